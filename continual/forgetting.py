"""Forgetting requests: GS-LoRA, "Continual Forgetting for Pre-trained Vision Models" (Zhao et al., CVPR
2024, arXiv 2403.11530) and its practical extension GS-LoRA++ (arXiv 2501.09705). The `FORGETTERS` catalog.

Each request (a stream's `forget:` experience, or `loraplex forget TASK`) adds one LoRA on the
feed-forward projections of every block (`experts.spec.FFN_TARGETS`), everything else frozen, and
trains it on batches that mix rows of what is to be forgotten with replayed rows of everything else:

    L = beta * ReLU(BND - CE(forgotten rows))       bounded forget loss (continual/losses.py)
      + CE(retained rows)                          retention loss on replayed data of every other task
                                                   (and, for a labels request, the task's other labels)
      + gamma * KL(before || now)(retained rows)   distillation to the predictions before the request
                                                   (`teacher`, added by ContinualModule.task_loss)
      + alpha * sum_g ||theta_g||_2                group lasso, one group per block (regularizer `gs-lora`)

After training, groups whose weight update is below `prune_threshold` of the largest group's are
zeroed and the surviving groups are counted (see `continual/regularizers/gs_lora.py`). The forgetting adapter is
registered with origin "forgetting" and a `forgets` edge to the task, holding only the surviving
groups' modules. Retained rows come from the stream's replay buffer (minus the forgotten rows), or,
when the stream keeps none (and for a one-off `loraplex forget`), from a class-balanced sample of the
retained tasks' training data of `retain_budget` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field

from loraplex.catalog import MAX_COUNT, MAX_LR, MAX_STEPS, MAX_WEIGHT, Catalog, Options, options
from loraplex.continual.distill import StoredScores
from loraplex.continual.experience import UnitOutcome, train_unit
from loraplex.continual.losses import bound_for, bounded_forget_loss
from loraplex.continual.metrics import forget_request_summary
from loraplex.continual.regularizers import REGULARIZERS, ExperienceContext
from loraplex.continual.regularizers.gs_lora import ffn_modules
from loraplex.continual.replay import ReplayBuffer, mixed_batches
from loraplex.continual.slots import SlotRef, add_slot, extract_slot, train_only
from loraplex.errors import UserInputError
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.training import Row, as_row, rows_of


class GSLoraConfig(Options):
    model_config = options()

    rank: int = Field(8, ge=1, le=1024)
    """Rank of the forgetting LoRA on each feed-forward projection."""
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    """LoRA alpha (default: 2 x rank)."""
    targets: tuple[str, ...] = ()
    """Feed-forward module suffixes (default: FFN_TARGETS of the base's model type)."""
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Optimiser steps (default: the trainer's steps per experience)."""
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    """Peak learning rate (default: the trainer's)."""
    sparsity_weight: float = Field(0.01, ge=0, le=MAX_WEIGHT)
    """alpha of GS-LoRA: weight of the group lasso over the blocks' LoRA groups."""
    group_by: Literal["block", "module"] = "block"
    """Groups of the lasso: one per transformer block (the paper) or one per module."""
    prune_threshold: float = Field(0.1, ge=0, lt=1)
    """A group survives if its weight update is at least this share of the largest group's."""
    bound: float = Field(1.3, gt=0, le=MAX_WEIGHT)
    """BND as a multiple of log(L), the cross-entropy of a uniform guess over the task's L labels. At 1.0
    the forgotten task stayed above chance (minilm, airline: 75% -> 43%, chance 33%): a batch-mean
    cross-entropy of log(L) still leaves the argmax right on many rows; 1.3 reached chance (31.5%) with
    the retained tasks' mean unchanged (-0.4 points), see bench/results/continual.txt."""
    forget_weight: float = Field(1.0, gt=0, le=MAX_WEIGHT)
    """beta: weight of the bounded forget loss."""
    forget_share: float = Field(0.5, gt=0, lt=1)
    """Share of each batch drawn from the rows to forget (the rest: retained rows)."""
    retain_budget: int = Field(600, ge=1, le=MAX_COUNT)
    """Retained rows sampled (class-balanced) when no replay buffer is available."""
    distill_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """gamma: weight of the distillation of retained rows to the predictions made before the request (0: off)."""


FORGETTERS: Catalog["GSLora"] = Catalog("forgetting method", modules=[__name__])


class ForgetObjective:
    """Which rows of a batch are to be forgotten, and their bounded loss (used by ContinualModule)."""

    def __init__(self, task: Any, labels: Sequence[str] | None, *, bound: float, weight: float,
                 distill_weight: float = 0.0):
        self.task = task
        self.labels = tuple(labels) if labels else None
        self.label_idx = None if labels is None else {task.label_index(lab) for lab in labels}
        self.bnd = bound_for(len(task.labels), bound)
        self.weight = weight
        self.distill_weight = distill_weight
        self.teacher = StoredScores(distill_weight)  # (task, text) -> (L,) scores before the request

    def record_teacher(self, head: Any, model: Any, tokenizer: Any, rows: Sequence[Row], tasks: dict[str, Any],
                       batch_size: int = 64) -> None:
        """Score the retained rows with the model as it is (before the forgetting slot exists)."""
        self.teacher.record(head, model, tokenizer, rows, tasks, batch_size=batch_size)

    def is_forget(self, row: Row) -> bool:
        row = as_row(row)
        return row.task == self.task.name and (self.label_idx is None or row.label in self.label_idx)

    def loss(self, module: Any, rows: Sequence[Row], emb: Any = None):
        """The bounded forget loss of `rows` (emb: their embeddings, when the module already has them)."""
        rows = [as_row(r) for r in rows]
        if emb is not None:
            scores = module.head.scores_of(module.model, module.tokenizer, emb, self.task)  # (N, L)
        else:
            scores = module.head.scores(module.model, module.tokenizer, [r.text for r in rows], self.task)
        y = torch.tensor([r.label for r in rows], device=scores.device)
        return self.weight * bounded_forget_loss(scores, y, self.bnd)


@FORGETTERS.register("gs-lora", GSLoraConfig, summary="GS-LoRA: group-sparse FFN LoRA, bounded forget loss, replayed retention")
class GSLora:
    name = "gs-lora"

    def __init__(self, config: GSLoraConfig):
        self.config = config

    def modules(self, fingerprint: Any) -> list[str]:
        return ffn_modules(fingerprint.linear_names(), fingerprint.model_type, self.config.targets)

    def lora_spec(self, modules: Sequence[str]):
        c = self.config
        return LoraSpec(r=c.rank, alpha=c.alpha if c.alpha is not None else 2.0 * c.rank, target_modules=tuple(modules))

    def regularizers(self, model_type: str) -> list[Any]:
        c = self.config
        cfg = {"sparsity_weight": c.sparsity_weight, "group_by": c.group_by,
               "prune_threshold": c.prune_threshold, "targets": c.targets}
        return [REGULARIZERS.build("gs-lora", cfg, model_type=model_type)]

    def objective(self, task: Any, labels: Sequence[str] | None) -> ForgetObjective:
        c = self.config
        return ForgetObjective(task, labels, bound=c.bound, weight=c.forget_weight, distill_weight=c.distill_weight)

    def forget_rows(self, task: Any, labels: Sequence[str] | None, rows: Sequence[Row]) -> list[Row]:
        obj = self.objective(task, labels)
        return [r for r in rows if obj.is_forget(r)]

    def steps(self, trainer: Any) -> int:
        return self.config.steps or trainer.steps or 100

    def lr(self, trainer: Any) -> float:
        return self.config.lr or trainer.lr


def no_rows_to_forget(task: Any, labels: Sequence[str] | None, limit: int | None = None) -> str | None:
    """Why a request to forget `task` (or only its `labels`) would have no training rows to forget, looking at
    the first `limit` training rows (the trainer's `train_limit`), as one line; None when every label has some.
    The spec (continual/spec.py) and a one-off request (continual/request.py) check this before anything trains."""
    rows = task.split("train")[:limit or None]
    where = (f"its first {limit} training rows (trainer.train_limit) have" if limit and len(task.train) > limit
             else "its training split has")
    if labels is None:
        return None if rows else f"cannot forget task {task.name!r}: {where} no row"
    have = {e.label for e in rows}
    lab = next((lab for lab in labels if lab not in have), None)
    return None if lab is None else f"cannot forget label {lab!r} of task {task.name!r}: {where} no row with that label"


def retained_sample(tasks: Sequence[Any], *, budget: int, seed: int, split_rows: Any,
                    exclude: Any = None) -> list[Row]:
    """A class-balanced sample of `budget` training rows of `tasks` (rows where exclude(row) is true left out;
    `budget` is GS-LoRA's `retain_budget`, which a warning about it names: sweep 47)."""
    buf = ReplayBuffer(budget=budget, policy="class-balanced", seed=seed, knob="retain_budget")
    for t in tasks:
        rows = [r for r in split_rows(t) if not (exclude and exclude(r))]
        if rows:
            buf.add_task(t.name, rows)
    return buf.contents()


def forget_request(*, model: Any, tokenizer: Any, head: Any, fingerprint: Any, forgetter: GSLora, task: Any,
                   labels: Sequence[str] | None, forget_rows: Sequence[Row], retained: Sequence[Row],
                   tasks: dict[str, Any], trainer: Any, seed: int, run_dir: Any, device: str, index: int = 0,
                   progress: bool = True, label: str = "") -> dict[str, Any]:
    """Train one GS-LoRA forgetting adapter into `model` (a new slot on the FFN projections).

    Returns {"slot", "spec", "outcome", "regularizers": {name: diagnostics}, "surviving_modules"}; the
    slot's pruned groups are already zero when this returns.
    """
    if not forget_rows:
        raise UserInputError(f"cannot forget task {task.name!r}: no training rows to forget")
    modules = forgetter.modules(fingerprint)
    spec = forgetter.lora_spec(modules)
    objective = forgetter.objective(task, labels)
    objective.record_teacher(head, model, tokenizer, retained, tasks)  # before the forgetting slot exists
    slot = add_slot(model, spec, modules, generator=torch.Generator().manual_seed(seed))
    train_only(model, slot)
    steps = forgetter.steps(trainer)
    batches = mixed_batches({task.name: list(forget_rows)}, list(retained), steps=steps,
                            batch_size=trainer.batch_size, mix=1.0 - forgetter.config.forget_share,
                            rng=np.random.default_rng([seed, 1]))
    regs = forgetter.regularizers(fingerprint.model_type)
    ctx = ExperienceContext(index=index, model=model, slot=slot)
    for r in regs:
        r.on_experience_start(ctx)
    outcome = train_unit(model=model, tokenizer=tokenizer, head=head, tasks=tasks, batches=batches,
                         lr=forgetter.lr(trainer), trainer=trainer, run_dir=run_dir, seed=seed, device=device,
                         regularizers=regs, forgetting=objective, teacher=objective.teacher,
                         snapshot_fn=lambda m: extract_slot(m, spec, slot), snapshot_spec=spec,
                         progress=progress, label=label)
    diag = {r.name: r.on_experience_end(ctx) for r in regs}
    surviving = next((d["surviving_modules"] for d in diag.values() if "surviving_modules" in d), sorted(slot))
    for d in diag.values():
        d.pop("surviving_modules", None)
    return {"slot": slot, "spec": spec, "outcome": outcome, "regularizers": diag, "surviving_modules": surviving}


@dataclass
class ForgetResult:
    """What one forgetting request did (a stream's `forget:` unit or `loraplex forget`)."""

    task: Any
    """The task erased (a `Task`)."""
    labels: tuple[str, ...] | None
    """The labels erased, or None for the whole task."""
    slot: SlotRef
    """The forgetting slot in the model's banks (its pruned groups already zero)."""
    adapter: Adapter
    """The forgetting adapter: the slot's surviving groups' modules."""
    outcome: UnitOutcome
    regularizers: dict[str, dict[str, Any]]
    """Each regularizer's diagnostics (GS-LoRA: groups_survived, groups_total, ...)."""
    summary: dict[str, Any]
    """`continual.metrics.forget_request_summary` of the accuracy before and after, plus the groups."""
    after: dict[str, Any]
    """The evaluation row after the request: {task: {"accuracy", "labels"}}."""

    @property
    def what(self) -> str:
        return self.task.name + (f" (labels {', '.join(self.labels)})" if self.labels else "")

    def record(self, *, name: str, base: Any, previous: str | None, extra: dict[str, Any],
               unit: int | None = None) -> dict[str, Any]:
        """The registry record fields of the forgetting adapter (continual/registration.py writes them):
        origin "forgetting", a `forgets` edge to the task, `trained-from` the composition's last adapter."""
        s, o = self.summary, self.outcome
        kept = ("forgotten_before", "forgotten_after", "retained_before", "retained_after", "retained_drop",
                "chance", "groups_survived", "groups_total")
        return {
            "name": name, "base": base.name, "family": base.family, "origin": "forgetting",
            "description": f"Forgetting adapter (GS-LoRA): erases {self.what} from the composition. "
                           f"The erased task: {self.task.description}",
            "task": self.task.ref,
            "edges": [{"target": f"task:{self.task.ref}", "kind": "forgets"}]
                     + ([{"target": f"adapter:{previous}", "kind": "trained-from"}] if previous else []),
            "metrics": {"accuracy": s["forgotten_after"], **({"unit": unit} if unit is not None else {}),
                        **{k: s[k] for k in kept}, "steps": o.steps, "train_seconds": o.seconds,
                        "step_time": o.step_time, "losses": o.losses},
            "extra": {**extra, "labels": list(self.labels) if self.labels else None},
        }


def forget(*, model: Any, tokenizer: Any, head: Any, fingerprint: Any, forgetter: GSLora, task: Any,
           labels: Sequence[str] | None, retained: Sequence[Row] | Callable[[Callable[[Row], bool]], Sequence[Row]],
           tasks: dict[str, Any], trainer: Any, seed: int, run_dir: Any, device: str,
           before: dict[str, Any], evaluate: Callable[[], dict[str, Any]], retained_tasks: Sequence[str],
           index: int = 0, progress: bool = True, label: str = "",
           stronger: str = "more --steps or a higher --lr",
           erased: Mapping[str, Sequence[str] | None] | None = None) -> ForgetResult:
    """One forgetting request, start to end: the rows to forget (the task's training rows, or those of
    `labels`, up to the trainer's `train_limit`), the retained rows (`retained(is_forget)` when a
    callable), GS-LoRA training (`forget_request`), `evaluate()` after it against `before` (evaluation
    rows, {task: {"accuracy", "labels"}}), and the surviving groups' adapter. `erased`: {task: labels, or None
    for the whole task} that earlier requests erased: not counted as retained, and watched (the summary's
    `erased_earlier`). A labels request forgets the task's labels erased earlier along with its own: nothing
    else holds them erased, and the forget loss, pushing the new labels' rows to any other label, brought
    the earlier ones back (sweep 44: 0/42 -> 42/42)."""
    labels = tuple(labels) if labels else None
    why = no_rows_to_forget(task, labels, trainer.train_limit)
    if why is not None:
        raise UserInputError(why)
    earlier = tuple(lab for lab in ((erased or {}).get(task.name) or ()) if labels is not None and lab not in labels)
    forgetting = None if labels is None else labels + earlier
    objective = forgetter.objective(task, forgetting)
    forget_rows = [r for r in rows_of(task, "train", trainer.train_limit) if objective.is_forget(r)]
    kept = retained(objective.is_forget) if callable(retained) else retained
    out = forget_request(model=model, tokenizer=tokenizer, head=head, fingerprint=fingerprint, forgetter=forgetter,
                         task=task, labels=forgetting, forget_rows=forget_rows, retained=kept, tasks=tasks,
                         trainer=trainer, seed=seed, run_dir=run_dir, device=device, index=index,
                         progress=progress, label=label)
    after = evaluate()
    summary = forget_request_summary(before, after, task.name, labels, list(retained_tasks), len(task.labels),
                                     split=getattr(trainer, "eval_split", "test"), stronger=stronger, erased=erased)
    if not kept:  # GS-LoRA's retention loss had nothing to hold on to: the request may have erased more than the task
        what = task.name + (f" (labels {', '.join(labels)})" if labels else "")
        gone = sorted(t for t, labs in (erased or {}).items() if t != task.name and labs is None)
        if gone:  # it learned those too, erased by earlier requests (it said "learned only ...": sweep 62)
            note = (f"nothing was retained: every other task of the composition ({', '.join(gone)}) was erased "
                    f"before, so no retained data protected the rest of the model while {what} was erased")
        else:
            note = (f"nothing was retained: the composition learned only {what}, so no retained data protected the "
                    "rest of the model; to drop the task, remove its adapters instead")
        summary["warning"] = f"{summary['warning']}; {note}" if summary.get("warning") else note
    gs = next(iter(out["regularizers"].values()), {})
    summary.update({k: gs.get(k) for k in ("groups_survived", "groups_total")})
    fspec = out["spec"].model_copy(update={"target_modules": tuple(out["surviving_modules"])})
    adapter = extract_slot(model, fspec, out["slot"], modules=out["surviving_modules"])
    return ForgetResult(task, labels, out["slot"], adapter, out["outcome"], out["regularizers"], summary, after)
