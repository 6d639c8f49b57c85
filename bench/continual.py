"""Continual-learning benchmark: the six embedded tasks (or a 15-task library stream) on minilm, three task orders.

For each order it runs, as stream specs through `loraplex.api.run_stream`:
  - seq-lora            (one LoRA fine-tuned task after task: the lower bound, shows forgetting)
  - o-lora + replay     (the method under test; replay with DER++ distillation of the replayed rows,
                         weight --distill, default 2.0 as in the spec's default; 0 is plain replay)
then a GS-LoRA forgetting request against the o-lora + replay run's final composition
(`loraplex.api.forget`, the mechanism of a stream's forget experience, kept separate so the streams'
results do not depend on it), and once (order-independent) `multitask` (all six tasks at once with
the steps of all six: the upper bound). It prints per order and averaged over orders: average accuracy (AA), backward transfer (BWT),
forward transfer against the bare base (FWT) and Chaudhry's forgetting, all in points; for each
forgetting request the forgotten task's accuracy before / after against chance and the retained
tasks' accuracy before / after. Goals (the issue): o-lora+replay within 2 points of multitask in AA,
BWT >= -1 point; the forgotten task at chance, retained tasks losing at most 1 point.

Step-time overhead: the same minilm model and batches, interleaved round-robin in one process, times
one optimiser step (forward, loss with every term of ContinualModule.training_step, backward, AdamW)
for plain LoRA training and for each method's configuration; it prints the median step time of
each and its ratio to plain LoRA (goal: at most 1.15). Replayed batches hold other tasks' rows (BBC
articles are ~3x longer than tweets), so configurations that replay are also compared with plain LoRA
trained on the same mixed batches (`seq-lora + replay`), which isolates the method's own cost.

Runs are kept in the bench home (default <repo>/.bench/continual-home); a stream already finished is
reused and an interrupted one resumed, so the script can be re-run after a stop.

    python bench/continual.py                     # the full benchmark (hours on 2 shared CPU cores)
    python bench/continual.py --steps 40 --orders 1 --eval-limit 100   # a quick look
    python bench/continual.py --orders 1 --routed   # add the routed method (reuses finished runs)
    python bench/continual.py --tasks library --steps 80 --eval-limit 100 --no-timing   # the 15-task stream
    python bench/continual.py --tasks library --base smollm2 --first 5 --orders 1 --steps 20 --batch-size 8 \
        --eval-limit 50 --no-timing                                     # the short causal-LM table

`--tasks library` runs the 15-task stream drawn from the task library (three tasks from each of five
families, `LIBRARY_ORDERS`), with the same methods and metrics, no forgetting requests; the replay
budget is 100 rows per task in both worlds. The setting that meets both goals over the three orders
(AA 85.8 against multitask's 85.5, BWT -0.2; bench/results/continual-library-s120.txt) replays 12 rows
on top of each batch of 16 new ones, with DER++ weight 4 (about 30 minutes per order on 2 cores):

    python bench/continual.py --tasks library --steps 120 --eval-limit 100 --no-timing \
        --replay-rows added --distill 4 --mix 0.75
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO, TASKS  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ORDERS = [
    ("airline", "deflategate", "apple", "coachella", "driverless", "bbc"),
    ("bbc", "driverless", "coachella", "apple", "deflategate", "airline"),
    ("apple", "bbc", "airline", "driverless", "deflategate", "coachella"),
]
# One forgetting request at the end of each order's o-lora + replay stream.
FORGET = [{"forget": "airline"}, {"forget": "bbc", "labels": ["sport"]}, {"forget": "driverless"}]


# The library stream (issue 12): 15 tasks of the task library, three from each of five families whose
# tasks share inputs or labels with their neighbours (tweets, BBC articles, kaomoji, chatbot lines,
# languages), so that later tasks overwrite what earlier ones need. Three orders, as in O-LoRA's long
# benchmark: family-interleaved, the reverse, and a fixed shuffle with same-family runs.
LIBRARY = ("airline", "bbc", "kaomoji-happy-vs-sad", "chat-six-topics", "lang-romance",
           "apple-polarity", "bbc-politics-vs-sport", "kaomoji-basic-emotions", "chat-knowledge", "lang-germanic",
           "deflategate-opinion", "bbc-tech-or-other", "kaomoji-animals", "kaomoji-actions", "lang-east-asian")
LIBRARY_ORDERS = [
    LIBRARY,
    tuple(reversed(LIBRARY)),
    ("kaomoji-animals", "kaomoji-basic-emotions", "kaomoji-happy-vs-sad", "lang-east-asian", "airline",
     "apple-polarity", "deflategate-opinion", "bbc-tech-or-other", "chat-knowledge", "lang-romance",
     "lang-germanic", "bbc", "bbc-politics-vs-sport", "chat-six-topics", "kaomoji-actions"),
]


def spec_dict(name: str, order, method, *, replay: bool, steps: int, eval_limit: int, forget=None, seed=0,
              distill: float = 2.0, base: str = "minilm", batch_size: int = 16, replay_rows: str = "share",
              mix: float = 0.25):
    spec = {
        "name": name, "base": base, "seed": seed, "lora": {"rank": 8},
        "trainer": {"steps": steps, "lr": 2e-3, "batch_size": batch_size, "eval_limit": eval_limit, "snapshots": 2},
        "method": method,
        "forgetting": {"name": "gs-lora", "steps": steps},
        "experiences": [{"learn": t} for t in order] + ([forget] if forget else []),
    }
    if replay:
        spec["replay"] = {"budget": 100 * len(order), "policy": "class-balanced", "mix": mix, "distill": distill,
                          "rows": replay_rows}
    return spec


def run(spec: dict, root: Path, settings, log) -> dict:
    import yaml

    from loraplex import api
    from loraplex.continual.stream import RunDir

    path = root / "specs" / f"{spec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = root / "runs" / spec["name"]
    rd = RunDir(out)
    t0 = time.perf_counter()
    if rd.is_run():
        info = rd.info()
        if info and rd.completed() == info["units_total"]:
            log(f"  {spec['name']}: finished earlier, reusing {out}")
            return api.stream_report(out)
        res = api.run_stream(path, resume=out, progress=False, settings=settings)
    else:
        res = api.run_stream(path, out=out, progress=False, settings=settings,
                             on_unit=lambda ev: log(f"    unit {ev['unit'] + 1}/{ev['total']} {ev['label']} done "
                                                    f"({time.perf_counter() - t0:.0f}s)"))
    log(f"  {spec['name']}: {time.perf_counter() - t0:.0f}s")
    return {"run_dir": str(res.run_dir), "matrix": res.matrix, "metrics": res.metrics}


def forget(name: str, request: dict, adapters: list[str], *, steps: int, eval_limit: int, settings, log) -> dict:
    from loraplex import api

    reg = api.open_registry(settings)
    if reg.has_adapter(name):
        log(f"  {name}: done earlier, reusing")
        run_dir = Path(reg.get_adapter(name).extra["run_dir"])
        return json.loads((run_dir / "summary.json").read_text())
    t0 = time.perf_counter()
    res = api.forget(request["forget"], labels=request.get("labels", ()), adapters=adapters, name=name, steps=steps,
                     eval_limit=eval_limit, progress=False, settings=settings)
    log(f"  {name}: {time.perf_counter() - t0:.0f}s")
    return res


def pts(v, signed=False):
    if v is None:
        return "    -"
    return f"{100 * v:+5.1f}" if signed else f"{100 * v:5.1f}"


# ---------------------------------------------------------------------------------------------
# step-time overhead


def step_times(*, rounds: int, steps: int, log) -> dict[str, float]:
    """Median seconds per optimiser step of each configuration, measured interleaved in one process."""
    import numpy as np
    import torch

    from loraplex.continual.fit import rows_of
    from loraplex.continual.forgetting import FORGETTERS
    from loraplex.continual.module import ContinualModule
    from loraplex.continual.regularizers import REGULARIZERS, ExperienceContext
    from loraplex.continual.replay import mixed_batches
    from loraplex.continual.slots import add_slot, train_only
    from loraplex.data import load_task
    from loraplex.experts.spec import LoraSpec
    from loraplex.heads import head_for
    from loraplex.models import load_base
    from loraplex.settings import Settings

    s = Settings.load(device="cpu", dtype="float32")
    tasks = {t: load_task(t) for t in TASKS}
    rng = np.random.default_rng(0)
    old = [r for t in TASKS[:5] for r in rows_of(tasks[t], "train")[:120]]
    plain_b = mixed_batches({"airline": rows_of(tasks["airline"], "train")[:400]}, [], steps=steps * rounds,
                            batch_size=16, mix=0, rng=rng)
    replay_b = mixed_batches({"airline": rows_of(tasks["airline"], "train")[:400]}, old, steps=steps * rounds,
                             batch_size=16, mix=0.25, rng=rng)
    spec = LoraSpec(r=8, alpha=16)

    def setup(n_slots: int, regs_for, forget: bool = False, distill: float = 0.0):
        lb = load_base("minilm", s)
        mods = spec.resolve_targets(lb.fingerprint.linear_names(), lb.fingerprint.model_type)
        slots = [add_slot(lb.model, spec, mods, generator=torch.Generator().manual_seed(i)) for i in range(n_slots)]
        slot, prev = slots[-1], slots[:-1]
        objective = None
        head = head_for(lb)
        if forget:  # a forgetting request on top of the six adapters: airline rows forgotten, the rest retained
            fg = FORGETTERS.build("gs-lora", {})
            fmods = fg.modules(lb.fingerprint)
            objective = fg.objective(tasks["airline"], None)
            objective.record_teacher(head, lb.model, lb.tokenizer, old, tasks)
            slot = add_slot(lb.model, fg.lora_spec(fmods), fmods, generator=torch.Generator().manual_seed(99))
            prev = []
        teacher = objective.teacher if objective is not None else None
        if distill:  # DER++: the replayed rows' stored scores, as the stream records them
            from loraplex.continual.distill import StoredScores

            teacher = StoredScores(distill)
            teacher.record(head, lb.model, lb.tokenizer, old, tasks)
        train_only(lb.model, slot)
        regs = regs_for(lb)
        ctx = ExperienceContext(n_slots, lb.model, slot, prev)
        for r in regs:
            r.on_experience_start(ctx)
        module = ContinualModule(lb.model, lb.tokenizer, head, tasks, regularizers=regs, forgetting=objective,
                                 teacher=teacher)
        module.log = lambda *a, **k: None  # outside a Trainer: nothing to log to
        opt = torch.optim.AdamW([p for p in lb.model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
        lb.model.train()
        return module, opt

    configs = {
        "plain LoRA": (setup(1, lambda lb: []), plain_b),
        "seq-lora + replay": (setup(1, lambda lb: []), replay_b),
        "o-lora (6 adapters)": (setup(6, lambda lb: [REGULARIZERS.build("o-lora", {})]), plain_b),
        "o-lora + replay": (setup(6, lambda lb: [REGULARIZERS.build("o-lora", {})]), replay_b),
        "o-lora + DER++ replay": (setup(6, lambda lb: [REGULARIZERS.build("o-lora", {})], distill=2.0), replay_b),
        "gs-lora forgetting": (setup(6, lambda lb: [REGULARIZERS.build("gs-lora", {}, model_type="bert")], forget=True),
                               replay_b),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds):
        for name, ((module, opt), batches) in configs.items():
            for i in range(steps):
                batch = batches[r * steps + i]
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = module.training_step(batch, i)
                loss.backward()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        log(f"  timing round {r + 1}/{rounds} done")
    return {k: statistics.median(v[1:]) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="optimiser steps per task (and per forgetting request)")
    ap.add_argument("--eval-limit", type=int, default=200, help="test examples per task in the accuracy matrix")
    ap.add_argument("--orders", type=int, default=3, help="how many of the three task orders to run")
    ap.add_argument("--only-order", type=int, choices=(1, 2, 3), action="append", default=None,
                    help="run this order only (repeatable; overrides --orders)")
    ap.add_argument("--tasks", choices=("six", "library"), default="six",
                    help="six: the six embedded tasks; library: the 15-task stream drawn from the task library")
    ap.add_argument("--first", type=int, default=0, help="only the first N tasks of each order (0: all)")
    ap.add_argument("--base", default="minilm", help="base model of the streams (minilm, smollm2, a directory)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-forget", action="store_true", help="skip the GS-LoRA forgetting requests (six tasks only)")
    ap.add_argument("--home", default=str(REPO / ".bench" / "continual-home"))
    ap.add_argument("--distill", type=float, default=2.0,
                    help="replay.distill of the replay runs (DER++ weight, the spec's default 2.0; 0: plain replay)")
    ap.add_argument("--replay-rows", choices=["share", "added"], default="share",
                    help="replay.rows of the replay runs: share (replayed rows take a quarter of each batch) or "
                         "added (on top of the batch's new rows, as DER++ samples its buffer minibatch)")
    ap.add_argument("--mix", type=float, default=0.25,
                    help="replay.mix of the replay runs: replayed rows per batch as a share of batch_size")
    ap.add_argument("--timing-rounds", type=int, default=4)
    ap.add_argument("--timing-steps", type=int, default=6)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-streams", action="store_true")
    ap.add_argument("--routed", action="store_true",
                    help="also run the routed method (a new LoRA per task + a token-gate router refitted on replay)")
    args = ap.parse_args()

    from loraplex.settings import Settings

    root = Path(args.home)
    settings = Settings.load(home=root / "registry", device="cpu", dtype="float32")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", flush=True)

    results: dict = {"steps": args.steps, "eval_limit": args.eval_limit, "orders": [], "multitask": None}
    tag = f"s{args.steps}-e{args.eval_limit}"
    if args.tasks == "library" or args.base != "minilm" or args.first or args.batch_size != 16:
        # other worlds get their own run names (the six-task runs keep theirs, so finished runs are reused)
        # (short: run names are at most 40 characters)
        tag = f"{args.tasks[0].upper()}{args.first or ''}{Path(args.base).name[:3]}b{args.batch_size}{tag.replace('-', '')}"
    rtag = f"{tag}-d{args.distill:g}"  # replay runs and their forgetting requests, per distillation weight
    rtag += "-a" if args.replay_rows == "added" else ""  # ... and per place of the replayed rows
    rtag += f"m{round(args.mix * 100)}" if args.mix != 0.25 else ""  # ... and per share of replayed rows
    if not args.no_streams:
        orders = [tuple(o[: args.first]) if args.first else tuple(o) for o in
                  (LIBRARY_ORDERS if args.tasks == "library" else ORDERS)][: max(args.only_order or [args.orders])]
        n = len(orders[0])
        results.update(tasks=args.tasks, base=args.base, n_tasks=n, batch_size=args.batch_size,
                       replay_rows=args.replay_rows)
        common = dict(steps=args.steps, eval_limit=args.eval_limit, base=args.base, batch_size=args.batch_size)
        log(f"multitask (all {n} tasks, {n * args.steps} steps)")
        results["multitask"] = run(spec_dict(f"multitask-{tag}", orders[0], "multitask", replay=False, **common),
                                   root, settings, log)
        for k, order in enumerate(orders):
            if args.only_order and k + 1 not in args.only_order:
                continue
            log(f"order {k + 1}: {' -> '.join(order)}")
            seq = run(spec_dict(f"seq-o{k + 1}-{tag}", order, "seq-lora", replay=False, **common), root, settings, log)
            olr = run(spec_dict(f"olora-replay-o{k + 1}-{rtag}", order, "o-lora", replay=True, distill=args.distill,
                                replay_rows=args.replay_rows, mix=args.mix, **common), root, settings, log)
            row = {"index": k + 1, "order": order, "seq-lora": seq, "o-lora+replay": olr}
            if args.tasks == "six" and not args.no_forget:
                adapters = [u["adapter"] for u in olr["metrics"]["units"]]
                row["forget"] = forget(f"forget-o{k + 1}-{rtag}", FORGET[k], adapters, steps=args.steps,
                                       eval_limit=args.eval_limit, settings=settings, log=log)
            if args.routed:
                routed = {"name": "routed", "router": "token-gate", "router_steps": args.steps}
                row["routed+replay"] = run(spec_dict(f"routed-replay-o{k + 1}-{rtag}", order, routed, replay=True,
                                                     distill=args.distill, replay_rows=args.replay_rows, mix=args.mix,
                                                     **common),
                                           root, settings, log)
            results["orders"].append(row)
    if not args.no_timing:
        log("step-time overhead (interleaved, one process)")
        results["step_time"] = step_times(rounds=args.timing_rounds, steps=args.timing_steps, log=log)
    out = root / f"results-{rtag}{''.join(f'-o{k}' for k in args.only_order or ())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    report(results)


def report(results: dict) -> None:
    keys = ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting")
    print()
    world = ("six embedded tasks" if results.get("tasks", "six") == "six"
             else f"{results.get('n_tasks', 15)} tasks of the task library")
    print(f"== continual benchmark: {results.get('base', 'minilm')}, {world}, {results['steps']} steps per task, "
          f"batch {results.get('batch_size', 16)}, {results['eval_limit']} test examples per task, replayed rows "
          f"{'added to' if results.get('replay_rows') == 'added' else 'sharing'} the batch ==")
    if results["orders"]:
        print(f"{'run':<28}{'AA':>7}{'BWT':>7}{'FWT':>7}{'F':>7}")
        avg: dict[str, dict[str, list[float]]] = {}
        for k, o in enumerate(results["orders"]):
            for method in ("seq-lora", "o-lora+replay", "routed+replay"):
                if method not in o:
                    continue
                m = o[method]["metrics"]
                label = f"order {o.get('index', k + 1)} {method}"
                print(f"{label:<28}{pts(m['average_accuracy'])}  {pts(m['backward_transfer'], True)}"
                      f"  {pts(m['forward_transfer'], True)}  {pts(m['forgetting'])}")
                for key in keys:
                    if m.get(key) is not None:
                        avg.setdefault(method, {}).setdefault(key, []).append(m[key])
        mt = results["multitask"]["metrics"]
        print(f"{'multitask (upper bound)':<28}{pts(mt['average_accuracy'])}      -      -      -")
        print()
        print(f"mean over {len(results['orders'])} orders:")
        means = {meth: {k: statistics.mean(v) for k, v in d.items()} for meth, d in avg.items()}
        for meth, d in means.items():
            print(f"  {meth:<16} AA {pts(d.get('average_accuracy'))}  BWT {pts(d.get('backward_transfer'), True)}  "
                  f"FWT {pts(d.get('forward_transfer'), True)}  forgetting {pts(d.get('forgetting'))}")
        print(f"  {'multitask':<16} AA {pts(mt['average_accuracy'])}")
        o = means.get("o-lora+replay", {})
        if o:
            gap = 100 * (mt["average_accuracy"] - o["average_accuracy"])
            print(f"  o-lora+replay vs multitask: AA gap {gap:.1f} points (goal <= 2.0); "
                  f"BWT {100 * o['backward_transfer']:+.1f} points (goal >= -1.0)")
        print()
        if any(o.get("forget") for o in results["orders"]):
            print("forgetting requests (GS-LoRA, against each order's final o-lora+replay composition):")
        for k, o in enumerate(results["orders"]):
            for f in [o["forget"]] if o.get("forget") else []:
                what = f["task"] + (f"[{','.join(f['labels'])}]" if f.get("labels") else "")
                print(f"  order {k + 1} forget {what:<16} forgotten {pts(f['forgotten_before'])} -> {pts(f['forgotten_after'])}"
                      f" (chance {pts(f['chance'])});  retained {pts(f['retained_before'])} -> {pts(f['retained_after'])}"
                      f" (mean drop {pts(f['retained_drop'], True)}, worst {pts(f['retained_max_drop'], True)});"
                      f"  LoRA groups kept {f['groups_survived']}/{f['groups_total']}")
    st = results.get("step_time")
    if st:
        print()
        print("step time (median seconds per optimiser step, interleaved in one process): ratio to plain LoRA on the")
        print("new task's rows, and, for configurations that train on replayed rows, to plain LoRA on the same rows")
        print("(seq-lora + replay: one LoRA, the same mixed batches, so the ratio is the method's own cost)")
        base, same = st["plain LoRA"], st.get("seq-lora + replay")
        for name, v in st.items():
            mixed = ("replay" in name or "gs-lora" in name) and same and name != "seq-lora + replay"
            extra = f"   x{v / same:.3f} vs plain LoRA on the same rows" if mixed else ""
            print(f"  {name:<24} {v:.3f}s  x{v / base:.3f}{extra}")


if __name__ == "__main__":
    main()
