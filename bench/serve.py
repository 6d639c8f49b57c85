"""Serving benchmark: `loraplex serve` against its peers, measured side by side in one run.

    python bench/serve.py                          # every part, sized for 2 CPU cores
    python bench/serve.py --part classify --requests 2000
    python bench/serve.py --part generate --gen-requests 64

Every part runs 32 concurrent clients in a closed loop (each sends its next request when the last one
is answered), client i always asking for its own adapter i out of 32:
1. generate: smollm2, /v1/completions, 32 new tokens (greedy), `--gen-requests` requests (64 by
   default: on 2 CPU cores one request takes about a second alone);
2. classify: minilm, /v1/classify, one text a request, `--requests` requests (2000 by default);
against (a) the same server with `--max-batch 1` (the same requests served one at a time) and (b)
PEFT with `set_adapter` per request in this process (a lock serialises the clients: what a user
writes without us). Throughput, p50 and p99 latency, failed requests; the figures are ratios of
systems measured in the same run.
3. auto: the cost of `model="auto"` (retrieval over every adapter) per request, one client at a time
   and with 32 clients; the time for a newly registered adapter to become servable
   (`/v1/load_lora_adapter`, then its first answer);
4. scale: 1,000 registered adapters and `--max-loras 32`, requests spread at random over all of
   them: a first pass (every adapter read from its blob once), then rounds alternating the 32-adapter
   case with the 1,000-adapter spread on the same server (adapters in host memory), whose ratio is
   the figure (`part_scale`).
5. slots (`--part slots`, a few seconds, not part of `all`): seconds per slot write (an adapter
   copied into a slot of the slot bank) module by module, as `LoraBank.set_expert` does (the slot
   bank's way before its banks were stacked), against `StackedBanks.write` of a pre-stacked host
   copy, in the same run, on banks of smollm2's and minilm's projection shapes (random weights; the
   base's weights take no part in a slot write).
The adapters are synthetic (random LoRA weights made with peft, rank 8 q/v on smollm2, rank 4
query/value on minilm), registered with descriptions of 32 topics and one two-label task: the
figures measure speed, not accuracy. Registries are kept in `.bench/serve` (made once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import REPO  # noqa: E402
from loraplex.experts.layers import StackedBanks, inject_new, routed_layers  # noqa: E402
from loraplex.experts.spec import Adapter, LoraSpec  # noqa: E402

HOME = Path(os.environ.get("LORAPLEX_BENCH_SERVE_HOME") or REPO / ".bench" / "serve")
TOPICS = ("flights", "football", "phones", "elections", "music festivals", "driverless cars", "stock markets",
          "cooking", "weather", "movies", "hiking", "banking", "gardening", "chess", "astronomy", "fashion",
          "medicine", "video games", "poetry", "cars", "coffee", "history", "painting", "sailing", "tennis",
          "law", "pets", "trains", "insurance", "photography", "baking", "robots")
CLIENTS = 32


# ---------------------------------------------------------------------------------------------
# registries of synthetic adapters


def task_file(root: Path) -> Path:
    p = root / "bench-task.jsonl"
    if not p.exists():
        root.mkdir(parents=True, exist_ok=True)
        rows = [{"text": f"{w} {t}", "label": lab} for t in TOPICS[:4] for w, lab in (("love", "good"), ("hate", "bad"))]
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (root / "bench-task.task.json").write_text(json.dumps(
            {"description": "is the message good or bad", "labels": ["good", "bad"]}))
    return p


def synthetic(base: str, n: int, root: Path, *, rank: int, targets: tuple[str, ...], causal: bool, prefix: str,
              log=print) -> list[str]:
    """Register `n` random PEFT adapters of `base` (once) in the registry at `root`; returns their names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    from loraplex import api
    from loraplex.models import resolve_base
    from loraplex.settings import Settings

    s = Settings.load(home=root / "home")
    reg = api.open_registry(s)
    names = [f"{prefix}-{i:04d}" for i in range(n)]
    todo = [i for i, nm in enumerate(names) if not reg.has_adapter(nm)]
    if not todo:
        return names
    t0 = time.perf_counter()
    path = str(resolve_base(base).path(s))
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                          init_lora_weights=False))
    task = task_file(root)
    for i in todo:
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        d = root / "peft" / names[i]
        pm.save_pretrained(str(d))
        api.register(d, name=names[i], description=f"messages about {TOPICS[i % len(TOPICS)]} (variant {i})",
                     task=str(task), base=base, settings=s)
    log(f"registered {len(todo)} synthetic {base} adapters in {time.perf_counter() - t0:.0f}s")
    return names


