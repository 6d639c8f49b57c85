"""Refining the top blocks only: what a refinement of the generated adapter keeps of its gain, at what cost.

Issue 12 asks for >= 70% of a trained adapter's gain and generation >= 100x faster than training. On the
library, icm-lora's sample reaches 40%, and 20 refinement steps on 16 labelled examples 72%, but a step
over every block costs about a training step (bench/results/library-generators.txt). `RefineConfig.blocks`
refines only the adapter's modules in the top blocks: the blocks below run once on the examples
(generators/refine.py), so a step costs the top blocks' forward and backward. This bench asks what that
keeps. For each library task with its adapter in the bench home (bench/library.py):
  1. icm-lora is fitted on every other library task (leave one out, as bench/library_generators.py: the
     held-out task's adapter and snapshots are never read) and samples the task's adapter from 16 of its
     training examples;
  2. that sample is refined on the same 16 examples for each variant B:S of --variants (S Adam steps over
     the modules of the top B blocks; B = 0 every block), at --lr;
  3. each adapter is scored on the task's test split (the first --eval-limit rows, as the library build
     scored them), with the bare base and the oracle (the task's own adapter).
Reported: gain recovered, (acc - base) / (oracle - base), over the tasks where the oracle gains at least
--min-gain, per family and overall; generation seconds (median: the sample and its refinement); and
x = the task's adapter's training seconds (its library record) / its generation seconds, median over tasks.

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/library_refine.py [--variants 0:20,1:20,2:20,3:20,1:40]
        [--tasks a,b] [--families F] [--eval-limit 150] [--lr 0.2] [--out FILE]
        (rows: library-refine.json in the bench home; a run stopped part way resumes from them, and a run
         with more variants measures only those)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import adapter_name, bench_home  # noqa: E402
from bench.library import count, out_file  # noqa: E402
from bench.library_generators import (N_EXAMPLES, gain_table, leave_one_out, make_generator,  # noqa: E402
                                      open_library, record_train_seconds, resumed_rows)
from loraplex.catalog import first_error  # noqa: E402
from loraplex.generators.refine import RefineConfig  # noqa: E402


def variants_arg(text: str) -> list[tuple[int, int]]:
    """`B:S,...` -> [(blocks, steps)], each a valid refinement (steps >= 1)."""
    out = []
    for part in text.split(","):
        b, sep, s = part.strip().partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not BLOCKS:STEPS (e.g. 1:20)")
        out.append((count(b, 0), count(s, 1)))
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("a variant is named twice")
    return out


def col(blocks: int, steps: int) -> str:
    return f"b{blocks}s{steps}"


def label(blocks: int, steps: int) -> str:
    return f"{'all' if blocks == 0 else f'top {blocks}'} x{steps}"


def missing(row: dict | None, variants) -> bool:
    """Whether a task's row lacks anything this run measures (a run with more variants adds only those)."""
    return row is None or "icm" not in row or ("refused" not in row and "icm_sec" not in row) or any(
        col(b, s) not in row for b, s in variants)


def run_task(t, full, gens, ev, loaded, variants, lr, row: dict | None = None):
    """One held-out task's row: base, oracle, the sample, and each refinement with its seconds; what `row`
    (an earlier run's, of the same recipe) already holds is kept, not measured again."""
    from loraplex.data import load_task
    from loraplex.generators.base import OutOfRange, Query
    from loraplex.generators.icm_lora import task_examples

    task, me = load_task(t), adapter_name(t)
    row = dict(row or {"task": t})
    if "base" not in row:
        row["base"], row["oracle"] = ev(None, task), ev(loaded[me], task)
    examples = task_examples(t, N_EXAMPLES, seed=1)
    data = leave_one_out(full, me)
    assert me not in data.members and all(src != me for src, _ in data.sources)
    entry, cfg, ctx, reps = gens["icm-lora"]
    gen = make_generator(entry, cfg, ctx, reps)
    gen.fit(data)
    try:
        sample = gen.generate(Query(task.description, examples), seed=0)
    except OutOfRange as exc:  # a refusal is the bare base, for the sample and every refinement of it
        row["refused"] = str(exc)
        row["icm"] = row["base"]
        for b, s in variants:
            row[col(b, s)] = row["base"]
        return row
    if "icm" not in row:
        row["icm"] = ev(sample.adapter, task)
    row["icm_sec"] = row.get("icm_sec", round(sample.seconds, 3))
    for b, s in variants:
        if col(b, s) in row:
            continue
        ref = gen.generate(Query(task.description, examples, task=task), seed=0,
                           refine=RefineConfig(steps=s, lr=lr, blocks=b))
        row[col(b, s)], row[f"{col(b, s)}_sec"] = ev(ref.adapter, task), round(ref.seconds, 3)
    return row


