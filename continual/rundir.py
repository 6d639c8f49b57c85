"""The files of one stream run directory, and the atomic commit of a unit's state.

    <run_dir>/run_id, spec.json, run.json     the run's name, its canonical spec, what was set at start
                                               (run.json: the fingerprint of each task file's rows too)
    <run_dir>/state/unit-XXX/                  a committed unit: state.json, banks.safetensors, the
                                               method's tensors, the adapter, its snapshots and record
    <run_dir>/state/.unit-XXX.tmp/             a unit being written (removed on resume)
    <run_dir>/units/XXX-kind/                  a unit's Lightning logs and checkpoints (a unit not committed
                                               has its removed on resume: it trains again from the start)

A unit's state directory is written under a temporary name, its files fsynced, and renamed into place
in one step (`commit`), so a run killed at any instant has every unit either fully saved or absent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from loraplex.catalog import MAX_COUNT, MAX_STEPS, first_error
from loraplex.errors import DamagedRun
from loraplex.fsio import atomic_write, fsync_dir, read_json_file, user_path

MAX_STATE_BYTES = 256 << 20  # a unit's state.json holds the replay buffer's rows


class _Saved(BaseModel):
    """What the report and a resume read of a saved file; the writer's other keys pass through unchecked."""

    model_config = ConfigDict(extra="allow", strict=True)


def _fraction(v: float) -> float:
    if not (math.isnan(v) or 0 <= v <= 1):  # NaN: not measured, as None
        raise ValueError(f"expected a fraction between 0 and 1, got {v}")
    return v


Fraction = Annotated[float, AfterValidator(_fraction)]


class _Cell(_Saved):
    accuracy: Fraction | None = None


class RunInfo(_Saved):
    """run.json: what was set when the run started."""

    run_id: str
    method: dict[str, Any]
    tasks: list[str]
    base: dict[str, Fraction | None]
    units_total: int = Field(ge=1, le=MAX_COUNT)
    task_fingerprints: dict[str, str] | None = None
    """{task file: `task_fingerprint`} of each file-based task (absent in runs started before it was kept)."""


class _ForgetSummary(_Saved):
    """A forget unit's `forget` (`metrics.forget_request_summary`), as far as the report reads it."""

    forgot: bool | None = None
    warning: str | None = None
    task: str
    labels: list[str] | None = None
    chance: Fraction | None = None
    forgotten_before: Fraction | None = None
    forgotten_after: Fraction | None = None
    retained_before: Fraction | None = None
    retained_after: Fraction | None = None
    retained_drop: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)
    groups_survived: int | None = Field(None, ge=0, le=MAX_COUNT)
    groups_total: int | None = Field(None, ge=0, le=MAX_COUNT)


class UnitResult(_Saved):
    """A committed unit's `result` (one row of the accuracy matrix and how it was made)."""

    unit: int = Field(ge=0, le=MAX_COUNT)
    kind: Literal["learn", "forget"]
    label: str
    tasks: list[str] = Field(min_length=1)
    labels: list[str] | None = None
    row: dict[str, _Cell | None]
    forget: _ForgetSummary | None = None
    steps: int | None = Field(None, ge=0, le=MAX_COUNT * MAX_STEPS)  # multitask: steps x tasks
    seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    step_time: float | None = Field(None, ge=0, allow_inf_nan=False)


def task_fingerprint(task: Any) -> str:
    """sha256 of what a run reads of a task: its name, labels, label texts and the rows of every split
    (a resume that finds the task file's rows changed is refused: the run would mix old and new data)."""
    data = [task.name, list(task.labels), sorted(task.label_texts.items()),
            *([[e.text, e.label] for e in getattr(task, split)] for split in ("train", "validation", "test"))]
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def changed_task_file(info: dict[str, Any], tasks: Any) -> str | None:
    """The first file-based task of `tasks` whose fingerprint differs from the one run.json recorded at the
    run's start, as the one-line refusal of a resume; None when none does (or the run recorded none)."""
    saved = info.get("task_fingerprints") or {}
    said = info.get("task_descriptions") or {}  # (runs started before it was kept: none)
    for t in tasks:
        if t.source != "embedded" and t.ref in saved and saved[t.ref] != task_fingerprint(t):
            return (f"task file {t.ref} changed since this run started (its rows or labels differ); "
                    "restore it, or start a new run")
        if t.source != "embedded" and t.ref in said and said[t.ref] != t.description:  # a causal LM's prompt says it
            return (f"task file {t.ref}: its description changed since this run started (sweep 50: a resume "
                    "prompted with the new one); restore it, or start a new run")
    return None