# ---------------------------------------------------------------------------------------------
# servers and clients


class Server:
    """`loraplex serve` as a child process on a free loopback port."""

    def __init__(self, home: Path, base: str, sets: tuple[str, ...] = (), **flags):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "loraplex", "serve", "--base", base, "--home", str(home), "--port", str(self.port)]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        for kv in sets:  # options of `auto` (--set KEY=VALUE)
            args += ["--set", kv]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 10 minutes")
            time.sleep(0.5)

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith(name) and ln[len(name)] in " {")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def closed_loop(send: Callable[[int, int], bool], n: int, clients: int = CLIENTS) -> dict:
    """`n` requests from `clients` threads, each sending its next request when the last is answered.
    `send(client, k)` returns whether request k succeeded; a sender's `prepare(client)` (an HTTP client
    and its open connection) runs in each thread before the clock starts, as a load generator's
    connections are open before it measures."""
    lat: list[float] = []
    failed = [0]
    left = [n]
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    prepare = getattr(send, "prepare", None)

    def client(c: int) -> None:
        if prepare is not None:
            prepare(c)
        ready.wait()
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
                k = n - left[0] - 1
            t0 = time.perf_counter()
            try:
                ok = send(c, k)
            except Exception:
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                failed[0] += 0 if ok else 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"n": n, "wall": wall, "rps": n / wall, "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "failed": failed[0]}


def http_sender(url: str, path: str, body: Callable[[int, int], dict]) -> Callable[[int, int], bool]:
    """POSTs of client c on its own keep-alive connection, kept across closed loops (`prepare` opens it)."""
    import httpx

    conns: dict[int, httpx.Client] = {}

    def prepare(c: int) -> None:
        if c not in conns:
            conns[c] = httpx.Client(base_url=url, timeout=600)
            conns[c].get("/health")  # the connection is open before the clock starts

    def send(c: int, k: int) -> bool:
        prepare(c)
        return conns[c].post(path, json=body(c, k)).status_code == 200

    send.prepare = prepare  # type: ignore[attr-defined]
    return send


def prompt(c: int, k: int) -> str:
    return f"Tell me something about {TOPICS[c % len(TOPICS)]}, number {k}:"


# ---------------------------------------------------------------------------------------------
# PEFT with set_adapter per request (the baseline a user writes without us)


def peft_sender(base: str, dirs: list[Path], names: list[str], *, causal: bool, max_new: int = 32):
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from loraplex.models import resolve_base
    from loraplex.settings import Settings

    path = str(resolve_base(base).path(Settings.load()))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path).eval()
    pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for d, nm in zip(dirs[1:], names[1:]):
        pm.load_adapter(str(d), adapter_name=nm)
    pm.eval()
    lock = threading.Lock()
    anchors = None
    if not causal:
        with torch.no_grad(), pm.disable_adapter():
            anchors = _embed(pm, tok, ["good", "bad"])

    def send(c: int, k: int) -> bool:
        with lock, torch.no_grad():
            pm.set_adapter(names[c % len(names)])
            if causal:
                ids = tok(prompt(c, k), return_tensors="pt")
                pm.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=max_new,
                            do_sample=False, pad_token_id=tok.pad_token_id)
            else:
                int((_embed(pm, tok, [prompt(c, k)]) @ anchors.T).argmax())
        return True

    return send


