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

`blocks` (0: every module) refines only the adapter's modules in the top `blocks` transformer blocks: the
others keep the generator's proposal, so theta = decode(x0) with those blocks' slots replaced by
decode(x)'s (`refined_theta`). Then nothing below the first refined block changes during refinement, and
where the examples are one batch the blocks below it run once (`_LowerBlocksOnce`: their output is kept and
handed to the first refined block at every step, after a check at the first step that the loss reads the
same as through the whole model). A step then costs the top blocks' forward and backward, not the model's:
on MiniLM (6 blocks, 16 examples) 20 steps of the top block take ~2 s against ~10 s for every block
(bench/results/library-refine.txt says what each keeps of the refinement's gain).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Collection, Sequence

import torch
from pydantic import Field, ValidationError
from torch import nn

from loraplex.catalog import MAX_LR, MAX_WEIGHT, Options, first_error, options
from loraplex.errors import InvalidSpec, UserInputError
from loraplex.experts.layers import block_name, eject, inject
from loraplex.generators.layout import ModuleSlot, ParamLayout
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
    blocks: int = Field(0, ge=0, le=10_000)
    """Refine only the adapter's modules in this many top transformer blocks (0: every module); the others keep
    the generator's proposal, and where the examples are one batch the blocks below run once, not every step."""


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
        if s.name not in layers:  # a module no head reads (BERT's pooler) is kept in the adapter but not put in
            continue
        bank = layers[s.name].bank
        bank.A.data[: s.rank].copy_(theta[s.a_slice].view(s.rank, s.d_in).to(bank.A.dtype))
        bank.B.data[:, : s.rank].copy_(theta[s.b_slice].view(s.d_out, s.rank).to(bank.B.dtype))


def _read_grad(layers: dict, layout: ParamLayout) -> torch.Tensor:
    """dL/dtheta (P,) from the banks' gradients, in the layout's order."""
    parts = []
    for s in layout.slots:
        if s.name not in layers:  # not put in (`_write`): no loss reads it, so its gradient is zero
            parts.append(torch.zeros(s.size))
            continue
        bank = layers[s.name].bank
        ga = bank.A.grad[: s.rank] if bank.A.grad is not None else torch.zeros(s.rank, s.d_in)
        gb = bank.B.grad[:, : s.rank] if bank.B.grad is not None else torch.zeros(s.d_out, s.rank)
        parts += [ga.reshape(-1).float().cpu(), gb.reshape(-1).float().cpu()]
    return torch.cat(parts)


@contextmanager
def trainable_bank(model, space: ParamSpace, x0: torch.Tensor, trainable: Collection[str] | None = None):
    """The adapter at coordinates x0 put into `model` as a bank of one expert whose A and B take gradients (the
    model in eval mode: no dropout); yields `loss_and_grad(theta, loss_fn, backward=True)`, which writes a
    (P,) vector into the bank, runs `loss_fn()` and returns its value and dL/dtheta (P,) in the layout's order
    (None without `backward`). Taken out again, and the model's mode restored, on exit. A caller chains
    dL/dtheta into whatever theta is a function of: `(theta * g_theta).sum().backward()`. `trainable`: the
    modules whose A and B take gradients (default every one; the others' dL/dtheta reads zero, and backward
    stops where nothing below takes a gradient)."""
    layout = space.layout
    layers = inject(model, [layout.unflatten(space.decode(x0.reshape(1, -1))[0])])
    banks = [layer.bank for name, layer in layers.items() if trainable is None or name in trainable]
    for name, layer in layers.items():
        if layer.bank not in banks:
            layer.bank.A.requires_grad_(False)
            layer.bank.B.requires_grad_(False)
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


def top_blocks(layout: ParamLayout, n: int) -> tuple[tuple[ModuleSlot, ...], str, int] | None:
    """The slots in the top `n` numbered blocks of the layout's stack (`encoder.layer`, `model.layers`), that
    stack's name and the first of those blocks' index; None where every slot is refined (n = 0, or n at least
    the number of blocks the adapter reaches). A layout over several stacks (an encoder and a decoder) has no
    one "top" and is refused by name."""
    if n == 0:
        return None
    where: dict[str, set[int]] = {}
    for s in layout.slots:
        b = block_name(s.name)
        if b is not None:
            stack, _, i = b.rpartition(".")
            where.setdefault(stack, set()).add(int(i))
    if len(where) != 1:
        stacks = ", ".join(sorted(where)) or "none"
        raise InvalidSpec(f"invalid refine option blocks: {n} needs the adapter's modules in one stack of numbered "
                          f"blocks; this adapter's stacks: {stacks}")
    (stack, indices), = where.items()
    if n >= len(indices):
        return None
    top = sorted(indices)[-n:]
    chosen = set(top)
    slots = tuple(s for s in layout.slots if (b := block_name(s.name)) is not None and int(b.rpartition(".")[2]) in chosen)
    return slots, stack, top[0]


def refined_theta(space: ParamSpace, x: torch.Tensor, x0: torch.Tensor, blocks: int = 0) -> torch.Tensor:
    """The (P,) vector a refinement ends at, from its coordinates x: decode(x), or with `blocks` the top blocks'
    slots of decode(x) and the other slots of decode(x0) (the proposal, which those blocks' refinement kept)."""
    with torch.no_grad():
        theta = space.decode(x.reshape(1, -1))[0]
        plan = top_blocks(space.layout, blocks)
        if plan is None:
            return theta
        out = space.decode(x0.reshape(1, -1))[0]
        for s in plan[0]:
            out[s.offset: s.offset + s.size] = theta[s.offset: s.offset + s.size]
        return out


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden states a transformer block is called with (its first argument or `hidden_states=`)."""
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


class _Skipped(nn.Module):
    """A block below the first refined one, while a cache stands for their output: it hands its input on in the
    form the block returned (a tensor, or a tuple of as many items, the first the hidden states; DeBERTa's
    blocks return two), and answers for the block's own attributes (ModernBERT's loop reads each block's
    `attention_type`); the refined block's hook replaces what reaches it with the cache."""

    def __init__(self, block: nn.Module, arity: int):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the block is not called, nor trained
        self.arity = arity

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        h = _hidden(args, kwargs)
        return (h,) + (None,) * (self.arity - 1) if self.arity else h


