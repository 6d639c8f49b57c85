"""Generators over the task library: leave one task out, write its adapter, compare with the baselines.

For each library task t whose adapter `<t>-lora` is in the bench registry (built by bench/library.py):
  1. the training vectors of every library adapter (finals and snapshots) are read once; the held-out
     task's adapter and all of its snapshots are dropped (`TrainingSet.without`), and sg-lora and
     icm-lora are fitted on what is left: every other library task;
  2. sg-lora writes t's adapter from t's description, icm-lora from 16 examples of t's training split
     (a refusal, "too far from every known task", counts as the bare base);
  3. on t's test split (the first --eval-limit rows, as the library build scored them) we measure:
     the bare base; the nearest other adapter by description (what `adapters search` picks); the
     average of the K nearest by description; a LoraHub-style combination (Huang et al., "LoraHub:
     Efficient Cross-Task Generalization via Dynamic LoRA Composition", arXiv 2307.13269: the
     candidates' A and B matrices mixed with one weight each, m = (sum w_i A_i, sum w_i B_i), the
     weights found gradient-free on the same 16 examples' cross-entropy plus 0.05 |w|_1, within
     [-1.5, 1.5], 40 loss evaluations; the paper draws 20 random candidates, here the --hub-candidates
     nearest by description, a stronger pool at the same budget; a (1+4) evolution strategy stands in
     for nevergrad's Shiwa); the generated adapters; and the oracle (t's own adapter).
  Gain recovered = (acc - base) / (oracle - base), averaged over the tasks where the oracle gains at
  least --min-gain; reported per family and overall.

Then: generation time against training one adapter at the library's recipe (same process), and the
refusal of descriptions outside every family by a generator fitted on the whole library. With
--refine-steps N, each generated adapter is also refined on the 16 labelled examples (generators/refine.py)
and read after 2, 5, 10, 20 and N steps of that one run: gain recovered and generation time against steps.

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/library_generators.py [--families F,G] [--tasks a,b]
        [--eval-limit 150] [--k 3] [--hub-candidates 8] [--out FILE]   (rows: library-generators.json in the bench home)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import adapter_name, bench_home, bench_settings  # noqa: E402
from bench.generators import Evaluator, _avg_adapter  # noqa: E402
from bench.library import count, library_tasks, out_file  # noqa: E402
from loraplex.catalog import first_error  # noqa: E402
from loraplex.generators.refine import RefineConfig  # noqa: E402

METHODS = ("sg-lora", "icm-lora")
N_EXAMPLES = 16
HUB_BUDGET = 40  # LoraHub's default number of optimisation steps
HUB_L1 = 0.05  # LoraHub's regularisation weight on |w|_1
CURVE = (2, 5, 10, 20)  # refinement steps read on the way to --refine-steps (the speed/quality curve)

# Descriptions of tasks outside every family (no tweets, news, kaomoji, chat topics or languages).
OUTSIDE = (
    "Does this Python function contain an off-by-one error? Answer buggy or correct.",
    "Classify the chemical compound in this SMILES string as toxic or non-toxic.",
    "Is this chess move a blunder, a mistake or a good move?",
    "Given a patient's lab results, is the kidney function normal or impaired?",
    "Decide whether this legal contract clause is an indemnity clause or a limitation of liability.",
    "Is the integer in this arithmetic expression's result even or odd?",
)


def resumed_rows(out: Path, recipe: dict, ap: argparse.ArgumentParser) -> dict:
    """The rows an earlier run of the same recipe (bench home, members, options) left in `out`, which this
    run adds to; a file holding rows of another run is refused, never mixed in (sweep 42: a scratch home's
    run replaced rows of the published results)."""
    if not out.is_file():
        return {}
    try:
        rows = json.loads(out.read_text())
    except ValueError:
        ap.error(f"--out {out}: not a JSON file of rows")
    if not isinstance(rows, dict) or any(not isinstance(r, dict) or r.get("recipe") != recipe for r in rows.values()):
        ap.error(f"--out {out} holds rows of another run (another bench home, library or options): name another "
                 "file, or move it away")
    return rows


def held_out_tasks(ap: argparse.ArgumentParser, reg, tasks: str | None, families: str | None):
    """(the library adapters in the bench registry, the tasks to hold out: those of --tasks and --families
    whose adapter is there); an unknown task or family, or nothing to hold out, is the parser's error."""
    from loraplex.data import EMBEDDED_TASKS
    from loraplex.errors import LoraplexError

    members = [adapter_name(n) for n in library_tasks() if reg.has_adapter(adapter_name(n))]
    fams = [f.strip() for f in (families or "").split(",") if f.strip()]
    try:
        for f in fams:
            library_tasks(family=f)  # an unknown family is named
        held = [n for n in library_tasks(tasks=tasks) if adapter_name(n) in members
                and (not fams or EMBEDDED_TASKS[n]["family"] in fams)]
    except LoraplexError as exc:
        ap.error(str(exc))
    if not held:
        ap.error(f"no task to hold out: none of those named has its adapter in the bench home {bench_home()} "
                 "(bench/library.py trains them)")
    return members, held