def _embed(model, tok, texts):
    import torch.nn.functional as F

    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


# ---------------------------------------------------------------------------------------------
# the parts


def row(name: str, r: dict, ref: dict | None = None) -> str:
    x = f"  {name:<34} {r['rps']:8.2f} req/s  p50 {r['p50'] * 1000:8.1f} ms  p99 {r['p99'] * 1000:8.1f} ms  " \
        f"p99/p50 {r['p99'] / r['p50']:5.2f}  failed {r['failed']}/{r['n']}"
    return x + (f"   loraplex = {ref['rps'] / r['rps']:.2f}x its throughput" if ref else "")


def compare(label: str, root: Path, base: str, names: list[str], n: int, path: str, body, *, causal: bool,
            warm: int, log=print) -> dict:
    log(f"\n{label}: {CLIENTS} clients, each with its own adapter out of {len(names)}, {n} requests per system")
    home = root / "home"
    with Server(home, base, max_loras=32, max_batch=32) as srv:
        send = http_sender(srv.url, path, body)
        closed_loop(send, warm)
        ours = closed_loop(send, n)
        batches = srv.metric("loraplex_batch_size_sum") / max(srv.metric("loraplex_batch_size_count"), 1)
    log(row("loraplex serve (batched)", ours) + f"   mean batch {batches:.1f}")
    with Server(home, base, max_loras=32, max_batch=1) as srv:
        send = http_sender(srv.url, path, body)
        closed_loop(send, min(warm, 4))
        one = closed_loop(send, n)
    log(row("(a) same server, one at a time", one, ours))
    dirs = [root / "peft" / nm for nm in names]
    peft = peft_sender(base, dirs, names, causal=causal)
    closed_loop(peft, 4)
    p = closed_loop(peft, n)
    log(row("(b) PEFT set_adapter per request", p, ours))
    return ours


def part_generate(args, log=print) -> None:
    root = HOME / "gen"
    names = synthetic("smollm2", 32, root, rank=8, targets=("q_proj", "v_proj"), causal=True, prefix="gen", log=log)
    body = lambda c, k: {"model": names[c], "prompt": prompt(c, k), "max_tokens": 32, "temperature": 0}  # noqa: E731
    compare("generate (smollm2, 32 new tokens)", root, "smollm2", names, args.gen_requests,
            "/v1/completions", body, causal=True, warm=CLIENTS, log=log)


def _cls_body(names):
    return lambda c, k: {"model": names[c % len(names)], "input": prompt(c, k)}


def part_classify(args, log=print) -> dict:
    root = HOME / "cls"
    names = synthetic("minilm", 32, root, rank=4, targets=("query", "value"), causal=False, prefix="cls", log=log)
    return compare("classify (minilm)", root, "minilm", names, args.requests, "/v1/classify",
                   _cls_body(names), causal=False, warm=64, log=log)