def _median_cell(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):>12{fmt}}" if values else f"{'-':>12}"


def report(rows, variants, min_gain: float, train_of: dict[str, float]) -> list[str]:
    """The gain table per family and the cost lines; a task whose oracle gains less than `min_gain` (> 0) is
    left out of both, a refused one counts as the base in the gain and is left out of the cost, and a cell
    with no task to read is '-'."""
    gaining = [r for r in rows if r["oracle"] - r["base"] >= min_gain]
    cols = [("icm", "icm-lora")] + [(col(b, s), label(b, s)) for b, s in variants]
    fams = sorted({r["family"] for r in rows})
    lines = [f"== gain recovered over tasks where the oracle gains >= {100 * min_gain:.0f} points "
             f"({len(gaining)} of {len(rows)}): icm-lora's sample, then refined S steps over every block (all) "
             "or the top B blocks =="]
    if not gaining:
        return lines + ["  no task's oracle gains that much: nothing to report"]
    lines += gain_table(gaining, fams, cols, 12)
    lines += ["", "== cost: generation seconds (median over the gaining tasks not refused: the sample and its "
                  "refinement) and x = the task's adapter's training seconds (library record) / them, median =="]
    lines.append(f"{'':<18}{'':>6}" + "".join(f"{h:>12}" for _, h in cols))
    have = [r for r in gaining if "refused" not in r]
    lines.append(f"{'seconds':<24}" + "".join(_median_cell([r[f"{c}_sec"] for r in have], ".2f") for c, _ in cols))
    lines.append(f"{'x vs training':<24}" + "".join(
        _median_cell([train_of[r["task"]] / r[f"{c}_sec"] for r in have if r["task"] in train_of], ".0f") for c, _ in cols))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=variants_arg, default=variants_arg("0:20,1:20,2:20,3:20,1:40"),
                    help="refinements as BLOCKS:STEPS, comma-separated (0 blocks: every block)")
    ap.add_argument("--tasks", help="only these tasks are held out (comma-separated)")
    ap.add_argument("--families", help="only these families' tasks are held out (comma-separated)")
    ap.add_argument("--eval-limit", type=lambda t: count(t, 1), default=150, help="test rows scored per task")
    ap.add_argument("--lr", type=float, default=0.2, help="the refinement's learning rate")
    ap.add_argument("--min-gain", type=float, default=0.05, help="tasks whose oracle gains less are left out of the means")
    ap.add_argument("--out", type=out_file, help="rows file (default: library-refine.json in the bench home)")
    args = ap.parse_args(argv)
    from pydantic import ValidationError

    try:
        for b, s in args.variants:
            RefineConfig(steps=s, lr=args.lr, blocks=b)
    except ValidationError as exc:
        ap.error(f"--variants/--lr: {first_error(exc)}")
    if not 0 < args.min_gain < 1:  # 0 would divide by an oracle that gains nothing
        ap.error(f"--min-gain: a share of accuracy in (0, 1), got {args.min_gain}")

    from tqdm.auto import tqdm

    from bench.generators import Evaluator
    from loraplex.data import EMBEDDED_TASKS

    t_start = time.perf_counter()
    s, reg, members, held, full, loaded, gens = open_library(ap, args.tasks, args.families)
    ev = Evaluator(s, args.eval_limit)
    out = args.out or bench_home() / "library-refine.json"
    recipe = {"home": str(bench_home()), "members": len(members), "eval_limit": args.eval_limit, "lr": args.lr}
    rows = resumed_rows(out, recipe, ap)  # a run of the same recipe: its rows are kept, its variants not rerun
    bar = tqdm([t for t in held if missing(rows.get(t), args.variants)], unit="task", dynamic_ncols=True)
    for t in bar:
        bar.set_description(t)
        row = run_task(t, full, gens, ev, loaded, args.variants, args.lr, rows.get(t))
        row["family"], row["recipe"] = EMBEDDED_TASKS[t]["family"], recipe
        rows[t] = row
        tqdm.write(f"{t:30s} base {row['base']:.3f} icm {row['icm']:.3f} " + " ".join(
            f"{label(b, st)} {row[col(b, st)]:.3f}" for b, st in args.variants) + f" oracle {row['oracle']:.3f}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    lines = report([rows[t] for t in held], args.variants, args.min_gain, record_train_seconds(reg, held))
    lines.append(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