def open_library(ap: argparse.ArgumentParser, tasks: str | None, families: str | None):
    """What a leave-one-out study over the library starts from: (settings, the bench registry, its library
    adapters, the tasks to hold out (`held_out_tasks`), their training set, every member's tensors, and the
    generators with their member representations (`generators_for`))."""
    from loraplex import api
    from loraplex.generators.workflow import training_set

    s = bench_settings()
    reg = api.open_registry(s)
    members, held = held_out_tasks(ap, reg, tasks, families)
    print(f"bench home {bench_home()}: {len(members)} library adapters registered; holding out {len(held)}")
    full = training_set(reg, members)
    print(f"training vectors: {full.vectors.shape[0]} ({len(members)} adapters and their snapshots), "
          f"{full.vectors.shape[1]:,} parameters each")
    loaded = {n: reg.load_adapter(n)[1] for n in members}
    return s, reg, members, held, full, loaded, generators_for(full, s, reg.embedder_name)


def leave_one_out(full, held_out: str):
    """The training set a generator for `held_out` is fitted on: every other member (never the held-out
    adapter or any snapshot of it)."""
    return full.without([held_out])


def combine(adapters, weights):
    """LoraHub's composition: one weight per adapter on both its A and B (element-wise sums)."""
    from loraplex.experts.spec import Adapter

    first = adapters[0]
    return Adapter(first.spec, {m: (sum(w * a.weights[m][0] for w, a in zip(weights, adapters)),
                                    sum(w * a.weights[m][1] for w, a in zip(weights, adapters)))
                                for m in first.weights})


def lorahub(ev: Evaluator, candidates, task, examples, budget: int = HUB_BUDGET, seed: int = 0):
    """(adapter, weights): the candidates mixed by weights fitted gradient-free on the few-shot loss.

    The search is a (1+4) evolution strategy with the 1/5 success rule for its step size, started at
    w = 0 (the bare base, as LoraHub starts), clipped to [-1.5, 1.5], and spending exactly `budget` loss
    evaluations (LoraHub uses nevergrad's Shiwa with 40; nevergrad is not a loraplex dependency)."""
    import numpy as np
    import torch

    from loraplex.experts.layers import eject, inject

    texts = [t for t, _ in examples]
    y = torch.tensor([task.labels.index(lab) for _, lab in examples])
    model, tok = ev.lb.model, ev.lb.tokenizer

    def loss(w: np.ndarray) -> float:
        inject(model, [combine(candidates, [float(v) for v in w])])
        try:
            with torch.no_grad():
                return float(ev.head.loss(model, tok, texts, y, task)) + HUB_L1 * float(np.abs(w).sum())
        finally:
            eject(model)

    rng = np.random.default_rng(seed)
    best = np.zeros(len(candidates))
    best_loss, sigma, spent = loss(best), 0.5, 1
    while spent < budget:
        lam = min(4, budget - spent)
        trials = [np.clip(best + sigma * rng.standard_normal(best.shape), -1.5, 1.5) for _ in range(lam)]
        losses = [loss(w) for w in trials]
        spent += lam
        i = int(np.argmin(losses))
        if losses[i] < best_loss:
            best, best_loss, sigma = trials[i], losses[i], sigma * 1.5
        else:
            sigma *= 0.7
    return combine(candidates, [float(v) for v in best]), [round(float(v), 3) for v in best]


