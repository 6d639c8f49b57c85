"""Training with Lightning, shared by every part that trains: one adapter (continual/fit.py), a
stream's units (continual/experience.py) and a router's gates (router/fit.py).

- `TrainConfig`: how to train (steps, learning rate, batch size, Lightning's devices and precision);
- `rows_of`, `make_loader`: a task's rows `(text, label index, task name)` and their DataLoader;
- `make_trainer`: a Lightning Trainer with a progress bar, CSV logs under `<run_dir>/logs` and the last
  checkpoint (trainable weights only) under `<run_dir>/checkpoints`; `fit` runs it, a Ctrl-C or a
  SIGTERM raising `Interrupted` (the caller then writes nothing);
- `AdapterSnapshots`: a callback that keeps a few intermediate adapter states (the generators learn
  from training trajectories, not only from end points);
- `ContinualModule`: the LightningModule whose `training_step` composes the loss.

Device, precision, devices and strategy pass through to the Trainer (`--devices`, `--strategy`,
`--precision` on the CLI): Lightning is the distributed engine. This module imports lightning (several
seconds), so only the commands that train import it.

ContinualModule trains adapters (one task, or a stream of them). The loss is composed visibly in
`training_step`, every term logged under its own name:

    loss = task loss                          (the head's loss, per task present in the batch)
         + forget loss                        (a forgetting experience: GS-LoRA's bounded loss on the
                                               rows to forget; the task loss is then the retention loss)
         + distillation                       (weight * KL(stored scores || now) on rows that have stored
                                               scores: a forgetting experience's retained rows, scored
                                               before it; replayed rows with replay.distill, scored when
                                               their task was learned (DER++); see continual/distill.py)
         + router auxiliary loss              (sum over routed layers of Routing.aux_loss, if any)
         + sum_i regularizer_i.penalty(self)  (O-LoRA orthogonality, GS-LoRA group sparsity, ...)

Regularizers are plain objects with a `name` and `penalty(module) -> Tensor` (their experience hooks
are called by the stream loop, not here); Lightning callbacks only log, show progress and checkpoint.
A forgetting objective (`continual.forgetting.ForgetObjective`) says which rows of a batch are to be
forgotten (`is_forget(row)`) and scores them (`loss(module, rows)`); the other rows keep the task loss.
A teacher (`continual.distill.StoredScores`: `weight`, `lookup(row)`) adds the distillation term; it
reuses the scores of the task loss's forward when the head gives them (`Head.scored_loss`), so it costs
no second forward on an encoder base.
A batch is a list of `(text, label index, task name)`: rows from several tasks can share a batch
(replay), and each is scored against its own task's label set. Rows are forwarded one task group at a
time (on an encoder head without a router, in length buckets instead: see `task_loss`):
`on_task_forward(task)` (optional) is called before each group's forward (a router uses it to know
which task's adapter the tokens belong to), and the router auxiliary loss is read after each group's
forward and averaged over the batch's rows.

Checkpoints keep only the trainable parameters (the adapter banks, routers), not the frozen base.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from pydantic import Field, ValidationError, field_validator, model_validator
from torch.utils.data import DataLoader, DistributedSampler

from loraplex import ranks
from loraplex.catalog import MAX_BATCH, MAX_COUNT, MAX_LR, MAX_STEPS, Options, options
from loraplex.errors import Diverged, Interrupted, InvalidSpec, LoraplexWarning
from loraplex.experts.layers import extract, routed_layers
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.heads import Head
from loraplex.settings import with_checked_devices
from loraplex.tasks import SEED_MAX, Task

class Row(NamedTuple):
    """One training or evaluation row. A plain `(text, label, task)` tuple is accepted wherever a Row is:
    the functions that take rows from outside read them through `as_row`, and then by field name."""

    text: str
    label: int
    """The index of the row's label in its task's label set."""
    task: str
    """The task's name: each row is scored against its own task's labels (a batch may mix tasks)."""


def as_row(row: Sequence[Any]) -> Row:
    """`row` as a Row (a plain `(text, label, task)` tuple is read in that order)."""
    return row if isinstance(row, Row) else Row(*row)


class LightningSettings(Options):
    """Lightning's settings, passed through to the Trainer: one definition for a one-off training
    (`TrainConfig`) and a stream's experiences (`continual.spec.TrainerSettings`). Each field's docstring
    is its description (`use_attribute_docstrings`) and the help of its CLI option (cli/_options.py)."""

    model_config = options(use_attribute_docstrings=True)

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int | str = 1
    """Lightning devices (a number, -1 for every GPU, or 'auto')."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp, ..."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                       "transformer-engine", "transformer-engine-float16"] = "32-true"
    """Lightning precision: 32-true, bf16-mixed, 16-mixed."""

    @field_validator("precision", mode="before")
    @classmethod
    def _legacy_precision(cls, v: object) -> object:
        """Lightning's older spellings (16, 32, 64, 'bf16') read as Lightning reads them."""
        return {"16": "16-mixed", "32": "32-true", "64": "64-true", "bf16": "bf16-mixed"}.get(str(v), v)

    @field_validator("precision")
    @classmethod
    def _trainable_precision(cls, v: str) -> str:
        """Refuse pure float16: AdamW's squared gradients and its eps (1e-8) underflow to 0 there, so the first
        update is 0/0 at any learning rate (it was blamed on the learning rate)."""
        if v == "16-true":
            raise ValueError("16-true (pure float16) cannot train with AdamW: its squared gradients underflow to 0 "
                             "and the first step is NaN at any learning rate; use 16-mixed on a GPU, bf16-mixed, "
                             "bf16-true or 32-true")
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        """'auto' or a strategy name in Lightning's registry (checked here, before a run directory exists)."""
        from lightning.pytorch.strategies import StrategyRegistry

        known = ["auto", *StrategyRegistry.available_strategies()]
        if v not in known:
            raise ValueError(f"unknown Lightning strategy {v!r} (known: auto, ddp, fsdp, deepspeed, "
                             f"... {len(known)} in all)")
        if any(w in v for w in ("spawn", "fork", "notebook")):
            # spawn pickles the model (its tokenizer and hooks do not pickle); fork trains in a child process
            # and copies back only the weights: the steps, validation and snapshots stayed there, and the
            # adapter was registered as trained for 0 steps
            raise ValueError(f"Lightning strategy {v!r} is not supported: loraplex runs DDP with Lightning's "
                             "own launcher, which re-runs the command once per device; use ddp")
        return v

    @model_validator(mode="after")
    def _devices_exist(self):
        return _lightning_accepts(with_checked_devices(self))

    def lightning(self) -> dict[str, Any]:
        """The Lightning settings alone: {accelerator, devices, strategy, precision}."""
        return {k: getattr(self, k) for k in LightningSettings.model_fields}


