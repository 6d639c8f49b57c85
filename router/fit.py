"""Fitting a learned router with Lightning, evaluating it, and storing it in the registry.

`fit_router` (what `loraplex router fit` runs):
1. loads the adapters (one base, fingerprints checked) into a bank, or, for a joint router given no
   adapters, creates fresh experts in the base's attention projections;
2. attaches the router's gates (one per adapted projection); only the gates require gradients, plus the
   experts when the router trains them jointly (`joint=True`);
3. trains with `ContinualModule` (task loss of the routed model + the router's auxiliary loss, each
   logged) on the mixed training rows of the tasks (balanced: as many rows from each task as the
   smallest has, capped by `train_limit`), `on_task_forward` telling the gates which expert's
   task each forward's rows belong to, with the shared Lightning trainer (progress bar, CSV logs,
   trainable-only checkpoints under `<home>/runs/router-<name>-<time>`);
4. evaluates on the tasks' test splits: routing accuracy, routed accuracy and each adapter alone (oracle);
5. stores a router record (config, members, metrics, gate weights in safetensors; joint experts too),
   in one registry transaction, last, so a failure leaves the registry as it was.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from loraplex.errors import AlreadyExists, ComponentNotFound, IncompatibleAdapter, LoraplexWarning, UserInputError
from loraplex.experts.layers import extract, inject, inject_new, routed_layers
from loraplex.experts.spec import LoraSpec
from loraplex.heads import head_for
from loraplex.models import load_base, resolve_base
from loraplex.ranks import is_worker
from loraplex.registry.record import validate_name
from loraplex.registry.signatures import embedder, task_signatures
from loraplex.registry.store import Registry
from loraplex.router.base import ROUTERS, LearnedRouter
from loraplex.router.load import joint_copy_names, load_members, one_name_each
from loraplex.router.model import RoutedModel
from loraplex.seeding import one_at_a_time
from loraplex.settings import Settings
from loraplex.tasks import checked_limit
from loraplex.training import (
    ContinualModule,
    TrainConfig,
    fit,
    last_metric,
    make_loader,
    make_trainer,
    rows_of,
    train_config,
)


GATE_LR = 1e-2
"""The default learning rate of router fitting: gates are small linear classifiers, trained faster than adapters."""


def router_train_config(**options: Any) -> TrainConfig:
    """The TrainConfig of a router fit (`TrainConfig` fields; lr defaults to GATE_LR); InvalidSpec if bad."""
    return train_config(**{"lr": GATE_LR, **options})


@dataclass
class RouterFitResult:
    record: Any
    metrics: dict[str, Any]
    run_dir: Path


def _tasks_for(reg, recs, tasks: Sequence[str] | None):
    if tasks:
        if len(tasks) != len(recs):
            raise UserInputError(f"--tasks names {len(tasks)} task(s) for {len(recs)} adapter(s); give one per adapter, in order")
        refs = list(tasks)
    else:
        refs = []
        for r in recs:
            if not r.task:
                raise UserInputError(f"adapter {r.name!r} has no task on record; name the tasks with --tasks (one per adapter)")
            refs.append(r.task)
    loaded = [reg.load_task(t) for t in refs]
    for r, t in zip(recs, loaded):  # an adapter's own file edited since: fitted on labels it never learned
        reg.check_learned_labels(r, t)
    task_of = {r.name: t.name for r, t in zip(recs, loaded)}
    for r in recs:  # a forgetting adapter carries the task it erased, which a member of its composition answers
        clash = next((m for m in r.composition if m != r.name and task_of.get(m) == task_of[r.name]), None)
        if clash is not None:  # with: told to name it with them, then refused for two adapters of one task (sweep 30)
            raise UserInputError(
                f"adapter {r.name!r} erased task {task_of[r.name]!r} from its composition ({', '.join(r.composition)}), "
                f"whose member {clash!r} answers it: a learned router needs one task per adapter, so it cannot route "
                f"this composition; use {r.name!r} by name (eval, the server's model {r.name!r})")
    one_name_each(loaded, [r.name for r in recs], "--tasks" if tasks else None)
    return loaded



@dataclass
class _Experts:
    """What a router routes over, loaded into the base: registered adapters, or fresh joint experts."""

    lb: Any
    tasks: list
    """The tasks the router is fitted on (one per adapter)."""
    expert_tasks: list
    """Each expert's task (None for an unsupervised fresh expert)."""
    expert_names: list[str]
    joint: bool
    specs: list
    """Each expert's LoraSpec (stored with a joint router's experts)."""
    blobs: dict = field(default_factory=dict)
    """The weights (blob sha) of each registered adapter as loaded: the store refuses a member replaced since."""


