"""Method contract, parametrized over the METHODS catalog."""

from __future__ import annotations

import json

import pytest

from loraplex.continual.methods import METHODS
from loraplex.continual.spec import TrainerSettings, parse_spec


@pytest.mark.parametrize("name", METHODS.names())
def test_contract(name, task_dir):
    spec = parse_spec({"method": name, "experiences": [
        {"learn": str(task_dir / "flights.jsonl")}, {"learn": str(task_dir / "sports.jsonl")}, {"forget": "flights"}]})
    method = METHODS.build(name, {})
    assert method.name == name and isinstance(method.new_slot, bool)
    units = method.plan(spec.experiences, ["flights", "sports", "flights"])
    assert [u.index for u in units] == list(range(len(units)))
    assert {t for u in units if u.kind == "learn" for t in u.tasks} == {"flights", "sports"}
    assert units[-1].kind == "forget" and units[-1].tasks == ("flights",)
    for r in method.regularizers():
        assert hasattr(r, "penalty") and hasattr(r, "on_experience_start") and hasattr(r, "on_experience_end")
    steps = method.steps(TrainerSettings(steps=7), units[0], 100, 16)
    assert steps >= 7
    assert method.steps(TrainerSettings(epochs=1.0), units[0], 100, 10) >= 10
    json.dumps(method.state_dict())
    method.load_state(method.state_dict(), method.state_tensors())
