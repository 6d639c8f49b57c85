"""Continual-learning metrics: pure functions of the accuracy matrix.

R[i, j] is the accuracy on task j after learning experience i (NaN where not measured); task j is
first learned at row `learned_at[j]`; b[j] is the bare base's accuracy on task j. With T experiences
that each learn one task (learned_at[j] = j) these are the textbook definitions:

    average accuracy   AA  = 1/T * sum_j R[T-1, j]
    backward transfer  BWT = 1/(T-1) * sum_{j<T-1} (R[T-1, j] - R[j, j])               (Lopez-Paz & Ranzato, GEM 2017)
    forward transfer   FWT = 1/(T-1) * sum_{j>0} (R[j-1, j] - b[j])                      (ibid.)
    forgetting         F   = 1/(T-1) * sum_{j<T-1} max_{l in [j, T-2]} (R[l, j] - R[T-1, j])   (Chaudhry et al., RWalk 2018)

When a row learns several tasks at once (the multitask upper bound learns all of them in one row),
the sums run over the tasks for which the quantity exists (a task learned in the last row has no
backward transfer; a task learned in the first row has no forward transfer); a metric with no task
to average over is None. Values are fractions (0..1); reports multiply by 100 for points. R holds the
learning rows only: when a forgetting request comes between two of them, R[j-1, j] is the accuracy on task
j measured by that request's unit, the last measurement before j is learned (`forward_transfer`'s `before`).
A stream that ends with forgetting requests has one more row, the last of them (continual/report.py): the
model the stream ends with, so AA, BWT and forgetting count what the requests did to the tasks kept (every
task is then learned before the last row).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from loraplex.continual.evaluation import label_accuracy


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else None


def average_accuracy(R: np.ndarray, learned_at: Sequence[int], row: int = -1) -> float | None:
    """Mean accuracy after row `row` over the tasks learned by then."""
    row = row % R.shape[0]
    return _mean([R[row, j] for j, at in enumerate(learned_at) if at <= row])


def backward_transfer(R: np.ndarray, learned_at: Sequence[int]) -> float | None:
    last = R.shape[0] - 1
    return _mean([R[last, j] - R[at, j] for j, at in enumerate(learned_at) if at < last])


def forward_transfer(R: np.ndarray, learned_at: Sequence[int], base: Sequence[float],
                     before: Sequence[float] | None = None) -> float | None:
    """`before[j]`: task j's accuracy measured just before the unit that learns it, when that unit follows
    one that is not a row of R (a forgetting request measures the next task too); default R[at - 1, j]."""
    return _mean([(R[at - 1, j] if before is None else before[j]) - base[j] for j, at in enumerate(learned_at) if at > 0])


def forgetting(R: np.ndarray, learned_at: Sequence[int]) -> float | None:
    """Chaudhry's average forgetting: how far each earlier task fell from its best accuracy."""
    last = R.shape[0] - 1
    out = []
    for j, at in enumerate(learned_at):
        if at < last:
            best = np.nanmax(R[at:last, j]) if not np.all(np.isnan(R[at:last, j])) else float("nan")
            out.append(best - R[last, j])
    return _mean(out)


def summary(R: np.ndarray, learned_at: Sequence[int], base: Sequence[float],
            before: Sequence[float] | None = None) -> dict[str, float | None]:
    """AA, BWT, FWT and forgetting of a matrix, as fractions (`before`: see `forward_transfer`)."""
    return {
        "average_accuracy": average_accuracy(R, learned_at),
        "backward_transfer": backward_transfer(R, learned_at),
        "forward_transfer": forward_transfer(R, learned_at, base, before),
        "forgetting": forgetting(R, learned_at),
    }


FORGET_MIN_DROP = 0.02
"""A forgetting request that lowers the forgotten rows' accuracy by less than this (2 points), or raises
it, did not forget: its summary says so (`forgot: false` and a `warning`)."""