def generators_for(full, settings, embedder: str):
    """method -> (entry, config, shared context): the base model and embedder load once for all fits.

    A member's representation depends only on its own task (sg-lora: its stored description embedding;
    icm-lora: the task vector of n_examples of its training split, seeded), never on the other members,
    so it is computed once over the whole library here and each leave-one-out fit reads its members'
    rows (the held-out task's row is never read: `without` removed it from the fold's members)."""
    from loraplex.generators.base import GENERATORS, GenContext

    ctx = GenContext(settings, embedder, full.base)
    out = {}
    for m in METHODS:
        entry = GENERATORS.get(m)
        cfg = entry.make_config({"n_examples": N_EXAMPLES} if m == "icm-lora" else {})
        reps = entry.factory(cfg, ctx).represent_members(full)
        out[m] = (entry, cfg, ctx, dict(zip(full.members, reps)))
    return out


def make_generator(entry, cfg, ctx, reps):
    """A generator of the method whose member representations are read from `reps` (name -> (D,))."""
    import torch

    gen = entry.factory(cfg, ctx)
    gen.represent_members = lambda data: torch.stack([reps[n] for n in data.members])
    return gen


def run_task(t, full, gens, ev, loaded, emb, k, hub_n, refine_steps=0, refine_lr=0.2, log=print):
    """One held-out task's row of accuracies (and what each method chose)."""
    import torch

    from loraplex.data import load_task
    from loraplex.generators.base import OutOfRange, Query
    from loraplex.generators.icm_lora import task_examples
    from loraplex.generators.refine import RefineConfig

    task = load_task(t)
    me = adapter_name(t)
    names = full.members
    i = names.index(me)
    sims = emb @ emb[i]  # (N,) cosine: the stored description embeddings are unit vectors
    sims[i] = -2.0
    ranked = [names[int(j)] for j in torch.argsort(sims, descending=True)]
    row = {"task": t, "family": None, "nearest": ranked[0], "nearest_sim": round(float(sims.max()), 3)}
    row["base"] = ev(None, task)
    row["oracle"] = ev(loaded[me], task)
    row["nearest_acc"] = ev(loaded[ranked[0]], task)
    row["average"] = ev(_avg_adapter([loaded[n] for n in ranked[:k]]), task)
    examples = task_examples(t, N_EXAMPLES, seed=1)
    t0 = time.perf_counter()
    hub, w = lorahub(ev, [loaded[n] for n in ranked[:hub_n]], task, examples)
    row["lorahub"] = ev(hub, task)
    row["lorahub_weights"] = dict(zip(ranked[:hub_n], w))
    row["lorahub_seconds"] = round(time.perf_counter() - t0, 2)
    data = leave_one_out(full, me)
    assert me not in data.members and all(src != me for src, _ in data.sources)
    for m, (entry, cfg, ctx, reps) in gens.items():
        gen = make_generator(entry, cfg, ctx, reps)
        fit = gen.fit(data)
        row[f"{m}_fit_seconds"] = fit["fit_seconds"]
        try:
            out = gen.generate(Query(task.description, examples if m == "icm-lora" else ()), seed=0)
        except OutOfRange as exc:
            row[m], row[f"{m}_refused"] = row["base"], str(exc)
            if refine_steps:
                for col in [f"{m}+refine"] + [f"{m}+refine@{c}" for c in CURVE if c < refine_steps]:
                    row[col] = row["base"]
            continue
        row[m] = ev(out.adapter, task)
        row[f"{m}_seconds"] = round(out.seconds, 3)
        row[f"{m}_distance"] = round(out.distance, 4)
        row[f"{m}_parents"] = [f"{p['name']}:{p['weight']:.2f}" for p in out.parents]
        if refine_steps:  # the same sample, then refined on the 16 labelled examples LoraHub sees
            kept, t0 = {}, time.perf_counter()

            def keep(step, theta, kept=kept, t0=t0):  # a shorter refinement is this one's first steps
                if step in CURVE and step < refine_steps:
                    kept[step] = (theta, time.perf_counter() - t0)

            ref = gen.generate(Query(task.description, examples, task=task), seed=0,
                               refine=RefineConfig(steps=refine_steps, lr=refine_lr), on_refine_step=keep)
            row[f"{m}+refine"] = ev(ref.adapter, task)
            row[f"{m}+refine_seconds"] = round(ref.seconds, 3)
            row[f"{m}+refine_loss"] = ref.extra["refine"]
            for step, (theta, secs) in sorted(kept.items()):
                adapter = gen.data.layout.unflatten(theta)
                row[f"{m}+refine@{step}"] = ev(adapter, task)
                row[f"{m}+refine@{step}_seconds"] = round(secs, 3)
    return row


