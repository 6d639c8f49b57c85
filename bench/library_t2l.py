"""Text-to-LoRA's SFT objective over the task library: a description -> adapter map trained on the tasks' data.

SG-LoRA and ICM-LoRA (generators/) learn to reproduce the library's adapters (a CVAE over their weights),
and on a held-out task their feed-forward adapter recovers 37-40% of its own adapter's gain
(bench/results/library-generators.txt). Text-to-LoRA (Charakorn et al., "Text-to-LoRA: Instant Transformer
Adaption", arXiv 2506.06105) reports that a hypernetwork trained end to end on the tasks' own data (its
"SFT" mode: the loss is the base + generated adapter's loss on a task's examples, not the distance to a
trained adapter) generalises to unseen tasks better than one trained to reconstruct adapters, since the
adapters differ in much that their tasks do not ask for (their training's noise). This study asks whether
that holds here, feed-forward (no step at generation time: the 100x goal's budget), with:

    h(e)     = b + (e - e_mean) W               e: the task description's embedding (384,), h: (m,) coordinates
    theta    = ParamSpace.decode(h(e))          the fold's parameter space (generators/space.py, m <= 32)
    L(W, b)  = CE(batch of task j | base + adapter(theta(h(e_j)))) + wd ||W - W0||^2,  j drawn in turn

How it differs from the paper, and why: T2L's hypernetwork emits every layer's A and B from the
description, a layer and a module embedding (an MLP of ~5M-55M parameters) and trains on 479 SNI tasks;
here the map is linear and emits coordinates of the space spanned by the library's adapters (m <= 32),
since 50-odd training tasks cannot fit a larger map, and it starts from the least-squares map onto the
training adapters' coordinates (T2L's reconstruction objective, the `recon` column) before the SFT steps.
A control, `multitask`, trains the bias alone the same way (one adapter for every task: does the
description matter, or only a good adapter for the library at large?).

Held-out tasks: k folds of the library (every k-th task in the library's order, so each fold takes a few of
every family); the map for fold f is fitted on the other folds' tasks only (their adapters and data),
never on fold f's adapters, snapshots, descriptions or examples (asserted). This is stricter than the
leave-one-out of bench/library_generators.py (a task's siblings in its own fold are held out with it),
so its figures are a lower bound for the same method under leave-one-out. One thing it shares with every
study over the library: sibling tasks are label sets over the same corpora, so a held-out task's test
texts can be training rows of a task in the fold's training set (21.5% of the scored rows, sweep 51), as
they were for the library adapters that the nearest-adapter, LoraHub and CVAE figures read.

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/library_t2l.py [--folds 8] [--steps 150] [--out FILE]
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
from bench.generators import Evaluator  # noqa: E402
from bench.library import count, library_tasks, out_file  # noqa: E402
from bench.library_generators import record_train_seconds, resumed_rows  # noqa: E402

BATCH = 16
METHODS = ("recon", "multitask", "t2l-sft")


def fold(full, tasks: list[str], k: int, f: int):
    """(held-out tasks, training set): fold f of k holds out every k-th library task from the f-th, and the
    training set keeps every other member (never a held-out task's adapter, snapshots or description)."""
    held = [t for i, t in enumerate(tasks) if i % k == f]
    return held, full.without([adapter_name(t) for t in held])


def ridge(E, C, lam: float):
    """(W, b): the least-squares map from centred description embeddings E (N, D) to coordinates C (N, m)."""
    import torch

    Ec = E - E.mean(0)
    W = torch.linalg.solve(Ec.T @ Ec + lam * torch.eye(E.shape[1]), Ec.T @ (C - C.mean(0)))
    return W, C.mean(0)


def sft(space, data, E, W0, b0, ev, steps: int, lr: float, wd: float, bias_only: bool, seed: int, log=print):
    """(W, b) after `steps` SFT steps on the fold's training tasks (one task's batch of BATCH per step)."""
    import torch

    from loraplex.data import load_task
    from loraplex.generators.refine import trainable_bank

    model, tok, head = ev.lb.model, ev.lb.tokenizer, ev.head
    basis, scale, mean = space.basis.float(), (space.kappa * space.param_scale()).float(), space.mean.float()
    e_mean = E.mean(0)
    W = W0.clone().requires_grad_(not bias_only)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [b], "lr": lr * 5}] + ([] if bias_only else [{"params": [W], "lr": lr}]))
    tasks = [load_task(t) for t in data.tasks]
    g = torch.Generator().manual_seed(seed)
    losses = []
    with trainable_bank(model, space, b0) as loss_and_grad:
        order = torch.randperm(len(tasks), generator=g).tolist()
        for step in range(steps):
            j = order[step % len(order)]
            task = tasks[j]
            rows = torch.randint(len(task.train), (min(BATCH, len(task.train)),), generator=g).tolist()
            texts = [task.train[r].text for r in rows]
            y = torch.tensor([task.label_index(task.train[r].label) for r in rows])
            theta = mean + ((b + (E[j] - e_mean) @ W) @ basis) * scale  # (P,), differentiable in W and b
            value, g_theta = loss_and_grad(theta, lambda: head.loss(model, tok, texts, y, task))
            opt.zero_grad()
            total = (theta * g_theta).sum() + (0 if bias_only else wd * (W - W0).pow(2).sum())
            total.backward()
            opt.step()
            losses.append(value)
            if (step + 1) % 50 == 0:
                log(f"    step {step + 1}: mean loss of the last 50 {statistics.mean(losses[-50:]):.3f}")
    return W.detach(), b.detach()


