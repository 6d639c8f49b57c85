"""Few-shot refinement of a generated adapter inside the generator's parameter space.

A CVAE generator decodes an adapter from the neighbourhood of the tasks it knows: the decoded point
lies near the members' adapters in `ParamSpace` coordinates, weighted by how similar their tasks are.
On the task library (bench/library_generators.py) that recovers well under half of a trained
adapter's gain where the nearest tasks by description answer a different question of other texts
(language pairs, kaomoji categories), while a LoraHub-style signed mix of neighbours fitted on 16
labelled examples recovers more. When the caller has a few labelled examples of the new task, this
step uses them the same way, but in the generator's own coordinates and with gradients:

    x0        = the generator's decoded coordinates (m,)          (m <= max_dims, unit RMS scale)
    theta(x)  = ParamSpace.decode(x)                              linear: mean + sigma * kappa * x V_m
    L(x)      = CE(examples | base + adapter(theta(x))) + anchor * ||x - x0||^2 / m
    x_{t+1}   = Adam step on L, `steps` times (one forward and backward over the examples per step)

The adapter is put into the base once (a bank of one expert); every step writes theta(x) into the
bank, runs the head's loss over the examples, reads the bank's gradients back in the layout's order
(dL/dtheta) and takes dL/dx = kappa * sigma * V_m dL/dtheta through the linear decode. The anchor
keeps the solution near what the generator proposed (a Gaussian prior centred on its sample), so 16
examples steer the adapter within the span of the members' adapters and snapshots rather than fit
an adapter from scratch. This is not part of either paper (SG-LoRA writes from the description,
ICM-LoRA from the examples' task vector, neither trains at generation time): it is an optional step
(`refine_steps`, 0 by default) that trades generation time for accuracy, and its cost is reported:
`steps` forward+backward passes over the examples, against a full training run's hundreds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from pydantic import Field, ValidationError

from loraplex.catalog import MAX_LR, MAX_WEIGHT, Options, first_error, options
from loraplex.errors import InvalidSpec, UserInputError
from loraplex.experts.layers import eject, inject
from loraplex.generators.layout import ParamLayout
from loraplex.generators.space import ParamSpace
from loraplex.tasks import Example, Task


class RefineConfig(Options):
    """Few-shot refinement of a generated adapter (off unless steps > 0 and labelled examples are given)."""

    model_config = options(use_attribute_docstrings=True)

    steps: int = Field(0, ge=0, le=1000)
    """Gradient steps on the labelled examples in the generator's coordinates (0: no refinement; at most 1,000)."""
    lr: float = Field(0.2, gt=0, le=MAX_LR)
    """Adam's learning rate on the coordinates (which have unit RMS over the training vectors)."""
    anchor: float = Field(0.05, ge=0, le=MAX_WEIGHT)
    """Weight of the squared distance (per coordinate) to the generator's own proposal."""
    batch_size: int = Field(64, ge=1, le=4096)
    """Examples per step, taken in turn (a few-shot set of up to this many is one batch, as before; 100,000
    examples in one forward and backward took all the memory there was)."""


def refine_config(**values) -> RefineConfig:
    """`RefineConfig(**values)`, a bad value refused in one line (`invalid refine option steps: ...`)."""
    try:
        return RefineConfig(**values)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid refine option {first_error(exc)}") from None


def examples_task(description: str, examples: Sequence[tuple[str, str | None]], like: Task | None = None) -> Task:
    """The task a set of labelled examples stands for (its `train` rows are exactly the examples): the
    label set and label texts of `like` when given (every example's label must be one of them),
    otherwise the examples' own labels in the order they first appear."""
    unlabelled = sum(1 for _, lab in examples if not lab)
    if unlabelled:
        raise UserInputError(f"refining an adapter needs a label on every example; {unlabelled} of {len(examples)} have none")
    rows = tuple(Example(t, lab) for t, lab in examples)
    if like is not None:
        unknown = sorted({lab for _, lab in examples} - set(like.labels))
        if unknown:
            raise UserInputError(f"example label {unknown[0]!r} is not one of the task's labels ({', '.join(like.labels)})")
        return Task(name=like.name, description=description, labels=like.labels, train=rows, validation=(), test=(),
                    label_texts=dict(like.label_texts), family=like.family)
    labels = tuple(dict.fromkeys(lab for _, lab in examples))
    if len(labels) < 2:
        raise UserInputError(f"refining an adapter needs examples of at least 2 labels, got {len(labels)} ({', '.join(labels)})")
    return Task(name="query", description=description, labels=labels, train=rows, validation=(), test=())


