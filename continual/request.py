"""A one-off forgetting request (`loraplex forget TASK`): erase a task from the current composition.

The composition is the adapters named, or the one recorded by the most recently registered adapter
that carries one (`extra["composition"]`). The forgetting adapter is trained exactly as a stream's
forgetting experience (`continual.forgetting.forget`), its retained data being a class-balanced
sample of the composition's other tasks, and is registered with origin "forgetting", a `forgets` edge
to the task and a `trained-from` edge to the composition's last adapter; its record carries the new
composition (the old one plus itself).
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from pydantic import ValidationError

from loraplex.continual.evaluation import evaluate_tasks
from loraplex.continual.forgetting import FORGETTERS, forget, no_rows_to_forget, retained_sample
from loraplex.continual.methods import METHODS
from loraplex.continual.registration import register_from_dir, safe_part, write_unit_adapter
from loraplex.continual.spec import TrainerSettings
from loraplex.errors import InvalidSpec, TaskNotFound, UserInputError
from loraplex.fsio import atomic_write
from loraplex.heads import head_for
from loraplex.models import fingerprint, resolve_base
from loraplex.registry.record import AdapterRecord, named_apart, validate_name
from loraplex.registry.store import Registry, is_task_path, same_task_file
from loraplex.router.load import load_adapted
from loraplex.seeding import one_at_a_time
from loraplex.settings import Settings
from loraplex.tasks import as_task_labels, checked_seed
from loraplex.training import Row, rows_of


def current_composition(reg: Registry, *, adapters: Sequence[str] = (), base: str | None = None) -> list[AdapterRecord]:
    """The adapters a one-off forgetting request acts on, as registry records.

    `adapters` names them explicitly. Otherwise the composition is the one recorded by the most
    recently registered adapter that carries one (`extra["composition"]`): the adapters active after
    the last unit of the latest stream run, or after the latest `loraplex forget`, on `base` if given.
    """
    want = resolve_base(base).name if base else None
    if adapters:
        recs = [reg.get_adapter(n) for n in adapters]
        apart = named_apart(recs, list(adapters))  # before the tasks are read: "never learned" blamed the task
        if apart:
            raise UserInputError(apart)
        other = [r.name for r in recs if want is not None and r.base != want]
        if other:
            raise UserInputError(f"adapters {', '.join(other)} are of base {reg.get_adapter(other[0]).base!r}, "
                                 f"not {want!r} (--base)")
        return recs
    recs = [r for r in reg.list_adapters() if r.extra.get("composition") and (want is None or r.base == want)]
    if not recs:
        others = sorted({r.base for r in reg.list_adapters() if r.extra.get("composition")}) if want else []
        if others:
            raise UserInputError(f"no composition to forget from on base {want!r}: the streams of this registry ran "
                                 f"on {', '.join(others)}; drop --base, or name the adapters with --adapters a,b")
        raise UserInputError("no composition to forget from: no stream has run in this registry; "
                             "name the adapters with --adapters a,b")
    latest = max(recs, key=lambda r: r.id)
    method = latest.extra.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    if name in METHODS.names() and not METHODS.get(name).factory.summed:
        raise UserInputError(f"the latest composition (of {latest.name!r}) answers through its stream's router; "
                             "a one-off request acts on summed adapters: put a `forget:` experience in the "
                             "stream instead, or name the adapters with --adapters a,b")
    missing = [n for n in latest.extra["composition"] if not reg.has_adapter(n)]
    if missing:
        raise UserInputError(f"the latest composition (of {latest.name!r}) lists adapters that were removed: "
                             f"{', '.join(missing)}; name the adapters with --adapters a,b")
    return [reg.get_adapter(n) for n in latest.extra["composition"]]


def _learned_tasks(reg: Registry, recs: Sequence[AdapterRecord]) -> list[Any]:
    """The tasks the composition's (non-forgetting) adapters were trained on, in order, loaded; a task file
    whose labels (or label texts) changed since an adapter learned it is refused, as `eval` refuses it: the
    composition answers with the learned ones, so forgetting the file's would erase nothing it says."""
    refs: dict[str, list[AdapterRecord]] = {}
    for r in recs:
        if r.origin == "forgetting":
            continue
        for ref in (r.extra.get("tasks") or ([r.task] if r.task else [])):
            refs.setdefault(ref, []).append(r)
    tasks: list[Any] = []
    for ref, learners in refs.items():
        t = reg.load_task(ref)
        for r in learners:
            reg.check_learned_labels(r, t)
        if not any(u.ref == t.ref for u in tasks):  # two spellings of one file's path: one task
            tasks.append(t)
    return tasks