def adapter_of(space, W, b, e, e_mean):
    import torch

    with torch.no_grad():
        x = b + (e - e_mean) @ W
        return space.layout.unflatten(space.decode(x.reshape(1, -1))[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=count, default=8, help="folds of the library (every k-th task held out together)")
    ap.add_argument("--only-folds", help="run only these folds (comma-separated, 0-based)")
    ap.add_argument("--steps", type=count, default=150, help="SFT steps per fold (one task's batch of 16 each)")
    ap.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate on W (the bias: 5x)")
    ap.add_argument("--wd", type=float, default=1.0, help="weight of ||W - W0||^2 (W0: the least-squares map)")
    ap.add_argument("--ridge", type=float, default=0.1, help="the least-squares map's ridge")
    ap.add_argument("--max-dims", type=count, default=32, help="the parameter space's dimensions at most")
    ap.add_argument("--eval-limit", type=count, default=150, help="test rows per task (the library build's)")
    ap.add_argument("--min-gain", type=float, default=0.05, help="tasks counted in gain recovered: oracle - base >= this")
    ap.add_argument("--no-multitask", action="store_true", help="skip the bias-only control")
    ap.add_argument("--out", type=out_file, default=None, help="rows file (default: library-t2l.json in the bench home)")
    args = ap.parse_args(argv)
    if args.folds < 2:
        ap.error("--folds: at least 2")
    try:
        only = {int(f) for f in args.only_folds.split(",")} if args.only_folds else set(range(args.folds))
    except ValueError:
        ap.error(f"--only-folds: fold numbers separated by commas, got {args.only_folds!r}")
    if not only or not only <= set(range(args.folds)):
        ap.error(f"--only-folds: folds are numbered 0 to {args.folds - 1}, got {args.only_folds!r}")
    if not 0 < args.min_gain <= 1:
        ap.error(f"--min-gain: above 0 and at most 1, got {args.min_gain:g}")

    import torch

    from loraplex import api
    from loraplex.data import EMBEDDED_TASKS, load_task
    from loraplex.generators.base import GenContext
    from loraplex.generators.space import ParamSpace
    from loraplex.generators.workflow import training_set

    t_start = time.perf_counter()
    s = bench_settings()
    reg = api.open_registry(s)
    tasks = [n for n in library_tasks() if reg.has_adapter(adapter_name(n))]
    members = [adapter_name(n) for n in tasks]
    if len(tasks) < 2 * args.folds:
        ap.error(f"{len(tasks)} library adapters in {bench_home()}: too few for {args.folds} folds")
    print(f"bench home {bench_home()}: {len(members)} library adapters, {args.folds} folds")
    full = training_set(reg, members)
    ev = Evaluator(s, args.eval_limit)
    out = args.out or bench_home() / "library-t2l.json"
    recipe = {"home": str(bench_home()), "members": len(members), "folds": args.folds, "steps": args.steps,
              "lr": args.lr, "wd": args.wd, "ridge": args.ridge, "max_dims": args.max_dims,
              "eval_limit": args.eval_limit, "multitask": not args.no_multitask}
    rows = resumed_rows(out, recipe, ap)
    ctx = GenContext(s, reg.embedder_name, full.base)
    ctx.embed(["a first call loads the embedder"])  # not a generation's cost
    train_of = record_train_seconds(reg, tasks)
    for f in sorted(only):
        held, data = fold(full, tasks, args.folds, f)
        if all(t in rows for t in held):  # done by an earlier run of this recipe (the rows file resumes)
            continue
        assert not {adapter_name(t) for t in held} & {src for src, _ in data.sources}
        t0 = time.perf_counter()
        space = ParamSpace.fit(data.layout, data.vectors, max_dims=args.max_dims)
        finals = [i for i, (_, step) in enumerate(data.sources) if step < 0]
        C = space.encode(data.vectors[finals])  # (N, m), in the members' order
        assert [data.sources[i][0] for i in finals] == data.members
        E = data.desc_embeddings.float()
        W0, b0 = ridge(E, C, args.ridge)
        print(f"fold {f}: holding out {', '.join(held)}; {len(data.members)} training tasks, space {space.dims} dims")
        maps = {"recon": (W0, b0)}
        if not args.no_multitask:
            maps["multitask"] = sft(space, data, E, torch.zeros_like(W0), torch.zeros_like(b0), ev, args.steps,
                                    args.lr, args.wd, True, seed=f)
        maps["t2l-sft"] = sft(space, data, E, W0, b0, ev, args.steps, args.lr, args.wd, False, seed=f)
        fit_s = time.perf_counter() - t0
        e_mean = E.mean(0)
        for t in held:
            task = load_task(t)
            i = full.members.index(adapter_name(t))
            e = full.desc_embeddings[i].float()
            row = {"task": t, "family": EMBEDDED_TASKS[t]["family"], "fold": f, "base": ev(None, task),
                   "oracle": ev(reg.load_adapter(adapter_name(t))[1], task), "fit_seconds": round(fit_s, 1),
                   "recipe": recipe}
            for m, (W, b) in maps.items():
                t1 = time.perf_counter()
                ctx.embed([task.description])  # what a generation from a new description costs (the map reads
                a = adapter_of(space, W, b, e, e_mean)  # the registry's stored embedding of the same text)
                row[f"{m}_seconds"] = round(time.perf_counter() - t1, 4)
                row[m] = ev(a, task)
            rows[t] = row
            print("  " + " ".join(f"{c}={row[c]:.3f}" for c in ("base",) + tuple(maps) + ("oracle",)) + f"  {t}")
        out.write_text(json.dumps(rows, indent=1) + "\n")
    done = list(rows.values())
    gaining = [r for r in done if r["oracle"] - r["base"] >= args.min_gain]
    if not gaining:
        print(f"\nno held-out task's own adapter gains {100 * args.min_gain:.0f} points over the base: no gain to "
              "recover (lower --min-gain, or hold out more folds)")
        return 0
    cols = [m for m in METHODS if all(m in r for r in done)]
    print(f"\n== gain recovered over {len(gaining)} of {len(done)} held-out tasks (oracle gains >= "
          f"{100 * args.min_gain:.0f} points), feed-forward ==")
    print(f"{'family':<18}{'tasks':>6}" + "".join(f"{c:>11}" for c in cols))
    for fam in sorted({r["family"] for r in gaining}) + ["all"]:
        rs = [r for r in gaining if fam in ("all", r["family"])]
        print(f"{fam:<18}{len(rs):>6}" + "".join(
            f"{statistics.mean((r[c] - r['base']) / (r['oracle'] - r['base']) for r in rs):>11.1%}" for c in cols))
    for c in cols:
        timed = [train_of[r["task"]] / r[f"{c}_seconds"] for r in done if train_of.get(r["task"])]
        if timed:
            print(f"{c}: generation {1000 * statistics.median(r[f'{c}_seconds'] for r in done):.0f} ms (median), "
                  f"{statistics.median(timed):,.0f}x faster than training the task's own adapter (its library record)")
    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
