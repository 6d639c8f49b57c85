"""The files of one stream run directory, and the atomic commit of a unit's state.

    <run_dir>/run_id, spec.json, run.json     the run's name, its canonical spec, what was set at start
    <run_dir>/state/unit-XXX/                  a committed unit: state.json, banks.safetensors, the
                                               method's tensors, the adapter, its snapshots and record
    <run_dir>/state/.unit-XXX.tmp/             a unit being written (removed on resume)

A unit's state directory is written under a temporary name, its files fsynced, and renamed into place
in one step (`commit`), so a run killed at any instant has every unit either fully saved or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from loraplex.fsio import fsync_dir

STATE_FILE = "state.json"
BANKS_FILE = "banks.safetensors"
METHOD_FILE = "method.safetensors"


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path).expanduser().absolute()
        self.state = self.path / "state"

    def is_run(self) -> bool:
        return (self.path / "spec.json").is_file()

    def spec(self) -> dict[str, Any]:
        return json.loads((self.path / "spec.json").read_text())

    def info(self) -> dict[str, Any] | None:
        p = self.path / "run.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def unit_dir(self, i: int) -> Path:
        return self.state / f"unit-{i:03d}"

    def completed(self) -> int:
        n = 0
        while (self.unit_dir(n) / STATE_FILE).is_file():
            n += 1
        return n

    def unit_state(self, i: int) -> dict[str, Any]:
        return json.loads((self.unit_dir(i) / STATE_FILE).read_text())

    def result(self, i: int) -> dict[str, Any]:
        return self.unit_state(i)["result"]

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
        for p in self.state.glob(".unit-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
