"""The stream spec: a YAML file that says what a continual run learns and forgets, and how.

    name: six-tasks                 # names the run (adapter names derive from it)
    base: minilm                    # an embedded base or a local model directory
    seed: 0
    lora: {rank: 8, alpha: 16}      # the adapter every learning experience trains
    trainer: {steps: 150, lr: 2.0e-3, batch_size: 16, precision: 32-true, devices: 1, strategy: auto}
    method: o-lora                  # or {name: o-lora, orth_weight: 0.5}: a name in continual.methods.METHODS
    replay: {budget: 600, policy: class-balanced, mix: 0.25, distill: 2.0}   # optional, any method; distill: DER++
                                    # (rows: added puts the replayed rows on top of batch_size new ones)
    forgetting: {name: gs-lora, sparsity_weight: 0.01}          # how forget experiences run (default: gs-lora)
    experiences:
      - learn: airline                        # an embedded task
      - learn: bbc
      - learn: tasks/tickets.jsonl            # a task file (relative to this spec), with its description
        description: Route support tickets to the right team.
      - forget: airline                       # erase a task learned earlier
      - forget: bbc
        labels: [sport]                       # or only some of its labels

examples/streams/reference.yaml names every key with its meaning and default, the methods' and the
forgetting's options included (tests/continual/test_reference_spec.py keeps it complete).

Everything is validated before anything runs: unknown keys are rejected with the key named, method
and forgetting configs are checked against their catalog entries, every task file must load, a
forget request must name a task learned earlier in the stream (and labels of its label set that its
training rows hold: GS-LoRA trains on them), and no two tasks learned may share a name. A spec
that fails validation raises `InvalidSpec` / `TaskNotFound` / `UnknownComponent` with one line.

`canonical()` is the spec with paths resolved and defaults filled in: a run directory stores it, and a
resume is refused when the given spec's canonical form differs from the stored one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplex.catalog import MAX_BATCH, MAX_COUNT, MAX_LR, MAX_STEPS, MAX_WEIGHT, Options, options
from loraplex.continual.forgetting import FORGETTERS, no_rows_to_forget
from loraplex.continual.methods import METHODS
from loraplex.models import EMBEDDED
from loraplex.data import EMBEDDED_TASKS, TASK_SUFFIXES, load_task
from loraplex.errors import InvalidSpec, InvalidTaskFile, TaskNotFound, UnknownComponent, UserInputError
from loraplex.experts.spec import MAX_RANK, LoraSpec
from loraplex.fsio import read_yaml_file, user_path, without_dotdot
from loraplex.registry.record import NAME_RE
from loraplex.tasks import SEED_MAX, as_task_labels, validate_description
from loraplex.training import LightningSettings


class _Frozen(Options):
    """Frozen, no unknown keys; each field's docstring is its description (and, for the options of
    `loraplex train` and `loraplex forget` that set one, its CLI help: cli/_options.py)."""

    model_config = options(use_attribute_docstrings=True)


class LoraSettings(_Frozen):
    """The LoRA every learning experience trains."""

    rank: int = Field(8, ge=1, le=MAX_RANK)
    """LoRA rank of the adapter trained (at most 4,096, every LoRA's bound)."""
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    """LoRA alpha (default: 2 x rank)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input while training."""
    targets: tuple[str, ...] = ()
    """Module name suffixes to adapt (default: the base's attention projections)."""

    def lora_spec(self):
        return LoraSpec(r=self.rank, alpha=self.alpha if self.alpha is not None else 2.0 * self.rank,
                        dropout=self.dropout, target_modules=self.targets)


class TrainerSettings(LightningSettings):
    """How each experience trains (Lightning settings, `LightningSettings`, pass through to the Trainer)."""

    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Optimiser steps per experience (default 100 when epochs is not given)."""
    epochs: float | None = Field(None, gt=0, le=MAX_STEPS)
    """Passes over each experience's new data instead of a step count (the steps they make are held to
    trainer.steps' bound too, per unit, before a run starts: `steps_for`)."""
    lr: float = Field(2e-3, gt=0, le=MAX_LR)
    """Peak learning rate (linear warm-up, cosine decay to 10%)."""
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    """Examples per step (replayed ones included), per device (under DDP a step sees batch size x devices)."""
    warmup: float = Field(0.1, ge=0, lt=1)
    """Share of each experience's steps spent warming up."""
    train_limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Use only the first N training examples of each task."""
    eval_limit: int | None = Field(300, ge=1, le=MAX_COUNT)
    """Test examples per task for the accuracies (the matrix, a forgetting's before/after); None: all."""
    eval_split: Literal["test", "validation"] = "test"
    """Split the accuracy matrix is measured on."""
    snapshots: int = Field(3, ge=0, le=1000)
    """Intermediate adapter states kept per experience (the generators learn from them)."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainerSettings":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give trainer.steps or trainer.epochs, not both")
        return self

    def steps_for(self, n_rows: int, batch_rows: int | None = None) -> int:
        """Steps of an experience whose new data has `n_rows` rows, `batch_rows` of them per step."""
        if self.epochs is None:
            return self.steps or 100
        per = max(1, batch_rows or self.batch_size)
        steps = max(1, math.ceil(self.epochs * n_rows / per))
        if steps > MAX_STEPS:
            raise InvalidSpec(f"trainer.epochs: {self.epochs:g} passes over {n_rows:,} rows, {per} new rows a step, "
                              f"are {steps:,} steps, more than {MAX_STEPS:,}; lower trainer.epochs")
        return steps


class ComponentRef(_Frozen):
    """A catalog name and its configuration (`{name: o-lora, orth_weight: 0.5}` or just `o-lora`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.config}


class ReplaySettings(_Frozen):
    """A budgeted replay buffer mixed into later experiences' batches (see continual.replay)."""

    budget: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Examples kept in all (give budget or share)."""
    share: float | None = Field(None, gt=0, le=1)
    """Share of each task's training examples kept (give budget or share)."""
    policy: Literal["reservoir", "class-balanced"] = "reservoir"
    """reservoir: a uniform sample of everything seen; class-balanced: equal quotas per (task, label)."""
    mix: float = Field(0.25, gt=0, lt=1)
    """Share of each batch drawn from the buffer once it holds examples."""
    rows: Literal["share", "added"] = "share"
    """share: the replayed rows take `mix` of each batch's `batch_size` rows; added: they come on top of
    `batch_size` new rows (DER++'s buffer minibatch beside the stream's), so a new task gets as many rows
    per step as without replay, at the cost of longer steps."""
    distill: float = Field(2.0, ge=0, le=MAX_WEIGHT)
    """DER++: weight of KL(stored || now) on replayed rows, the stored scores being the composition's
    right after the row's task was learned (0: plain replay, cross-entropy on the gold labels only).
    Measured (bench/continual.py, minilm, six tasks, o-lora, 120 steps per task): task order 1, AA 71.8 /
    BWT -10.7 with 0, 80.0 / -0.6 with 1.0, 79.9 / +0.2 with 2.0; mean of three orders 79.9 / -1.3 with
    1.0, 79.9 / -0.3 with 2.0 (multitask: 82.0)."""

    @model_validator(mode="after")
    def _one_budget(self) -> "ReplaySettings":
        if (self.budget is None) == (self.share is None):
            raise ValueError("give replay.budget (examples) or replay.share (of each task), exactly one")
        return self


class Experience(_Frozen):
    """One step of the stream: learn a task, or forget one (or some of its labels)."""

    learn: str | None = None
    """An embedded task name or a .jsonl/.csv task file (relative to the spec)."""
    description: str | None = None
    """The task's description (for a task file without a sidecar .task.json)."""
    forget: str | None = None
    """The name of a task learned earlier in the stream."""
    labels: tuple[str, ...] | None = None
    """Forget only these labels of the task (default: the whole task)."""

    @model_validator(mode="after")
    def _one_kind(self) -> "Experience":
        if (self.learn is None) == (self.forget is None):
            raise ValueError("an experience has exactly one of 'learn' or 'forget'")
        if self.learn is not None and self.labels is not None:
            raise ValueError("'labels' belongs to a forget experience")
        if self.forget is not None and self.description is not None:
            raise ValueError("'description' belongs to a learn experience")
        if self.labels is not None and not self.labels:
            raise ValueError("'labels' must name at least one label")
        return self

    @property
    def kind(self) -> str:
        return "learn" if self.learn is not None else "forget"


class StreamSpec(_Frozen):
    """A continual-learning stream: the base, the trainer, the method and the ordered experiences."""

    name: str = "stream"
    """Run name; adapters are registered as <name>-<stamp>-<i>-<task>."""
    base: str = "minilm"
    """Base model: minilm, smollm2, or a local model directory."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of initialisation, batch order, replay sampling and dropout."""
    lora: LoraSettings = LoraSettings()
    """The adapter each learning experience trains."""
    trainer: TrainerSettings = TrainerSettings()
    """Training settings for every experience."""
    method: ComponentRef
    """How tasks are added: seq-lora, o-lora, multitask (a name in continual.methods.METHODS)."""
    replay: ReplaySettings | None = None
    """Optional replay buffer (works with every method)."""
    forgetting: ComponentRef = ComponentRef(name="gs-lora")
    """How forget experiences run (a name in continual.forgetting.FORGETTERS)."""
    experiences: tuple[Experience, ...] = Field(min_length=1)
    """The stream, in order."""

    @field_validator("method", "forgetting", mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v) or ".." in v or len(v) > 40:
            raise ValueError("must be 1-40 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    # ---- derived ------------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """The spec as plain JSON with every default filled in, the method's and forgetting's included
        (what a run directory stores: a resume under changed defaults is refused too)."""
        out = self.model_dump(mode="json", exclude={"method", "forgetting"})
        for key, ref, cat in (("method", self.method, METHODS), ("forgetting", self.forgetting, FORGETTERS)):
            cfg = cat.get(ref.name).make_config(ref.config)
            out[key] = {"name": ref.name, **(cfg.model_dump(mode="json") if cfg is not None else {})}
        return json.loads(json.dumps(out, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# loading and validation


def _where(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def format_error(exc: ValidationError) -> str:
    """The first validation error as one line, naming the key (`experiences[2]: unknown key 'lern'`)."""
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "extra_forbidden" and loc:
        where = _where(loc[:-1])
        return f"unknown key {loc[-1]!r}" + (f" in {where}" if where else "")
    where = _where(loc) or "spec"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    msg = msg.replace("Input should be a valid tuple", "expected a list")  # what YAML calls it
    if err.get("type") == "missing":
        return f"{where}: required key missing"
    return f"{where}: {msg}"


def parse_spec(data: Any, *, where: str = "stream spec", root: Path | None = None) -> StreamSpec:
    """Validate a mapping into a StreamSpec and resolve its tasks and components (see `validate`)."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"{where}: expected a mapping of keys (name, base, trainer, method, experiences, ...)")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # a YAML `null:` / `~:` key is None, which a `next(..., None)` default took for "no such key" (sweep 53)
        shown = "null" if odd[0] is None else repr(odd[0])
        raise InvalidSpec(f"{where}: the key {shown} is not a name (keys are text: name, base, trainer, method, ...)")
    try:
        spec = StreamSpec(**data)
    except ValidationError as exc:
        raise InvalidSpec(f"{where}: {format_error(exc)}") from None
    except TypeError as exc:
        raise InvalidSpec(f"{where}: {exc}") from None
    return validate(spec, where=where, root=root)


def load_spec(path: str | Path) -> StreamSpec:
    """Read and validate a YAML stream spec; task files are resolved relative to its directory."""
    p = user_path(path).absolute()
    if not p.exists():
        raise InvalidSpec(f"{p}: no such stream spec")
    data = read_yaml_file(p, error=InvalidSpec, what="stream spec")
    return parse_spec(data, where=str(p), root=p.parent)


def _resolve_ref(ref: str, root: Path | None) -> str:
    """An embedded task name stays; a path becomes absolute (relative to the spec's directory). A bare
    name that is neither (no folder, no task-file suffix, no such file beside the spec) stays as it is, so
    that loading it says "unknown task" with the embedded names it is close to, not "no such file"."""
    if ref in EMBEDDED_TASKS:
        return ref
    p = user_path(ref)
    if not p.is_absolute() and root is not None:
        p = root / p
    bare = "/" not in ref and os.sep not in ref and not ref.lower().endswith(TASK_SUFFIXES)
    if bare and not p.exists():
        return ref
    return str(without_dotdot(p))  # as load_task_file records it: no `specs/../` (sweep 50)


def _resolve_base(base: str, root: Path | None) -> str:
    """`base:` read as `learn:` is: a relative path to a model directory beside the spec becomes absolute
    (it was read relative to the current directory, so the spec ran from its own folder only, and its
    run directory kept the relative path a resume from elsewhere could not find). An embedded name or hub
    id, an absolute path, or a path with no directory beside the spec stays as written."""
    if root is None or base in EMBEDDED or any(base.lower() == m.hub_id.lower() for m in EMBEDDED.values()):
        return base
    p = user_path(base)
    if p.is_absolute() or not (root / p).is_dir():
        return base
    return str(without_dotdot(root / p))  # recorded as the adapters' base: no `specs/../` (as the system reads it)


def _same_file(a: str, b: str) -> bool:
    """Two task refs naming one task: equal, or paths of one file (however spelled: `..`, links)."""
    if a == b:
        return True
    if a in EMBEDDED_TASKS or b in EMBEDDED_TASKS:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _shown(task: Any) -> str:
    """A task as a message names it: its file, or its name and "embedded"."""
    return f"{task.name}, embedded" if task.source == "embedded" else task.source


def validate(spec: StreamSpec, *, where: str = "stream spec", root: Path | None = None) -> StreamSpec:
    """Check names against catalogs, load every task, check forget requests; return the resolved spec."""
    for ref, cat in ((spec.method, METHODS), (spec.forgetting, FORGETTERS)):
        try:
            cat.get(ref.name).make_config(ref.config)  # UnknownComponent names the known ones
        except (InvalidSpec, UnknownComponent) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    learned: dict[str, Any] = {}  # task name -> Task
    learned_at: dict[str, int] = {}  # task name -> the experience that learns it
    forgotten: dict[str, set[str] | None] = {}
    resolved: list[Experience] = []
    for i, exp in enumerate(spec.experiences):
        if exp.learn is not None:
            if not exp.learn.strip():  # "" was read as the spec's own folder
                raise InvalidSpec(f"{where}: experiences[{i}].learn: empty (name an embedded task or a task file)")
            if exp.description is not None:  # its faults are the spec's, not the task file's
                try:
                    validate_description(exp.description)
                except UserInputError as exc:
                    raise InvalidSpec(f"{where}: experiences[{i}].description: {exc}") from None
            ref = _resolve_ref(exp.learn, root)
            try:
                task = load_task(ref, description=exp.description)
            except TaskNotFound as exc:
                raise TaskNotFound(f"{where}: experiences[{i}]: {exc}") from None
            except InvalidTaskFile as exc:  # which unit of the spec reads the file
                raise InvalidTaskFile(f"{where}: experiences[{i}]: {exc}") from None
            same = next((t for t in learned.values() if _same_file(t.ref, task.ref)), None)
            if same is not None:  # `t/../t/a.jsonl`, or a link to it, is the file `t/a.jsonl` (one sidecar)
                raise InvalidSpec(f"{where}: experiences[{i}]: task {task.name!r} is learned twice"
                                  + (f" (as {same.name!r} by experiences[{learned_at[same.name]}]: {_shown(same)} is "
                                     "the same file)" if same.ref != task.ref else ""))
            if task.name in learned:
                first = learned[task.name]
                raise InvalidSpec(f"{where}: experiences[{learned_at[task.name]}] ({_shown(first)}) and "
                                  f"experiences[{i}] ({_shown(task)}) are both named {task.name!r}; a stream needs "
                                  "one task per name (give a task file a sidecar .task.json with another 'name')")
            learned[task.name] = task
            learned_at[task.name] = i
            resolved.append(exp.model_copy(update={"learn": ref}))
            continue
        name = exp.forget
        task = learned.get(name) or next((t for t in learned.values() if _same_file(t.ref, _resolve_ref(name, root))), None)
        if task is None:
            known = ", ".join(learned) or "none yet"
            raise InvalidSpec(f"{where}: experiences[{i}]: cannot forget {name!r}: the stream has not learned it "
                              f"(learned so far: {known})")
        if exp.labels is not None:
            mapped, bad = as_task_labels(exp.labels, task.labels)  # an NFD "café" names the task's "café" (sweep 44)
            if bad is not None:
                raise InvalidSpec(f"{where}: experiences[{i}]: task {task.name!r} has no label {bad!r} "
                                  f"(labels: {', '.join(task.labels)})")
            exp = exp.model_copy(update={"labels": tuple(mapped)})
            twice = next((lab for j, lab in enumerate(exp.labels) if lab in exp.labels[:j]), None)
            if twice is not None:
                raise InvalidSpec(f"{where}: experiences[{i}]: label {twice!r} is named twice")
            if set(exp.labels) == set(task.labels):
                raise InvalidSpec(f"{where}: experiences[{i}]: naming every label of {task.name!r} forgets the "
                                  "whole task; drop 'labels'")
        if task.name in forgotten and forgotten[task.name] is None:
            raise InvalidSpec(f"{where}: experiences[{i}]: task {task.name!r} is already forgotten")
        done = forgotten.get(task.name) or set()
        again = sorted(done & set(exp.labels or ()))
        if again:
            raise InvalidSpec(f"{where}: experiences[{i}]: label {again[0]!r} of {task.name!r} is already forgotten")
        if exp.labels is not None and done | set(exp.labels) == set(task.labels):
            raise InvalidSpec(f"{where}: experiences[{i}]: with the labels forgotten before, this forgets every label "
                              f"of {task.name!r}: forget the whole task instead (drop 'labels')")
        why = no_rows_to_forget(task, exp.labels, spec.trainer.train_limit)
        if why is not None:
            raise InvalidSpec(f"{where}: experiences[{i}]: {why}")
        forgotten[task.name] = None if exp.labels is None else set(exp.labels) | (forgotten.get(task.name) or set())
        resolved.append(exp.model_copy(update={"forget": task.name}))
    if not learned:
        raise InvalidSpec(f"{where}: the stream learns no task")
    return spec.model_copy(update={"experiences": tuple(resolved), "base": _resolve_base(spec.base, root)})


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two canonical specs differ (for the resume error), else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return sub
            d = first_difference(a[k], b[k], sub)
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(b)} != {len(a)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else path or "spec"