def _erased(reg: Registry, recs: Sequence[AdapterRecord], learned: Sequence[Any]) -> dict[str, set[str] | None]:
    """What the composition's forgetting adapters already erased: task name -> the labels erased, or None
    for the whole task (as a stream keeps it: `continual/stream.py` `forgotten`)."""
    out: dict[str, set[str] | None] = {}
    for r in recs:
        if r.origin != "forgetting" or not r.task:
            continue
        t = next((u for u in learned if r.task in (u.ref, u.name)), None) or reg.load_task(r.task)
        labels = r.extra.get("labels")
        if not labels or out.get(t.name, set()) is None:
            out[t.name] = None
        else:
            out[t.name] = set(out.get(t.name) or ()) | {str(x) for x in labels}
    return out


def _target(learned: Sequence[Any], task: str, labels: Sequence[str],
            erased: dict[str, set[str] | None] | None = None) -> tuple[Any, tuple[str, ...] | None]:
    """The learned task named `task` and the labels to erase (None: all of them). The request's rows and
    accuracies are keyed by task name, so two learned tasks of one name are refused."""
    seen: dict[str, Any] = {}
    for t in learned:
        if t.name in seen:
            raise UserInputError(f"two tasks of the composition are named {t.name!r}: {seen[t.name].ref}, {t.ref}; "
                                 "forget needs one task per name")
        seen[t.name] = t
    target = next((t for t in learned if task in (t.name, t.ref)), None)
    if target is None and is_task_path(task):  # a task file named by another spelling of its path (relative, ..)
        target = next((t for t in learned if t.source != "embedded" and same_task_file(t.ref, task)), None)
    if target is None:
        known = ", ".join(t.name for t in learned) or "none"
        raise TaskNotFound(f"cannot forget {task!r}: the composition never learned it (its tasks: {known})")
    mapped, bad = as_task_labels(labels, target.labels)  # an NFD "café" names the task's "café" (sweep 44)
    chosen = tuple(mapped) or None
    if chosen:
        if bad is not None:
            raise UserInputError(f"task {target.name!r} has no label {bad!r} (labels: "
                                 f"{', '.join(repr(x) for x in target.labels)})")
        twice = next((lab for j, lab in enumerate(chosen) if lab in chosen[:j]), None)
        if twice is not None:
            raise UserInputError(f"label {twice!r} is named twice")
        if set(chosen) == set(target.labels):  # as a stream spec says it: a request means what it names
            raise UserInputError(f"naming every label of {target.name!r} forgets the whole task; drop --labels")
    erased = erased or {}
    if target.name in erased:  # as a stream spec refuses it: the composition already erased it
        done = erased[target.name]
        if done is None:
            raise UserInputError(f"task {target.name!r} is already forgotten by this composition")
        again = sorted(done & set(chosen or ()))
        if again:
            raise UserInputError(f"label {again[0]!r} of {target.name!r} is already forgotten by this composition")
        if chosen and done | set(chosen) >= set(target.labels):  # as a stream spec refuses it (sweep 37: the labels
            raise UserInputError(f"with the labels this composition forgot before ({', '.join(sorted(done))}), this "
                                 f"forgets every label of {target.name!r}: forget the whole task instead (drop --labels)")
    why = no_rows_to_forget(target, chosen)
    if why is not None:
        raise UserInputError(why)
    return target, chosen


