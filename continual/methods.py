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

- `routed`: a new LoRA per task, trained alone (one-hot static gates on its slot, earlier slots frozen),
  plus a learned router (router/: token-gate by default) over the adapters, extended by one expert after
  every task and refitted, adapters frozen, on the new task's rows and the replay buffer (or, without
  replay, a small per-task router memory), so routing of the earlier tasks does not decay. The model
  answers through the router (no task id).

Adding a method: a class with these members registered with `@METHODS.register(name, ConfigCls)`. The
stream loop calls `configure_train(model, slot)` before a learning unit trains, `after_unit(run, unit)`
after it, `configure_eval(model)` before every evaluation, and saves `state_dict` / `state_tensors` with
each unit (`load_state` on resume), so a method that carries state across units resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from loraplex.catalog import Catalog, MAX_COUNT, MAX_LR, MAX_STEPS, Options, options
from loraplex.continual.regularizers.o_lora import OLoraConfig
from loraplex.continual.experience import train_unit
from loraplex.continual.regularizers import REGULARIZERS
from loraplex.continual.replay import mixed_batches
from loraplex.continual.slots import train_only
from loraplex.experts.layers import routed_layers
from loraplex.router.base import ROUTERS, LearnedRouter
from loraplex.training import Row, rows_of


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
    summed = True
    """The composition answers with every adapter summed (False: through something else, e.g. a router)."""

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

    def configure_train(self, model: Any, slot: dict[str, int]) -> None:
        """Called before a learning unit trains `slot` (a routed method trains it alone, without its router)."""

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


class NoConfig(Options):
    model_config = options()


class MultitaskConfig(Options):
    model_config = options()

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