COLS = (("base", "base"), ("nearest_acc", "nearest"), ("average", "avg-K"), ("lorahub", "lorahub"),
        ("sg-lora", "sg-lora"), ("icm-lora", "icm-lora"), ("oracle", "oracle"))
REFINED = (("sg-lora+refine", "sg+ref"), ("icm-lora+refine", "icm+ref"))


def columns(rows):
    """The table's columns: the refined generators' too when every row has them."""
    extra = tuple(c for c in REFINED if all(c[0] in r for r in rows))
    return COLS[:-1] + extra + COLS[-1:]


def recovered(r, col):
    return (r[col] - r["base"]) / (r["oracle"] - r["base"])


def gain_table(gaining, fams, cols, width: int) -> list[str]:
    """A header and one line per family (and "all") of the mean gain recovered in each (key, heading) column,
    over the `gaining` rows; a family with none of them is left out."""
    lines = [f"{'family':<18}{'tasks':>6}" + "".join(f"{h:>{width}}" for _, h in cols)]
    for f in fams + ["all"]:
        rs = [r for r in gaining if f in ("all", r["family"])]
        if rs:
            lines.append(f"{f:<18}{len(rs):>6}" + "".join(
                f"{statistics.mean(recovered(r, c) for r in rs):>{width}.1%}" for c, _ in cols))
    return lines


def report(rows, min_gain, k, hub_n) -> list[str]:
    """The tables: accuracy and gain recovered per family and overall."""
    lines = []
    gaining = [r for r in rows if r["oracle"] - r["base"] >= min_gain]
    fams = sorted({r["family"] for r in rows})
    cols = columns(rows)
    rec_cols = [c for c in cols if c[0] not in ("base", "oracle")]
    lines.append(f"== accuracy on the test split, mean per family (K={k} for avg-K, {hub_n} LoraHub candidates) ==")
    lines.append(f"{'family':<18}{'tasks':>6}" + "".join(f"{h:>10}" for _, h in cols))
    for f in fams + ["all"]:
        rs = [r for r in rows if f in ("all", r["family"])]
        lines.append(f"{f:<18}{len(rs):>6}" + "".join(f"{statistics.mean(r[c] for r in rs):>10.3f}" for c, _ in cols))
    lines.append("")
    lines.append(f"== gain recovered, (acc - base) / (oracle - base), over tasks where the oracle gains >= "
                 f"{100 * min_gain:.0f} points ({len(gaining)} of {len(rows)}) ==")
    lines += gain_table(gaining, fams, rec_cols, 10)
    lines.append("")
    lines.append("== per task: accuracy (refusals counted as the base) ==")
    lines.append(f"{'task':<30}{'family':<18}" + "".join(f"{h:>10}" for _, h in cols) + "  sg parents / refusal")
    for r in rows:
        sg = "refused" if "sg-lora_refused" in r else ", ".join(r.get("sg-lora_parents", []))
        lines.append(f"{r['task']:<30}{r['family']:<18}" + "".join(f"{r[c]:>10.3f}" for c, _ in cols) + f"  {sg}")
    return lines


