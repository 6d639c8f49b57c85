"""Routing benchmarks: ratios measured side by side in one run (print the figures the routing note reports).

    python bench/routing.py                   # all three parts
    python bench/routing.py --part speed      # routed forward vs merged base vs a naive per-expert loop
    python bench/routing.py --part hetero     # heterogeneous batch vs peft's mixed-batch inference
    python bench/routing.py --part quality    # routing / routed / oracle accuracy of every router

1. speed: token-gate (k=2) forward with E = 8 and 32 random rank-8 adapters on the attention
   projections, batch 16 x 128 tokens, on minilm and on a Llama-shaped model (SmolLM2-135M's layer
   geometry: d=576, 9 heads, 3 KV heads, FFN 1536; 6 layers, no LM head). Times relative to the base
   with one merged adapter (plain LoRA inference cost), to one unmerged LoRA, and to a naive loop over
   experts (Mixtral-style: each expert gathers its tokens, computes, scatters back), which lives here,
   not in the library. Variants are timed round-robin so machine load hits them alike.
2. hetero: 32 rows, each with its own adapter out of 32 (minilm), in one forward: our bank with
   one-hot (B, 1, E) gates (sparse gather dispatch) against `peft`'s mixed-batch inference
   (`model(..., adapter_names=[...])`), outputs checked equal.
3. quality: the routers over the six task adapters of the bench registry (LORAPLEX_BENCH_HOME; five
   sentiment domains and BBC topics, minilm): routing accuracy, routed accuracy and each adapter alone
   (oracle) per task. Learned routers are stored as `route-<method>` (reused when present).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import TASKS, adapter_name, bench_settings  # noqa: E402

# ---------------------------------------------------------------------------------------------
# helpers


def round_robin(fns: dict, *, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def random_adapters(model, targets, E: int, r: int = 8, seed: int = 0):
    import torch

    from loraplex.experts.layers import linear_dims
    from loraplex.experts.spec import Adapter, LoraSpec, matches_target

    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if linear_dims(m) and any(matches_target(n, t) for t in targets)]
    out = []
    for _ in range(E):
        w = {}
        for n in names:
            d_in, d_out = linear_dims(model.get_submodule(n))
            w[n] = (torch.randn(r, d_in, generator=g) / d_in**0.5, torch.randn(d_out, r, generator=g) * 0.01)
        out.append(Adapter(LoraSpec(r=r, alpha=2 * r), w))
    return out


def naive_loop_bank(bank):
    """The per-expert loop a MoE layer is often first written as (for comparison only)."""
    import torch

    class NaiveLoopBank(torch.nn.Module):
        def __init__(self, bank):
            super().__init__()
            self.bank = bank

        @property
        def A(self):
            return self.bank.A

        def forward(self, x, gates):
            return _naive(self.bank, x, gates)

    return NaiveLoopBank(bank)


def _naive(b, x, gates):
    """Each expert gathers the tokens routed to it, computes its LoRA on them, scatters them back."""
    import torch

    E, R = b.n_experts, b.rank
    xf = x.reshape(-1, b.d_in)  # (N, d_in)
    gf = gates.reshape(-1, E)  # (N, E)
    out = torch.zeros(xf.shape[0], b.d_out, dtype=x.dtype)
    A = b.A.view(E, R, b.d_in)
    Bm = b.B.view(b.d_out, E, R)
    for e in range(E):
        rows = (gf[:, e] != 0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        ye = (xf[rows] @ A[e].T) @ Bm[:, e].T * (b.scaling[e] * gf[rows, e: e + 1])
        out.index_add_(0, rows, ye)
    return out.view(*x.shape[:-1], b.d_out)


def llama_shaped():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                      num_hidden_layers=6, vocab_size=8192, max_position_embeddings=512)
    import torch

    torch.manual_seed(0)
    return LlamaModel(cfg).eval(), "llama"


# ---------------------------------------------------------------------------------------------
# 1. routed forward speed


def bench_speed(rounds: int) -> None:
    import torch

    from loraplex.experts.layers import inject, merge, routed_layers
    from loraplex.experts.spec import DEFAULT_TARGETS
    from loraplex.models import load_base
    from loraplex.router.base import ROUTERS
    from loraplex.settings import Settings

    s = Settings.load(device="cpu", dtype="float32")
    print(f"\n== 1. routed forward, token-gate k=2, batch 16 x 128 tokens, {torch.get_num_threads()} threads ==")
    print(f"{'model':8} {'E':>3} {'merged base':>12} {'1 LoRA':>8} {'routed':>8} {'naive loop':>11} "
          f"{'routed/base':>12} {'routed/1LoRA':>13} {'naive/routed':>13}")
    for model_name in ("minilm", "llama"):
        if model_name == "minilm":
            base = load_base("minilm", s).model
            mtype, vocab = "bert", base.config.vocab_size
        else:
            base, mtype = llama_shaped()
            vocab = base.config.vocab_size
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(5, vocab, (16, 128), generator=g)
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        targets = DEFAULT_TARGETS[mtype]
        for E in (8, 32):
            ads = random_adapters(base, targets, E)
            merged = copy.deepcopy(base)
            merge(merged, ads[0])
            single = copy.deepcopy(base)
            inject(single, ads[:1])
            routed = copy.deepcopy(base)
            inject(routed, ads)
            router = ROUTERS.build("token-gate", {"top_k": 2, "init_std": 1.0})
            router.attach(routed)
            routed.eval()
            naive = copy.deepcopy(routed)
            for layer in routed_layers(naive).values():
                layer.bank = naive_loop_bank(layer.bank)
            # the naive loop copy shares the gate modules' weights (deepcopy copied them): same routing
            fns = {k: (lambda m=m: m(**x)) for k, m in {"merged": merged, "single": single, "routed": routed}.items()}
            with torch.inference_mode():
                ref, got = routed(**x).last_hidden_state, naive(**x).last_hidden_state
                rel = float((ref - got).norm() / ref.norm())  # same routing and math: float noise only
                assert rel < 1e-3, f"the naive loop must compute the same thing (relative difference {rel:.1e})"
                t = round_robin(fns, rounds=rounds)
                # the naive loop is an order of magnitude slower: two rounds, each paired with a routed call
                pair = round_robin({"naive": lambda: naive(**x), "routed2": fns["routed"]},
                                   rounds=2, warmup=0)
                t["naive"] = pair["naive"] * t["routed"] / pair["routed2"]
            print(f"{model_name:8} {E:>3} {t['merged'] * 1e3:>10.0f}ms {t['single'] * 1e3:>6.0f}ms "
                  f"{t['routed'] * 1e3:>6.0f}ms {t['naive'] * 1e3:>9.0f}ms {t['routed'] / t['merged']:>11.2f}x "
                  f"{t['routed'] / t['single']:>12.2f}x {t['naive'] / t['routed']:>12.2f}x", flush=True)
            del merged, single, routed, naive


# ---------------------------------------------------------------------------------------------
# 2. heterogeneous batch


def bench_hetero(rounds: int, n: int = 32) -> None:
    import tempfile

    import torch
    from peft import PeftModel

    from loraplex.data import load_task
    from loraplex.experts.layers import inject, routed_layers, use_gates
    from loraplex.experts.peft_io import peft_config, write_peft_dir
    from loraplex.experts.spec import DEFAULT_TARGETS
    from loraplex.models import load_base
    from loraplex.settings import Settings

    s = Settings.load(device="cpu", dtype="float32")
    lb = load_base("minilm", s)
    base, tok = lb.model, lb.tokenizer
    ads = random_adapters(base, DEFAULT_TARGETS["bert"], n, seed=3)
    texts = [e.text for t in ("airline", "apple", "bbc", "coachella") for e in load_task(t).test[: n // 4]][:n]
    rows = list(range(n))  # row i uses adapter i
    print(f"\n== 2. heterogeneous batch: {n} rows, each with its own adapter out of {n} (minilm) ==")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i, a in enumerate(ads):
            cfg = peft_config(a, base_model_name_or_path="minilm", all_linear=lb.fingerprint.linear_names(),
                              fan_in_fan_out=False)
            dirs.append(write_peft_dir(a, Path(tmp) / f"a{i}", cfg))
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0")
        for i in range(1, n):
            pm.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
        pm.eval()
        ours = copy.deepcopy(base)
        inject(ours, ads)
        dense = copy.deepcopy(ours)
        for layer in routed_layers(dense).values():
            layer.bank.sparse = False
        gates = torch.zeros(n, 1, n)
        gates[torch.arange(n), 0, torch.tensor(rows)] = 1.0
        names = [f"a{i}" for i in rows]
        for label, T in (("tweets/articles, padded", None), ("128 tokens", 128)):
            if T is None:
                x = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            else:
                ids = torch.randint(5, base.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(2))
                x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def run_ours(m=ours):
                with use_gates(m, gates):
                    return m(**x).last_hidden_state

            fns = {"peft": lambda: pm(**x, adapter_names=names).last_hidden_state, "ours": run_ours,
                   "ours_dense": lambda: run_ours(dense), "base": lambda: base(**x).last_hidden_state}
            with torch.inference_mode():
                diff = float((fns["peft"]() - fns["ours"]()).abs().max())
                t = round_robin(fns, rounds=rounds)
            tp = {k: n / v for k, v in t.items()}
            over_peft, over_ours = t["peft"] - t["base"], t["ours"] - t["base"]
            over = f"{over_peft / over_ours:.1f}x" if over_ours > 0 else "n/a (ours within noise of the bare base)"
            print(f"{label:24} T={x['input_ids'].shape[1]:>3}: peft {tp['peft']:7.1f} rows/s, ours {tp['ours']:7.1f} "
                  f"rows/s (dense path {tp['ours_dense']:6.1f}; bare base {tp['base']:6.1f}) -> "
                  f"ours/peft {tp['ours'] / tp['peft']:.2f}x; adapter overhead (time over the bare base) "
                  f"peft/ours {over}; max |ours - peft| = {diff:.1e}", flush=True)


# ---------------------------------------------------------------------------------------------
# 3. quality


def wait_for_task_adapters(s, timeout: float = 3 * 3600) -> dict[str, str]:
    """The six `<task>-lora` adapters the lead pre-trains in the bench registry (waits; never trains them)."""
    from loraplex import api

    t0 = time.time()
    while True:
        reg = api.open_registry(s)
        missing = [t for t in TASKS if not reg.has_adapter(adapter_name(t))]
        if not missing:
            return {t: adapter_name(t) for t in TASKS}
        if time.time() - t0 > timeout:
            raise SystemExit(f"bench adapters still missing after {timeout:.0f}s: {missing}")
        print(f"waiting for bench adapters {missing} ...", flush=True)
        time.sleep(60)


def bench_quality(steps: int, eval_limit: int | None, lr: float) -> None:
    from loraplex import api
    from loraplex.data import load_task

    s = bench_settings()
    ads = wait_for_task_adapters(s)
    names = [ads[t] for t in TASKS]
    tasks = [load_task(t) for t in TASKS]
    print(f"\n== 3. quality over {len(names)} adapters (minilm), registry {s.home}, "
          f"test examples per task: {eval_limit or 'all'} ==", flush=True)
    reg = api.open_registry(s)
    for method in ("token-gate", "mixer", "rank", "retrieval"):
        name = f"route-{method}"
        if method == "retrieval":
            for w in (None, 1.0):  # the default prototype weight, and prototypes alone
                cfg = {"prototype_weight": w} if w is not None else None
                ev = api.load_routed_model("retrieval", names, config=cfg, settings=s).evaluate(tasks, limit=eval_limit)
                report_quality("retrieval" + (f" (prototype_weight={w})" if w is not None else " (defaults)"), ev)
            continue
        else:
            if not any(c.name == name for c in reg.list_components("router")):
                t0 = time.perf_counter()
                api.fit_router(name, router=method, adapters=names, settings=s, steps=steps, lr=lr, batch_size=16,
                               progress=False, eval_limit=50)
                print(f"fitted {name} in {time.perf_counter() - t0:.0f}s ({steps} steps)", flush=True)
            ev = api.evaluate_router(name, limit=eval_limit, settings=s)
        report_quality(method, ev)


def report_quality(method: str, ev: dict) -> None:
    print(f"\n-- {method}: routing accuracy {100 * ev['routing_accuracy']:.1f}%, routed accuracy "
          f"{100 * ev['accuracy']:.1f}% vs adapters alone {100 * ev['oracle_accuracy']:.1f}%")
    print(f"   {'task':12} {'n':>4} {'routing':>8} {'routed':>8} {'oracle':>8} {'routed-oracle':>14}")
    worst = 0.0
    for r in ev["tasks"]:
        gap = 100 * (r["accuracy"] - r["oracle_accuracy"])
        worst = min(worst, gap)
        print(f"   {r['task']:12} {r['n']:>4} {100 * r['routing_accuracy']:>7.1f}% {100 * r['accuracy']:>7.1f}% "
              f"{100 * r['oracle_accuracy']:>7.1f}% {gap:>+13.1f}")
    ok_route = ev["routing_accuracy"] >= 0.95
    ok_acc = worst >= -1.0
    print(f"   goals: routing >= 95%: {'met' if ok_route else 'missed'}; every task within 1 point of its "
          f"oracle: {'met' if ok_acc else f'missed (worst {worst:+.1f})'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("speed", "hetero", "quality", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    ap.add_argument("--steps", type=int, default=300, help="router training steps (quality)")
    ap.add_argument("--lr", type=float, default=1e-2, help="router learning rate (quality)")
    ap.add_argument("--eval-limit", type=int, default=300, help="test examples per task (quality; 0 = all)")
    a = ap.parse_args()
    if a.part in ("speed", "all"):
        bench_speed(a.rounds)
    if a.part in ("hetero", "all"):
        bench_hetero(a.rounds)
    if a.part in ("quality", "all"):
        bench_quality(a.steps, a.eval_limit or None, a.lr)


if __name__ == "__main__":
    main()