class RoutedConfig(Options):
    model_config = options()

    router: str = "token-gate"
    """A learned router of `loraplex.router.ROUTERS` that routes registered adapters (token-gate, mixer, rank)."""
    router_config: dict[str, Any] = Field(default_factory=dict)
    """That router's own settings (e.g. {top_k: 1}); validated by the router's config class."""
    router_steps: int = Field(100, ge=1, le=MAX_STEPS)
    """Optimiser steps of each refit of the router (adapters frozen, only the gates learn)."""
    router_lr: float = Field(1e-2, gt=0, le=MAX_LR)
    memory_per_task: int = Field(64, ge=1, le=MAX_COUNT)
    """Rows per task kept for refitting the router when the stream has no replay buffer."""

    @field_validator("router")
    @classmethod
    def _learned_router(cls, v: str) -> str:
        if v not in ROUTERS.names():
            raise ValueError(f"unknown router {v!r}; known: {', '.join(ROUTERS.names())}")
        if not issubclass(ROUTERS.get(v).factory, LearnedRouter):
            raise ValueError(f"router {v!r} is not trained; the routed method needs a learned router")
        return v

    @field_validator("router_config")
    @classmethod
    def _router_config(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if v.get("joint"):
            raise ValueError("the routed method trains its adapters task by task; a joint router is not allowed")
        if "router" in info.data:  # the router's own config class checks its fields now, not at run time
            ROUTERS.get(info.data["router"]).make_config(dict(v))
        return v

    def router_entry(self):
        return ROUTERS.get(self.router)


@METHODS.register("routed", RoutedConfig, summary="a new LoRA per task plus a router extended and refitted after each task")
class Routed(ContinualMethod):
    """A new adapter per task and a learned router over them, grown by one expert per task.

    Per learning unit: (1) the new slot trains alone (its static gate one-hot, the router detached), as
    MeteoRA's adapters are trained one task each; (2) `after_unit` builds the router over the banks' E
    experts and copies the previous router's gate weights into the first E-1 expert rows (every gate
    tensor whose first dimension counts experts, or ranks for SMoRA, is extended; the new rows keep the
    router's seeded initialisation); (3) it refits the gates, adapters frozen, for `router_steps` steps
    on batches balanced over every task learned so far: the new task's training rows and, for the
    earlier tasks, the replay buffer's rows (or this method's own per-task memory when the stream has
    no buffer). The router's supervision (MeteoRA's gate loss, LoRA-Mixer's balance loss) comes with the
    router; each row is labelled with its task's expert through `on_task_forward`.

    The router covers the learning slots' projections only; a GS-LoRA forgetting slot (feed-forward
    projections) is summed in as usual. The router state (expert tasks, gate tensors, memory) is saved
    with each unit, so a resume continues exactly."""

    name = "routed"
    new_slot = True
    summed = False

    def __init__(self, config: RoutedConfig):
        super().__init__(config)
        self.entry = config.router_entry()
        self.router_cfg = self.entry.make_config(dict(config.router_config))
        self.expert_tasks: list[str] = []
        self.memory: dict[str, list[list]] = {}
        self.tensors: dict[str, Any] = {}  # the router's gate tensors after the last refit
        self.modules: list[str] = []  # projections the router gates
        self.router = None
        self._slot: dict[str, int] | None = None

    # ---- training a new adapter alone ---------------------------------------------------------
    def configure_train(self, model: Any, slot: dict[str, int]) -> None:
        self._detach(model)
        self._slot = dict(slot)
        for name, layer in routed_layers(model).items():
            if name in slot:
                g = torch.zeros(1, 1, layer.bank.n_experts, device=layer.bank.A.device, dtype=layer.bank.A.dtype)
                g[..., slot[name]] = 1.0
                layer.static_gates = g  # (1, 1, E): only the new adapter
            else:
                layer.static_gates = None

    def _detach(self, model: Any) -> None:
        for name, layer in routed_layers(model).items():
            if name in self.modules or (self._slot and name in self._slot):
                layer.router = None
        if self.router is not None:
            self.router.detach_hook()
        self.router = None

    # ---- growing and refitting the router -----------------------------------------------------
    def _build(self, model: Any, seed: int):
        """A router over the current banks, previous gate tensors copied into the leading expert rows."""
        layers = routed_layers(model)
        for m in self.modules:
            n = layers[m].bank.n_experts
            if n != len(self.expert_tasks):
                raise ValueError(f"routed: projection {m} holds {n} adapters but the router knows "
                                 f"{len(self.expert_tasks)} tasks (a forgetting slot in a routed projection?)")
        torch.manual_seed(seed)
        router = self.entry.factory(self.router_cfg)
        router.attach(model, only=self.modules)
        router.set_expert_tasks(list(self.expert_tasks))
        fresh = router.state_tensors()
        merged = {}
        for k, new in fresh.items():
            old = self.tensors.get(k)
            if old is not None and old.shape == new.shape:
                merged[k] = old
            elif old is not None and old.shape[1:] == new.shape[1:] and old.shape[0] < new.shape[0]:
                merged[k] = torch.cat([old, new[old.shape[0]:]])  # an expert more: old rows kept
            else:
                merged[k] = new
        router.load_tensors(merged)
        self.router = router
        return router

    def after_unit(self, run: Any, unit: Unit) -> None:
        model, tr = run.lb.model, run.spec.trainer
        slot = self._slot or {}
        self.modules = sorted(slot)
        self.expert_tasks = self.expert_tasks + [unit.tasks[0]]
        layers = routed_layers(model)
        for layer_name in self.modules:  # the new adapter's one-hot gate is replaced by the router
            layers[layer_name].static_gates = None
        new = {t: rows_of(run.tasks[t], "train", tr.train_limit) for t in unit.tasks}
        if run.replay is None:
            rng = np.random.default_rng([run.spec.seed, unit.index, 7])
            for t, rows in new.items():
                pick = rng.permutation(len(rows))[: self.config.memory_per_task]
                self.memory[t] = [list(rows[int(i)]) for i in sorted(pick)]
            old = [Row(*r) for t in self.expert_tasks if t not in unit.tasks for r in self.memory.get(t, [])]
        else:
            old = run.replay.contents()
        by_task: dict[str, list] = {t: list(v) for t, v in new.items()}
        for r in map(Row._make, old):
            if r.task in self.expert_tasks:
                by_task.setdefault(r.task, []).append(r)
        seed = (run.spec.seed * 1000003 + unit.index * 7919 + 17) % (2**31)
        router = self._build(model, seed)
        if len(self.expert_tasks) < 2:  # one adapter: nothing to choose between
            self.tensors = router.state_tensors()
            return
        train_only(model, None)
        for p in router.parameters():
            p.requires_grad_(True)
        batches = mixed_batches(by_task, [], steps=self.config.router_steps, batch_size=tr.batch_size, mix=0.0,
                                rng=np.random.default_rng([run.spec.seed, unit.index, 11]))
        train_unit(model=model, tokenizer=run.lb.tokenizer, head=run.head, tasks=run.tasks, batches=batches,
                   lr=self.config.router_lr, trainer=tr, run_dir=run.rd.path / "units" / f"{unit.index:03d}-router",
                   seed=seed, device=run.device, progress=run.progress, label=f"{run.bar(unit)} router",
                   on_task_forward=router.ctx.set_task)
        router.ctx.set_task(None)
        for p in router.parameters():
            p.requires_grad_(False)
        self.tensors = router.state_tensors()

    def configure_eval(self, model: Any) -> None:
        if not self.expert_tasks:
            return
        if self.router is None:  # after a resume: rebuild the stored router
            self._build(model, 0)
        self.router.attach(model, only=self.modules)
        model.eval()

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"expert_tasks": self.expert_tasks, "modules": self.modules, "memory": self.memory}

    def state_tensors(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.expert_tasks = list(state.get("expert_tasks", []))
        self.modules = list(state.get("modules", []))
        self.memory = {t: [list(r) for r in rows] for t, rows in state.get("memory", {}).items()}
        self.tensors = dict(tensors)
        self.router = None
