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


@pytest.mark.parametrize("key,shown", [("null", "the key null is not a name"), ("~", "the key null is not a name"),
                                       ("1", "the key 1 is not a name")])
def test_a_key_that_is_not_text_is_named(cli, spec, tmp_path, key, shown):
    """A top-level `null:` key was refused with Python's bare "keywords must be strings" (sweep 53)."""
    spec.write_text(spec.read_text() + f"{key}: x\n")
    _check(cli, ["stream", "run", spec, "--out", tmp_path / "r"], 2, shown)
    assert not (tmp_path / "r").exists()


def test_missing_task_file(cli, spec, tmp_path, task_dir):
    _edit(spec, experiences=[{"learn": str(task_dir / "gone.jsonl")}])
    _check(cli, ["stream", "run", spec, "--out", tmp_path / "r"], 2, "gone.jsonl", "no such task file")


def test_a_task_whose_labels_the_base_reads_alike_is_refused_before_the_run_directory(cli, spec, tmp_path):
    """Labels 'good' and 'Good' (one to an uncased tokenizer) were refused at the first evaluation, after the
    run directory was made: it stayed behind, and a plain rerun was refused as 'not empty' (sweep 23)."""
    f = tmp_path / "case.jsonl"
    f.write_text("".join(json.dumps({"text": f"great flight {i}", "label": lab}) + "\n"
                         for i, lab in enumerate(["good", "Good", "bad"] * 6)))
    exps = yaml.safe_load(spec.read_text())["experiences"]
    _edit(spec, experiences=[*exps[:1], {"learn": str(f), "description": "how good a flight was"}])
    _check(cli, ["stream", "run", spec, "--out", tmp_path / "r"], 2, "labels 'Good' and 'good' read the same")
    assert not (tmp_path / "r").exists()
    _check(cli, ["stream", "run", spec], 2, "labels 'Good' and 'good' read the same")
    assert not list((cli.home / "runs").glob("stream-*")) if (cli.home / "runs").exists() else True


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


@pytest.mark.parametrize("args, said", [
    (["--set", "retain_budget=0"], "retain_budget: Input should be greater than or equal to 1"),
    (["--set", "nosuch=1"], "unknown GS-LoRA option 'nosuch'"),
    (["--set", "steps=3"], "give --steps instead"),
    # keys the command passes itself collided with it: an internal TypeError (sweep 42)
    (["--set", "seed=1"], "give --seed instead"),
    (["--set", "batch_size=4"], "give --batch-size instead"),
    (["--set", "eval-limit=3"], "give --eval-limit instead"),
    (["--set", "name=x"], "give --name instead"),
    (["--set", "progress=false"], "give --quiet instead"),
    (["--set", "task=x"], "give the TASK argument instead"),
    (["--set", "settings=x"], "unknown GS-LoRA option 'settings'"),
    (["--set", "retain_budget=abc"], "--set retain_budget must be int, got str 'abc'"),  # was `forget(): ...`
    (["--batch-size", "0"], "batch_size"),
])
def test_forget_options_are_checked_before_the_registry_is_read(cli, args, said):
    """forget's GS-LoRA options (--set, --batch-size: sweep 40) are refused before the composition is looked up."""
    _check(cli, ["forget", "airline", *args], 2, said)


def test_a_forget_refused_after_its_name_was_chosen_gives_the_name_back(cli, spec, tmp_path, monkeypatch):
    """Sweep 44: a forget refused after it had claimed its default adapter name (a task file moved away, the
    model that would not load) left the claim in the registry home (`.run-ids/forget-TASK-STAMP`) for good."""
    from loraplex.continual import request
    from loraplex.errors import UserInputError

    assert cli("stream", "run", spec, "--out", tmp_path / "r", "--quiet").exit_code == 0
    ids = cli.home / ".run-ids"
    before = sorted(p.name for p in ids.iterdir())

    def refused(*a, **k):
        raise UserInputError("the composition's task file is gone")

    monkeypatch.setattr(request, "load_adapted", refused)
    _check(cli, ["forget", "flights"], 2, "task file is gone")
    assert sorted(p.name for p in ids.iterdir()) == before


def test_report_of_a_non_run(cli, tmp_path):
    _check(cli, ["stream", "report", tmp_path], 2, "not a stream run directory")