class _LowerBlocksOnce:
    """The blocks below the first refined block computed once for a batch (the adapter's lower modules are fixed
    there): `fill(run)` runs the whole model once, keeping what block `first` receives (by shape: a head that
    also encodes its label texts makes a second, smaller call); inside `skipping()` the blocks below it hand
    their input on and block `first` is given the kept states of that shape instead. `refine` checks that the
    loss reads the same both ways at the first step, and runs the whole model when it does not (a model whose
    blocks take more than their hidden states from each other, two calls of one shape)."""

    def __init__(self, model, stack: str, first: int):
        self.blocks = model.get_submodule(stack)
        self.first = first
        self.kept: dict[tuple[int, ...], torch.Tensor] = {}
        self.arity = 0  # what the last lower block returned: 0 a tensor, n a tuple of n

    def usable(self) -> bool:
        return isinstance(self.blocks, (nn.ModuleList, nn.Sequential)) and 0 < self.first < len(self.blocks)

    def fill(self, run: Callable[[], float]) -> float:
        def keep(module, args, kwargs):
            h = _hidden(args, kwargs)
            if h is not None:
                self.kept[tuple(h.shape)] = h.detach()

        def form(module, args, out):
            self.arity = len(out) if isinstance(out, tuple) else 0

        hooks = [self.blocks[self.first].register_forward_pre_hook(keep, with_kwargs=True),
                 self.blocks[self.first - 1].register_forward_hook(form)]
        try:
            return run()
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def skipping(self):
        def give(module, args, kwargs):
            h = _hidden(args, kwargs)
            kept = None if h is None else self.kept.get(tuple(h.shape))
            if kept is None:
                return None  # no call of this shape was seen: the loss check will see it
            return ((kept,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kept})

        lower = [self.blocks[i] for i in range(self.first)]
        hook = self.blocks[self.first].register_forward_pre_hook(give, with_kwargs=True)
        try:
            for i in range(self.first):
                self.blocks[i] = _Skipped(lower[i], self.arity)
            yield
        finally:
            hook.remove()
            for i, block in enumerate(lower):
                self.blocks[i] = block


