"""Routing benchmarks: ratios measured side by side in one run (print the figures the routing note reports).

    python bench/routing.py                   # all three parts
    python bench/routing.py --part speed      # routed forward vs merged base vs a naive per-expert loop
    python bench/routing.py --part hetero     # heterogeneous batch vs peft's mixed-batch inference
    python bench/routing.py --part quality    # routing / routed / oracle accuracy of every router

1. speed: token-gate (k=2) forward with E = 8, 32, 128 and 512 random rank-8 adapters on the default
   target projections, batch 16 x 128 tokens, on minilm and on a Llama-shaped model (SmolLM2-135M's layer
   geometry: d=576, 9 heads, 3 KV heads, FFN 1536; 6 layers, no LM head). Each (model, E) runs in a
   child process of its own (its peak RSS is reported; one process for the whole sweep grew past 24 GB
   with every configuration's models and freed heap in it). `--gate shared` gives one gate per layer
   input, `--gate block` one per transformer block, `--gate-rank r` factorises the gate (router/token_gate.py). Times relative to the base
   with one merged adapter (plain LoRA inference cost); the same adapter unmerged (`unmerged/base`: what
   a multi-LoRA server pays for one named adapter, the floor of any forward whose adapters are not
   folded into the weights) and a naive loop over
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

        def forward(self, x, gates, into=None, **kw):
            delta = _naive(self.bank, x, gates)
            return delta if into is None else into + delta.reshape(into.shape)  # into: the base's 2-D product

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


def random_banks(model, E: int, r: int = 8, seed: int = 0) -> None:
    """Replace every routed layer's bank by one of E random rank-r adapters (fast for E in the hundreds)."""
    import torch

    from loraplex.experts.bank import LoraBank
    from loraplex.experts.layers import routed_layers

    g = torch.Generator().manual_seed(seed)
    for layer in routed_layers(model).values():
        b0 = layer.bank
        bank = LoraBank(b0.d_in, b0.d_out, E, r)
        with torch.no_grad():
            bank.A.copy_(torch.randn(E * r, b0.d_in, generator=g) / b0.d_in**0.5)
            bank.B.copy_(torch.randn(b0.d_out, E * r, generator=g) * 0.01)
            bank.rank_mask.fill_(1.0)
            bank.scaling.fill_(2.0)
        layer.bank = bank


def set_dispatch(model, dispatch: str, kernel: str = "auto") -> None:
    """Every bank's dispatch ("auto" | "dense" | "sparse") and token-dispatch kernel ("auto" | "csr" | "grouped")."""
    from loraplex.experts.layers import routed_layers

    for layer in routed_layers(model).values():
        bank = getattr(layer.bank, "bank", layer.bank)
        bank.dispatch = dispatch
        bank.kernel = kernel


class SavedBytes:
    """Bytes of the distinct tensors autograd saves for backward during a forward (the activation memory).

    `models`: storages they hold anyway are not counted when saved: their parameters and the banks'
    kept copies of frozen B (E, R, d_out) and of q, k and v's A joined (E, 3R, d_in) (LoraBank._b_rows,
    _a_rows), which a forward saves by reference."""

    def __init__(self, *models):
        self.held = set()
        for m in models:
            self.held.update(p.untyped_storage().data_ptr() for p in m.parameters())
            self.held.update(mod.__dict__[kept][1].untyped_storage().data_ptr()
                             for mod in m.modules() for kept in ("_b_kept", "_a_kept") if kept in mod.__dict__)

    def __enter__(self):
        import torch

        self.seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in self.held:
                self.seen[st.data_ptr()] = st.nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / 2**20