def damaged(path: Path, detail: str) -> DamagedRun:
    """The one-line error of a run directory whose file at `path` cannot be read back as saved."""
    return DamagedRun(f"{path}: damaged{detail} (the run directory cannot be read back; start the run again, "
                      "or restore the file)")


def _checked(path: Path, model: type[BaseModel], data: Any, at: str = "") -> dict[str, Any]:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        raise damaged(path, f"{' at ' + at if at else ''}: {first_error(exc)}") from None
    return data


def _read(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A saved JSON object, or DamagedRun naming the file."""
    data = read_json_file(path, error=DamagedRun, max_bytes=max_bytes, what="saved run file")
    if not isinstance(data, dict):
        raise DamagedRun(f"{path}: damaged: expected a JSON object, got {type(data).__name__}")
    return data

STATE_FILE = "state.json"
REGISTERED_FILE = "registered"  # in a unit's directory once its adapter is registered (a resume does not again)
BANKS_FILE = "banks.safetensors"
METHOD_FILE = "method.safetensors"


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = user_path(path).absolute()
        self.state = self.path / "state"

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the run directory for this process (an flock on the directory itself, so nothing is written
        into it): a second `stream run --resume DIR` beside a running one trained the same units, and each
        cleared the other's uncommitted unit."""
        import fcntl

        from loraplex.errors import UserInputError

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserInputError(f"{self.path}: another process is running this stream (a stream run or its "
                                     "--resume); wait for it to end") from None
            yield
        finally:
            os.close(fd)

    def is_run(self) -> bool:
        return (self.path / "spec.json").is_file()

    def spec(self) -> dict[str, Any]:
        return _read(self.path / "spec.json")

    def info(self) -> dict[str, Any] | None:
        """run.json (None before the run wrote it), checked for what the report reads."""
        p = self.path / "run.json"
        if not os.path.lexists(p):
            return None
        return _checked(p, RunInfo, _read(p))

    def unit_dir(self, i: int) -> Path:
        return self.state / f"unit-{i:03d}"

    def registered(self, i: int) -> bool:
        """Whether unit i's adapter was registered by this run (a run stopped between the unit's commit and its
        registration has it to register; one the user removed since is not registered again: sweep 50)."""
        return (self.unit_dir(i) / REGISTERED_FILE).is_file()

    def mark_registered(self, i: int) -> None:
        atomic_write(self.unit_dir(i) / REGISTERED_FILE, "")

    def completed(self) -> int:
        """How many units are committed: unit-000 on, without a gap (DamagedRun when one is missing
        before a committed later one: the run cannot be read back, or resumed, past the gap)."""
        n = 0
        while (self.unit_dir(n) / STATE_FILE).is_file():
            n += 1
        later = sorted(p.name for p in self.state.glob("unit-*") if p.name > f"unit-{n:03d}") if self.state.is_dir() else []
        if later:
            raise damaged(self.unit_dir(n), f": missing (or without {STATE_FILE}) while {later[0]} is saved")
        return n

    def unit_state(self, i: int) -> dict[str, Any]:
        return _read(self.unit_dir(i) / STATE_FILE, MAX_STATE_BYTES)

    def result(self, i: int) -> dict[str, Any]:
        p = self.unit_dir(i) / STATE_FILE
        st = self.unit_state(i)
        if not isinstance(st.get("result"), dict):
            raise DamagedRun(f"{p}: damaged: no 'result' object")
        res = _checked(p, UnitResult, st["result"], "result")
        if res["unit"] != i:
            raise damaged(p, f" at result.unit: {res['unit']} in the directory of unit {i}")
        return res

    def begin(self, i: int) -> Path:
        tmp = self.state / f".unit-{i:03d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, i: int, tmp: Path) -> Path:
        """Make a unit's state visible in one rename (after syncing its files)."""
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        final = self.unit_dir(i)
        os.rename(tmp, final)
        fsync_dir(self.state)
        return final

    def clean(self) -> None:
        """Before a resume: remove the state a stopped unit began writing, and the Lightning logs and
        checkpoints of every unit not committed (`units/NNN-kind/`), which it trains again from the start
        (Lightning warns about each non-empty directory it is given)."""
        for p in self.state.glob(".unit-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        done = self.completed()
        for p in (self.path / "units").glob("*"):
            index = p.name.split("-", 1)[0]
            if p.is_dir() and index.isdigit() and int(index) >= done:
                shutil.rmtree(p, ignore_errors=True)
