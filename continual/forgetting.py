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

from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from loraplex.catalog import Catalog


class GSLoraConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(8, ge=1, le=1024)
    """Rank of the forgetting LoRA on each feed-forward projection."""
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    """LoRA alpha (default: 2 x rank)."""
    targets: tuple[str, ...] = ()
    """Feed-forward module suffixes (default: FFN_TARGETS of the base's model type)."""
    steps: int | None = Field(None, ge=1)
    """Optimiser steps (default: the trainer's steps per experience)."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate (default: the trainer's)."""
    sparsity_weight: float = Field(0.01, ge=0)
    """alpha of GS-LoRA: weight of the group lasso over the blocks' LoRA groups."""
    group_by: Literal["block", "module"] = "block"
    """Groups of the lasso: one per transformer block (the paper) or one per module."""
    prune_threshold: float = Field(0.1, ge=0, lt=1)
    """A group survives if its weight update is at least this share of the largest group's."""
    bound: float = Field(1.3, gt=0)
    """BND as a multiple of log(L), the cross-entropy of a uniform guess over the task's L labels. At 1.0
    the forgotten task stayed above chance (minilm, airline: 75% -> 43%, chance 33%): a batch-mean
    cross-entropy of log(L) still leaves the argmax right on many rows; 1.3 reached chance (31.5%) with
    the retained tasks' mean unchanged (-0.4 points), see bench/results/continual.txt."""
    forget_weight: float = Field(1.0, gt=0)
    """beta: weight of the bounded forget loss."""
    forget_share: float = Field(0.5, gt=0, lt=1)
    """Share of each batch drawn from the rows to forget (the rest: retained rows)."""
    retain_budget: int = Field(600, ge=1)
    """Retained rows sampled (class-balanced) when no replay buffer is available."""
    distill_weight: float = Field(1.0, ge=0)
    """gamma: weight of the distillation of retained rows to the predictions made before the request (0: off)."""


FORGETTERS: Catalog["GSLora"] = Catalog("forgetting method", modules=[__name__])


class ForgetObjective:
    """Which rows of a batch are to be forgotten, and their bounded loss (used by ContinualModule)."""

    def __init__(self, task: Any, labels: Sequence[str] | None, *, bound: float, weight: float,
                 distill_weight: float = 0.0):
        from loraplex.continual.distill import StoredScores
        from loraplex.continual.losses import bound_for

        self.task = task
        self.labels = tuple(labels) if labels else None
        self.label_idx = None if labels is None else {task.label_index(lab) for lab in labels}
        self.bnd = bound_for(len(task.labels), bound)
        self.weight = weight
        self.distill_weight = distill_weight
        self.teacher = StoredScores(distill_weight)  # (task, text) -> (L,) scores before the request

    def record_teacher(self, head: Any, model: Any, tokenizer: Any, rows: Sequence[tuple], tasks: dict[str, Any],
                       batch_size: int = 64) -> None:
        """Score the retained rows with the model as it is (before the forgetting slot exists)."""
        self.teacher.record(head, model, tokenizer, rows, tasks, batch_size=batch_size)

    def is_forget(self, row: tuple) -> bool:
        return row[2] == self.task.name and (self.label_idx is None or row[1] in self.label_idx)

    def loss(self, module: Any, rows: Sequence[tuple], emb: Any = None):
        """The bounded forget loss of `rows` (emb: their embeddings, when the module already has them)."""
        import torch

        from loraplex.continual.losses import bounded_forget_loss

        if emb is not None:
            scores = module.head.scores_of(module.model, module.tokenizer, emb, self.task)  # (N, L)
        else:
            scores = module.head.scores(module.model, module.tokenizer, [r[0] for r in rows], self.task)
        y = torch.tensor([r[1] for r in rows], device=scores.device)
        return self.weight * bounded_forget_loss(scores, y, self.bnd)


@FORGETTERS.register("gs-lora", GSLoraConfig, summary="GS-LoRA: group-sparse FFN LoRA, bounded forget loss, replayed retention")
class GSLora:
    name = "gs-lora"

    def __init__(self, config: GSLoraConfig):
        self.config = config

    def modules(self, fingerprint: Any) -> list[str]:
        from loraplex.continual.regularizers.gs_lora import ffn_modules

        return ffn_modules(fingerprint.linear_names(), fingerprint.model_type, self.config.targets)

    def lora_spec(self, modules: Sequence[str]):
        from loraplex.experts.spec import LoraSpec

        c = self.config
        return LoraSpec(r=c.rank, alpha=c.alpha if c.alpha is not None else 2.0 * c.rank, target_modules=tuple(modules))

    def regularizers(self, model_type: str) -> list[Any]:
        from loraplex.continual.regularizers import REGULARIZERS

        c = self.config
        cfg = {"sparsity_weight": c.sparsity_weight, "group_by": c.group_by,
               "prune_threshold": c.prune_threshold, "targets": c.targets}
        return [REGULARIZERS.build("gs-lora", cfg, model_type=model_type)]

    def objective(self, task: Any, labels: Sequence[str] | None) -> ForgetObjective:
        c = self.config
        return ForgetObjective(task, labels, bound=c.bound, weight=c.forget_weight, distill_weight=c.distill_weight)

    def forget_rows(self, task: Any, labels: Sequence[str] | None, rows: Sequence[tuple]) -> list[tuple]:
        obj = self.objective(task, labels)
        return [r for r in rows if obj.is_forget(r)]

    def steps(self, trainer: Any) -> int:
        return self.config.steps or trainer.steps or 100

    def lr(self, trainer: Any) -> float:
        return self.config.lr or trainer.lr


def retained_sample(tasks: Sequence[Any], *, budget: int, seed: int, split_rows: Any,
                    exclude: Any = None) -> list[tuple]:
    """A class-balanced sample of `budget` training rows of `tasks` (rows where exclude(row) is true left out)."""
    from loraplex.continual.replay import ReplayBuffer

    buf = ReplayBuffer(budget=budget, policy="class-balanced", seed=seed)
    for t in tasks:
        rows = [r for r in split_rows(t) if not (exclude and exclude(r))]
        if rows:
            buf.add_task(t.name, rows)
    return buf.contents()


def forget_request(*, model: Any, tokenizer: Any, head: Any, fingerprint: Any, forgetter: GSLora, task: Any,
                   labels: Sequence[str] | None, forget_rows: Sequence[tuple], retained: Sequence[tuple],
                   tasks: dict[str, Any], trainer: Any, seed: int, run_dir: Any, device: str, index: int = 0,
                   progress: bool = True, label: str = "") -> dict[str, Any]:
    """Train one GS-LoRA forgetting adapter into `model` (a new slot on the FFN projections).

    Returns {"slot", "spec", "outcome", "regularizers": {name: diagnostics}, "surviving_modules"}; the
    slot's pruned groups are already zero when this returns.
    """
    import numpy as np
    import torch

    from loraplex.continual.experience import train_unit
    from loraplex.continual.regularizers import ExperienceContext
    from loraplex.continual.replay import mixed_batches
    from loraplex.continual.slots import add_slot, extract_slot, train_only

    if not forget_rows:
        raise ValueError(f"no training rows to forget for {task.name}")
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
    ctx = ExperienceContext(index=index, kind="forget", model=model, slot=slot, tasks=[task.name])
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