def _registered(reg, s, cfg, adapters: list[str], tasks, base) -> _Experts:
    lb, recs, ads = load_members(reg, adapters, s)
    if base is not None and resolve_base(base).name != lb.ref.name:
        raise IncompatibleAdapter(f"adapters {', '.join(adapters)} are of base {lb.ref.name!r}, not {base!r}")
    task_objs = _tasks_for(reg, recs, tasks)
    inject(lb.model, ads)
    return _Experts(lb, task_objs, list(task_objs), list(adapters), bool(getattr(cfg, "joint", False)),
                    [r.spec for r in recs], {r.name: r.blob for r in recs})


def _fresh(reg, s, method: str, factory, cfg, name: str, tasks, base, seed: int) -> _Experts:
    if not factory.joint_capable:
        raise UserInputError(f"router {method!r} routes registered adapters: name them with --adapters")
    if not tasks:
        raise UserInputError("with no --adapters, a jointly trained router needs --tasks to learn its experts from")
    task_objs = [reg.load_task(t) for t in tasks]
    one_name_each(task_objs, None, "--tasks")
    lb = load_base(resolve_base(base or "minilm"), s)
    n, r = factory.fresh_experts(cfg, len(task_objs))
    spec = LoraSpec(r=r, alpha=2.0 * r)
    modules = spec.resolve_targets(lb.fingerprint.linear_names(), lb.fingerprint.model_type)
    inject_new(lb.model, spec, modules, n_experts=n, seed=seed)
    supervised = n == len(task_objs) and getattr(cfg, "gate_loss", 0) > 0
    expert_tasks = list(task_objs) if supervised else [None] * n
    return _Experts(lb, task_objs, expert_tasks, [f"{name}/expert-{e}" for e in range(n)], True, [spec] * n)


