"""Generators benchmark: leave one task out, generate its adapter, compare with the base, the nearest
adapter, the average adapter and the adapter trained on it (minilm, the six embedded tasks).

For each embedded task t (its trained adapter `<t>-lora` is the oracle):
  1. fit `gen-<method>-no-<t>` on the other five adapters and their training snapshots (stored in the
     bench registry like any generator);
  2. generate `gen-<method>-<t>` from t's description (sg-lora) or from 8 examples of t's training split
     (icm-lora), registered like any generated adapter; a refusal (too far from every known task) is
     recorded with its distance and counts as the bare base (no gain);
  3. measure test accuracy of (a) the bare base, (b) the nearest other adapter by description (what
     `adapters search` would pick), (c) the average of the five other adapters (A and B averaged: the
     adapters share A's initialisation, so this is the parameter space the generators write in),
     (d) the generated adapters, (e) the oracle; and, for context, (u) the best single other adapter
     chosen on the test set itself (an upper bound on picking one expert).
  Gain recovered = (acc - base) / (oracle - base).

Then, side by side in this run: the seconds to train one adapter (`fit_adapter`, the bench's 200
steps) against the seconds to generate one (the generator's sampling, and end to end: load the
generator from the registry, sample, register), and the generators' stored size against the adapters
they learned from.

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/generators.py [--limit N] [--tasks a,b] [--no-upper]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import TASKS, adapter_name, bench_settings, ensure_task_adapters  # noqa: E402

METHODS = ("sg-lora", "icm-lora")
N_EXAMPLES = 8


def _avg_adapter(adapters):
    from loraplex.experts.spec import Adapter

    first = adapters[0]
    n = len(adapters)
    return Adapter(first.spec, {m: (sum(a.weights[m][0] for a in adapters) / n, sum(a.weights[m][1] for a in adapters) / n)
                                for m in first.weights})


class Evaluator:
    """Accuracy of an in-memory adapter (or the bare base) on a task's test split, one minilm in memory."""

    def __init__(self, settings, limit):
        from loraplex.heads import head_for
        from loraplex.models import load_base

        self.lb = load_base("minilm", settings)
        self.head = head_for(self.lb)
        self.limit = limit

    def __call__(self, adapter, task) -> float:
        from loraplex.experts.layers import eject, inject
        from loraplex.heads import accuracy

        if adapter is None:
            return accuracy(self.head, self.lb.model, self.lb.tokenizer, task, "test", self.limit)["accuracy"]
        inject(self.lb.model, [adapter])
        try:
            return accuracy(self.head, self.lb.model, self.lb.tokenizer, task, "test", self.limit)["accuracy"]
        finally:
            eject(self.lb.model)


def _clean(reg, held_out):
    """Remove this benchmark's own records for a task from an earlier run (only gen- names)."""
    from loraplex.generators import workflow

    for m in METHODS:
        if reg.has_adapter(f"gen-{m}-{held_out}"):
            reg.remove_adapter(f"gen-{m}-{held_out}")
        if any(c.name == f"gen-{m}-no-{held_out}" for c in reg.list_components(workflow.KIND)):
            workflow.remove(reg, f"gen-{m}-no-{held_out}")


def run(tasks, limit, upper, log=print):
    from loraplex import api
    from loraplex.data import load_task
    from loraplex.generators import workflow
    from loraplex.generators.base import OutOfRange
    from loraplex.generators.icm_lora import task_examples

    s = bench_settings()
    experts = ensure_task_adapters(log=log)
    reg = api.open_registry(s)
    names = [experts[t] for t in TASKS]
    _, nm, emb, _ = reg.signatures(names)
    loaded = {n: reg.load_adapter(n)[1] for n in names}
    ev = Evaluator(s, limit)
    rows, sizes, gen_times = [], {}, {}
    for t in tasks:
        task = load_task(t)
        me = adapter_name(t)
        others = [n for n in names if n != me]
        _clean(reg, t)
        i = nm.index(me)
        sims = {n: float(emb[i] @ emb[nm.index(n)]) for n in others}
        nearest = max(sims, key=sims.get)
        row = {"task": t, "nearest": nearest, "nearest_sim": round(sims[nearest], 3)}
        row["base"] = ev(None, task)
        row["oracle"] = ev(loaded[me], task)
        accs = {n: ev(loaded[n], task) for n in (others if upper else [nearest])}
        row["nearest_acc"] = accs[nearest]
        row["average"] = ev(_avg_adapter([loaded[n] for n in others]), task)
        if upper:
            best = max(accs, key=accs.get)
            row["best_other"], row["best_other_acc"] = best, accs[best]
        examples = task_examples(t, N_EXAMPLES, seed=1)
        for m in METHODS:
            gname, aname = f"gen-{m}-no-{t}", f"gen-{m}-{t}"
            fit = workflow.fit(reg, s, gname, method=m, adapters=others)
            sizes[m] = fit
            try:
                t0 = time.perf_counter()
                out = workflow.generate(reg, s, task.description, generator=gname, name=aname,
                                        examples=examples if m == "icm-lora" else (), seed=0)
                gen_times.setdefault(m, []).append((time.perf_counter() - t0, out["seconds"]))
                row[m] = ev(reg.load_adapter(aname)[1], task)
                row[f"{m}_parents"] = [f"{p['name']}:{p['weight']:.2f}" for p in out["parents"]]
                row[f"{m}_distance"] = out["distance"]
            except OutOfRange as exc:
                row[m] = row["base"]
                row[f"{m}_refused"] = str(exc)
        log(json.dumps(row))
        rows.append(row)
    return rows, sizes, gen_times, s, reg


