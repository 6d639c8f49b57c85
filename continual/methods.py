"""Continual-learning methods: how a stream of tasks is turned into adapters. The `METHODS` catalog.

A method decides three things; the stream loop (`continual/stream.py`) does everything else (data,
replay, training, evaluation, registration, persistence), so every method combines with replay:

    plan(experiences)   group the stream's learn experiences into training units (rows of the
                        accuracy matrix); default: one unit per experience
    new_slot            True: each unit trains a fresh adapter slot in every adapted projection, the
                        earlier slots frozen; False: the unit keeps training the previous slot
    regularizers()      objects whose penalties join the loss (see continual/regularizers)
    steps(...)          optimiser steps of a unit

Registered methods:
- `seq-lora`: one LoRA fine-tuned on each task in turn (the lower bound that shows forgetting).
- `o-lora`: a new LoRA per task, earlier ones frozen, its A pushed orthogonal to theirs (regularizer
  `o-lora`); the model answers with all adapters summed (no task id).
- `multitask`: every task of a run of consecutive learn experiences at once, in one unit, with the
  steps of all of them (the upper bound for comparison).

Adding a method: a class with these members registered with `@METHODS.register(name, ConfigCls)`. The
`routed` method (a new adapter per task plus a router extended by one expert and refitted on the new
task and the replay buffer) plugs in here: `new_slot = True`; `after_unit(run, unit)` extends the router
by one expert, refits it on the unit's rows plus `run.replay.contents()` and attaches it to the model
(`experts.layers.set_router`); `configure_eval(model)` routes instead of summing; `state_dict` /
`state_tensors` / `load_state` carry the router across units so a resume is exact. The stream loop
already calls every one of these hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from loraplex.catalog import Catalog
from loraplex.continual.regularizers.o_lora import OLoraConfig


@dataclass(frozen=True)
class Unit:
    """One training unit of a stream: one row of the accuracy matrix."""

    index: int
    kind: str  # learn | forget
    experiences: tuple[int, ...]
    tasks: tuple[str, ...]  # task names learned, or the one forgotten
    labels: tuple[str, ...] | None = None  # forget only these labels

    @property
    def label(self) -> str:
        if self.kind == "learn":
            return "+".join(self.tasks) if len(self.tasks) <= 2 else f"{self.tasks[0]}+{len(self.tasks) - 1} more"
        return f"forget {self.tasks[0]}" + (f"[{','.join(self.labels)}]" if self.labels else "")


class ContinualMethod:
    """Base class: one unit per experience, a slot reused or added, no regularizer."""

    name = ""
    new_slot = False

    def __init__(self, config: Any = None):
        self.config = config

    def plan(self, experiences: Sequence[Any], task_names: Sequence[str | None]) -> list[Unit]:
        """experiences: the spec's; task_names[i]: the task experience i learns or forgets."""
        units = []
        for i, exp in enumerate(experiences):
            units.append(_unit(len(units), exp, [i], [task_names[i]]))
        return units

    def regularizers(self) -> list[Any]:
        return []

    def steps(self, trainer: Any, unit: Unit, n_rows: int, new_per_batch: int) -> int:
        return trainer.steps_for(n_rows, new_per_batch)

    def after_unit(self, run: Any, unit: Unit) -> None:
        """Called after a learning unit has trained, before its rows join `run.replay` and before evaluation.

        `run` exposes the model (`run.lb.model`), the tasks (`run.tasks`), the replay buffer (`run.replay`)
        and the slots of the learned adapters (`run.learn_slots`)."""

    def configure_eval(self, model: Any) -> None:
        """Called before every evaluation (a routed method attaches its router here)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state carried across units (saved with each unit, restored on resume)."""
        return {}

    def state_tensors(self) -> dict[str, Any]:
        """Tensors carried across units (e.g. a router's weights), saved as safetensors with each unit."""
        return {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Restore what `state_dict` and `state_tensors` returned."""


def _unit(index: int, exp: Any, idx: list[int], names: list[str | None]) -> Unit:
    if exp.learn is not None:
        return Unit(index, "learn", tuple(idx), tuple(n for n in names if n))
    return Unit(index, "forget", tuple(idx), (exp.forget,), tuple(exp.labels) if exp.labels else None)


class NoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MultitaskConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scale_steps: bool = True
    """Train for the steps of all the grouped tasks together (same total budget as a sequential run)."""


METHODS: Catalog[ContinualMethod] = Catalog("continual method", modules=[__name__])


@METHODS.register("seq-lora", NoConfig, summary="one LoRA fine-tuned on each task in turn (lower bound)")
class SeqLora(ContinualMethod):
    name = "seq-lora"
    new_slot = False


@METHODS.register("o-lora", OLoraConfig, summary="O-LoRA: a new LoRA per task, orthogonal to the frozen earlier ones")
class OLora(ContinualMethod):
    name = "o-lora"
    new_slot = True

    def regularizers(self) -> list[Any]:
        from loraplex.continual.regularizers import REGULARIZERS

        return [REGULARIZERS.build("o-lora", self.config)]


@METHODS.register("multitask", MultitaskConfig, summary="all tasks at once in one LoRA (upper bound)")
class Multitask(ContinualMethod):
    name = "multitask"
    new_slot = False

    def plan(self, experiences: Sequence[Any], task_names: Sequence[str | None]) -> list[Unit]:
        units: list[Unit] = []
        group: list[int] = []
        for i, exp in enumerate(list(experiences) + [None]):
            if exp is not None and exp.learn is not None:
                group.append(i)
                continue
            if group:
                units.append(_unit(len(units), experiences[group[0]], group, [task_names[g] for g in group]))
                group = []
            if exp is not None:
                units.append(_unit(len(units), exp, [i], [task_names[i]]))
        return units

    def steps(self, trainer: Any, unit: Unit, n_rows: int, new_per_batch: int) -> int:
        if trainer.epochs is not None or not self.config.scale_steps:
            return trainer.steps_for(n_rows, new_per_batch)
        return trainer.steps_for(n_rows, new_per_batch) * len(unit.tasks)