def _lightning_accepts(cfg: LightningSettings) -> LightningSettings:
    """Lightning's own check of the accelerator, strategy and precision together, made by building a Trainer
    that never runs, before anything is evaluated or written: fsdp on a CPU, mps or tpu where there is none,
    or transformer-engine without its package used to end in exit 70 after the bare base's evaluation. The
    defaults (what every CPU run uses) need no check."""
    if (cfg.accelerator in ("auto", "cpu") and cfg.strategy == "auto" and cfg.devices in (1, "1")
            and cfg.precision in ("32-true", "64-true", "bf16-mixed")):
        return cfg
    _quiet_lightning()
    try:
        with warnings.catch_warnings():  # a precision Lightning replaces is refused below, not warned about
            warnings.simplefilter("ignore")
            trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                                precision=cfg.precision, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    except Exception as exc:  # noqa: BLE001 (Lightning raises ValueError, MisconfigurationException, ModuleNotFoundError...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"Lightning cannot run accelerator={cfg.accelerator!r}, strategy={cfg.strategy!r}, "
                         f"precision={cfg.precision!r} on this machine: {first}") from None
    got = str(getattr(trainer, "precision", cfg.precision))
    if got != cfg.precision:  # 16-mixed on a CPU: Lightning trains in bf16-mixed instead, with a warning
        raise ValueError(f"Lightning cannot run precision={cfg.precision!r} on this machine's "
                         f"{type(trainer.accelerator).__name__}: it would train in {got!r} instead; ask for {got!r} "
                         "or 32-true")
    if type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
        # strategy "auto" with several devices in a REPL or notebook: Lightning forks (see _known_strategy)
        raise ValueError(f"devices={cfg.devices!r} here would train in forked or spawned processes (Lightning's "
                         "choice in an interactive session), whose steps and snapshots never come back: run "
                         "several devices from the command line or a script")
    if (type(getattr(trainer.strategy, "launcher", None)).__name__ == "_SubprocessScriptLauncher"
            and trainer.num_devices * trainer.num_nodes > 1 and not ranks.COMMAND_LINE):
        raise ValueError(f"devices={cfg.devices!r} from a Python program: Lightning's DDP launcher would run this whole "
                         "program again once per extra device (it re-runs sys.argv), every call before the training "
                         "included; train on several devices with the loraplex command (--devices), or start one "
                         "process per device yourself with torchrun")
    asked = cfg.devices if isinstance(cfg.devices, int) and cfg.devices > 0 else None
    if asked is not None and trainer.num_devices != asked:  # single_device with --devices 2: one, without a word
        raise ValueError(f"devices={asked} with strategy={cfg.strategy!r}: Lightning would run on "
                         f"{trainer.num_devices} device(s); use strategy ddp for several, or devices={trainer.num_devices}")
    return cfg


