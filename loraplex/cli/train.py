"""`loraplex train TASK --name NAME` and `loraplex eval [NAME] --task TASK`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import (
    Base, Description, Devices, Home, Json, Precision, Quiet, Strategy, field_option, parse_list, settings,
)

_TRAIN = "loraplex.training:TrainConfig"
_LORA = "loraplex.continual.spec:LoraSettings"


def train(
    task: Annotated[str, typer.Argument(help="An embedded task name, or a task file with text and label columns and an optional split column (.jsonl, .json, .csv, .tsv).")],
    name: Annotated[str, typer.Option("--name", help="Name to register the trained adapter under.")],
    base: Annotated[str, typer.Option("--base", help="Base model: minilm, smollm2, or a local model directory.")] = "minilm",
    rank: Annotated[int, field_option(f"{_LORA}.rank", "--rank")] = 8,
    alpha: Annotated[Optional[float], field_option(f"{_LORA}.alpha", "--alpha")] = None,
    targets: Annotated[Optional[str], field_option(f"{_LORA}.targets", "--targets", syntax="comma-separated")] = None,
    steps: Annotated[int, field_option(f"{_TRAIN}.steps", "--steps")] = 100,
    lr: Annotated[float, field_option(f"{_TRAIN}.lr", "--lr")] = 2e-3,
    batch_size: Annotated[int, field_option(f"{_TRAIN}.batch_size", "--batch-size")] = 16,
    seed: Annotated[int, field_option(f"{_TRAIN}.seed", "--seed")] = 0,
    train_limit: Annotated[Optional[int], field_option(f"{_TRAIN}.train_limit", "--train-limit")] = None,
    val_limit: Annotated[int, field_option(f"{_TRAIN}.val_limit", "--val-limit")] = 200,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Evaluate the bare base and the adapter on the first N test examples only (default: the whole test split).")] = None,
    description: Description = None,
    devices: Devices = "1",
    strategy: Strategy = "auto",
    precision: Precision = "32-true",
    quiet: Quiet = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Fine-tune a LoRA adapter on a task (Lightning), evaluate it, register it with its snapshots."""
    from loraplex import api

    res = api.train(
        task, name=name, base=base, rank=rank, alpha=alpha, targets=parse_list(targets, "--targets"), description=description,
        eval_limit=eval_limit, steps=steps, lr=lr, batch_size=batch_size, seed=seed, train_limit=train_limit,
        val_limit=val_limit,
        devices=int(devices) if devices.isdecimal() else devices, strategy=strategy, precision=precision,
        progress=not quiet and not json, settings=settings(home),
    )
    if res.record is None:  # a DDP worker: rank 0 registers and reports
        return
    m = res.metrics
    for w in res.warnings:
        out.warn(w)
    if json:
        out.emit_json({"name": res.record.name, "metrics": m, "run_dir": str(res.run_dir), "warnings": res.warnings})
        return
    out.line(f"trained {res.record.name} on {m['task']} in {m['train_seconds']:.1f}s ({m['steps']} steps): "
             f"test accuracy {m['accuracy']:.3f} (bare base {m['base_accuracy']:.3f}; n={m['test_n']}); "
             f"logs in {res.run_dir}")


def eval_(
    name: Annotated[Optional[str], typer.Argument(help="Adapter name (omit to evaluate the bare base).")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="An embedded task name, or a task file (default: the "
                                                 "adapter's own task).")] = None,
    base: Base = None,
    description: Description = None,
    split: Annotated[str, typer.Option("--split", help="train, validation or test.")] = "test",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate on the first N examples only.")] = None,
    vs_base: Annotated[bool, typer.Option("--vs-base", help="Also report the bare base's accuracy.")] = False,
    quiet: Quiet = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Accuracy of an adapter (or of the bare base) on a task."""
    from loraplex import api

    res = api.evaluate(name, task=task, base=base, description=description, split=split, limit=limit, vs_base=vs_base,
                       progress=not quiet and not json, settings=settings(home))
    if json:
        out.emit_json(res)
        return
    who = f"adapter {name}" if name else f"bare base {res['base']}"
    if res.get("composition"):  # a forgetting adapter, on top of what it erases from
        who += f" (on top of its composition {', '.join(res['composition'])})"
    if res.get("task_from"):  # a generated adapter: no task of its own, its parent's label set
        who += f" (generated; evaluated on the task of {res['task_from']}, whose labels it answers with)"
    extra = f" (bare base {res['base_accuracy']:.3f})" if "base_accuracy" in res else ""
    out.line(f"{who} on {res['task']} [{res['split']}, n={res['n']}]: accuracy {res['accuracy']:.3f}{extra}")