def refine_curve(rows, min_gain, refine_steps: int, train_of: dict[str, float] | None) -> list[str]:
    """Gain recovered and generation time (median, sample + refinement) against the refinement's steps,
    over the tasks where the oracle gains at least `min_gain`; each shorter refinement is read on the way
    to `refine_steps` (the same Adam trajectory), so one run gives the whole curve. `train_of`: each task's
    own adapter's training seconds (its library record); x is that over the task's generation seconds,
    the median over tasks."""
    gaining = [r for r in rows if r["oracle"] - r["base"] >= min_gain]
    lines = ["", f"== refinement steps: gain recovered over {len(gaining)} tasks, generation seconds (median) and x = "
                 "the task's own adapter's training seconds (its library record, 50 steps) / its generation seconds, "
                 "median over tasks =="]
    lines.append(f"{'steps':>6}" + "".join(f"{m + ' gain':>16}{'s':>8}{'x':>8}" for m in METHODS))
    for step in (0,) + tuple(c for c in CURVE if c < refine_steps) + (refine_steps,):
        cells = ""
        for m in METHODS:
            col = m if step == 0 else f"{m}+refine" if step == refine_steps else f"{m}+refine@{step}"
            have = [r for r in gaining if col in r and f"{m}_refused" not in r]
            if not have:
                cells += f"{'-':>16}{'-':>8}{'-':>8}"
                continue
            secs = statistics.median(r[f"{col}_seconds"] for r in have)
            gain = statistics.mean(recovered(r, col) for r in gaining if col in r)  # a refusal counts as the base
            timed = [train_of[r["task"]] / r[f"{col}_seconds"] for r in have
                     if train_of and train_of.get(r["task"]) and r[f"{col}_seconds"] > 0]
            cells += f"{gain:>16.1%}{secs:>8.2f}" + (f"{statistics.median(timed):>8.0f}" if timed else f"{'-':>8}")
        lines.append(f"{step:>6}" + cells)
    return lines


def record_train_seconds(reg, tasks) -> dict[str, float]:
    """Each task's own library adapter's training seconds, from its record (what bench/library.py measured)."""
    out = {}
    for t in tasks:
        secs = reg.get_adapter(adapter_name(t)).metrics.get("train_seconds") if reg.has_adapter(adapter_name(t)) else None
        if secs:
            out[t] = float(secs)
    return out