def bench_speed(rounds: int, experts=(8, 32, 128, 512), models=("minilm", "llama"), naive_max: int = 8,
                shared: bool | str = False, header: bool = True, gate_rank: int | None = None) -> dict:
    """Token-gate k=2 routed forward against the base with one merged adapter, for each E: the token-sparse
    dispatch (auto: on CPU its csr kernel), the token dispatch forced with its grouped kernel (sorted blocks, what
    auto takes when the adapters train, and off CPU), the dense bank and the per-expert loop, forward-only
    and forward+backward (router training: gates and the input embeddings take gradients, the adapters are
    frozen), with the activation memory autograd keeps for backward."""
    import torch

    from loraplex.experts.layers import inject, merge, routed_layers
    from loraplex.experts.spec import DEFAULT_TARGETS
    from loraplex.models import load_base
    from loraplex.router.base import ROUTERS
    from loraplex.settings import Settings

    from loraplex.allocator import keep_heap

    s = Settings.load(device="cpu", dtype="float32")
    heap = "heap kept (loraplex/allocator.py)" if keep_heap() else "system allocator"
    gate = gate_words(shared, gate_rank)
    if header:
        speed_header(gate, heap, torch.get_num_threads())
    summary = {}
    for model_name in models:
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
        one = random_adapters(base, targets, 1)
        merged = copy.deepcopy(base)
        merge(merged, one[0])
        unmerged = copy.deepcopy(base)  # the same adapter applied unmerged, as multi-LoRA servers do: the floor
        inject(unmerged, one)  # of any forward that cannot fold its adapters into the weights
        unmerged.eval()
        for m in (merged, unmerged):  # as in the routed model: the base frozen, only the input takes gradients
            for p in m.parameters():
                p.requires_grad_(False)
            m.get_input_embeddings().weight.requires_grad_(True)
        for E in experts:
            routed = copy.deepcopy(base)
            inject(routed, one)
            random_banks(routed, E)
            for p in (q for layer in routed_layers(routed).values() for q in layer.bank.parameters()):
                p.requires_grad_(False)  # router training: adapters frozen
            routed.get_input_embeddings().weight.requires_grad_(True)
            torch.manual_seed(E)  # the gate's initialisation: the same table from run to run
            router = ROUTERS.build("token-gate", {"top_k": 2, "init_std": 1.0, "shared": shared, "gate_rank": gate_rank})
            router.attach(routed)
            routed.eval()
            share = gate_share(routed, merged)
            banks = {n: layer.bank for n, layer in routed_layers(routed).items()}
            loops = {n: naive_loop_bank(b) for n, b in banks.items()}

            def run(m, variant, backward):
                if m is routed:
                    for n, layer in routed_layers(routed).items():
                        layer.bank = loops[n] if variant == "naive" else banks[n]
                    if variant != "naive":  # grouped: that kernel forced (auto would take the dense bank below E=16k)
                        set_dispatch(routed, {"dense": "dense", "grouped": "sparse"}.get(variant, "auto"),
                                     "grouped" if variant == "grouped" else "auto")
                if backward:
                    m.zero_grad(set_to_none=True)
                    m(**x).last_hidden_state.pow(2).mean().backward()
                else:
                    with torch.inference_mode():
                        m(**x)

            variants = {"base": merged, "unmerged": unmerged, "sparse": routed, "grouped": routed, "dense": routed}
            if E <= naive_max:
                variants["naive"] = routed
            agree(routed, x)
            for backward in (False, True):
                fns = {k: (lambda m=m, k=k: run(m, k, backward)) for k, m in variants.items()}
                t = round_robin(fns, rounds=rounds)
                mem = {}
                for k in ("base", "sparse", "grouped", "dense"):
                    if k != "base":
                        run(routed, k, False)  # set the variant (and keep the banks' copies of B)
                    with SavedBytes(variants[k]) as sb:
                        variants[k](**x).last_hidden_state.sum()
                    mem[k] = sb.mib
                tb = t["base"]
                naive = f"{t['naive'] * 1e3:>5.0f}ms" if "naive" in t else f"{'-':>7}"
                naive_r = f"{t['naive'] / tb:>9.2f}x" if "naive" in t else f"{'-':>10}"
                label = "fwd+bwd" if backward else "fwd"
                print(f"{model_name:7} {E:>4} {label:>8} {tb * 1e3:>5.0f}ms {t['sparse'] * 1e3:>5.0f}ms "
                      f"{t['grouped'] * 1e3:>5.0f}ms {t['dense'] * 1e3:>5.0f}ms {naive} {t['unmerged'] / tb:>13.2f}x "
                      f"{t['sparse'] / tb:>10.2f}x {t['grouped'] / tb:>11.2f}x {t['dense'] / tb:>9.2f}x {naive_r} "
                      f"{mem['base']:>8.0f} {mem['sparse']:>10.0f} {mem['grouped']:>11.0f} {mem['dense']:>9.0f}",
                      flush=True)
                summary[(model_name, E, label)] = t["sparse"] / tb, t["sparse"], share
            set_dispatch(routed, "auto")
            del routed, banks, loops
    return summary