def forget_request_summary(before: dict[str, Any], after: dict[str, Any], task: str, labels: Sequence[str] | None,
                           retained: Sequence[str], n_labels: int, *, split: str = "test",
                           stronger: str = "more --steps or a higher --lr",
                           erased: Mapping[str, Sequence[str] | None] | None = None) -> dict[str, Any]:
    """Accuracy on what a forgetting request erased and on what it kept, before and after it.

    `before` / `after` are evaluation rows ({task: {"accuracy", "labels": {label: [correct, n]}}}) of the
    `split` evaluated; the forgotten part is `task` (or only its `labels`), the retained part is every task
    in `retained` plus, for a labels request, the task's other labels. Chance level is 1 / n_labels.
    `forgot` is True when the forgotten rows' accuracy fell by FORGET_MIN_DROP or more, False when it did
    not, None when no evaluated row was one to forget (then the `warning` says the forgetting was not measured).
    `stronger`: what to change for a stronger request, in the caller's terms (a stream's spec keys).
    `erased`: {task: labels, or None for the whole task} earlier requests erased: not counted as kept (sweep
    37: an erased label of the task counted as retained, and its return as a retention gain; sweep 44: a
    retained task's erased labels were counted as its retention, 70.0 where its kept label read 0.0), and
    watched: `erased_earlier` holds their accuracy before and after, and one that rose by FORGET_MIN_DROP or
    more is a warning (sweep 44: a second label request brought the first's label back, 0% -> 100%, unsaid).
    """
    def part(row: dict[str, Any], keep: bool) -> float | None:
        return label_accuracy(row[task], labels, keep=keep) if task in row else None

    erased = dict(erased or {})

    def kept(row: dict[str, Any], t: str) -> float | None:  # a retained task on the labels it still has
        return label_accuracy(row[t], list(erased[t]), keep=True) if erased.get(t) else row[t]["accuracy"]

    f_before, f_after = part(before, False), part(after, False)
    kept_before = {t: v for t in retained if t in before and (v := kept(before, t)) is not None}
    kept_after = {t: v for t in retained if t in after and (v := kept(after, t)) is not None}
    if labels is not None:
        gone = tuple(labels) + tuple(lab for lab in (erased.get(task) or ()) if lab not in labels)
        kb = label_accuracy(before[task], gone, keep=True) if task in before else None
        ka = label_accuracy(after[task], gone, keep=True) if task in after else None
        if kb is not None and ka is not None:
            kept_before[f"{task}[other labels]"], kept_after[f"{task}[other labels]"] = kb, ka
    drops = {t: kept_before[t] - kept_after[t] for t in kept_before if t in kept_after}
    what = task + (f" (labels {', '.join(labels)})" if labels else "")
    warning, forgot = None, True
    if f_before is None or f_after is None:
        cell = before.get(task) or {}
        n = cell.get("n") or 0
        of = f" (of the {n} evaluated)" if n else ""
        if labels is None:
            warning = f"task {task!r} has no {split} row{of}: the forgetting was not measured"
        else:
            missing = [lab for lab in labels if not (cell.get("labels") or {}).get(lab)] or list(labels)
            warning = (f"no {split} row has label {missing[0]!r}" if len(missing) == 1 else
                       f"no {split} row has any of the labels {', '.join(map(repr, missing))}")
            warning += f"{of}: the forgetting was not measured"
        forgot = None
    elif f_after > f_before - FORGET_MIN_DROP:
        warning = (f"the request did not forget {what}: accuracy on its rows went from {100 * f_before:.1f} to "
                   f"{100 * f_after:.1f} (chance {100 / n_labels:.1f}); try {stronger}")
        forgot = False
    back = {}  # what earlier requests erased, watched
    for t, labs in erased.items():
        if (t == task and labels is None) or t not in before or t not in after:
            continue
        was = before[t]["accuracy"] if labs is None else label_accuracy(before[t], list(labs))
        now = after[t]["accuracy"] if labs is None else label_accuracy(after[t], list(labs))
        if was is not None and now is not None:
            back[t if labs is None else f"{t}[{','.join(labs)}]"] = {"before": was, "after": now}
    risen = [(n, v) for n, v in back.items() if v["after"] > v["before"] + FORGET_MIN_DROP]
    if risen:
        said = "; ".join(f"{n} {100 * v['before']:.1f} -> {100 * v['after']:.1f}" for n, v in risen)
        note = f"the request brought back what earlier requests erased (accuracy on their rows: {said})"
        warning = f"{warning}; {note}" if warning else note
    return {
        "forgot": forgot,
        "warning": warning,
        "task": task,
        "labels": list(labels) if labels is not None else None,
        "chance": 1.0 / n_labels,
        "forgotten_before": f_before,
        "forgotten_after": f_after,
        "retained_before": _mean(list(kept_before.values())),
        "retained_after": _mean(list(kept_after.values())),
        "retained_drop": _mean(list(drops.values())),
        "retained_max_drop": max(drops.values()) if drops else None,
        "retained": {t: {"before": kept_before[t], "after": kept_after.get(t)} for t in kept_before},
        "erased_earlier": back,
    }