@one_at_a_time
def fit_router(reg: Registry, settings: Settings, name: str, *, method: str, adapters: Sequence[str] = (),
               tasks: Sequence[str] | None = None, base: str | None = None, config: dict[str, Any] | None = None,
               eval_limit: int | None = 200, **train_options: Any) -> RouterFitResult:
    """Fit router `name` with `method` (token-gate, mixer, rank) over `adapters` on their tasks (or, with
    no adapters, fresh joint experts on `tasks`), evaluate it on the first `eval_limit` test rows of each
    task and store it (see the module docstring). `config` holds the router's options (its pydantic
    config); `train_options` are `TrainConfig` fields (steps, lr, batch_size, train_limit, ...; lr
    defaults to GATE_LR). Returns a `RouterFitResult(record, metrics, run_dir)`."""
    tc = router_train_config(**train_options)  # a bad training option is named first
    checked_limit(eval_limit)
    validate_name(name, "router")
    worker = is_worker()  # a DDP worker (--devices N) trains beside rank 0 and stores nothing
    if _has(reg, name) and not worker:
        raise AlreadyExists(f"a router named {name!r} already exists")
    if not worker:  # a full disk or a read-only home: said before the fit, not after it (sweep 70)
        reg.check_writable()
    if reg.has_adapter(name) and not worker:  # found at store time, after the whole fit, before
        raise AlreadyExists(f"an adapter named {name!r} already exists: a router of that name would share its model "
                            "name (choose another)")
    entry = ROUTERS.get(method)
    cfg = entry.make_config(config or {})
    if not issubclass(entry.factory, LearnedRouter):
        raise UserInputError(f"router {method!r} needs no training: query with `--router {method} --adapters ...`")
    adapters = list(adapters)
    tasks = list(tasks) if tasks else None
    shaping = [k for k in entry.factory.fresh_options if k in (config or {})]
    if adapters and shaping:  # the experts are the adapters as registered: the option would be stored unused
        raise UserInputError(f"{shaping[0]} shapes the fresh experts router {method!r} makes when no --adapters are "
                             "given; over registered adapters the experts are those adapters (drop it)")
    if adapters:
        ex = _registered(reg, settings, cfg, adapters, tasks, base)
    else:
        if entry.factory.joint_capable and "joint" in (config or {}) and not cfg.joint:  # it was trained joint anyway
            raise UserInputError(f"joint=false needs --adapters: with none, router {method!r} trains fresh experts "
                                 "with its gates (drop joint=false, or name the adapters to route over)")
        cfg = cfg.model_copy(update={"joint": True}) if entry.factory.joint_capable else cfg
        ex = _fresh(reg, settings, method, entry.factory, cfg, name, tasks, base, tc.seed)
    pool = entry.factory.choices([sp.r for sp in ex.specs])
    if entry.factory.slot == "rank":  # the real ranks of the projection that has most (rank_pattern counted: the
        # specs' base r said 6 where a projection held 14; a gate takes min(top_k, its real ranks): sweep 30)
        real = [int((layer.bank.rank_mask > 0).sum()) for layer in routed_layers(ex.lb.model).values()]
        pool = max(real) if real else pool
    if pool < 2:  # a gate over one choice always picks it: nothing to learn
        what = "rank" if entry.factory.slot == "rank" else "adapter"
        raise UserInputError(f"router {method!r} would choose among 1 {what}: it needs at least 2 "
                             f"({'adapters' if what == 'adapter' else 'ranks in its adapters'})")
    if "top_k" in (config or {}) and cfg.top_k > pool:  # the default is capped at what there is
        what = "ranks" if entry.factory.slot == "rank" else "experts"
        raise UserInputError(f"top_k={cfg.top_k} is more than the {pool} {what} router {method!r} would choose among")
    lb = ex.lb
    L.seed_everything(tc.seed, verbose=False)  # gate initialisation, shuffling and dropout follow the seed
    router: LearnedRouter = entry.factory(cfg)
    for layer in routed_layers(lb.model).values():
        for p in layer.bank.parameters():
            p.requires_grad_(ex.joint)
    router.attach(lb.model)
    router.set_expert_tasks([t.name if t is not None else None for t in ex.expert_tasks])
    for p in router.parameters():
        p.requires_grad_(True)
    with reg.new_run("router", name) as run_dir:  # removed if anything below fails: nothing was stored
        trainer, seconds = _train(lb, router, ex.tasks, tc, run_dir, settings.resolved_device())
        if worker:  # rank 0 evaluates, stores and reports
            return RouterFitResult(None, {}, run_dir)

        # ---- evaluate ----------------------------------------------------------------------------
        sig = task_signatures(reg, ex.tasks)
        if ex.joint and adapters:
            ex.expert_names = joint_copy_names(name, ex.expert_names)
        # experts without a task (gate_loss=0, or more fresh experts than tasks) take the task a query's text is
        # nearest, as a loaded router's do: without the embedder every answer counted as unanswered (sweep 35)
        emb = embedder(reg) if any(t is None for t in ex.expert_tasks) else None
        rm = RoutedModel(lb, ex.expert_names, ex.expert_tasks, router=router, record=None, task_pool=ex.tasks,
                         task_signatures=sig, embedder=emb)
        ev = rm.evaluate(ex.tasks, split="test", limit=eval_limit, oracle=not (ex.joint and not adapters))
        metrics = {
            "steps": int(trainer.global_step), "train_seconds": round(seconds, 2),
            "train_loss": last_metric(trainer.callback_metrics, "loss/task"),
            "router_aux": last_metric(trainer.callback_metrics, "loss/router_aux"),
            "routing_accuracy": _r(ev["routing_accuracy"]), "accuracy": _r(ev["accuracy"]),
            "answered_accuracy": _r(ev["answered_accuracy"]),
            "oracle_accuracy": _r(ev["oracle_accuracy"]), "eval_limit": eval_limit,
            "per_task": [{k: (_r(v) if isinstance(v, float) else v) for k, v in row.items()} for row in ev["tasks"]],
        }

        # ---- store -------------------------------------------------------------------------------
        tensors = {f"gate.{k}": v for k, v in router.state_tensors().items()}
        tensors["task_sig"] = torch.from_numpy(sig)
        extra: dict[str, Any] = {
            "tasks": [t.ref if t is not None else None for t in ex.expert_tasks],
            "task_cards": {t.ref: t.card() for t in ex.tasks},  # what each expert answers with, as fitted
            "task_pool": [t.ref for t in ex.tasks], "base_sha": lb.fingerprint.sha, "joint": ex.joint,
            "expert_names": ex.expert_names, "run_dir": str(run_dir), "train_config": tc.model_dump(mode="json"),
        }
        if ex.joint:
            for e, spec in enumerate(ex.specs):
                tensors.update({f"expert.{e}.{k}": v for k, v in extract(lb.model, spec, e).state_dict().items()})
            extra["expert_specs"] = [spec.model_dump(mode="json") for spec in ex.specs]
        rec = reg.put_component("router", name, method=method, base=lb.ref.name, config=cfg.model_dump(mode="json"),
                                tensors=tensors, members=adapters, metrics=metrics, extra=extra, member_blobs=ex.blobs)
        return RouterFitResult(rec, metrics, run_dir)


