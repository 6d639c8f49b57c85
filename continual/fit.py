"""Training with Lightning: loaders, the Trainer, training snapshots, and `fit_adapter` (one task).

`fit_adapter` is the single-task case of the continual trainer: a fresh LoRA (PEFT initialisation) in
the base's target modules, the `ContinualModule` with no regularizers, a Lightning Trainer with a
progress bar, CSV logs under `<run_dir>/logs`, the last checkpoint (trainable weights only) under
`<run_dir>/checkpoints`, and `AdapterSnapshots` that keep a few intermediate adapter states (the
generators learn from training trajectories, not only from end points).

Device, precision, devices and strategy pass through to the Trainer (`--devices`, `--strategy`,
`--precision` on the CLI): Lightning is the distributed engine. This module imports lightning (several
seconds), so only the commands that train import it.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader

from loraplex.data import Task
from loraplex.experts.layers import extract, inject_new
from loraplex.experts.spec import Adapter, LoraSpec

Row = tuple[str, int, str]  # (text, label index, task name)


class TrainConfig(BaseModel):
    """How to train an adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(100, ge=1)
    """Optimiser steps."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (linear warm-up, cosine decay to 10%)."""
    batch_size: int = Field(16, ge=1)
    """Examples per step."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    warmup: float = Field(0.1, ge=0, lt=1)
    """Share of steps spent warming up."""
    eval_every: int | None = Field(None, ge=1)
    """Validate every N steps (default: four times per run)."""
    val_limit: int = Field(200, ge=1)
    """Validation examples per task."""
    train_limit: int | None = Field(None, ge=1)
    """Use only the first N training examples (a quick slice)."""
    snapshots: int = Field(4, ge=0)
    """Intermediate adapter states to keep (evenly spaced; the final one is the adapter itself)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int | str = 1
    """Lightning devices (an int or 'auto')."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp, ..."""
    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed, 16-mixed."""

    @model_validator(mode="after")
    def _devices_exist(self):
        from loraplex.settings import with_checked_devices

        return with_checked_devices(self)
    progress: bool = True
    """Show a progress bar."""


def rows_of(task: Task, split: str, limit: int | None = None) -> list[Row]:
    ex = task.split(split)
    if limit:
        ex = ex[:limit]
    return [(e.text, task.label_index(e.label), task.name) for e in ex]


def make_loader(rows: Sequence[Row], batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(list(rows), batch_size=batch_size, shuffle=shuffle, generator=gen,
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
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*isinstance.*treespec.*")


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


class AdapterSnapshots(Callback):
    """Keeps copies of adapter `expert` at `count` evenly spaced steps before the last.

    `extract_fn(model) -> Adapter` overrides how the adapter is read (a continual run reads one slot
    of some modules' banks, see `continual.slots.extract_slot`)."""

    def __init__(self, spec: LoraSpec, steps: int, count: int, expert: int = 0, *, extract_fn=None):
        self.spec, self.expert = spec, expert
        self.extract_fn = extract_fn
        self.at = sorted({max(1, round(steps * (i + 1) / (count + 1))) for i in range(count)} - {steps}) if count else []
        self.taken: list[tuple[int, Adapter]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.at and not any(s == step for s, _ in self.taken):
            model = pl_module.model
            adapter = self.extract_fn(model) if self.extract_fn else extract(model, self.spec, self.expert)
            self.taken.append((step, adapter))


@dataclass
class FitResult:
    adapter: Adapter
    snapshots: list[tuple[int, Adapter]]
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def fit_adapter(base, task: Task, spec: LoraSpec, cfg: TrainConfig, run_dir: Path) -> FitResult:
    """Train one LoRA adapter on `task` over `base` (a LoadedBase, modified in place)."""
    from loraplex.continual.module import ContinualModule
    from loraplex.heads import head_for

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, verbose=False)
    modules = spec.resolve_targets(base.fingerprint.linear_names(), base.fingerprint.model_type)
    inject_new(base.model, spec, modules, seed=cfg.seed)
    head = head_for(base)
    module = ContinualModule(base.model, base.tokenizer, head, {task.name: task}, lr=cfg.lr,
                             warmup=cfg.warmup, total_steps=cfg.steps)
    train = make_loader(rows_of(task, "train", cfg.train_limit), cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = make_loader(rows_of(task, "validation", cfg.val_limit), 64, shuffle=False)
    snaps = AdapterSnapshots(spec, cfg.steps, cfg.snapshots)
    trainer = make_trainer(cfg, run_dir, callbacks=[snaps], device=base.settings.resolved_device())
    t0 = time.perf_counter()
    base.model.train()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    seconds = time.perf_counter() - t0
    base.model.eval()
    with torch.no_grad():
        adapter = extract(base.model, spec, 0)
    metrics = {
        "steps": int(trainer.global_step),
        "train_seconds": round(seconds, 2),
        "train_loss": _last(trainer.callback_metrics, "loss/task"),
        "val_accuracy": module.last_val.get(task.name),
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
    }
    return FitResult(adapter, list(snaps.taken), metrics, run_dir)


def _last(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None else round(float(v), 5)