def _write(layers: dict, layout: ParamLayout, theta: torch.Tensor) -> None:
    """Put a (P,) vector into the slot-0 experts of the injected banks (scalings unchanged)."""
    for s in layout.slots:
        bank = layers[s.name].bank
        bank.A.data[: s.rank].copy_(theta[s.a_slice].view(s.rank, s.d_in).to(bank.A.dtype))
        bank.B.data[:, : s.rank].copy_(theta[s.b_slice].view(s.d_out, s.rank).to(bank.B.dtype))


def _read_grad(layers: dict, layout: ParamLayout) -> torch.Tensor:
    """dL/dtheta (P,) from the banks' gradients, in the layout's order."""
    parts = []
    for s in layout.slots:
        bank = layers[s.name].bank
        ga = bank.A.grad[: s.rank] if bank.A.grad is not None else torch.zeros(s.rank, s.d_in)
        gb = bank.B.grad[:, : s.rank] if bank.B.grad is not None else torch.zeros(s.d_out, s.rank)
        parts += [ga.reshape(-1).float().cpu(), gb.reshape(-1).float().cpu()]
    return torch.cat(parts)


@contextmanager
def trainable_bank(model, space: ParamSpace, x0: torch.Tensor):
    """The adapter at coordinates x0 put into `model` as a bank of one expert whose A and B take gradients (the
    model in eval mode: no dropout); yields `loss_and_grad(theta, loss_fn, backward=True)`, which writes a
    (P,) vector into the bank, runs `loss_fn()` and returns its value and dL/dtheta (P,) in the layout's order
    (None without `backward`). Taken out again, and the model's mode restored, on exit. A caller chains
    dL/dtheta into whatever theta is a function of: `(theta * g_theta).sum().backward()`."""
    layout = space.layout
    layers = inject(model, [layout.unflatten(space.decode(x0.reshape(1, -1))[0])])
    banks = [layer.bank for layer in layers.values()]
    was_training = model.training
    model.eval()

    def loss_and_grad(theta: torch.Tensor, loss_fn: Callable[[], torch.Tensor], backward: bool = True):
        with torch.no_grad():
            _write(layers, layout, theta.detach())
        for b in banks:
            b.A.grad = b.B.grad = None
        loss = loss_fn()
        if not backward:
            return loss.item(), None
        loss.backward()
        return loss.item(), _read_grad(layers, layout)

    try:
        for b in banks:
            b.A.requires_grad_(True)
            b.B.requires_grad_(True)
        yield loss_and_grad
    finally:
        eject(model)
        model.train(was_training)


def refine(space: ParamSpace, x0: torch.Tensor, base, head, task: Task, cfg: RefineConfig,
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Coordinates (m,) refined on `task.train` (the labelled examples), and {loss_before, loss_after}.
    `on_step(step, x)` is called after each step (1..steps) with a copy of the coordinates so far (a
    benchmark reads the accuracy a shorter refinement would have reached from one run)."""
    model, tok = base.model, base.tokenizer
    texts = [e.text for e in task.train]
    y = torch.tensor([task.label_index(e.label) for e in task.train])
    basis = space.basis.float()  # (m, P)
    scale = (space.kappa * space.param_scale()).float()  # (P,)
    mean = space.mean.float()
    x = x0.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    losses: list[float] = []
    with trainable_bank(model, space, x0) as loss_and_grad:
        for _ in range(cfg.steps + 1):
            theta = mean + (x @ basis) * scale  # (P,), differentiable in x
            last = len(losses) >= cfg.steps  # the last pass only measures, on the first batch again
            step = 0 if last else len(losses)
            at = [(step * cfg.batch_size + j) % len(texts) for j in range(min(cfg.batch_size, len(texts)))]
            value, g_theta = loss_and_grad(theta, lambda: head.loss(model, tok, [texts[j] for j in at], y[at], task),
                                           backward=not last)
            losses.append(value)
            if last:
                break
            opt.zero_grad()
            total = (theta * g_theta).sum() + cfg.anchor * (x - x0).pow(2).mean()
            total.backward()
            opt.step()
            if on_step is not None:
                on_step(len(losses), x.detach().clone())
    return x.detach(), {"loss_before": round(losses[0], 4), "loss_after": round(losses[-1], 4)}
