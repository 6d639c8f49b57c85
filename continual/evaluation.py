"""Evaluating the model on the tasks of a stream: one row of the accuracy matrix.

`evaluate_tasks` scores each task's evaluation split with the model as it is (every adapter summed,
`gates=None`, or whatever routing the model carries) and keeps, besides the accuracy, the correct and
total counts per gold label, so accuracies on a subset of labels (a forgetting request for some
labels of a task, and the labels it keeps) follow from the same row without evaluating again.
"""

from __future__ import annotations

from typing import Any, Sequence

from loraplex.data import Task
from loraplex.heads import Head, split_predictions


def evaluate_task(head: Head, model, tokenizer, task: Task, *, split: str = "test", limit: int | None = None,
                  batch_size: int = 64) -> dict[str, Any]:
    """{"accuracy", "n", "labels": {label: [correct, n]}} on the first `limit` examples of `split`."""
    examples, preds = split_predictions(head, model, tokenizer, task, split, limit, batch_size)
    if not examples:
        return {"accuracy": None, "n": 0, "labels": {}}
    per: dict[str, list[int]] = {lab: [0, 0] for lab in task.labels}
    for p, e in zip(preds, examples):
        c = per[e.label]
        c[0] += int(p == task.label_index(e.label))
        c[1] += 1
    correct = sum(c for c, _ in per.values())
    return {"accuracy": correct / len(examples), "n": len(examples),
            "labels": {lab: c for lab, c in per.items() if c[1]}}


def evaluate_tasks(head: Head, model, tokenizer, tasks: Sequence[Task], **kw: Any) -> dict[str, dict[str, Any]]:
    """evaluate_task for each task, by task name."""
    return {t.name: evaluate_task(head, model, tokenizer, t, **kw) for t in tasks}


def label_accuracy(cell: dict[str, Any], labels: Sequence[str] | None, *, keep: bool = False) -> float | None:
    """Accuracy of an evaluated task restricted to `labels` (keep=True: to the other labels)."""
    if labels is None:
        return cell.get("accuracy") if not keep else None
    chosen = [c for lab, c in cell.get("labels", {}).items() if (lab in labels) != keep]
    n = sum(c[1] for c in chosen)
    return sum(c[0] for c in chosen) / n if n else None
