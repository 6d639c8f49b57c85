"""Task library benchmark registry: one trained minilm adapter per embedded task (`<task>-lora`).

Trains the adapters that are missing from the bench registry (resumable: a task whose adapter is
already registered is skipped, so an interrupted run picks up where it stopped), with a progress bar,
and prints each adapter's test accuracy against the bare base and the total time. Results (one entry
per registered library adapter, read from its record: family, steps, test rows, accuracy, base accuracy,
seconds) are written to a JSON file, `library.json` in the bench home unless --out names another
(bench/results/library.json is the published one).

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/library.py [--family F] [--tasks a,b] [--steps 200]
        [--limit N] [--eval-limit 200] [--interleave] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import STEPS, adapter_name, bench_home, bench_settings  # noqa: E402


def interleaved(names: list[str]) -> list[str]:
    """The tasks round-robin over their families (a partly built library then covers every family)."""
    from loraplex.data import EMBEDDED_TASKS

    by: dict[str, list[str]] = {}
    for n in names:
        by.setdefault(EMBEDDED_TASKS[n]["family"], []).append(n)
    out: list[str] = []
    while any(by.values()):
        for fam in list(by):
            if by[fam]:
                out.append(by[fam].pop(0))
    return out


def library_tasks(family: str | None = None, tasks: str | None = None) -> list[str]:
    from loraplex.data import EMBEDDED_TASKS
    from loraplex.errors import TaskNotFound
    from loraplex.library import FAMILIES

    if family is not None and family not in FAMILIES:
        raise TaskNotFound(f"unknown task family {family!r} (families: {', '.join(FAMILIES)})")
    names = [n for n, info in EMBEDDED_TASKS.items() if family in (None, info["family"])]
    if tasks is not None:  # "" names no task (it read as "every task": sweep 40)
        wanted = [t.strip() for t in tasks.split(",") if t.strip()]
        if not wanted:
            raise TaskNotFound("--tasks names no task")
        unknown = [t for t in wanted if t not in EMBEDDED_TASKS]
        if unknown:
            raise TaskNotFound(f"unknown task {unknown[0]!r}")
        names = [n for n in names if n in wanted]
        if not names:
            raise TaskNotFound(f"none of the tasks named is of family {family!r}")
    return names


def count(text: str, least: int = 1) -> int:
    """An argparse type: a whole number of at least `least`."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"{n} is below {least}")
    return n


def entry(reg, task: str) -> dict:
    """A task's results entry, from its registered adapter's record (what the training measured and stored):
    `seconds` is the record's training time, for every entry alike (the wall time of the run that trained it,
    model load and evaluation included, stood in the entries that run wrote: sweep 42)."""
    from loraplex.data import EMBEDDED_TASKS

    m = reg.get_adapter(adapter_name(task)).metrics
    return {"family": EMBEDDED_TASKS[task]["family"], "adapter": adapter_name(task), "steps": m.get("steps"),
            "eval_limit": m.get("test_n"), "accuracy": m.get("accuracy"), "base_accuracy": m.get("base_accuracy"),
            "seconds": round(m.get("train_seconds", 0.0), 1)}


def out_file(text: str) -> Path:
    """An argparse type: a results file this run can write (not a folder; its folder exists or can be made),
    checked before anything trains (sweep 42: a traceback after the first adapter)."""
    p = Path(text).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if (p.exists() or p.is_symlink()) and not p.is_file():  # a FIFO: opening it waited for a reader (sweep 43)
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    existed = p.exists()
    made = [d for d in p.parents if not d.exists()]  # the folders the check makes (deepest first): taken back
    try:  # tried, not predicted from permission bits (root passes those where /proc refuses)
        p.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {exc.strerror or exc}") from None
    finally:  # a run refused later (another argument) leaves no trace of the check (sweep 43); `write` makes them
        if not existed and p.is_file():
            p.unlink()
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
    return p


def write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", help="only this family's tasks")
    ap.add_argument("--tasks", help="comma-separated task names (default: every embedded task)")
    ap.add_argument("--steps", type=count, default=STEPS, help="training steps per adapter")
    ap.add_argument("--limit", type=lambda t: count(t, 0), default=None, help="train at most this many new adapters this run")
    ap.add_argument("--eval-limit", type=count, default=200, help="test rows scored per adapter (and for the bare base)")
    ap.add_argument("--interleave", action="store_true", help="train round-robin over the families")
    ap.add_argument("--out", type=out_file, default=None,
                    help="results file (default: library.json in the bench home; the published one is "
                         "bench/results/library.json, written only when named)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from loraplex import api

    from loraplex.errors import LoraplexError

    s = bench_settings()
    reg = api.open_registry(s)
    try:
        names = library_tasks(args.family, args.tasks)
    except LoraplexError as exc:
        ap.error(str(exc))
    todo = [n for n in names if not reg.has_adapter(adapter_name(n))]
    missing = len(todo)
    if args.interleave:
        todo = interleaved(todo)
    if args.limit is not None:
        todo = todo[: args.limit]
    later = f", {missing - len(todo)} left for a later run (--limit)" if missing > len(todo) else ""
    print(f"bench home {bench_home()}: {len(names)} tasks, {len(names) - missing} already registered, "
          f"{len(todo)} to train ({args.steps} steps each){later}")
    out = args.out or bench_home() / "library.json"
    # the file describes this bench home's registry, read from its records: a task trained by an earlier (killed)
    # run has its entry, and nothing of another home or recipe stays in it (sweep 40: a scratch home's 1-step run
    # was merged into the published 50-step results)
    results = {n: entry(reg, n) for n in library_tasks() if reg.has_adapter(adapter_name(n))}
    t_all = time.perf_counter()
    bar = tqdm(todo, unit="task", dynamic_ncols=True)
    for n in bar:
        bar.set_description(n)
        t0 = time.perf_counter()
        res = api.train(n, name=adapter_name(n), base="minilm", steps=args.steps, eval_limit=args.eval_limit,
                        progress=False, settings=s)
        dt = time.perf_counter() - t0
        results[n] = entry(reg, n)
        tqdm.write(f"{n:32s} {results[n]['family']:17s} accuracy {res.metrics['accuracy']:.3f} "
                   f"(base {res.metrics['base_accuracy']:.3f}) in {dt:.0f}s")
        write(out, results)  # after each task: an interrupted run keeps its results
    write(out, results)
    total = time.perf_counter() - t_all
    print(f"trained {len(todo)} adapters in {total:.0f}s ({total / max(1, len(todo)):.0f}s each); "
          f"{sum(reg.has_adapter(adapter_name(n)) for n in names)}/{len(names)} registered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