def part_auto(args, log=print) -> None:
    import httpx

    root = HOME / "cls"
    names = synthetic("minilm", 32, root, rank=4, targets=("query", "value"), causal=False, prefix="cls", log=log)
    log(f"\nauto (minilm, retrieval over all {len(names)} adapters) against naming the adapter; route threshold 0, so "
        f"every request routes: the synthetic descriptions are no calibrated world (their prompts score ~0.28, below "
        f"the library-fitted 0.35, and would all go to the base), and this part measures the decision's cost")
    with Server(root / "home", "minilm", max_loras=32, sets=("route_threshold=0", "generate_threshold=0")) as srv:
        named, auto = http_sender(srv.url, "/v1/classify", _cls_body(names)), http_sender(
            srv.url, "/v1/classify", lambda c, k: {"model": "auto", "input": prompt(c, k)})
        for clients, n in ((1, 100), (CLIENTS, min(args.requests, 640))):
            closed_loop(named, 8, clients)
            closed_loop(auto, 8, clients)
            a, b = closed_loop(named, n, clients), closed_loop(auto, n, clients)
            log(row(f"named adapter, {clients} client(s)", a))
            log(row(f"auto, {clients} client(s)", b) + f"   auto adds {1000 * (b['p50'] - a['p50']):.1f} ms p50")
        d = root / "peft" / names[0]
        with httpx.Client(base_url=srv.url, timeout=600) as h:
            h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh-lora"})
            t0 = time.perf_counter()
            r1 = h.post("/v1/load_lora_adapter", json={"lora_name": "fresh-lora", "lora_path": str(d),
                                                      "description": "messages about lighthouses", "task": str(task_file(root))})
            t1 = time.perf_counter()
            r2 = h.post("/v1/classify", json={"model": "fresh-lora", "input": "a lighthouse"})
            r3 = h.post("/v1/classify", json={"model": "auto", "input": "lighthouses on the coast"})
            t2 = time.perf_counter()
            h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh-lora"})
        routed = r3.json()["routing"]["inputs"][0]["adapters"][0]["name"] if r3.status_code == 200 else None
        log(f"  a new adapter: registered in {t1 - t0:.2f}s (/v1/load_lora_adapter), first answers "
            f"{t2 - t1:.2f}s later (status {r1.status_code}, {r2.status_code}); auto routes 'lighthouses' to {routed}")