def test_a_damaged_run_directory_is_named_not_a_crash(cli, spec, tmp_path):
    """run.json, spec.json or a unit's state.json that cannot be read back: one line naming the file (they were
    exit 70: JSONDecodeError, KeyError, TypeError...), for `stream report` and for `--resume` alike."""
    import shutil

    run = tmp_path / "r"
    assert cli("stream", "run", spec, "--out", run, "--quiet").exit_code == 0
    unit = "state/unit-000/state.json"
    state = json.loads((run / unit).read_text())
    damage = [
        ("run.json", "{not json", "run.json: not valid JSON"),
        ("run.json", "[]", "run.json: damaged: expected a JSON object, got list"),
        ("run.json", "{}", "run.json: damaged: run_id: Field required"),
        ("run.json", json.dumps({**json.loads((run / "run.json").read_text()), "tasks": 5}), "tasks: Input should be"),
        (unit, "", "state.json: not valid JSON"),
        (unit, "{}", "state.json: damaged: no 'result' object"),
        (unit, json.dumps({**state, "result": {**state["result"], "row": {"t": {"accuracy": "high"}}}}),
         "damaged at result: row.t.accuracy"),
        # values the report reads that a writer never saves (they printed inf, or ended in exit 70)
        (unit, json.dumps({**state, "result": {**state["result"], "row": {"t": {"accuracy": float("inf")}}}}),
         "damaged at result: row.t.accuracy"),
        (unit, json.dumps({**state, "result": {**state["result"], "kind": "bogus"}}), "damaged at result: kind"),
        (unit, json.dumps({**state, "result": {**state["result"], "tasks": []}}), "damaged at result: tasks"),
        (unit, json.dumps({**state, "result": {**state["result"], "step_time": "slow"}}), "damaged at result: step_time"),
        (unit, json.dumps({**state, "result": {**state["result"], "forget": "oops"}}), "damaged at result: forget"),
        (unit, json.dumps({**state, "result": {**state["result"], "forget": {"x": 1}}}), "damaged at result: forget.task"),
        (unit, json.dumps({**state, "result": {**state["result"], "unit": 2}}), "damaged at result.unit: 2"),
        ("run.json", json.dumps({**json.loads((run / "run.json").read_text()), "units_total": 2}),
         "run.json: damaged at units_total: 2, but "),
    ]
    for i, (name, text, needle) in enumerate(damage):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(run, bad)
        (bad / name).write_text(text)
        _check(cli, ["stream", "report", bad], 2, str(bad / name), needle)
        _check(cli, ["stream", "run", spec, "--resume", bad, "--quiet"], 2, needle)
    for name, needle in (("run.json", "run.json: damaged: missing while 3 unit(s) are saved"),
                         ("state/unit-000", "unit-000: damaged: missing (or without state.json) while unit-001 is saved")):
        bad = tmp_path / f"gone-{name.replace('/', '-')}"
        shutil.copytree(run, bad)
        (shutil.rmtree if (bad / name).is_dir() else (lambda p: p.unlink()))(bad / name)
        _check(cli, ["stream", "report", bad], 2, needle)
    bad = tmp_path / "banks"
    shutil.copytree(run, bad)
    last = sorted((bad / "state").glob("unit-*"))[-1]  # a resume restores the last unit's state
    (last / "banks.safetensors").write_text("junk")
    _check(cli, ["stream", "run", spec, "--resume", bad, "--quiet"], 2, f"{last.name}: the saved state cannot be restored")
    spec_bad = tmp_path / "spec"
    shutil.copytree(run, spec_bad)
    (spec_bad / "spec.json").write_text("{")
    _check(cli, ["stream", "run", spec, "--resume", spec_bad, "--quiet"], 2, "spec.json: not valid JSON")


def test_a_run_directory_in_use_is_refused(cli, spec, tmp_path):
    """`stream run --resume DIR` beside the run still going in DIR trained the same units twice."""
    import fcntl
    import os

    from loraplex.continual.spec import load_spec

    run = tmp_path / "r"
    run.mkdir()
    (run / "run_id").write_text("s-1")
    (run / "spec.json").write_text(json.dumps(load_spec(spec).canonical()))
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the first `stream run` holds it
        _check(cli, ["stream", "run", spec, "--resume", run], 2, "another process is running this stream")
    finally:
        os.close(fd)


@pytest.mark.timeout(120)  # without the check these runs would start millions of steps
def test_epochs_are_held_to_the_step_bound_per_unit_before_anything_is_written(cli, tmp_path, tiny_bert, task_dir):
    """A multitask unit learns its tasks' rows together, and replay leaves fewer new rows a step: the bound
    is checked on the steps each unit will take (it was checked per task, and refused mid-run)."""
    from loraplex.data import load_task

    n_f, n_s = (len(load_task(str(task_dir / f"{t}.jsonl")).train) for t in ("flights", "sports"))
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")]
    # multitask: each task alone fits under 10,000,000 steps at batch 4, the two together do not;
    # o-lora with replay (1 of 4 rows replayed after the first unit): sports fits at 4 new rows a step, not at 3
    for method, replay, epochs in (("multitask", False, 4e7 / (max(n_f, n_s) + min(n_f, n_s) / 2)),
                                   ("o-lora", True, 3.5e7 / n_s)):
        spec = make_spec(tmp_path / f"{method}.yaml", tiny_bert, task_dir, method=method, replay=replay, experiences=exps)
        data = yaml.safe_load(spec.read_text())
        data["trainer"].pop("steps")
        data["trainer"]["epochs"] = epochs
        spec.write_text(yaml.safe_dump(data))
        run = tmp_path / f"run-{method}"
        _check(cli, ["stream", "run", spec, "--out", run, "--quiet"], 2, "stream unit ", "more than 10,000,000")
        assert not run.exists()


def test_a_stream_says_what_train_says_of_its_tasks_data(cli, tiny_bert, task_dir, tmp_path):
    """Texts with two labels were named by `train` only; a stream trained on the same file said nothing (review)."""
    import shutil

    f = tmp_path / "flights.jsonl"
    shutil.copy(task_dir / "flights.jsonl", f)
    shutil.copy(task_dir / "flights.task.json", tmp_path / "flights.task.json")
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    labels = sorted({r["label"] for r in rows})
    rows += [{"text": "the same words", "label": labels[0]}, {"text": "the same words", "label": labels[1]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=1, replay=False, method="seq-lora",
                     experiences=[{"learn": str(f)}])
    r = cli("stream", "run", spec, "--out", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    assert "warning: task 'flights': 1 text(s) appear with more than one label (e.g. 'the same words'" in r.stderr


def test_out_inside_the_registry_storage_is_refused(cli, spec):
    """`--out HOME/blobs/x` wrote a run into the content-addressed blob store, and `--out HOME` mixed the run
    with registry.db (sweep 18 F10); HOME/runs/..., where runs go by default, stays allowed."""
    for out in (cli.home / "blobs" / "x", cli.home):
        _check(cli, ["stream", "run", spec, "--out", out, "--quiet"], 2, f"{out}: inside the registry home",
               "registry's own storage")
    assert not (cli.home / "blobs" / "x").exists()
