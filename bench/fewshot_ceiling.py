"""How far can a one-pass, label-aware few-shot adapter go on the task library? (issue 12's budget)

Issue 12 asks a generator for >= 70% of the oracle's gain at >= 100x less time than training one
library adapter (26.7 s, so 0.27 s: about one forward over the 16 examples). Gradients on the labels
cost a training step each (refinement, generators/refine.py: 70.9% with 40 steps, ~1.6x faster than
training), so an answer inside the budget has to come from one forward pass. This bench measures the
best a one-pass use of the labels can do on the encoder head, without training anything:

    p_c     = mean embedding of the 16 examples labelled c (the same 16 the leave-one-out bench uses:
              generators.icm_lora.task_examples(task, 16, seed=1))
    score_c = cos(e(x), normalise(a_c + lam * p_c))          a_c: the label anchor of c (bare base)

A rank-L linear map W on the pooled embedding with W^T a_c = lam p_c gives e'(x) . a_c = e(x) . a_c
+ lam e(x) . p_c, i.e. the same scores up to the norms: the class-prototype shift is what a closed-form
adapter acting after pooling can express at best (one forward over the examples, a small solve). The
`cen` rows subtract the prototypes' mean first (only what separates the classes). The oracle and base
accuracies are bench/results/library.json's (bench/library.py, the same 150 test rows). No registry
is needed: the bare base and the tasks are enough.

    python bench/fewshot_ceiling.py            # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO  # noqa: E402  (also sets the offline environment)

LAMBDAS = (0.5, 1.0, 2.0, 1000.0)


def task_scores(head, model, tokenizer, name: str, limit: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from loraplex.data import load_task
    from loraplex.generators.icm_lora import task_examples

    task = load_task(name)
    test = list(task.test)[:limit]
    emb = F.normalize(head.encode(model, tokenizer, [e.text for e in test]), dim=-1)
    y = torch.tensor([task.labels.index(e.label) for e in test])
    anchors = F.normalize(head.anchors(model, tokenizer, task), dim=-1)
    ex = task_examples(name, 16, seed=1)
    xe = F.normalize(head.encode(model, tokenizer, [t for t, _ in ex]), dim=-1)
    protos = torch.stack([xe[[i for i, (_, lab) in enumerate(ex) if lab == c]].mean(0)
                          if any(lab == c for _, lab in ex) else torch.zeros(xe.shape[1]) for c in task.labels])
    out = {"base (re-measured)": (emb @ anchors.T).argmax(-1).eq(y).float().mean().item()}
    for lam in LAMBDAS:
        for tag, p in (("raw", protos), ("cen", protos - protos.mean(0, keepdim=True))):
            cls = F.normalize(anchors + lam * p, dim=-1)
            out[f"{tag} lam={lam:g}"] = (emb @ cls.T).argmax(-1).eq(y).float().mean().item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=150, help="test rows per task (bench/library.py's --eval-limit)")
    ap.add_argument("--min-gain", type=float, default=0.05, help="tasks counted: the oracle gains at least this much")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fewshot-ceiling.txt")
    args = ap.parse_args(argv)

    import torch

    from loraplex.heads import head_for
    from loraplex.models import load_base

    t0 = time.perf_counter()
    library = json.loads((REPO / "bench" / "results" / "library.json").read_text())
    base = load_base("minilm")
    head = head_for(base)
    rows = {}
    with torch.no_grad():
        for name, info in library.items():
            rows[name] = {"family": info["family"], "base": info["base_accuracy"], "oracle": info["accuracy"],
                          **task_scores(head, base.model, base.tokenizer, name, args.limit)}
    cols = [c for c in next(iter(rows.values())) if c not in ("family", "base", "oracle")]
    counted = {n: r for n, r in rows.items() if r["oracle"] - r["base"] >= args.min_gain}

    def recovered(rs, col):
        return 100 * sum((r[col] - r["base"]) / (r["oracle"] - r["base"]) for r in rs) / len(rs)

    lines = [f"# python bench/fewshot_ceiling.py --limit {args.limit}   ({time.strftime('%Y-%m-%d')}, "
             f"{time.perf_counter() - t0:.0f} s on this machine's CPU)",
             f"# mean gain recovered over the {len(counted)} of {len(rows)} library tasks where the oracle gains "
             f">= {args.min_gain:.2f}; leave-one-out peers (bench/results/library-generators.txt): nearest 43.3%, "
             "LoraHub 55.4%, sg-lora 40.2%, icm-lora 33.3%, icm+refine (40 steps) 70.9%", ""]
    families = sorted({r["family"] for r in counted.values()})
    lines.append(f"{'one-pass scoring':22}" + "".join(f"{f[:14]:>15}" for f in families) + f"{'all':>8}")
    for col in cols:
        per = [recovered([r for r in counted.values() if r["family"] == f], col) for f in families]
        lines.append(f"{col:22}" + "".join(f"{v:14.1f}%" for v in per) + f"{recovered(counted.values(), col):7.1f}%")
    best = [max(r[c] for c in cols) for r in counted.values()]
    bound = 100 * sum((b - r["base"]) / (r["oracle"] - r["base"]) for b, r in zip(best, counted.values())) / len(counted)
    lines.append(f"\nbest column per task, chosen on the test rows themselves (an optimistic bound): {bound:.1f}%")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