def gate_share(routed, base) -> float:
    """The gates' multiply-adds per token as a share of the base's linear layers': a linear gate (full, or
    factorised, or its product where that is cheaper) does one multiply-add per weight per evaluation, and each gate module is evaluated once per
    token (per projection, per layer input or per block as it is shared). A full gate's share grows with E
    (d x E per evaluation: at E=512 more than a 384 x 384 projection), which no dispatch removes."""
    import torch

    from loraplex.experts.layers import routed_layers

    gates = {id(layer.router): layer.router for layer in routed_layers(routed).values() if layer.router is not None}
    # a factorised gate past its break-even rank is applied as its (E, d_in) product (TokenGate.collapses)
    gate = sum(g.gate_matrix().numel() if getattr(g, "collapses", lambda: False)() else sum(p.numel() for p in g.parameters())
               for g in gates.values())
    lin = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    return gate / lin


def agree(routed, x) -> None:
    """The sparse and dense dispatch give the same hidden states, checked in float64 on a copy of the model.

    Not in float32: there the two paths differ by rounding (about 1e-4 in the gate logits by the last
    block at E=512, logits up to about 100), enough to flip a token's second choice where its second and
    third logits are closer than that (the closest of 2,048 tokens' were 6e-5 to 3e-3 apart in one-off
    runs, changing with the gate's initialisation): one flipped choice moved the whole output by a relative
    2e-4 in one run. In float64 the rounding is about 1e-13 and no choice flips; the float32 values are
    compared by tests/experts/test_token_dispatch.py at fixed gates. The model is converted in place and
    back (float32 -> float64 -> float32 is exact): a deep copy would lose the block gates' hooks.

    Llama's RMSNorm computes in float32 whatever its input (transformers' LlamaRMSNorm casts to float32 and
    back), so in a float64 model it rounds the residual stream to float32 at every block: a 1e-15
    difference between the paths then became a float32 rounding step (1e-7) wherever it crossed one, and
    grew to 4e-9 at the output (Llama-shaped, E=32, gate_rank 64, with no routing choice different). The
    norms are computed in float64 here (`_norms_in_input_dtype`)."""
    import torch

    routed.double()
    undo = _norms_in_input_dtype(routed)
    try:
        with torch.inference_mode():
            set_dispatch(routed, "dense")
            ref = routed(**x).last_hidden_state
            rel = {}
            for kernel in ("csr", "grouped"):  # each kernel forced (auto takes the dense bank below its break-even)
                set_dispatch(routed, "sparse", kernel)
                rel[kernel] = float((routed(**x).last_hidden_state - ref).norm() / ref.norm())
    finally:
        undo()
        routed.float()
        set_dispatch(routed, "auto")
    for kernel, r in rel.items():
        assert r < 1e-10, f"the sparse dispatch's {kernel} kernel and the dense one must agree (relative difference {r:.1e} in float64)"


def _norms_in_input_dtype(model):
    """Make RMSNorm modules that compute in float32 (LlamaRMSNorm: `variance_epsilon`, a weight, a float32
    upcast) compute in their input's dtype; returns the function that puts them back."""
    import torch

    def exact(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]
    for m in norms:
        m.forward = exact.__get__(m)

    def undo():
        for m in norms:
            del m.forward

    return undo


GATES = {"per-projection": False, "shared": True, "block": "block"}  # --gate -> token-gate's `shared`


def gate_words(shared: bool | str, gate_rank: int | None) -> str:
    gate = {False: "a gate per projection", True: "one gate per layer input (shared)",
            "block": "one gate per transformer block (block)"}[shared]
    return gate + (f", factorised at rank {gate_rank}" if gate_rank else ", full rank")


def speed_header(gate: str, heap: str, threads: int) -> None:
    print(f"\n== 1. routed forward, token-gate k=2, {gate}, batch 16 x 128 tokens, {threads} threads, {heap}; "
          f"ratios against the base with one merged adapter; mem = MiB of activations saved for backward (parameters not counted); each (model, E) in "
          f"its own process, peak RSS = that process's high-water mark ==")
    print(f"{'model':7} {'E':>4} {'pass':>8} {'base':>7} {'sparse':>7} {'grouped':>7} {'dense':>7} {'naive':>7} "
          f"{'unmerged/base':>14} {'sparse/base':>11} {'grouped/base':>12} {'dense/base':>10} {'naive/base':>10} "
          f"{'mem base':>8} {'mem sparse':>10} {'mem grouped':>11} {'mem dense':>9}")


