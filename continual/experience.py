"""Training one unit of a stream (a learning experience, a multitask group or a forgetting request).

`train_unit` is the one place a continual run calls Lightning: the batches (already mixed with
replay, see `continual/replay.py`) go through a `DataLoader`, the `ContinualModule` composes the loss
(task / retention loss, GS-LoRA forget loss, regularizer penalties), `make_trainer` brings the progress
bar, CSV logs and checkpoints, `AdapterSnapshots` keeps a few intermediate states of the trained slot,
and `StepTimer` (a logging callback) measures the wall time of each optimiser step.

An interrupted fit (Ctrl-C, SIGTERM) raises `Interrupted` (`loraplex.training.fit`: Lightning exits
after its own clean-up), so the caller can say how to resume.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from loraplex.training import AdapterSnapshots, ContinualModule, TrainConfig, fit, make_trainer


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, optimiser), for the step-time overhead."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)

    def median(self, skip: int = 3) -> float | None:
        ts = self.times[skip:] if len(self.times) > skip + 2 else self.times
        return statistics.median(ts) if ts else None


class _Describe(Callback):
    """Names the progress bar after the unit ("[2/6] apple") instead of "Epoch 0"."""

    def __init__(self, label: str):
        self.label = label

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        bar = getattr(trainer.progress_bar_callback, "train_progress_bar", None) if trainer.progress_bar_callback else None
        if bar is not None and batch_idx == 0:
            bar.set_description(self.label)


@dataclass
class UnitOutcome:
    steps: int
    seconds: float
    step_time: float | None
    losses: dict[str, float] = field(default_factory=dict)
    snapshots: list = field(default_factory=list)


def train_unit(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    head: Any,
    tasks: dict[str, Any],
    batches: Sequence[list],
    lr: float,
    trainer: Any,
    run_dir: Path,
    seed: int,
    device: str,
    regularizers: Sequence[Any] = (),
    forgetting: Any = None,
    teacher: Any = None,
    on_task_forward: Callable[[str], None] | None = None,
    snapshot_fn: Callable[[torch.nn.Module], Any] | None = None,
    snapshot_spec: Any = None,
    progress: bool = True,
    label: str = "",
) -> UnitOutcome:
    """Fit the model's trainable slot on `batches` (one optimiser step per batch)."""
    steps = len(batches)
    L.seed_everything(seed, verbose=False)
    module = ContinualModule(model, tokenizer, head, tasks, lr=lr, warmup=trainer.warmup, total_steps=steps,
                             regularizers=regularizers, forgetting=forgetting, teacher=teacher,
                             on_task_forward=on_task_forward)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=max(1, max(len(b) for b in batches)), seed=seed,
                      warmup=trainer.warmup, snapshots=trainer.snapshots, progress=progress, **trainer.lightning())
    snaps = AdapterSnapshots(snapshot_spec, steps, trainer.snapshots if snapshot_fn else 0, extract_fn=snapshot_fn,
                             asked="snapshots" in trainer.model_fields_set)
    timer = StepTimer()
    callbacks: list[Callback] = [snaps, timer]
    if progress and label:
        callbacks.append(_Describe(label))
    pl_trainer = make_trainer(cfg, Path(run_dir), callbacks=callbacks, device=device)
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
    loader = DataLoader(list(batches), batch_size=None, shuffle=False, collate_fn=list, num_workers=0)
    t0 = time.perf_counter()
    model.train()
    try:
        fit(pl_trainer, module, loader)
    finally:
        model.eval()
    seconds = time.perf_counter() - t0
    losses = {k.removeprefix("loss/"): round(float(v), 5) for k, v in pl_trainer.callback_metrics.items()
              if k.startswith("loss/")}
    return UnitOutcome(int(pl_trainer.global_step), round(seconds, 2), timer.median(), losses, list(snaps.taken))