def time_train_vs_generate(s, reg, task_name, log=print):
    """Train one adapter (the bench's recipe, 200 steps) and generate one, in this process, side by side."""
    from bench.common import STEPS, train_seconds
    from loraplex.data import load_task
    from loraplex.generators import workflow
    from loraplex.generators.base import Query

    task = load_task(task_name)
    train_s = train_seconds(task_name, STEPS, s)
    out = {"train_seconds": train_s}
    gname = f"gen-sg-lora-no-{task_name}"
    _, gen = workflow.load(reg, s, gname)
    gen.generate(Query(task.description), seed=0)  # warm: the embedder is loaded once per process
    t0 = time.perf_counter()
    for k in range(5):
        gen.generate(Query(task.description), seed=k)
    out["sample_seconds"] = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    if reg.has_adapter("gen-timing"):
        reg.remove_adapter("gen-timing")
    workflow.generate(reg, s, task.description, generator=gname, name="gen-timing", seed=0)
    out["end_to_end_seconds"] = time.perf_counter() - t0
    reg.remove_adapter("gen-timing")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="Test examples per task (default: the whole test split).")
    ap.add_argument("--tasks", default=",".join(TASKS), help="Tasks to hold out, comma-separated.")
    ap.add_argument("--no-upper", action="store_true", help="Skip the best-single-other-adapter upper bound.")
    ap.add_argument("--no-timing", action="store_true", help="Skip training an adapter for the time comparison.")
    ap.add_argument("--keep", action="store_true",
                    help="Keep the gen-* generators and adapters in the bench registry (default: removed at the end, "
                         "so other benchmarks that list every adapter do not see them).")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    t_start = time.perf_counter()
    rows, sizes, gen_times, s, reg = run(tasks, args.limit, not args.no_upper)

    def rec(acc, r):
        gap = r["oracle"] - r["base"]
        return (acc - r["base"]) / gap if gap > 1e-9 else float("nan")

    cols = ["base", "nearest_acc", "average", *METHODS, "oracle"] + (["best_other_acc"] if not args.no_upper else [])
    heads = ["base", "nearest", "average", *METHODS, "oracle"] + (["best-other*"] if not args.no_upper else [])
    print("\n== leave-one-task-out accuracy (test split" + (f", first {args.limit}" if args.limit else "") + ") ==")
    print(f"{'task':<12}" + "".join(f"{h:>12}" for h in heads))
    for r in rows:
        print(f"{r['task']:<12}" + "".join(f"{r[c]:>12.3f}" for c in cols))
    print("\n== gain recovered, (acc - base) / (oracle - base) ==")
    print(f"{'task':<12}" + "".join(f"{h:>12}" for h in heads[1:-1 if args.no_upper else -2] + (["best-other*"] if not args.no_upper else [])))
    rec_cols = ["nearest_acc", "average", *METHODS] + (["best_other_acc"] if not args.no_upper else [])
    means = {c: [] for c in rec_cols}
    for r in rows:
        vals = [rec(r[c], r) for c in rec_cols]
        for c, v in zip(rec_cols, vals):
            means[c].append(v)
        print(f"{r['task']:<12}" + "".join(f"{v:>12.1%}" for v in vals))
    print(f"{'mean':<12}" + "".join(f"{sum(means[c]) / len(means[c]):>12.1%}" for c in rec_cols))
    print(f"{'mean acc':<12}" + "".join(f"{sum(r[c] for r in rows) / len(rows):>12.3f}" for c in rec_cols))
    print("  * best-other: the best single other adapter chosen on the test set (an upper bound on picking one expert)")
    for r in rows:
        for m in METHODS:
            if f"{m}_refused" in r:
                print(f"  {m} on {r['task']}: refused: {r[f'{m}_refused']}")
            else:
                print(f"  {m} on {r['task']}: parents {', '.join(r[f'{m}_parents'])}; distance {r[f'{m}_distance']:.3f}")
        print(f"  nearest to {r['task']}: {r['nearest']} (similarity {r['nearest_sim']:.3f})"
              + (f"; best other on the test set: {r['best_other']}" if "best_other" in r else ""))
    print("\n== generator size ==")
    for m, f in sizes.items():
        print(f"  {m}: {f['stored_params']:,} stored numbers = {f['stored_params'] / f['member_params']:.2%} of its "
              f"{len(f['members'])} member adapters ({f['member_params']:,} parameters), "
              f"{f['stored_params'] / f['trained_params']:.2%} of the {f['vectors']} vectors it learned from "
              f"({f['trained_params']:,}); it reads its members from the registry to decode (basis not stored)")
    timing = None if args.no_timing else time_train_vs_generate(s, reg, tasks[0])
    if not args.keep:
        for t in tasks:
            _clean(reg, t)
    if timing is None:
        print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
        return
    print("\n== time: train one adapter vs generate one (same process, same machine) ==")
    print(f"  train ({tasks[0]}, 200 steps, fit_adapter): {timing['train_seconds']:.1f} s")
    print(f"  generate, sg-lora sampling (warm embedder): {timing['sample_seconds'] * 1000:.1f} ms  "
          f"-> {timing['train_seconds'] / timing['sample_seconds']:,.0f}x faster")
    print(f"  generate, sg-lora end to end (load generator from the registry, sample, register): "
          f"{timing['end_to_end_seconds']:.2f} s -> {timing['train_seconds'] / timing['end_to_end_seconds']:,.0f}x faster")
    for m, ts in gen_times.items():
        print(f"  {m} in the leave-one-out runs: end to end {sum(a for a, _ in ts) / len(ts):.2f} s on average "
              f"(of which sampling {sum(b for _, b in ts) / len(ts):.3f} s, including task vector / embedding)")
    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