def _train(lb, router: LearnedRouter, task_objs: list, tc: TrainConfig, run_dir: Path, device: str):
    """Train the gates (and joint experts) with ContinualModule on the tasks' mixed rows. Returns
    (trainer, seconds). Balanced tasks: each contributes as many training rows as the smallest (capped
    by train_limit), so the gates do not learn the tasks' sizes as a prior."""
    run_dir.mkdir(parents=True, exist_ok=True)
    per_task = min([len(t.train) for t in task_objs] + ([tc.train_limit] if tc.train_limit else []))
    smallest = min(task_objs, key=lambda t: len(t.train))
    largest = max(task_objs, key=lambda t: len(t.train))
    if 0 < per_task == len(smallest.train) < min(FEW_ROWS, len(largest.train)) and not is_worker():
        warnings.warn(f"router fit balances its tasks: each gives the gates {per_task:,} training row(s), as many as "
                      f"task {smallest.name!r} has (task {largest.name!r} has {len(largest.train):,})",
                      LoraplexWarning, stacklevel=2)  # a tiny task cut every other to a handful, unsaid
    train_rows = [row for t in task_objs for row in rows_of(t, "train", per_task)]
    val_rows = [row for t in task_objs for row in rows_of(t, "validation", max(1, tc.val_limit // len(task_objs)))]
    if not train_rows:
        raise UserInputError("the tasks have no training examples")
    module = ContinualModule(lb.model, lb.tokenizer, head_for(lb), {t.name: t for t in task_objs}, lr=tc.lr,
                             warmup=tc.warmup, total_steps=tc.steps, on_task_forward=router.ctx.set_task)
    trainer = make_trainer(tc, run_dir, device=device)
    t0 = time.perf_counter()
    lb.model.train()
    try:  # Ctrl-C, SIGTERM: Interrupted, and nothing is stored
        fit(trainer, module, make_loader(train_rows, tc.batch_size, shuffle=True, seed=tc.seed),
            make_loader(val_rows, 64, shuffle=False))
    finally:
        lb.model.eval()
        router.ctx.set_task(None)
    seconds = time.perf_counter() - t0
    return trainer, seconds


FEW_ROWS = 32
"""Below this many training rows per task, router fit says that its balancing cut the other tasks down."""


def _has(reg, name: str) -> bool:
    try:
        reg.get_component("router", name)
        return True
    except ComponentNotFound:
        return False


def _r(v):
    return None if v is None else round(float(v), 4)

