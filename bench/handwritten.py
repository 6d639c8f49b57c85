"""Handwritten queries through `auto` and retrieval on the task library: does a person's text reach its task?

The library studies score each task on its own test split; a user types something else: short, misspelt,
a question about a topic rather than an instance of it, another language, or nothing the library knows.
bench/data/handwritten.tsv holds 150 such queries written by hand for this bench (tab-separated: the
query's family, the task it is of, its expected label, the query): 119 of the library's families
(`mixed`: a sentence mixing two languages, answered right by a language-id task) and 31 that fit none
(`none`: recipes, code, addresses; `near-miss`: questions about a library topic; `short`: one or two
words). The bench copies the bench home (`query --router auto` may write adapters into it), and answers
every query with retrieval routing, with `auto` (no generator: route or base), and with `--generator`
also with `auto` after fitting an sg-lora generator over the library (route, generate or base), twice:
the second pass shows whether what the first wrote changes the answers.

Reported per family: the decisions (route / generate / base), the share answered by a task of the
query's family, and the share answered with the expected label; for the out-of-family groups, the share
left to the bare base (what `auto` should do with text no task fits).

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/handwritten.py [--generator] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_home  # noqa: E402
from bench.library import out_file  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "handwritten.tsv"
OUTSIDE = ("none", "near-miss", "short")


def queries() -> list[tuple[str, str, str, str]]:
    """(family, task, label, query) rows of the handwritten set."""
    rows = [line.rstrip("\n").split("\t") for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows, 1) if len(r) != 4), None)
    if bad is not None:
        raise SystemExit(f"{DATA}:{bad}: expected 4 tab-separated fields")
    return [tuple(r) for r in rows]  # type: ignore[misc]


def family_of(task: str | None) -> str | None:
    from loraplex.data import EMBEDDED_TASKS

    return EMBEDDED_TASKS[task]["family"] if task in EMBEDDED_TASKS else None


def in_family(want: str, got: str | None) -> bool:
    """A query of family `want` answered by a task of family `got`: tweets by any tweet family (one tweet is
    an instance of its sentiment, polarity and opinion tasks alike), news by any news family, a sentence
    mixing languages by language identification."""
    if got is None:
        return False
    if want.startswith("tweet-"):
        return got.startswith("tweet-")
    if want == "news-topics":
        return got.startswith("news-")
    if want == "mixed":
        return got == "language-id"
    return got == want


def label_right(want: str, label: str, answer) -> bool:
    if answer is None:
        return False
    if want.startswith("tweet-") and label in ("negative", "positive") and answer == "opinion":
        return True  # an opinion-vs-neutral task answers a tweet with a sentiment as "opinion"
    return answer == label


def table(rows, answers, title: str) -> list[str]:
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (fam, _task, label, _q), a in zip(rows, answers):
        c = per[fam]
        c["n"] += 1
        c[a.get("decision", "route")] += 1
        c["family"] += in_family(fam, family_of(a.get("task")))
        c["label"] += label_right(fam, label, a.get("answer"))
    out = [f"== {title} ==", f"{'family':17} {'n':>3} {'route':>5} {'gen':>4} {'base':>4} {'family':>7} {'label':>7}"]
    for fam in sorted(per, key=lambda f: (f in OUTSIDE, f)):
        c, n = per[fam], per[fam]["n"]
        right = (f"   base share {c['base'] / n:.0%}" if fam in OUTSIDE
                 else f" {c['family'] / n:7.0%} {c['label'] / n:7.0%}")
        out.append(f"{fam:17} {n:3} {c['route']:5} {c['generate']:4} {c['base']:4}{right}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", action="store_true", help="also fit an sg-lora generator and answer with it")
    ap.add_argument("--out", type=out_file, default=None, help="write the tables to this file too")
    args = ap.parse_args(argv)
    from loraplex import api
    from loraplex.settings import Settings

    src = bench_home()
    if not (src / "registry.db").is_file():
        raise SystemExit(f"no bench registry at {src}: build it with bench/library.py")
    rows = queries()
    texts = [q for *_, q in rows]
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="loraplex-handwritten-") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(src, home, ignore=shutil.ignore_patterns("runs", "*.json"))
        s = Settings.load(home=home)
        passes = [("retrieval routing", None), ("auto, no generator", "auto")]
        for title, router in passes:
            t0 = time.perf_counter()
            ans = api.query(texts, router=router, settings=s)
            lines += table(rows, ans, f"{title} ({time.perf_counter() - t0:.0f} s)") + [""]
        if args.generator:
            api.fit_generator("g", method="sg-lora", settings=s)
            n = len(api.list_adapters(s))
            for k in (1, 2):
                t0 = time.perf_counter()
                ans = api.query(texts, router="auto", settings=s)
                grown = len(api.list_adapters(s)) - n
                lines += table(rows, ans, f"auto with an sg-lora generator, pass {k} ({time.perf_counter() - t0:.0f} s; "
                                          f"{grown} adapters written so far)") + [""]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