class TrainConfig(LightningSettings):
    """How to train an adapter."""

    steps: int = Field(100, ge=1, le=MAX_STEPS)
    """Optimiser steps."""
    lr: float = Field(2e-3, gt=0, le=MAX_LR)
    """Peak learning rate (linear warm-up, cosine decay to 10%)."""
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    """Examples per step, per device (under DDP a step sees batch size x devices)."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed for initialisation, shuffling and dropout."""
    warmup: float = Field(0.1, ge=0, lt=1)
    """Share of steps spent warming up."""
    eval_every: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Validate every N steps (default: every steps // 4, about four times a run)."""
    val_limit: int = Field(200, ge=1, le=MAX_COUNT)
    """Validation examples per task."""
    train_limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Use only the first N training examples (a quick slice)."""
    snapshots: int = Field(4, ge=0, le=1000)
    """Intermediate adapter states to keep (evenly spaced; the final one is the adapter itself)."""
    progress: bool = True
    """Show a progress bar."""


_AS_TYPED = {"r": "rank", "target_modules": "targets"}
"""LoraSpec's field names as `train` and the API's `train` name them (`--rank`, `--targets`)."""


def invalid_option(exc: ValidationError) -> InvalidSpec:
    """The first error of a training config's validation, as one line: `invalid training option steps: ...`."""
    err = exc.errors()[0]
    loc = [_AS_TYPED.get(str(p), str(p)) for p in err["loc"]] if len(err["loc"]) == 1 else list(map(str, err["loc"]))
    where = " " + ".".join(loc) if loc else ""
    out = InvalidSpec(f"invalid training option{where}: {err['msg'].removeprefix('Value error, ')}")
    out.option = loc[0] if len(loc) == 1 else None
    return out


def train_config(**options: Any) -> TrainConfig:
    """`TrainConfig(**options)`, a bad option raising InvalidSpec (one line) instead of a ValidationError."""
    try:
        return TrainConfig(**options)
    except ValidationError as exc:
        raise invalid_option(exc) from None


def rows_of(task: Task, split: str, limit: int | None = None) -> list[Row]:
    """The first `limit` rows (default: all) of a task's split."""
    return [Row(e.text, task.label_index(e.label), task.name) for e in task.split(split)[:limit or None]]


def _task_groups(batch: Sequence[Row]) -> dict[str, list[int]]:
    """{task: the indices of its rows in the batch}, the tasks in the order they first appear."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(batch):
        groups.setdefault(r.task, []).append(i)
    return groups


PADDING = "\0padding"
"""The task name of an evaluation loader's padding rows (no task can be named so): scored by nobody."""


class _EvalRows:
    """Evaluation rows; an index past them is a padding row (`PADDING`), which `EvalSampler` hands out so
    that every process reads as many batches as the others."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i] if i < len(self.rows) else Row("", 0, PADDING)


class EvalSampler(DistributedSampler):
    """Each row once over all processes: rank r of W reads rows r, r + W, r + 2W, ... in order, and the
    shards are made one length with padding rows (indices past the rows: `_EvalRows`) that validation skips.

    Lightning gives a validation loader a DistributedSampler under DDP, which pads the shards by repeating
    rows, so the summed validation counts counted a repeated row twice (3 rows on 2 processes: 4). The shards
    must stay one length: each process's first forward in validation synchronises DDP's buffers, so a process
    with a batch fewer would leave the others waiting. Lightning keeps a sampler that already is a
    DistributedSampler; this one reads the process group when it is iterated (the loader is made before DDP
    starts)."""

    def __init__(self, n: int):
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=False)
        self.n = n

    def _shard(self) -> range:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            return range(dist.get_rank(), -(-self.n // world) * world, world)
        return range(self.n)

    def __iter__(self):
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._shard())


def make_loader(rows: Sequence[Row], batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """Training rows (shuffle=True; Lightning shards them under DDP) or evaluation rows (shuffle=False:
    each row read once over all processes, `EvalSampler`)."""
    rows = list(rows)
    gen = torch.Generator().manual_seed(seed)  # its own: iterating a loader draws a seed, never from the global RNG
    if not shuffle:
        return DataLoader(_EvalRows(rows), batch_size=batch_size, sampler=EvalSampler(len(rows)), collate_fn=list,
                          num_workers=0, drop_last=False, generator=gen)
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=gen,
                      collate_fn=list, num_workers=0, drop_last=False)


class _TrainProgress(TQDMProgressBar):
    """Lightning's progress bar without the nested validation bars (the val accuracy shows in the postfix)."""

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for noise in ("does not have many workers", "LeafSpec", "sync_dist=True", "number of training batches",
                  "isinstance.*treespec"):
        warnings.filterwarnings("ignore", message=f".*{noise}.*")


def make_trainer(cfg: TrainConfig, run_dir: Path, *, callbacks: Sequence[Any] = (), max_steps: int | None = None,
                 device: str = "cpu", checkpoint: bool = True) -> L.Trainer:
    _quiet_lightning()
    steps = max_steps or cfg.steps
    cbs = list(callbacks)
    if cfg.progress:
        cbs.append(_TrainProgress(refresh_rate=max(1, steps // 50)))
    if checkpoint:
        cbs.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_last=False,
                                   every_n_train_steps=max(1, steps // 4), save_top_k=1, enable_version_counter=False))
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if device == "cuda" else ("mps" if device == "mps" else "cpu")
    eval_every = cfg.eval_every or max(1, steps // 4)
    return L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=CSVLogger(str(run_dir), name="logs", version=""),
        callbacks=cbs,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        num_sanity_val_steps=0,
        val_check_interval=min(eval_every, steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=max(1, min(10, steps // 10)),
        default_root_dir=str(run_dir),
    )


def fit(trainer: L.Trainer, module: L.LightningModule, train: DataLoader, val: DataLoader | None = None) -> None:
    """`trainer.fit`; a stop raises `Interrupted`, so the caller writes nothing. Lightning ends a fit
    stopped by Ctrl-C with sys.exit(1) (the only SystemExit out of fit; a Ctrl-C in its set-up may not
    mark the trainer `interrupted`), and one stopped by SIGTERM with SIGTERMException, a SystemExit with
    no code: uncaught, the command would exit 0 as if it had succeeded."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None  # put back as it was: a library's caller's own
    try:                                                        # handler was replaced by Python's (sweep 69)
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    except OSError as exc:  # a checkpoint's or a log's write (a file too large, a full disk) names no file
        if not getattr(exc, "filename", None):
            exc.filename = trainer.default_root_dir  # the run directory it was writing into (errors.os_error)
        raise
    except SystemExit:
        if main:  # Lightning ignores Ctrl-C after the first
            signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)
    else:
        if not trainer.received_sigterm:  # a SIGTERM in the last step ends the fit as if it had finished
            _check_finite(trainer, module)
            return
    how = "SIGTERM" if trainer.received_sigterm else "SIGINT"
    raise Interrupted(f"training was interrupted ({how}); nothing was registered", signal=how)


def _check_finite(trainer: L.Trainer, module: L.LightningModule) -> None:
    """A fit whose trained weights hold NaN or infinity diverged (a learning rate too high, 16-bit precision):
    said as such here, rather than later as a damaged adapter."""
    bad = next((n for n, p in module.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        low = "" if str(trainer.precision) in ("32-true", "64-true") else f", or train in 32-true precision (not {trainer.precision})"
        steps = f"{trainer.global_step} step{'s' if trainer.global_step != 1 else ''}"
        where = f"training diverged: after {steps} the trained weights hold NaN or infinity ({bad})"
        raise Diverged(f"{where}; lower the learning rate (--lr){low}; nothing was registered", detail=where)


class AdapterSnapshots(Callback):
    """Keeps copies of adapter `expert` at `count` evenly spaced steps before the last (at most steps - 1:
    a warning says so when `asked`, i.e. the count was given, not a default).

    `extract_fn(model) -> Adapter` overrides how the adapter is read (a continual run reads one slot
    of some modules' banks, see `continual.slots.extract_slot`)."""

    def __init__(self, spec: LoraSpec, steps: int, count: int, expert: int = 0, *, extract_fn=None,
                 asked: bool = True):
        self.spec, self.expert = spec, expert
        self.extract_fn = extract_fn
        self.at = sorted({max(1, round(steps * (i + 1) / (count + 1))) for i in range(count)} - {steps}) if count else []
        self.taken: list[tuple[int, Adapter]] = []
        if asked and len(self.at) < count:  # fewer steps before the last than snapshots asked for: said, not dropped
            warnings.warn(f"{count} snapshots were asked for and {len(self.at)} will be kept: a run of {steps} "
                          f"step{'s' if steps != 1 else ''} has {steps - 1} before its last", LoraplexWarning,
                          stacklevel=2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.at and not any(s == step for s, _ in self.taken):
            model = pl_module.model
            adapter = self.extract_fn(model) if self.extract_fn else extract(model, self.spec, self.expert)
            self.taken.append((step, adapter))


def distill_loss(scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(scores)), mean over rows; scores and teacher (N, L)."""
    return F.kl_div(F.log_softmax(scores.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="batchmean")


class ContinualModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any, head: Head, tasks: dict[str, Task], *,
                 lr: float = 1e-3, warmup: float = 0.1, total_steps: int = 100, regularizers: Sequence[Any] = (),
                 forgetting: Any = None, teacher: Any = None, on_task_forward: Callable[[str], None] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.head = head
        self.tasks = dict(tasks)
        self.lr = lr
        self.warmup = warmup
        self.total_steps = max(1, total_steps)
        self.regularizers = list(regularizers)
        self.forgetting = forgetting
        self.teacher = teacher if teacher is not None and getattr(teacher, "weight", 0) > 0 else None
        self.on_task_forward = on_task_forward
        self._batch_aux: torch.Tensor | None = None
        self._batch_kd: torch.Tensor | None = None
        self.last_val: dict[str, float] = {}
        self.last_val_n: dict[str, int] = {}  # the rows each task's last validation read, every rank's summed
        self._val_counts: dict[str, list[int]] = {}

    # ---- the loss ----------------------------------------------------------------------------
    def mixed_embeddings(self, batch: Sequence[Row]) -> torch.Tensor | None:
        """(N, D) embeddings of a batch mixing tasks, forwarded in length buckets, when that is possible
        (an encoder head, no `on_task_forward` hook, no router attached); None otherwise."""
        batch = [as_row(r) for r in batch]
        if len({r.task for r in batch}) < 2 or self.on_task_forward is not None or not self.head.embeds:
            return None
        if any(layer.router is not None for layer in routed_layers(self.model).values()):
            return None
        return self.head.encode_mixed(self.model, self.tokenizer, [r.text for r in batch])

    def task_loss(self, batch: Sequence[Row], emb: torch.Tensor | None = None) -> torch.Tensor:
        """Mean head loss over the batch, each row scored against its own task's labels.

        Rows are forwarded one task group at a time, except on an encoder head with no router attached:
        there the sentence embedding does not depend on the task, so a batch mixing tasks (replay) is
        forwarded in length buckets (`EncoderHead.encode_mixed`) and only the scoring is per task.
        `emb`: the rows' embeddings when the caller already has them (`mixed_embeddings`).
        Also leaves the batch's router auxiliary loss in `_batch_aux` and its distillation term (mean over
        the rows the teacher knows, times its weight) in `_batch_kd` (None when there is none)."""
        batch = [as_row(r) for r in batch]
        groups = _task_groups(batch)
        if emb is None:
            emb = self.mixed_embeddings(batch)  # (N, D), or None: one forward per task group
        total = 0.0
        aux_total = None
        kd_total, kd_rows = None, 0
        for t, rows in groups.items():
            texts = [batch[i].text for i in rows]
            y = torch.tensor([batch[i].label for i in rows], device=self.device)
            if emb is not None:
                scores = self.head.scores_of(self.model, self.tokenizer, emb[rows], self.tasks[t])
                loss = F.cross_entropy(scores, y)
            else:
                if self.on_task_forward is not None:
                    self.on_task_forward(t)
                loss, scores = self.head.scored_loss(self.model, self.tokenizer, texts, y, self.tasks[t])
                aux = self.router_aux_loss()  # this group's forward
                if aux is not None:
                    aux_total = aux * len(rows) if aux_total is None else aux_total + aux * len(rows)
            total = total + loss * len(rows)
            stored = [self.teacher.lookup(batch[i]) for i in rows] if self.teacher is not None else []
            known = [j for j, s in enumerate(stored) if s is not None]
            if known:
                if scores is None:  # a head whose loss is not a function of its scores (causal LM)
                    scores = self.head.scores(self.model, self.tokenizer, [texts[j] for j in known], self.tasks[t])
                else:
                    scores = scores[known]
                target = torch.stack([stored[j] for j in known]).to(scores.device)
                kd = distill_loss(scores, target) * len(known)
                kd_total = kd if kd_total is None else kd_total + kd
                kd_rows += len(known)
        self._batch_aux = None if aux_total is None else aux_total / len(batch)
        self._batch_kd = None if kd_total is None else self.teacher.weight * kd_total / kd_rows
        return total / len(batch)

    def router_aux_loss(self) -> torch.Tensor | None:
        terms = [layer.last_routing.aux_loss for layer in routed_layers(self.model).values()
                 if layer.router is not None and layer.last_routing is not None
                 and getattr(layer.last_routing, "aux_loss", None) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def training_step(self, batch, batch_idx):
        batch = [as_row(r) for r in batch]
        bs = len(batch)
        to_forget = [self.forgetting is not None and self.forgetting.is_forget(r) for r in batch]
        forget_rows = [r for r, f in zip(batch, to_forget) if f]
        keep_rows = [r for r, f in zip(batch, to_forget) if not f]
        loss = torch.zeros((), device=self.device)
        self._batch_kd = None
        emb = self.mixed_embeddings(batch) if keep_rows and forget_rows else None  # one pass for both kinds
        keep_emb = forget_emb = None
        if emb is not None:
            keep_emb = emb[[i for i, f in enumerate(to_forget) if not f]]
            forget_emb = emb[[i for i, f in enumerate(to_forget) if f]]
        if keep_rows:
            task = self.task_loss(keep_rows, keep_emb)
            loss = loss + task
            self.log("loss/task", task, prog_bar=True, batch_size=len(keep_rows))
        if forget_rows:
            forget = self.forgetting.loss(self, forget_rows, forget_emb)
            loss = loss + forget
            self.log("loss/forget", forget, prog_bar=True, batch_size=len(forget_rows))
        if self._batch_kd is not None:
            loss = loss + self._batch_kd
            self.log("loss/distill", self._batch_kd, batch_size=len(keep_rows))
        aux = self._batch_aux if keep_rows else self.router_aux_loss()
        if aux is not None:
            loss = loss + aux
            self.log("loss/router_aux", aux, batch_size=bs)
        for reg in self.regularizers:
            pen = reg.penalty(self)
            if pen is None:
                continue
            loss = loss + pen
            self.log(f"loss/{reg.name}", pen, prog_bar=True, batch_size=bs)
        self.log("loss/total", loss, batch_size=bs)
        return loss

    # ---- validation: accuracy per task on the validation loader ------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_counts: dict[str, list[int]] = {}

    def validation_step(self, batch, batch_idx):
        batch = [as_row(r) for r in batch]
        for t, rows in _task_groups(batch).items():
            if t == PADDING:  # EvalSampler's: keeps the processes' batch counts equal, counted by nobody
                continue
            if self.on_task_forward is not None:
                self.on_task_forward(t)
            scores = self.head.scores(self.model, self.tokenizer, [batch[i].text for i in rows], self.tasks[t])
            pred = scores.argmax(-1).tolist()
            c = self._val_counts.setdefault(t, [0, 0])
            c[0] += sum(int(p == batch[i].label) for p, i in zip(pred, rows))
            c[1] += len(rows)

    def on_validation_epoch_end(self) -> None:
        counts = self._val_counts
        if self.trainer.world_size > 1:  # each rank validated its shard: the counts of all ranks, summed
            names = sorted(self.tasks)   # (a rank whose shard lacks a task counts 0 of 0 for it)
            local = torch.tensor([counts.get(t, [0, 0]) for t in names], dtype=torch.float64, device=self.device)
            total = self.trainer.strategy.reduce(local, reduce_op="sum")
            counts = {t: [int(c), int(n)] for t, (c, n) in zip(names, total.tolist())}
        accs = {t: c / n for t, (c, n) in counts.items() if n}
        if self.trainer.sanity_checking or not accs:
            return
        self.last_val = accs
        self.last_val_n = {t: n for t, (_, n) in counts.items() if n}
        for t, a in accs.items():
            self.log(f"val/{t}", a, prog_bar=len(accs) == 1)
        self.log("val/accuracy", sum(accs.values()) / len(accs), prog_bar=True)

    # ---- optimisation ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("nothing to train: no parameter requires grad")
        # weight_decay=0: banks hold frozen experts whose slices must not decay (see LoraBank).
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        warm = max(1, int(self.warmup * self.total_steps))

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < warm:
                return (step + 1) / warm
            p = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints hold the trainable state only --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.named_buffers() if ".bank." in n or ".router." in n}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base is rebuilt from the registry; restore only what the checkpoint holds.
        own = self.state_dict()
        own.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = own


def last_metric(metrics: dict, key: str) -> float | None:
    """The trainer's last logged value of `key`, rounded (None if it never logged it)."""
    v = metrics.get(key)
    return None if v is None else round(float(v), 5)
