"""ContinualModule's task loss: a batch mixing tasks forwarded in length buckets equals the per-task forwards."""

from __future__ import annotations

import pytest
import torch

from loraplex.data import load_task
from loraplex.heads import length_buckets


def test_length_buckets():
    assert length_buckets([20, 31, 25, 18] * 4) == [sorted(range(16), key=lambda i: [20, 31, 25, 18][i % 4])]
    tweets_and_article = [20, 30, 25, 128, 22]
    assert length_buckets(tweets_and_article) == [[0, 4, 2, 1], [3]]  # the article is forwarded alone
    assert sorted(i for b in length_buckets([5, 90, 7, 128, 64, 3]) for i in b) == list(range(6))
    assert length_buckets([]) == []


def test_mixed_batch_loss_equals_per_task_forwards(tiny_bert, settings, task_dir):
    from loraplex.continual.distill import StoredScores
    from loraplex.continual.module import ContinualModule
    from loraplex.heads import head_for
    from loraplex.models import load_base

    tasks = {t: load_task(str(task_dir / f"{t}.jsonl")) for t in ("flights", "sports", "markets")}
    lb = load_base(str(tiny_bert), settings)
    head = head_for(lb)
    batch = [(e.text * (1 + 19 * (i == 0)), tasks[t].label_index(e.label), t)  # one long row among short ones
             for t in tasks for i, e in enumerate(tasks[t].train[:3])]
    teacher = StoredScores(0.7)  # stored scores far from the model's: a distillation term well above rounding
    gen = torch.Generator().manual_seed(0)
    for r in batch[1:]:
        teacher.table[(r[2], r[0])] = 3 * torch.randn(len(tasks[r[2]].labels), generator=gen)
    lb.model.eval()
    for t in tasks.values():  # label anchors are embedded once, on first use: not counted below
        head.anchors(lb.model, lb.tokenizer, t)
    mixed = ContinualModule(lb.model, lb.tokenizer, head, tasks, teacher=teacher)
    per_task = ContinualModule(lb.model, lb.tokenizer, head, tasks, teacher=teacher,
                               on_task_forward=lambda t: None)  # a hook forces one forward per task
    calls = []
    real = lb.model.forward
    lb.model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        a = mixed.task_loss(batch)
        n_mixed = len(calls)
        b = per_task.task_loss(batch)
    finally:
        del lb.model.forward
    assert n_mixed == 2 and len(calls) - n_mixed == 3  # two length buckets instead of three task groups
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    assert float(mixed._batch_kd) > 0.1 and float(mixed._batch_kd) == pytest.approx(float(per_task._batch_kd), rel=1e-4)


def test_forgetting_step_shares_one_pass_with_the_retained_rows(tiny_bert, settings, task_dir):
    from loraplex.continual.forgetting import FORGETTERS
    from loraplex.continual.module import ContinualModule
    from loraplex.heads import head_for
    from loraplex.models import load_base

    tasks = {t: load_task(str(task_dir / f"{t}.jsonl")) for t in ("flights", "markets")}
    lb = load_base(str(tiny_bert), settings)
    head = head_for(lb)
    batch = [(e.text, tasks[t].label_index(e.label), t) for t in tasks for e in tasks[t].train[:4]]
    obj = FORGETTERS.build("gs-lora", {}).objective(tasks["flights"], None)
    obj.record_teacher(head, lb.model, lb.tokenizer, batch[4:], tasks)
    lb.model.eval()
    losses = []
    for hook in (None, lambda t: None):  # shared pass, then one forward per kind of row
        module = ContinualModule(lb.model, lb.tokenizer, head, tasks, forgetting=obj, teacher=obj.teacher,
                                 on_task_forward=hook)
        module.log = lambda *a, **k: None  # outside a Trainer
        losses.append(float(module.training_step(batch, 0)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
