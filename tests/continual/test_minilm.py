"""One short real stream on minilm (slow): O-LoRA + replay learns two embedded tasks and keeps the first."""

from __future__ import annotations

import pytest

from loraplex import api
from loraplex.settings import Settings


@pytest.mark.slow
def test_minilm_o_lora_replay_stream(tmp_path):
    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "slow", "base": "minilm",
        "trainer": {"steps": 30, "eval_limit": 60, "snapshots": 1},
        "method": "o-lora", "replay": {"budget": 120, "policy": "class-balanced"},
        "experiences": [{"learn": "airline"}, {"learn": "bbc"}],
    }))
    s = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    res = api.run_stream(spec, out=tmp_path / "run", progress=False, settings=s)
    R, base = res.matrix["R"], res.matrix["base"]
    assert R[0][0] > base["airline"] + 0.25  # airline learned (the bare base is near chance)
    assert R[1][0] > base["airline"] + 0.2  # and kept after learning bbc
    assert R[1][1] >= base["bbc"] - 0.05
    assert res.metrics["backward_transfer"] > -0.15