@one_at_a_time
def forget_composition(reg: Registry, settings: Settings, task: str, *, labels: Sequence[str] | None = None,
                       adapters: Sequence[str] = (), base: str | None = None, name: str | None = None,
                       steps: int = 100, lr: float = 2e-3, batch_size: int = 16, eval_limit: int | None = 300,
                       seed: int = 0, progress: bool = True, **gs_lora: Any) -> dict[str, Any]:
    """Erase TASK (or some of its labels) from the current composition with a GS-LoRA adapter (see the
    module docstring); `gs_lora` options override the GS-LoRA configuration. `labels`: those to erase (None:
    the whole task); an empty list is refused, not read as the whole task (a caller's filter that came out empty
    erased everything: sweep 69). Returns a summary dict."""
    checked_seed(seed, "--seed")
    if labels is not None and not list(labels):
        raise UserInputError("the label list is empty: name the labels to erase (--labels), or leave it out to erase "
                             "the whole task").about("labels")
    labels = () if labels is None else labels
    try:  # the options first: a bad one is refused before the registry is read
        forgetter = FORGETTERS.build("gs-lora", {**gs_lora, "steps": steps, "lr": lr})
        trainer = TrainerSettings(steps=steps, lr=lr, batch_size=batch_size, eval_limit=eval_limit)  # snapshots: 3
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidSpec(f"invalid option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    reg.check_embedder()  # it registers what it trains: an embedder the registry cannot take is refused first
    reg.check_writable()  # and a registry it cannot write (sweep 70)
    recs = current_composition(reg, adapters=adapters, base=base)
    learned = _learned_tasks(reg, recs)
    erased = _erased(reg, recs, learned)
    target, chosen = _target(learned, task, labels, erased)
    claimed = None
    if name is None:  # "" is not "not given": validate_name refuses it, as train and router fit do
        stem = f"forget-{safe_part(target.name, 40)}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = claimed = next(n for n in (stem if i == 1 else f"{stem}-{i}" for i in range(1, 10_000))
                              if not reg.has_adapter(n) and reg.reserve_run_id(n))  # not another request's of this second
    try:
        return _erase(reg, settings, recs, learned, erased, target, chosen, name, forgetter, trainer,
                      eval_limit=eval_limit, seed=seed, progress=progress)
    except BaseException:
        if claimed is not None and not reg.has_adapter(claimed):  # refused or failed: the claim given back
            reg.release_run_id(claimed)
        raise


def _erase(reg, settings, recs, learned, erased, target, chosen, name: str, forgetter, trainer, *,
           eval_limit: int | None, seed: int, progress: bool) -> dict[str, Any]:
    """`forget_composition` once the request is read and the adapter's name chosen."""
    validate_name(name)
    reg.check_adapter_name_free(name)
    ref = resolve_base(recs[0].base)
    fp = fingerprint(ref, settings)
    forgetter.modules(fp)

    lb, _ = load_adapted(reg, [r.name for r in recs], settings)
    head = head_for(lb)

    def evaluate() -> dict[str, Any]:
        return evaluate_tasks(head, lb.model, lb.tokenizer, learned, split="test", limit=eval_limit)

    by_name = {t.name: t for t in learned}

    def gone(r: Row) -> bool:  # erased by the composition already: not retained (it would be taught back)
        if r.task not in erased:
            return False
        done = erased[r.task]
        return done is None or by_name[r.task].labels[r.label] in done

    def retained(is_forget) -> list[Row]:
        return retained_sample(learned, budget=forgetter.config.retain_budget, seed=seed,
                               split_rows=lambda t: rows_of(t, "train"), exclude=lambda r: is_forget(r) or gone(r))

    with reg.new_run("forget", name) as run_dir:  # removed if anything below fails: nothing was registered
        res = forget(model=lb.model, tokenizer=lb.tokenizer, head=head, fingerprint=lb.fingerprint, forgetter=forgetter,
                     task=target, labels=chosen, retained=retained, tasks={t.name: t for t in learned}, trainer=trainer,
                     seed=seed, run_dir=run_dir / "train", device=settings.resolved_device(), before=evaluate(),
                     evaluate=evaluate,
                     retained_tasks=[t.name for t in learned if t.name != target.name and erased.get(t.name, ()) is not None],
                     erased={t: None if labs is None else sorted(labs) for t, labs in erased.items()},
                     progress=progress, label=f"forget {target.name}")
        composition = [r.name for r in recs] + [name]
        record = res.record(name=name, base=ref, previous=recs[-1].name,
                            extra={"run_id": name, "unit": 0, "run_dir": str(run_dir), "tasks": [target.ref],
                                   "task_cards": {target.ref: target.card()}, "composition": composition})
        state = run_dir / "adapter"
        state.mkdir(parents=True, exist_ok=True)
        write_unit_adapter(state, res.adapter, res.outcome.snapshots, record)
        atomic_write(run_dir / "summary.json", _json_dumps(res.summary))
        rec = register_from_dir(reg, state, fingerprint=fp, member_blobs={r.name: r.blob for r in recs})
        return {"name": rec.name, "task": target.name, "labels": list(chosen) if chosen else None,
                "composition": composition, "run_dir": str(run_dir), **res.summary}


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
