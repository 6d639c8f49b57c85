"""GS-LoRA forgetting objective: the bounded loss, the distillation term, which rows are forgotten."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.continual.forgetting import FORGETTERS
from loraplex.continual.losses import bound_for, bounded_forget_loss, distill_loss
from loraplex.data import load_task


def test_bounded_loss_stops_at_the_bound():
    y = torch.tensor([0, 1])
    confident = torch.tensor([[5.0, -5.0], [-5.0, 5.0]], requires_grad=True)
    loss = bounded_forget_loss(confident, y, bound_for(2, 1.0))
    assert float(loss) == pytest.approx(math.log(2) - float(torch.nn.functional.cross_entropy(confident, y)), rel=1e-5)
    loss.backward()
    assert confident.grad[0, 0] > 0  # descending the loss lowers the gold label's score
    wrong = torch.tensor([[-5.0, 5.0], [5.0, -5.0]], requires_grad=True)
    assert float(bounded_forget_loss(wrong, y, bound_for(2, 1.0))) == 0.0


def test_distill_is_zero_at_the_teacher():
    t = torch.randn(4, 3)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(t + torch.randn(4, 3), t)) > 0


def test_objective_rows_and_teacher(tiny_bert, settings, task_dir):
    from loraplex.continual.module import ContinualModule
    from loraplex.heads import head_for
    from loraplex.models import load_base

    markets = load_task(str(task_dir / "markets.jsonl"))
    flights = load_task(str(task_dir / "flights.jsonl"))
    obj = FORGETTERS.build("gs-lora", {}).objective(markets, ["up"])
    up, down = markets.label_index("up"), markets.label_index("down")
    assert obj.is_forget(("x", up, "markets")) and not obj.is_forget(("x", down, "markets"))
    assert not obj.is_forget(("x", up, "flights"))
    lb = load_base(str(tiny_bert), settings)
    head = head_for(lb)
    tasks = {"markets": markets, "flights": flights}
    kept = [(e.text, flights.label_index(e.label), "flights") for e in flights.train[:5]]
    obj.record_teacher(head, lb.model, lb.tokenizer, kept, tasks)
    assert len(obj.teacher) == 5
    module = ContinualModule(lb.model, lb.tokenizer, head, tasks, teacher=obj.teacher)
    lb.model.eval()
    module.task_loss(kept)
    assert float(module._batch_kd) == pytest.approx(0.0, abs=1e-5)  # unchanged model: no distillation loss
    module.task_loss([("unseen text", 0, "flights")])
    assert module._batch_kd is None
    # a changed model: the term is the KL to the recorded scores, computed from the task loss's own forward
    with torch.no_grad():
        lb.model.encoder.layer[0].intermediate.dense.weight.mul_(1.5)
    module.task_loss(kept + [("unseen text", 0, "flights")])
    with torch.no_grad():
        want = distill_loss(head.scores(lb.model, lb.tokenizer, [r[0] for r in kept], flights),
                            torch.stack([obj.teacher.lookup(r) for r in kept]))
    assert float(module._batch_kd) > 1e-6
    assert float(module._batch_kd) == pytest.approx(obj.distill_weight * float(want), rel=1e-4)