def timing_and_refusal(full, gens, settings, steps: int) -> tuple[list[str], float]:
    """Train one adapter at the library's recipe and generate one, in this process; and the refusal of
    descriptions outside every family by generators fitted on the whole library. Also returns the
    training's seconds."""
    from bench.common import train_seconds
    from loraplex.data import load_task
    from loraplex.generators.base import OutOfRange, Query
    from loraplex.generators.icm_lora import task_examples

    lines = ["", f"== time: train one adapter (the library's recipe: {steps} steps) vs generate one, same process =="]
    name = full.tasks[0]
    task = load_task(name)
    train_s = train_seconds(name, steps, settings)
    lines.append(f"  train {name}, {steps} steps (fit_adapter): {train_s:.1f} s")
    fitted = {}
    for m, (entry, cfg, ctx, reps) in gens.items():
        gen = make_generator(entry, cfg, ctx, reps)
        fitted[m] = gen.fit(full), gen
        q = Query(task.description, task_examples(name, N_EXAMPLES, seed=1) if m == "icm-lora" else ())
        gen.generate(q, seed=0)  # warm
        t0 = time.perf_counter()
        for s in range(5):
            gen.generate(q, seed=s)
        g = (time.perf_counter() - t0) / 5
        lines.append(f"  {m}: fit on {len(full.members)} adapters {fitted[m][0]['fit_seconds']:.1f} s; generate "
                     f"{1000 * g:.0f} ms -> {train_s / g:,.0f}x faster than training")
    lines.append("")
    lines.append(f"== descriptions outside every family, sg-lora fitted on all {len(full.members)} library adapters "
                 f"(max_distance {gens['sg-lora'][1].max_distance}) ==")
    gen = fitted["sg-lora"][1]
    for desc in OUTSIDE:
        try:
            out = gen.generate(Query(desc), seed=0)
            lines.append(f"  generated (distance {out.distance:.3f}, nearest {out.parents[0]['name']}): {desc}")
        except OutOfRange as exc:
            dist = str(exc).split("cosine distance ")[1].split(" ")[0]
            lines.append(f"  refused (distance {dist}): {desc}")
    return lines, train_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="only these families' tasks are held out (comma-separated)")
    ap.add_argument("--tasks", help="only these tasks are held out (comma-separated)")
    ap.add_argument("--eval-limit", type=count, default=150, help="test rows per task (the library build's)")
    ap.add_argument("--k", type=count, default=3, help="K for the average of the K nearest adapters")
    ap.add_argument("--hub-candidates", type=count, default=8, help="LoraHub's candidate adapters (nearest by description)")
    ap.add_argument("--min-gain", type=float, default=0.05,
                    help="tasks counted in gain recovered: oracle - base >= this (above 0, at most 1)")
    ap.add_argument("--refine-steps", type=lambda t: count(t, 0), default=0,
                    help="also refine each generated adapter on the 16 examples this many steps (generators/refine.py)")
    ap.add_argument("--refine-lr", type=float, default=0.2, help="the refinement's learning rate")
    ap.add_argument("--no-timing", action="store_true", help="skip the training-vs-generation timing and refusals")
    ap.add_argument("--train-steps", type=count, default=50, help="steps of the timed training (the library build's --steps)")
    ap.add_argument("--out", type=out_file, default=None,
                    help="rows file (default: library-generators.json in the bench home; the published one is "
                         "bench/results/library-generators.json, written only when named)")
    args = ap.parse_args(argv)
    if not 0 < args.min_gain <= 1:  # gain recovered divides by the oracle's gain (sweep 43: a ZeroDivisionError)
        ap.error(f"--min-gain: above 0 and at most 1, got {args.min_gain:g}")
    try:
        RefineConfig(steps=args.refine_steps, lr=args.refine_lr)
    except ValueError as exc:
        ap.error(f"--refine-steps/--refine-lr: {first_error(exc)}")

    from tqdm import tqdm

    from loraplex.data import EMBEDDED_TASKS

    t_start = time.perf_counter()
    s, reg, members, held, full, loaded, gens = open_library(ap, args.tasks, args.families)
    emb = full.desc_embeddings.float()
    ev = Evaluator(s, args.eval_limit)
    out = args.out or bench_home() / "library-generators.json"
    recipe = {"home": str(bench_home()), "members": len(members), "eval_limit": args.eval_limit, "k": args.k,
              "hub_candidates": args.hub_candidates, "refine_steps": args.refine_steps, "refine_lr": args.refine_lr}
    rows = resumed_rows(out, recipe, ap)
    bar = tqdm(held, unit="task", dynamic_ncols=True)
    for t in bar:
        bar.set_description(t)
        row = run_task(t, full, gens, ev, loaded, emb, args.k, args.hub_candidates, args.refine_steps, args.refine_lr)
        row["family"], row["recipe"] = EMBEDDED_TASKS[t]["family"], recipe
        rows[t] = row
        tqdm.write(" ".join(f"{c}={row[c]:.3f}" for c, _ in columns([row])) + f"  {t}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    done = [rows[t] for t in held]
    lines = report(done, args.min_gain, args.k, args.hub_candidates)
    if not args.no_timing:
        timing, _ = timing_and_refusal(full, gens, s, args.train_steps)
        lines += timing
    if args.refine_steps:
        lines += refine_curve(done, args.min_gain, args.refine_steps, record_train_seconds(reg, held))
    lines.append(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