def refine(space: ParamSpace, x0: torch.Tensor, base, head, task: Task, cfg: RefineConfig,
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Coordinates (m,) refined on `task.train` (the labelled examples), and {loss_before, loss_after} (and
    `blocks` where only the top blocks were refined).
    `on_step(step, x)` is called after each step (1..steps) with a copy of the coordinates so far (a
    benchmark reads the accuracy a shorter refinement would have reached from one run). With `cfg.blocks`,
    only the top blocks' slots of theta follow x (the rest stay at x0's decode): `refined_theta` gives the
    adapter's vector from the coordinates returned (or reported)."""
    model, tok = base.model, base.tokenizer
    texts = [e.text for e in task.train]
    y = torch.tensor([task.label_index(e.label) for e in task.train])
    plan = top_blocks(space.layout, cfg.blocks)
    free = plan[0] if plan else space.layout.slots
    idx = torch.cat([torch.arange(s.offset, s.offset + s.size) for s in free])
    basis = space.basis.float()[:, idx]  # (m, P_free)
    scale = (space.kappa * space.param_scale()).float()[idx]  # (P_free,)
    mean = space.mean.float()
    with torch.no_grad():
        theta0 = space.decode(x0.reshape(1, -1))[0].float()  # (P,): the proposal, which slots not refined keep
    mean = mean[idx]
    x = x0.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    losses: list[float] = []
    one_batch = len(texts) <= cfg.batch_size
    with trainable_bank(model, space, x0, trainable={s.name for s in free}) as loss_and_grad, ExitStack() as cached:
        def batch_loss(step: int) -> Callable[[], torch.Tensor]:
            # every step reads the same rows in the same order where they are one batch (a cache holds them so)
            at = list(range(len(texts))) if one_batch else [(step * cfg.batch_size + j) % len(texts)
                                                            for j in range(cfg.batch_size)]
            return lambda: head.loss(model, tok, [texts[j] for j in at], y[at], task)

        check = None
        if plan is not None and one_batch:
            once = _LowerBlocksOnce(model, plan[1], plan[2])
            if once.usable():
                with torch.no_grad():
                    check = once.fill(lambda: loss_and_grad(theta0, batch_loss(0), backward=False)[0])
                if once.kept:
                    cached.enter_context(once.skipping())
                else:
                    check = None
        for _ in range(cfg.steps + 1):
            vals = mean + (x @ basis) * scale  # (P_free,), differentiable in x
            theta = theta0.index_put((idx,), vals)
            last = len(losses) >= cfg.steps  # the last pass only measures, on the first batch again
            step = 0 if last else len(losses)
            if check is None:
                value, g_theta = loss_and_grad(theta, batch_loss(step), backward=not last)
            else:  # the first pass through the cache, at x0: it must read what the whole model did, and where it
                # does not, or fails (a model whose loop reads more from its blocks), the whole model runs instead
                try:
                    value, g_theta = loss_and_grad(theta, batch_loss(step), backward=not last)
                    same = abs(value - check) <= 1e-4 * max(1.0, abs(check))
                except Exception:
                    same = False
                if not same:
                    cached.close()
                    value, g_theta = loss_and_grad(theta, batch_loss(step), backward=not last)
                check = None
            losses.append(value)
            if last:
                break
            opt.zero_grad()
            total = (vals * g_theta[idx]).sum() + cfg.anchor * (x - x0).pow(2).mean()
            total.backward()
            opt.step()
            if on_step is not None:
                on_step(len(losses), x.detach().clone())
    info = {"loss_before": round(losses[0], 4), "loss_after": round(losses[-1], 4)}
    if plan is not None:  # a count at least the blocks the adapter reaches refined every module: said as such
        info["blocks"] = cfg.blocks
    return x.detach(), info
