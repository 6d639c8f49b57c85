"""One adapter on one task: train it (`train_adapter`: `loraplex train`), evaluate it (`evaluate_adapter`).

`fit_adapter` is the single-task case of the continual trainer.

A fresh LoRA (PEFT initialisation) in the base's target modules, the `ContinualModule` with no
regularizers, the shared Lightning trainer (`loraplex.training`: progress bar, CSV logs under
`<run_dir>/logs`, the last checkpoint under `<run_dir>/checkpoints`) and `AdapterSnapshots` that keep
a few intermediate adapter states.
"""

from __future__ import annotations

import time
import warnings as pywarnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from pydantic import ValidationError

from loraplex.errors import IncompatibleAdapter, LoraplexWarning, UserInputError
from loraplex.experts.layers import adapters_disabled, extract, inject_new
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.heads import accuracy, head_for, texts_readable
from loraplex.models import load_base, resolve_base
from loraplex.ranks import is_worker
from loraplex.registry.record import AdapterDraft, Edge, validate_description, validate_name
from loraplex.registry.signatures import description_embedding, prototype
from loraplex.registry.store import Registry
from loraplex.router.load import load_adapted
from loraplex.seeding import one_at_a_time
from loraplex.settings import Settings
from loraplex.tasks import Task, checked_limit, data_notes
from loraplex.training import (  # noqa: F401 (TrainConfig, rows_of, make_loader: imported from here too)
    AdapterSnapshots,
    ContinualModule,
    invalid_option,
    Row,
    TrainConfig,
    fit,
    make_loader,
    last_metric,
    make_trainer,
    rows_of,
)


@dataclass
class FitResult:
    adapter: Adapter
    snapshots: list[tuple[int, Adapter]]
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def fit_adapter(base, task: Task, spec: LoraSpec, cfg: TrainConfig, run_dir: Path) -> FitResult:
    """Train one LoRA adapter on `task` over `base` (a LoadedBase, modified in place)."""
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
    snaps = AdapterSnapshots(spec, cfg.steps, cfg.snapshots, asked="snapshots" in cfg.model_fields_set)
    trainer = make_trainer(cfg, run_dir, callbacks=[snaps], device=base.settings.resolved_device())
    t0 = time.perf_counter()
    base.model.train()
    try:
        fit(trainer, module, train, val)  # Ctrl-C, SIGTERM: Interrupted, and nothing is registered
    finally:
        base.model.eval()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        adapter = extract(base.model, spec, 0)
    metrics = {
        "steps": int(trainer.global_step),
        "train_seconds": round(seconds, 2),
        "train_loss": last_metric(trainer.callback_metrics, "loss/task"),
        "val_accuracy": module.last_val.get(task.name),
        "val_n": module.last_val_n.get(task.name),
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
    }
    return FitResult(adapter, list(snaps.taken), metrics, run_dir)


@dataclass
class TrainResult:
    record: Any
    """The registered AdapterRecord (None in a DDP worker, which registers nothing)."""
    metrics: dict[str, Any]
    run_dir: Path
    warnings: list[str] = field(default_factory=list)
    """What the user should know of the data (texts with more than one label), said but not refused."""


@one_at_a_time
def train_adapter(reg: Registry, settings: Settings, task: str, *, name: str, base: str = "minilm", rank: int = 8,
                  alpha: float | None = None, targets: Sequence[str] = (), description: str | None = None,
                  eval_limit: int | None = None, **train_options: Any) -> TrainResult:
    """Fine-tune one LoRA adapter on a task, evaluate it (and the bare base) on the first `eval_limit`
    test rows (default: all), and register it with its snapshots (origin "trained")."""
    validate_name(name)
    if not isinstance(task, str) or not task.strip():  # "" would be read as the current directory
        raise UserInputError("the task is empty: name an embedded task or a task file")
    if description is not None:
        description = validate_description(description)
    if not is_worker():
        reg.check_adapter_name_free(name)  # an adapter's or a router's: before training, not after
        reg.check_embedder()
    try:
        cfg = TrainConfig(**train_options)
        spec = LoraSpec(r=rank, alpha=alpha if alpha is not None else 2.0 * rank, target_modules=tuple(targets))
    except ValidationError as exc:
        raise invalid_option(exc) from None
    checked_limit(eval_limit)
    if not is_worker():  # a full disk or a read-only home: said before training (after the options), not after it
        reg.check_writable()  # (sweep 70)
    with pywarnings.catch_warnings(record=True) as caught:  # what reading the file said (columns not read)
        pywarnings.simplefilter("always")
        t = reg.load_task(task, description=description)
    said = [str(w.message) for w in caught if issubclass(w.category, LoraplexWarning)]  # in the result's
    for w in caught:  # `warnings` (the CLI prints them, and train --json lists them); others as they were
        if not issubclass(w.category, LoraplexWarning):
            pywarnings.warn(w.message, w.category, stacklevel=2)
    ref = resolve_base(base)
    lb = load_base(ref, settings)
    head = head_for(lb)
    texts_readable(lb.tokenizer, t)
    warnings = [*said, *data_notes(t, cfg.train_limit)]

    def bar(who: str) -> str | None:
        return f"evaluating {who} on {t.name}" if cfg.progress else None

    if is_worker():  # a DDP worker trains its share and leaves evaluating and registering to rank 0
        result = fit_adapter(lb, t, spec, cfg, reg.run_dir("train", name))
        return TrainResult(None, result.metrics, result.run_dir)
    base_acc = accuracy(head, lb.model, lb.tokenizer, t, "test", eval_limit, progress=bar("the bare base"))["accuracy"]
    with reg.new_run("train", name) as run_dir:  # removed if anything below fails: nothing was registered
        res = _train_and_register(reg, lb, head, t, spec, cfg, run_dir, name=name, ref=ref, base_acc=base_acc,
                                  eval_limit=eval_limit, bar=bar)
    res.warnings = warnings
    return res


