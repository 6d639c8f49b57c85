"""examples/streams/reference.yaml names every key a stream spec accepts, and the spec loader accepts it.

A key added to the spec (a field of StreamSpec, LoraSettings, TrainerSettings, ReplaySettings or
Experience, or an option of a method or forgetting catalog entry) fails here until the reference
documents it. The catalog entries that are not the file's active `method:` / `forgetting:` are written
as commented-out blocks (`# method:` then `#   key: value` lines); those blocks are parsed and checked
against their entry's option class too. No model is loaded and nothing trains.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from loraplex.continual.forgetting import FORGETTERS
from loraplex.continual.methods import METHODS
from loraplex.continual.spec import (
    Experience,
    LoraSettings,
    ReplaySettings,
    StreamSpec,
    TrainerSettings,
    load_spec,
)

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "streams" / "reference.yaml"


def _data() -> dict:
    return yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))


def _commented_blocks(key: str) -> list[dict]:
    """The commented-out `# <key>:` blocks of the reference, each parsed as YAML ({key: ...})."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if re.match(rf"#\s?{re.escape(key)}:", line):
            current = [line.lstrip("#").lstrip()]
            blocks.append(current)
        elif current is not None and re.match(r"#\s{2,}\S", line):
            current.append(line[1:])
        else:
            current = None
    return [yaml.safe_load("\n".join(b)) for b in blocks]


def _refs(key: str) -> list[dict]:
    """Every `method` (or `forgetting`) of the reference, the active one first, as {name, options...}."""
    out = []
    for block in [_data()] + _commented_blocks(key):
        ref = block.get(key)
        if ref is not None:
            out.append({"name": ref} if isinstance(ref, str) else dict(ref))
    return out


def test_the_reference_spec_loads():
    spec = load_spec(REFERENCE)
    kinds = {e.kind for e in spec.experiences}
    assert kinds == {"learn", "forget"}
    assert any(e.labels for e in spec.experiences), "a forget experience with labels"
    assert any(e.description for e in spec.experiences), "a task file learned with its description"


@pytest.mark.parametrize("model, where", [
    (StreamSpec, ()),
    (LoraSettings, ("lora",)),
    (TrainerSettings, ("trainer",)),
    (ReplaySettings, ("replay",)),
])
def test_every_settings_key_is_in_the_reference(model, where):
    section = _data()
    for key in where:
        section = section[key]
    missing = sorted(set(model.model_fields) - set(section))
    assert not missing, f"{REFERENCE.name}: {'.'.join(where) or 'top level'} lacks {missing}"


def test_every_experience_key_is_in_the_reference():
    seen = {k for exp in _data()["experiences"] for k in exp}
    missing = sorted(set(Experience.model_fields) - seen)
    assert not missing, f"{REFERENCE.name}: no experience uses {missing}"


@pytest.mark.parametrize("key, catalog", [("method", METHODS), ("forgetting", FORGETTERS)])
def test_every_catalog_entry_and_option_is_in_the_reference(key, catalog):
    refs = _refs(key)
    by_name = {r["name"]: r for r in refs}
    assert len(by_name) == len(refs), f"{REFERENCE.name}: a {key} is written twice"
    for entry in catalog:
        assert entry.name in by_name, f"{REFERENCE.name}: no {key} block for {entry.name!r}"
        options = {k: v for k, v in by_name[entry.name].items() if k != "name"}
        fields = set(entry.config_cls.model_fields) if entry.config_cls is not None else set()
        missing = sorted(fields - set(options))
        assert not missing, f"{REFERENCE.name}: {key} {entry.name!r} lacks {missing}"
        entry.make_config(options)  # the commented-out blocks must be valid too
