"""Bad input through the CLI: one clear line, a non-zero exit, nothing written to the registry."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import registry_state
from tests.continual.conftest import make_spec


def _check(cli, args, code, *needles):
    before = registry_state(cli.home)
    res = cli(*args)
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert "Traceback" not in res.output
    assert registry_state(cli.home) == before
    return err


def _edit(path, **changes):
    data = yaml.safe_load(path.read_text())
    for k, v in changes.items():
        data[k] = v
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def spec(tmp_path, tiny_bert, task_dir):
    return make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=2)


def test_unknown_key(cli, spec, tmp_path):
    _check(cli, ["stream", "run", _edit(spec, methd="o-lora"), "--out", tmp_path / "r"], 2, "unknown key 'methd'")
    assert not (tmp_path / "r").exists()


def test_missing_task_file(cli, spec, tmp_path, task_dir):
    _edit(spec, experiences=[{"learn": str(task_dir / "gone.jsonl")}])
    _check(cli, ["stream", "run", spec, "--out", tmp_path / "r"], 2, "gone.jsonl", "no such task file")


def test_unknown_method(cli, spec, tmp_path):
    _check(cli, ["stream", "run", _edit(spec, method="ewc"), "--out", tmp_path / "r"], 2, "unknown continual method 'ewc'")


def test_forget_request_for_a_task_never_learned(cli, spec, tmp_path, task_dir):
    _edit(spec, experiences=[{"learn": str(task_dir / "flights.jsonl")}, {"forget": "markets"}])
    _check(cli, ["stream", "run", spec, "--out", tmp_path / "r"], 2, "cannot forget 'markets'")


def test_resume_directory_from_another_spec(cli, spec, tmp_path, tiny_bert, task_dir):
    other = make_spec(tmp_path / "o.yaml", tiny_bert, task_dir, steps=3)
    from loraplex.continual.spec import load_spec

    run = tmp_path / "r"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps(load_spec(other).canonical()))
    _check(cli, ["stream", "run", spec, "--resume", run], 2, "different stream spec", "steps")
    _check(cli, ["stream", "run", spec, "--resume", tmp_path / "nowhere"], 2, "no such run directory")
    (tmp_path / "plain").mkdir()
    _check(cli, ["stream", "run", spec, "--resume", tmp_path / "plain"], 2, "not a stream run directory")
    _check(cli, ["stream", "run", spec, "--out", run], 2, "not empty", "--resume")


def test_forget_without_a_composition(cli):
    _check(cli, ["forget", "airline"], 2, "no composition")
    _check(cli, ["forget", "airline", "--adapters", "nope"], 2, "no adapter named 'nope'")


def test_report_of_a_non_run(cli, tmp_path):
    _check(cli, ["stream", "report", tmp_path], 2, "not a stream run directory")