def _train_and_register(reg: Registry, lb, head, t, spec: LoraSpec, cfg: TrainConfig, run_dir: Path, *, name: str, ref,
                        base_acc: float, eval_limit: int | None, bar) -> TrainResult:
    result = fit_adapter(lb, t, spec, cfg, run_dir)
    test = accuracy(head, lb.model, lb.tokenizer, t, "test", eval_limit, progress=bar(name))
    metrics = {**result.metrics, "accuracy": round(test["accuracy"], 4), "base_accuracy": round(base_acc, 4),
               "test_n": test["n"], "task": t.name}
    draft = AdapterDraft(
        name=name, base=ref.name, base_sha=lb.fingerprint.sha, family=ref.family, description=t.description,
        task=t.ref, origin="trained", spec=spec, metrics=metrics, edges=(Edge.to_task(t.ref, "trained-on"),),
        extra={"run_dir": str(result.run_dir), "train_config": cfg.model_dump(mode="json"),
               "task_cards": {t.ref: t.card()}},
    )
    rec = reg.add_adapter(draft, result.adapter, embedding=description_embedding(reg, t.description),
                          prototype=prototype(reg, [e.text for e in t.train]), snapshots=result.snapshots,
                          embedder=reg.embedder_name, fingerprint_json=lb.fingerprint.model_dump_json())
    return TrainResult(rec, metrics, result.run_dir)


def evaluate_adapter(reg: Registry, settings: Settings, name: str | None, *, task: str | None = None, base: str | None = None,
                     description: str | None = None, split: str = "test", limit: int | None = None,
                     vs_base: bool = False, progress: bool = False) -> dict[str, Any]:
    """Accuracy of an adapter (or, with name=None, of the bare base) on a task's split (`progress`: a
    progress bar on stderr for each evaluation; `description`: a task file's, where it has no sidecar and no
    adapter recorded one; `task`: default, the adapter's own)."""
    if task is not None and not task.strip():  # "" would be read as the current directory
        raise UserInputError("--task is empty: name an embedded task or a task file")
    if name is None and vs_base:
        raise UserInputError("--vs-base compares an adapter with the bare base: name the adapter")
    parent = None
    rec = reg.get_adapter(name) if name is not None else None  # read once: every check below sees one record
    if task is None:
        if rec is None:
            raise UserInputError("the bare base has no task of its own: name one with --task")
        task = rec.task
        if not task:
            learned = [str(t) for t in rec.extra.get("tasks") or []]  # a multitask unit's: several, none its own (sweep 63)
            raise UserInputError(f"adapter {name!r} learned {len(learned)} tasks ({', '.join(learned)}) and records none as "
                                 "its own: name the one to evaluate with --task" if len(learned) > 1 else
                                 f"adapter {name!r} records no task: name one with --task")
        if rec.origin == "generated" and rec.extra.get("labels_from") not in (None, "examples"):
            parent = str(rec.extra["labels_from"])  # a generated adapter answers with its parent's labels: said so
    if split not in ("train", "validation", "test"):
        raise UserInputError(f"unknown split {split!r} (train, validation, test)")
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be at least 1 (got {limit})")
    if description is not None:
        description = validate_description(description)
    own = reg.learned_ref(rec, task) if rec is not None else None  # its own file, however spelled
    card = (rec.extra.get("task_cards") or {}).get(own) if own is not None else None
    # its own card's description stands in for one the file lacks (the labels check below then says what changed)
    t = reg.load_task(task, description=description,
                      fallback_description=card.get("description") if isinstance(card, dict) else None)
    if rec is not None:  # its own file however spelled (`--task toy.jsonl`): the check compares refs
        reg.check_learned_labels(rec, t)
    family = rec.family if rec is not None else resolve_base(base or "minilm").family
    if description is not None and t.source == "embedded" and family == "encoder":
        raise UserInputError(f"--description changes nothing here: {t.name!r} is an embedded task with its own "
                             "description, and an encoder's classifier does not read it (a causal base's prompt does)")

    def bar(who: str) -> str | None:
        return f"evaluating {who} on {t.name}" if progress else None

    if name is None:
        lb = load_base(resolve_base(base or "minilm"), settings)
        res = accuracy(head_for(lb), lb.model, lb.tokenizer, t, split, limit, progress=bar("the bare base"))
        return {"adapter": None, "base": lb.ref.name, "task": t.name, "split": split, **res}
    if base is not None and resolve_base(base).name != rec.base:
        raise IncompatibleAdapter(f"adapter {name!r} was registered for base {rec.base!r}, not {base!r}")
    # one that answers with a composition (a forgetting adapter erases from it, a summed stream's adapter
    # was trained and scored with it: record.composition_of) is evaluated with the rest of it
    composition = [n for n in rec.composition if n != name]
    lb, _ = load_adapted(reg, [*composition, name], settings)
    head = head_for(lb)
    res = accuracy(head, lb.model, lb.tokenizer, t, split, limit, progress=bar(name))
    out = {"adapter": name, "base": lb.ref.name, "task": t.name, "split": split, **res}
    if parent is not None:
        out["task_from"] = parent
    if composition:
        out["composition"] = composition
    if vs_base:
        with adapters_disabled(lb.model):
            out["base_accuracy"] = accuracy(head, lb.model, lb.tokenizer, t, split, limit,
                                            progress=bar("the bare base"))["accuracy"]
    return out