def part_scale(args, ref: dict | None, log=print, rounds: int = 3) -> None:
    """1,000 adapters, --max-loras 32: a first pass spread over all of them (every adapter read from its
    blob), then `rounds` rounds alternating, on the same server, the 32-adapter case (client i asking for
    adapter i of the first 32) with requests spread at random over all 1,000 (adapters in host memory,
    paged into the 32 slots). The ratio is of those interleaved rounds: one process, one load, so what it
    measures is the number of adapters, not the machine's mood between two servers."""
    import numpy as np

    root = HOME / "scale"
    names = synthetic("minilm", 1000, root, rank=4, targets=("query", "value"), causal=False, prefix="s", log=log)
    rng = np.random.default_rng(0)
    n = max(CLIENTS, args.requests // 2)
    pick = rng.integers(0, len(names), size=(rounds + 1, max(n, args.requests)))
    log(f"\nscale (minilm): {len(names)} adapters, --max-loras 32; {rounds} rounds of {n} requests alternating the "
        "32-adapter case (client i -> adapter i) with requests spread at random over all of them, on one server")
    with Server(root / "home", "minilm", max_loras=32, max_batch=32, host_loras=1024) as srv:
        send = http_sender(srv.url, "/v1/classify",
                           lambda c, k: {"model": names[int(pick[0, k])], "input": prompt(c, k)})
        r = closed_loop(send, args.requests)
        log(row("first touch (blob reads)", r) + f"   blob reads {srv.metric('loraplex_adapter_blob_reads_total'):.0f}"
            + (f"; {r['rps'] / ref['rps']:.2f}x part 2's server" if ref else ""))
        ratios = []
        for k in range(rounds):
            few = closed_loop(http_sender(srv.url, "/v1/classify",
                                          lambda c, j: {"model": names[c], "input": prompt(c, j)}), n)
            reads = srv.metric("loraplex_adapter_blob_reads_total")
            ev = srv.metric("loraplex_adapter_cache_evictions_total")
            many = closed_loop(http_sender(srv.url, "/v1/classify",
                                           lambda c, j, k=k: {"model": names[int(pick[k + 1, j])],
                                                              "input": prompt(c, j)}), n)
            ratios.append(many["rps"] / few["rps"])
            log(row(f"round {k + 1}: 32 adapters", few))
            log(row(f"round {k + 1}: all {len(names)}", many) + f"   {ratios[-1]:.2f}x the 32-adapter case; blob reads "
                f"+{srv.metric('loraplex_adapter_blob_reads_total') - reads:.0f}, evictions "
                f"+{srv.metric('loraplex_adapter_cache_evictions_total') - ev:.0f}")
        log(f"  1,000 adapters against 32: {statistics.median(ratios):.2f}x throughput (median of {rounds} rounds; "
            f"{', '.join(f'{x:.2f}' for x in ratios)})")


SLOT_SHAPES = {  # model: (layers, {projection: (d_in, d_out)}, rank): the adapters of parts 1 and 2
    "smollm2": (30, {"q_proj": (576, 576), "v_proj": (576, 192)}, 8),
    "minilm": (6, {"query": (384, 384), "value": (384, 384)}, 4),
}


def part_slots(args, log=print, writes: int = 400) -> None:
    log(f"\nslot writes: seconds per adapter copied into a slot of a {CLIENTS}-slot bank (mean of {writes}), CPU")
    for model_name, (n_layers, projs, rank) in SLOT_SHAPES.items():
        def model():
            layers = nn.ModuleList(nn.Module() for _ in range(n_layers))
            for layer in layers:
                for p, (d_in, d_out) in projs.items():
                    setattr(layer, p, nn.Linear(d_in, d_out, bias=False))
            m = nn.Module()
            m.layers = layers
            return m

        names = [f"layers.{i}.{p}" for i in range(n_layers) for p in projs]
        gen = torch.Generator().manual_seed(0)
        ads = [Adapter(LoraSpec(r=rank, alpha=2 * rank, target_modules=tuple(projs)),
                       {n: (torch.randn(rank, projs[n.rsplit(".", 1)[1]][0], generator=gen),
                            torch.randn(projs[n.rsplit(".", 1)[1]][1], rank, generator=gen)) for n in names})
               for _ in range(8)]
        before = model()
        inject_new(before, LoraSpec(r=rank), names, n_experts=CLIENTS)
        layers = routed_layers(before)
        t0 = time.perf_counter()
        for k in range(writes):
            ad = ads[k % len(ads)]
            for name, layer in layers.items():
                A, B = ad.weights[name]
                layer.bank.set_expert(k % CLIENTS, A.float(), B.float(), ad.scaling(name))
        t_before = (time.perf_counter() - t0) / writes
        after = model()
        inject_new(after, LoraSpec(r=rank), names, n_experts=CLIENTS)
        banks = StackedBanks(after)
        t0 = time.perf_counter()
        packed = [banks.pack(ad) for ad in ads]
        t_pack = (time.perf_counter() - t0) / len(ads)
        t0 = time.perf_counter()
        for k in range(writes):
            banks.write(k % CLIENTS, packed[k % len(ads)])
        t_after = (time.perf_counter() - t0) / writes
        same = all(torch.equal(a.bank.A, b.bank.A) and torch.equal(a.bank.B, b.bank.B)
                   for a, b in zip(layers.values(), routed_layers(after).values()))
        log(f"  {model_name:8s} {len(names):3d} projections, rank {rank}: module by module {t_before * 1e3:7.3f} ms, "
            f"stacked {t_after * 1e3:7.3f} ms ({t_before / t_after:.1f}x; packing once per host read "
            f"{t_pack * 1e3:.3f} ms); same banks after: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "generate", "classify", "auto", "scale", "slots"], default="all")
    ap.add_argument("--requests", type=int, default=2000, help="classify requests per system")
    ap.add_argument("--gen-requests", type=int, default=64, help="generation requests per system")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    log = print
    log(f"bench/serve.py on {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {os.getloadavg()[0]:.1f} at start")
    ref = None
    if args.part in ("all", "generate"):
        part_generate(args, log)
    if args.part in ("all", "classify"):
        ref = part_classify(args, log)
    if args.part in ("all", "auto"):
        part_auto(args, log)
    if args.part in ("all", "scale"):
        part_scale(args, ref, log)
    if args.part == "slots":
        part_slots(args, log)
    log(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
