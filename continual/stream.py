"""The stream loop: run a stream spec unit by unit, persist after each, resume exactly after a crash.

    run_stream(spec_path, out=DIR)      -> learn / forget each unit of the spec in order
    run_stream(spec_path, resume=DIR)   -> continue from the last completed unit of DIR

For each unit (continual/methods.py groups experiences into units; one row of the accuracy matrix):
  1. the method picks the slot to train (a fresh one per task for O-LoRA, the same one for seq-lora),
     or a forgetting request adds a GS-LoRA slot on the feed-forward projections;
  2. batches are built from the unit's new rows and the replay buffer (continual/replay.py) with a
     generator seeded by (seed, unit); Lightning trains the slot (continual/experience.py);
  3. the unit's tasks are offered to the replay buffer (a forgotten task's rows are removed);
  4. the model (all adapters summed) is evaluated on every task learned so far and on the next
     unit's tasks (for forward transfer): one row of R; with `replay.distill` the buffer's new rows
     are then scored by that model, the targets later units distil towards (DER++);
  5. the run state is committed: `state/unit-XXX/` is written under a temporary name and renamed
     (atomic) with the banks' tensors, the replay buffer's rows, stored scores and generator state, the regularizers'
     state, the composition, the evaluation row, and the adapter with its snapshots and record;
  6. the adapter is registered (idempotently, continual/registration.py) with metrics, lineage
     (`trained-from` the previous unit's adapter; `forgets` for a forgetting adapter) and snapshots;
  7. matrix.json, metrics.json and heatmap.png are rewritten.

Everything random in a unit derives from (spec.seed, unit index) or from state saved in step 5, so a
run killed at any point and resumed from its last committed unit ends with the same matrix and the
same adapters as a run never stopped. A resume is refused when the given spec differs from the one
the run directory was made with, or when a task file's rows differ from those it started with (run.json
keeps each file's `task_fingerprint`). All validation (spec, tasks, base, targets) happens before anything
is written.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from loraplex.continual.evaluation import evaluate_tasks, label_accuracy
from loraplex.continual.metrics import FORGET_MIN_DROP
from loraplex.continual.experience import train_unit
from loraplex.continual.forgetting import FORGETTERS, forget, retained_sample
from loraplex.continual.methods import METHODS
from loraplex.continual.registration import RECORD_FILE, register_from_dir, safe_part, write_unit_adapter
from loraplex.continual.regularizers import ExperienceContext
from loraplex.continual.replay import ReplayBuffer, mixed_batches, replayed_per_batch
from loraplex.continual.report import write_report
from loraplex.continual.rundir import (  # noqa: F401 (RunDir: imported from here too)
    BANKS_FILE, METHOD_FILE, STATE_FILE, RunDir, changed_task_file, damaged, task_fingerprint)
from loraplex.continual.slots import add_slot, bank_tensors, extract_slot, restore_banks, train_only
from loraplex.continual.spec import first_difference, load_spec
from loraplex.data import load_task
from loraplex.errors import (AlreadyExists, DamagedRun, Diverged, IncompatibleAdapter, InvalidSpec, Interrupted,
                             LoraplexWarning, Terminated, UserInputError, check_termination)
from loraplex.experts.layers import adapters_disabled
from loraplex.fsio import atomic_write, user_path, without_dotdot, write_tensors
from loraplex.heads import HEADS, head_for, texts_readable
from loraplex.models import base_files, fingerprint, load_base, load_tokenizer, resolve_base
from loraplex.ranks import is_worker, shared_run_dir
from loraplex.registry.store import Registry
from loraplex.seeding import one_at_a_time, outside
from loraplex.settings import Settings
from loraplex.tasks import data_notes
from loraplex.training import Row, rows_of


@dataclass
class StreamResult:
    run_dir: Path
    run_id: str
    matrix: dict[str, Any]
    metrics: dict[str, Any]
    adapters: list[str] = field(default_factory=list)
    resumed_from: int = 0
    registered_now: list[str] = field(default_factory=list)  # the adapters this call registered (a resume: few)


def compute_of(settings: Settings) -> dict[str, str]:
    """The device kind and dtype a run trains in (run.json): a resume in another one is not the same run."""
    return {"device": settings.resolved_device(), "dtype": str(settings.torch_dtype()).removeprefix("torch.")}


def _paths_as_recorded(stored: Any) -> Any:
    """A stored spec with its task files' paths as a spec is read now, without `..` (sweep 52: a run started
    before that, from a spec with `learn: ../tasks/x.csv`, was "made by a different stream spec")."""
    if not isinstance(stored, dict) or not isinstance(stored.get("experiences"), list):
        return stored
    exps = [{k: str(without_dotdot(v)) if k in ("learn", "forget") and isinstance(v, str) and os.path.isabs(v) else v
             for k, v in e.items()} if isinstance(e, dict) else e for e in stored["experiences"]]
    return {**stored, "experiences": exps}


def _unit_seed(seed: int, unit: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (unit + 1)) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------


def _same_directory(a: str, b: str) -> bool:
    """Two spellings of one existing directory (a relative one read from the current directory)."""
    return os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b)


def _outside_registry_storage(out: Path, home: Path) -> None:
    """Refuse an --out that is the registry home or inside its own files (blobs/ is content-addressed storage
    `registry check` reads as such); `<home>/runs/...`, where runs go by default, is fine."""
    h, o = os.path.realpath(home), os.path.realpath(out)
    if os.path.commonpath([h, o]) == h and os.path.commonpath([os.path.join(h, "runs"), o]) != os.path.join(h, "runs"):
        raise UserInputError(f"{out}: inside the registry home {home}, which is the registry's own storage; give a "
                             f"directory elsewhere, or under {os.path.join(home, 'runs')}")


@one_at_a_time
def run_stream(
    spec_path: str | Path,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    settings: Settings | None = None,
    progress: bool = True,
    on_unit: Callable[[dict[str, Any]], None] | None = None,
) -> StreamResult:
    """Run the stream spec at `spec_path` (or resume the run in `resume`); see the module docstring.
    `on_unit(event)` is called after each unit with {"unit", "label", "total", "matrix", "metrics"}."""
    s = settings or Settings.load()
    spec = load_spec(spec_path)
    canonical = spec.canonical()
    if not is_worker():  # every unit registers its adapter
        Registry.open(s).check_embedder()
    if resume is not None:
        rd = RunDir(user_path(resume))  # "" is refused, not read as the working directory (sweep 69)
        if out is not None and user_path(out).absolute() != rd.path:
            raise UserInputError("give --resume DIR alone (the run continues in DIR), not with a different --out")
        if not rd.path.is_dir():
            raise UserInputError(f"{rd.path}: no such run directory to resume")
        if not rd.is_run():
            raise UserInputError(f"{rd.path}: not a stream run directory (no spec.json)")
        stored = rd.spec()
        was = stored.get("base") if isinstance(stored, dict) else None
        if isinstance(was, str) and was != spec.base and _same_directory(was, spec.base):
            # a run started before `base:` was read beside the spec kept the path as written: the same model
            spec = spec.model_copy(update={"base": was})  # its adapters keep the base name they were recorded with
            canonical = spec.canonical()
        diff = first_difference(_paths_as_recorded(stored), canonical)
        if diff is not None:
            raise InvalidSpec(f"{rd.path} was made by a different stream spec (they differ at {diff}); "
                              "resume it with its own spec")
    else:
        # without --out the run directory is made once the spec has passed every check below (made now, a
        # refused spec left an empty one behind)
        rd = RunDir(shared_run_dir(user_path(out))) if out is not None else None  # out="" wrote into the cwd
        if rd is not None:
            _outside_registry_storage(rd.path, s.home)
        if rd is not None and not is_worker() and rd.path.exists() and any(rd.path.iterdir()):
            hint = " (resume it with --resume)" if rd.is_run() else ""
            raise AlreadyExists(f"{rd.path} is not empty{hint}")

    method = METHODS.build(spec.method.name, spec.method.config)
    forgetter = FORGETTERS.build(spec.forgetting.name, spec.forgetting.config)
    tasks: dict[str, Any] = {}
    names: list[str] = []
    for exp in spec.experiences:
        if exp.learn is not None:
            t = load_task(exp.learn, description=exp.description)
            tasks[t.name] = t
            names.append(t.name)
        else:
            names.append(exp.forget)
    units = method.plan(spec.experiences, names)
    _check_steps(spec, method, units, tasks)
    _check_router_top_k(method, tasks, spec.lora.rank)
    ref = resolve_base(spec.base)
    fp = fingerprint(ref, s)
    if resume is None and not is_worker():  # a task its base reads as unknown tokens only teaches nothing
        tok = load_tokenizer(ref, s)
        head = HEADS.build(ref.family, {})  # labels it reads as one: refused now, not at the first evaluation
        for t in tasks.values():                # (after the run directory was made: a plain rerun was refused)
            texts_readable(tok, t)
            head.check_labels(tok, t)
            for note in data_notes(t, spec.trainer.train_limit):  # said as `train` says them (a warning: line)
                warnings.warn(note, LoraplexWarning, stacklevel=2)
    learn_spec = spec.lora.lora_spec()
    learn_modules = learn_spec.resolve_targets(fp.linear_names(), fp.model_type)
    if any(u.kind == "forget" for u in units):
        shared = sorted(set(forgetter.modules(fp)) & set(learn_modules))  # IncompatibleAdapter now rather than mid-run
        if shared and not method.summed:  # a routed projection takes one expert per task; a forgetting slot is not one
            raise InvalidSpec(f"{spec_path}: forgetting.targets and lora.targets share {shared[0]!r}: method "
                              f"{spec.method.name!r} routes that projection among its tasks' adapters, and a "
                              "forgetting slot in it is not one of them; give forgetting projections the routed "
                              "ones do not use (its default is the feed-forward ones)")
    info = rd.info() if resume is not None else None
    if info is not None and info["units_total"] != len(units):  # the spec is spec.json's: the counts agree
        raise damaged(rd.path / "run.json", f" at units_total: {info['units_total']}, but the spec makes {len(units)} units")
    was_on = info.get("compute") if info is not None else None
    if isinstance(was_on, dict) and was_on != compute_of(s):  # a run started before this was kept says nothing
        now = compute_of(s)
        raise UserInputError(f"{rd.path}: this run started in {was_on.get('dtype')} on {was_on.get('device')}, and a "
                             f"resume here would train in {now['dtype']} on {now['device']} (not the run it continues): "
                             f"resume it with LORAPLEX_DTYPE={was_on.get('dtype')} LORAPLEX_DEVICE={was_on.get('device')}")
    if info is not None and info.get("base_sha") != fp.sha:
        raise IncompatibleAdapter(f"{rd.path}: base {ref.name!r} has changed since this run started")
    then = info.get("base_files") if info is not None else None
    if isinstance(then, dict) and (now := base_files(ref)) != then:
        if now is None:
            raise IncompatibleAdapter(f"{rd.path}: cannot read base {ref.name} to check it is the one this run started on")
        odd = sorted(set(now) ^ set(then)) or [k for k in sorted(now) if now[k] != then[k]]
        what = odd[0] if odd else "its files"
        how = "is new" if what in now and what not in then else "is gone" if what in then and what not in now else "changed"
        raise IncompatibleAdapter(f"{rd.path}: base {ref.name} changed since this run started ({what} {how}); restore "
                                  "it, or start a new run")
    changed = changed_task_file(info, tasks.values()) if info is not None else None
    if changed is not None:
        raise UserInputError(f"{rd.path}: {changed}")
    if rd is None:
        rd = RunDir(Registry.open(s).run_dir("stream", spec.name))
    run = _StreamRun(spec, s, rd, method, forgetter, tasks, units, ref, fp, learn_spec, learn_modules,
                     progress=progress, on_unit=on_unit)
    if is_worker():  # a DDP worker follows rank 0, which holds the run directory
        return run.execute(info, fresh=resume is None)
    with rd.exclusive():
        return run.execute(info, fresh=resume is None)


def _check_router_top_k(method: Any, tasks: dict[str, Any], rank: int) -> None:
    """A routed stream's router mixes top_k of its experts, one per task learned (for a rank router, SMoRA,
    one per rank of each task's adapter: `rank` each): a top_k above what the whole stream gives it is refused,
    as `router fit` refuses it (it was capped without a word). A rank router's top_k counts ranks (sweep 37:
    it was held to the task count, and its own default of 8 ran past that)."""
    top_k = (getattr(getattr(method, "config", None), "router_config", None) or {}).get("top_k")
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        return
    entry = getattr(method, "entry", None)
    if getattr(getattr(entry, "factory", None), "slot", None) == "rank":
        if top_k > len(tasks) * rank:
            raise InvalidSpec(f"method.router_config.top_k={top_k} is more than the {len(tasks) * rank} ranks the "
                              f"router would choose among ({len(tasks)} tasks x lora.rank {rank})")
    elif top_k > len(tasks):
        raise InvalidSpec(f"method.router_config.top_k={top_k} is more than the {len(tasks)} tasks this stream "
                          f"learns (one expert each) the router would choose among")


def _check_steps(spec: Any, method: Any, units: list, tasks: dict[str, Any]) -> None:
    """With trainer.epochs, every learning unit's step count within trainer.steps' bound, before anything
    is written: the rows of all its tasks (multitask learns them in one unit), as few new rows a step as
    replay leaves (its largest share, whatever the buffer holds by then)."""
    tr = spec.trainer
    if tr.epochs is None:
        return
    replay = spec.replay
    k_old = 0 if replay is None or replay.rows == "added" else replayed_per_batch(1 << 30, tr.batch_size, replay.mix)
    first = True  # the first learning unit replays nothing: its buffer is empty
    for u in units:
        if u.kind == "learn":
            n = sum(len(tasks[t].split("train")[: tr.train_limit or None]) for t in u.tasks)
            try:
                method.steps(tr, u, n, tr.batch_size - (0 if first else k_old))
            except InvalidSpec as exc:
                raise InvalidSpec(f"stream unit {u.index} ({u.label}): {exc}") from None
            first = False


class _StreamRun:
    """The state of a run in progress (model, slots, replay, regularizers) and the unit steps."""

    def __init__(self, spec, settings, rd, method, forgetter, tasks, units, ref, fp, learn_spec, learn_modules,
                 *, progress, on_unit):
        self.spec, self.settings, self.rd = spec, settings, rd
        self.method, self.forgetter = method, forgetter
        self.tasks, self.units, self.ref, self.fp = tasks, units, ref, fp
        self.learn_spec, self.learn_modules = learn_spec, learn_modules
        self.progress, self.on_unit = progress, on_unit
        self.regs = {r.name: r for r in method.regularizers()}
        self.replay = None
        self.learn_slots: list[dict[str, int]] = []
        self.composition: list[dict[str, Any]] = []
        self.forgotten: dict[str, list[str] | None] = {}
        self.registered_now: list[str] = []
        self.results: list[dict[str, Any]] = []

    # ---- start / resume -----------------------------------------------------------------------
    def execute(self, info: dict[str, Any] | None, *, fresh: bool) -> StreamResult:
        rd, spec = self.rd, self.spec
        self.reg = Registry.open(self.settings)
        # A DDP worker (loraplex.ranks) follows rank 0 through the same units and writes nothing: rank 0
        # wrote run_id, spec.json and run.json before Lightning started the workers, and it commits,
        # registers and reports every unit.
        self.writer = not is_worker()
        if not self.writer:
            fresh, info = False, rd.info()
        if fresh:
            run_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            while (any(r.name.startswith(run_id + "-") for r in self.reg.list_adapters())
                   or not self.reg.reserve_run_id(run_id)):  # another run started in this second holds it
                run_id += "x"
            rd.path.mkdir(parents=True, exist_ok=True)
            atomic_write(rd.path / "run_id", run_id)  # before spec.json, whose presence marks a run directory
            atomic_write(rd.path / "spec.json", json.dumps(spec.canonical(), indent=1, sort_keys=True))
        run_id = (rd.path / "run_id").read_text().strip()
        if not fresh and self.writer and not self.reg.holds_run_id(run_id) \
                and not any(r.name.startswith(run_id + "-") for r in self.reg.list_adapters()):
            was = f" (it started in {info['registry']})" if info and info.get("registry") else ""
            raise UserInputError(f"{rd.path}: run {run_id} did not start in the registry at {self.reg.home}{was}: its "
                                 "adapters register where it started; resume it with that --home (or LORAPLEX_HOME)")
        if self.writer:
            rd.state.mkdir(exist_ok=True)
            rd.clean()
        self.lb = load_base(self.ref, self.settings)
        self.head = head_for(self.lb)
        self.device = self.settings.resolved_device()
        if info is None:
            base = self._evaluate(list(self.tasks), bare=True)
            info = {
                "run_id": run_id, "method": spec.method.dump(),
                "replay": spec.replay.model_dump(mode="json") if spec.replay else None,
                "tasks": [t for u in self.units if u.kind == "learn" for t in u.tasks],
                "task_refs": {n: t.ref for n, t in self.tasks.items()},
                "task_fingerprints": {t.ref: task_fingerprint(t) for t in self.tasks.values() if t.source != "embedded"},
                "task_descriptions": {t.ref: t.description for t in self.tasks.values() if t.source != "embedded"},
                "units_total": len(self.units), "units": [u.label for u in self.units],
                "base": {t: c["accuracy"] for t, c in base.items()}, "base_name": self.ref.name, "base_sha": self.fp.sha,
                "base_labels": {t: c.get("labels", {}) for t, c in base.items()},  # a task erased in part: on its kept labels
                "compute": compute_of(self.settings),
                "registry": str(self.reg.home),  # named when a resume is refused under another registry
                "registration_marked": True,  # each unit's directory says when its adapter is registered
                **({"base_files": files} if (files := base_files(self.ref)) is not None else {}),
            }
            atomic_write(rd.path / "run.json", json.dumps(info, indent=1))
        self.info = info
        if spec.replay is not None:
            self.replay = ReplayBuffer.from_settings(spec.replay, seed=spec.seed)
        done = rd.completed()
        if done:
            self._restore(done - 1)
        self.results = [rd.result(i) for i in range(done)]
        if not self.writer:
            for unit in self.units[done:]:
                self.results.append(self._learn(unit) if unit.kind == "learn" else self._forget(unit))
            return StreamResult(rd.path, run_id, {}, {}, [], resumed_from=done)
        for i in range(done):  # a run killed between commit and registration registers now
            self._register(i)
        if not info.get("registration_marked"):  # a run started before units were marked: every saved unit is now,
            info = {**info, "registration_marked": True}  # so a later stop is told apart too (sweep 52)
            atomic_write(rd.path / "run.json", json.dumps(info, indent=1))
            self.info = info
        report = write_report(rd.path, info, self.results) if done else None
        for unit in self.units[done:]:
            try:
                check_termination()  # a Ctrl-C or SIGTERM a library swallowed during the last unit
                result = self._learn(unit) if unit.kind == "learn" else self._forget(unit)
                self.results.append(result)
                self._register(unit.index)
                report = write_report(rd.path, info, self.results)
            except (Interrupted, KeyboardInterrupt, Terminated) as exc:
                saved = rd.completed()
                when = (f"after unit {unit.index} ({unit.label}) was saved (continuing registers its adapter if "
                        "it is not yet)" if saved > unit.index else f"during unit {unit.index} ({unit.label})")
                raise Interrupted(f"interrupted {when}; {saved} of {len(self.units)} units are saved in {rd.path}; "
                                  f"continue with `loraplex stream run SPEC --resume {rd.path}`",
                                  signal=getattr(exc, "signal", "SIGINT")) from None
            except Diverged as exc:  # train's words name its options and say nothing was registered
                where, n = exc.detail, unit.index
                kept = (f"the {n} unit{'s' if n != 1 else ''} before it {'are' if n != 1 else 'is'} saved in {rd.path} "
                        "and registered" if n else "nothing was registered")
                raise Diverged(f"unit {n} ({unit.label}): {where}; lower trainer.lr (or a loss weight: "
                               f"replay.distill, the method's and forgetting's weights) in the spec and start a new "
                               f"run; {kept}") from None
            if self.on_unit is not None:
                # the callback's own copy: what it changes is not the result this returns (sweep 26); run outside
                # this seeded job (a callback may wait for a training of its own in another thread: sweep 29)
                with outside():
                    self.on_unit(copy.deepcopy({"unit": unit.index, "label": unit.label, "total": len(self.units),
                                                **report}))
        report = report or write_report(rd.path, info, self.results)
        return StreamResult(rd.path, run_id, report["matrix"], report["metrics"],
                            [r["adapter"] for r in self.results if r.get("adapter")], resumed_from=done,
                            registered_now=self.registered_now)

    def _restore(self, last: int) -> None:
        """The model, slots, buffer and method state as unit `last` left them; DamagedRun when they cannot be
        read back (the files are the run directory's, so their damage is the input's, not a bug)."""
        from safetensors import SafetensorError

        st = self.rd.unit_state(last)
        try:
            self._restore_state(last, st)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError, SafetensorError) as exc:
            raise DamagedRun(f"{self.rd.unit_dir(last)}: the saved state cannot be restored ({type(exc).__name__}: "
                             f"{exc}); start the run again, or restore the unit's files") from None

    def _restore_state(self, last: int, st: dict[str, Any]) -> None:
        restore_banks(self.lb.model, load_file(str(self.rd.unit_dir(last) / BANKS_FILE)), st["layout"])
        self.learn_slots = [dict(x) for x in st["learn_slots"]]
        self.composition = st["composition"]
        self.forgotten = st["forgotten"]
        if self.replay is not None and st.get("replay"):
            self.replay.load_state_dict(st["replay"])
        for name, state in st.get("regularizers", {}).items():
            if name in self.regs:
                self.regs[name].load_state_dict(state)
        mt = self.rd.unit_dir(last) / METHOD_FILE
        self.method.load_state(st.get("method", {}), load_file(str(mt)) if mt.is_file() else {})

    # ---- units --------------------------------------------------------------------------------
    def _learn(self, unit) -> dict[str, Any]:
        spec, tr = self.spec, self.spec.trainer
        seed = _unit_seed(spec.seed, unit.index)
        if self.method.new_slot or not self.learn_slots:
            slot = add_slot(self.lb.model, self.learn_spec, self.learn_modules, generator=torch.Generator().manual_seed(seed))
            new_slot = True
        else:
            slot, new_slot = self.learn_slots[-1], False
        train_only(self.lb.model, slot)
        self.method.configure_train(self.lb.model, slot)
        new = {t: rows_of(self.tasks[t], "train", tr.train_limit) for t in unit.tasks}
        old = self.replay.contents() if self.replay is not None else []
        mix = spec.replay.mix if spec.replay is not None else 0.0
        added = spec.replay is not None and spec.replay.rows == "added"
        k_old = 0 if added else replayed_per_batch(len(old), tr.batch_size, mix)
        steps = self.method.steps(tr, unit, sum(len(v) for v in new.values()), tr.batch_size - k_old)
        batches = mixed_batches(new, old, steps=steps, batch_size=tr.batch_size, mix=mix,
                                rng=np.random.default_rng([spec.seed, unit.index]), added=added)
        previous = [p for p in self.learn_slots if p != slot]
        ctx = ExperienceContext(unit.index, self.lb.model, slot, previous)
        regs = list(self.regs.values())
        for r in regs:
            r.on_experience_start(ctx)
        outcome = train_unit(
            model=self.lb.model, tokenizer=self.lb.tokenizer, head=self.head, tasks=self.tasks, batches=batches,
            lr=tr.lr, trainer=tr, run_dir=self.rd.path / "units" / f"{unit.index:03d}-learn", seed=seed,
            device=self.device, regularizers=regs, progress=self.progress, label=self.bar(unit),
            teacher=self.replay.scores if self.replay is not None else None,
            snapshot_fn=lambda m: extract_slot(m, self.learn_spec, slot), snapshot_spec=self.learn_spec)
        diag = {r.name: r.on_experience_end(ctx) for r in regs}
        self.method.after_unit(self, unit)
        if self.replay is not None:
            for t in unit.tasks:
                self.replay.add_task(t, new[t])
        if new_slot:
            self.learn_slots.append(slot)
        name = self._adapter_name(unit, "-".join(unit.tasks) if len(unit.tasks) <= 2 else "multitask")
        prev = self.composition[-1]["name"] if self.composition else None
        self.composition = [c for c in self.composition if c["slot"] != slot] + [{"name": name, "kind": "learn", "slot": slot}]
        self.method.configure_eval(self.lb.model)
        row = self._evaluate(self._eval_tasks(unit))
        if self.replay is not None:  # DER++: the new rows' scores as the composition gives them now
            self.replay.scores.record(self.head, self.lb.model, self.lb.tokenizer, self.replay.contents(), self.tasks)
        adapter = extract_slot(self.lb.model, self.learn_spec, slot)
        own = [row[t]["accuracy"] for t in unit.tasks if row[t]["accuracy"] is not None]
        result = self._result(unit, row, outcome, diag, name)
        result["rows_per_step"] = round(float(np.mean([len(b) for b in batches])), 2) if batches else None
        returned = self._erased_returned(row)
        if returned:
            result["erased_returned"] = returned
        ts = [self.tasks[t] for t in unit.tasks]
        record = {
            "name": name, "base": self.ref.name, "family": self.ref.family, "origin": "continual",
            "description": ts[0].description if len(ts) == 1 else "Multitask adapter for: " + " | ".join(t.description for t in ts),
            "task": ts[0].ref if len(ts) == 1 else None,
            "edges": [{"target": f"task:{t.ref}", "kind": "trained-on"} for t in ts]
                     + ([{"target": f"adapter:{prev}", "kind": "trained-from"}] if prev else []),
            "metrics": {"accuracy": round(sum(own) / len(own), 4) if own else None, "unit": unit.index,
                        "row": {t: c["accuracy"] for t, c in row.items()}, "steps": outcome.steps,
                        "train_seconds": outcome.seconds, "step_time": outcome.step_time, "method": self.method.name,
                        "replay": self.replay is not None, "losses": outcome.losses, **_flat(diag),
                        # the accuracy is what the stream's model scored: through its router (not registered)
                        # when its adapters are not summed, so `adapters list` says so beside the figure
                        **({} if self.method.summed else {"scored_through": "router"})},
            "extra": self._extra(unit, ts),
        }
        self._commit(unit, result, adapter, outcome.snapshots, record)
        return result

    def _forget(self, unit) -> dict[str, Any]:
        spec, tr = self.spec, self.spec.trainer
        seed = _unit_seed(spec.seed, unit.index)
        task, labels = self.tasks[unit.tasks[0]], unit.labels
        learned = [t for t in self.info["tasks"] if any(t in u.tasks for u in self.units[: unit.index] if u.kind == "learn")]

        def retained(is_forget) -> list[Row]:
            def gone(r) -> bool:  # forgotten now or by an earlier request
                if is_forget(r):
                    return True
                f = self.forgotten.get(r.task, "absent")
                return f is None or (f != "absent" and self.tasks[r.task].labels[r.label] in f)

            if self.replay is not None:
                kept = [r for r in self.replay.contents() if not gone(r)]
                if kept:
                    return kept  # else a buffer holding only the erased task's rows: the sample, as with none
                    # (sweep 50: the request trained with nothing retained, "the composition learned only ...")
            return retained_sample([self.tasks[t] for t in learned], budget=self.forgetter.config.retain_budget,
                                   seed=seed, split_rows=lambda t: rows_of(t, "train", tr.train_limit), exclude=gone)

        def evaluate() -> dict[str, Any]:
            self.method.configure_eval(self.lb.model)
            return self._evaluate(self._eval_tasks(unit))

        retained_tasks = [t for t in learned if t != task.name and self.forgotten.get(t, "absent") is not None]
        res = forget(model=self.lb.model, tokenizer=self.lb.tokenizer, head=self.head, fingerprint=self.fp,
                     forgetter=self.forgetter, task=task, labels=labels, retained=retained, tasks=self.tasks,
                     trainer=tr, seed=seed, run_dir=self.rd.path / "units" / f"{unit.index:03d}-forget",
                     device=self.device, before=self.results[-1]["row"], evaluate=evaluate,
                     retained_tasks=retained_tasks, index=unit.index, progress=self.progress, label=self.bar(unit),
                     stronger="a larger forgetting.steps or forgetting.lr in the spec",
                     erased=dict(self.forgotten))
        if self.replay is not None:
            self.replay.remove(task.name, None if labels is None else sorted({task.label_index(lab) for lab in labels}))
        self.forgotten[task.name] = None if labels is None else sorted(set(labels) | set(self.forgotten.get(task.name) or []))
        name = self._adapter_name(unit, f"forget-{task.name}")
        prev = self.composition[-1]["name"] if self.composition else None
        self.composition = self.composition + [{"name": name, "kind": "forget", "slot": res.slot}]
        result = self._result(unit, res.after, res.outcome, res.regularizers, name)
        result["forget"] = res.summary
        record = res.record(name=name, base=self.ref, previous=prev, extra=self._extra(unit, [task]), unit=unit.index)
        self._commit(unit, result, res.adapter, res.outcome.snapshots, record)
        return result

    # ---- helpers ------------------------------------------------------------------------------
    def _erased_returned(self, row: dict[str, Any]) -> dict[str, list[float]]:
        """What earlier `forget:` units erased and this learning unit brought back: {task or task[labels]:
        [accuracy after its last request, now]} for a rise of FORGET_MIN_DROP or more, each said as a warning
        (sweep 50: a unit after the request took the erased task from 25.0 back to 62.5, unsaid, and the run
        ended saying it was forgotten). A forget request watches the same for the erasures before it."""
        out = {}
        for t, labels in self.forgotten.items():
            last = [r for r in self.results if r["kind"] == "forget" and r["tasks"][0] == t]
            if not last or t not in row or t not in last[-1]["row"]:
                continue
            was, now = label_accuracy(last[-1]["row"][t], labels), label_accuracy(row[t], labels)
            if was is None or now is None or now - was < FORGET_MIN_DROP:
                continue
            what = t if labels is None else f"{t}[{','.join(labels)}]"
            out[what] = [round(was, 4), round(now, 4)]
            warnings.warn(f"{what}, erased by an earlier forget: request, came back with this unit: accuracy "
                          f"{100 * was:.1f} -> {100 * now:.1f} (a forget: after the last unit that learns erases it "
                          "from the model the stream ends with)", LoraplexWarning, stacklevel=2)
        return out

    def bar(self, unit) -> str:
        """The progress-bar label of a unit: `[i/n] label`."""
        return f"[{unit.index + 1}/{len(self.units)}] {unit.label}"

    def _adapter_name(self, unit, what: str) -> str:
        return f"{self.info['run_id']}-{unit.index}-{safe_part(what, 36)}"

    def _extra(self, unit, tasks: list[Any]) -> dict[str, Any]:
        return {"run_id": self.info["run_id"], "run_dir": str(self.rd.path), "unit": unit.index,
                "method": self.spec.method.dump(), "tasks": [t.ref for t in tasks],
                "task_cards": {t.ref: t.card() for t in tasks},
                "composition": [c["name"] for c in self.composition],
                "summed": self.method.summed}  # it answers with its composition (record.composition_of)

    def _eval_tasks(self, unit) -> list[str]:
        """Tasks learned up to this unit, plus the next unit's (its forward-transfer column)."""
        upto = [t for u in self.units[: unit.index + 1] if u.kind == "learn" for t in u.tasks]
        nxt = self.units[unit.index + 1] if unit.index + 1 < len(self.units) else None
        return upto + ([t for t in nxt.tasks if t not in upto] if nxt is not None and nxt.kind == "learn" else [])

    def _evaluate(self, names: list[str], *, bare: bool = False) -> dict[str, Any]:
        tr = self.spec.trainer
        with adapters_disabled(self.lb.model) if bare else nullcontext():
            return evaluate_tasks(self.head, self.lb.model, self.lb.tokenizer, [self.tasks[n] for n in names],
                                  split=tr.eval_split, limit=tr.eval_limit)

    def _result(self, unit, row, outcome, diag, name) -> dict[str, Any]:
        return {"unit": unit.index, "kind": unit.kind, "label": unit.label, "tasks": list(unit.tasks),
                "labels": list(unit.labels) if unit.labels else None, "row": row, "adapter": name,
                "steps": outcome.steps, "seconds": outcome.seconds, "step_time": outcome.step_time,
                "losses": outcome.losses, "regularizers": diag}

    def _commit(self, unit, result, adapter, snapshots, record) -> None:
        if not self.writer:
            return
        tmp = self.rd.begin(unit.index)
        tensors, layout = bank_tensors(self.lb.model)
        write_tensors(tmp / BANKS_FILE, tensors)
        write_unit_adapter(tmp, adapter, snapshots, record)
        state = {
            "result": result, "layout": layout, "learn_slots": self.learn_slots, "composition": self.composition,
            "forgotten": self.forgotten, "replay": self.replay.state_dict() if self.replay is not None else None,
            "regularizers": {n: r.state_dict() for n, r in self.regs.items()},
            "seed": _unit_seed(self.spec.seed, unit.index),
        }
        state["method"] = self.method.state_dict()
        method_tensors = self.method.state_tensors()
        if method_tensors:
            write_tensors(tmp / METHOD_FILE, {k: v.detach().cpu().contiguous() for k, v in method_tensors.items()})
        atomic_write(tmp / STATE_FILE, json.dumps(state))
        self.rd.commit(unit.index, tmp)

    def _register(self, i: int) -> None:
        if self.rd.registered(i):
            return
        res = self.rd.result(i)
        texts = []
        if res["kind"] == "learn":
            texts = [e.text for t in res["tasks"] for e in self.tasks[t].train[:256]]
        name = json.loads((self.rd.unit_dir(i) / RECORD_FILE).read_text())["name"]
        there = self.reg.has_adapter(name)  # a run made before units were marked: registered already (sweep 52)
        register_from_dir(self.reg, self.rd.unit_dir(i), fingerprint=self.fp, prototype_texts=texts)
        self.rd.mark_registered(i)
        if not there:
            self.registered_now.append(name)


def _flat(diag: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{n}.{k}": v for n, d in diag.items() for k, v in d.items() if not isinstance(v, (dict, list))}