def bench_speed_isolated(rounds: int, experts, models, shared: bool | str, gate_rank: int | None = None) -> None:
    """Each (model, E) configuration in a fresh child process (this script with --child), so one
    configuration's banks and freed heap never weigh on the next and each row's peak RSS is its own;
    the goals are read from the children's summaries."""
    import json
    import subprocess

    import torch

    from loraplex.allocator import keep_heap

    heap = "heap kept (loraplex/allocator.py)" if keep_heap() else "system allocator"
    speed_header(gate_words(shared, gate_rank), heap, torch.get_num_threads())
    summary = {}
    for model_name in models:
        for E in experts:
            cmd = [sys.executable, __file__, "--part", "speed", "--child", "--rounds", str(rounds), "--models", model_name,
                   "--experts", str(E), "--gate", next(k for k, v in GATES.items() if v == shared)]
            cmd += ["--gate-rank", str(gate_rank)] if gate_rank else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                if line.startswith("SUMMARY "):
                    got = json.loads(line[len("SUMMARY "):])
                    summary.update({(m, int(e), lab): tuple(v) for m, e, lab, v in got["rows"]})
                    print(f"{model_name:7} {E:>4} peak RSS {got['peak_rss_mib']:,.0f} MiB", flush=True)
                else:
                    print(line, flush=True)
            if proc.returncode != 0:
                print(f"{model_name:7} {E:>4} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
    print_speed_goals(summary, experts, models)


def print_speed_goals(summary: dict, experts, models) -> None:
    for model_name in models:
        for label in ("fwd", "fwd+bwd"):
            r = {E: summary[(model_name, E, label)] for E in experts if (model_name, E, label) in summary}
            parts = []
            if 32 in r:
                parts.append(f"E=32 {r[32][0]:.2f}x base (goal <= 1.15: {'met' if r[32][0] <= 1.15 else 'missed'})")
            if 512 in r:
                parts.append(f"E=512 {r[512][0]:.2f}x base (goal <= 1.3: {'met' if r[512][0] <= 1.3 else 'missed'})")
                if 8 in r:
                    q = r[512][1] / r[8][1]
                    parts.append(f"time E=512 / E=8 {q:.2f} (goal <= 1.2: {'met' if q <= 1.2 else 'missed'})")
            shares = [f"{E}: {v[2]:.1%}" for E, v in sorted(r.items()) if len(v) > 2]
            if shares and label == "fwd":
                parts.append("the gates' multiply-adds per token against the base's linear layers' at E=" + ", ".join(shares))
            print(f"goals {model_name} {label}: " + "; ".join(parts))


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
    ap.add_argument("--experts", default="8,32,128,512", help="adapter counts E (speed)")
    ap.add_argument("--models", default="minilm,llama", help="models (speed)")
    ap.add_argument("--gate", choices=tuple(GATES), default="per-projection",
                    help="token-gate per projection, one gate per layer input (MeteoRA's accelerated form) or one per "
                         "transformer block (loraplex's option) (speed)")
    ap.add_argument("--steps", type=int, default=300, help="router training steps (quality)")
    ap.add_argument("--lr", type=float, default=1e-2, help="router learning rate (quality)")
    ap.add_argument("--eval-limit", type=int, default=300, help="test examples per task (quality; 0 = all)")
    ap.add_argument("--gate-rank", type=int, default=None, help="factorise the token gate at this rank (speed)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one (model, E) of the speed part
    a = ap.parse_args()
    experts, models = tuple(int(e) for e in a.experts.split(",")), tuple(a.models.split(","))
    if a.child:
        import json
        import resource

        summary = bench_speed(a.rounds, experts, models, shared=GATES[a.gate], header=False, gate_rank=a.gate_rank)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print("SUMMARY " + json.dumps({"rows": [[m, e, lab, list(v)] for (m, e, lab), v in summary.items()],
                                       "peak_rss_mib": peak}), flush=True)
        return
    if a.part in ("speed", "all"):
        bench_speed_isolated(a.rounds, experts, models, shared=GATES[a.gate], gate_rank=a.gate_rank)
    if a.part in ("hetero", "all"):
        bench_hetero(a.rounds)
    if a.part in ("quality", "all"):
        bench_quality(a.steps, a.eval_limit or None, a.lr)


if __name__ == "__main__":
    main()
