"""Stream spec validation: unknown keys are named, components and tasks are checked before anything runs."""

from __future__ import annotations

import pytest
import yaml

from loraplex.continual.spec import first_difference, load_spec, parse_spec
from loraplex.errors import InvalidSpec, TaskNotFound, UnknownComponent


def _spec(task_dir, **over):
    data = {
        "name": "s",
        "base": "minilm",
        "method": "o-lora",
        "experiences": [{"learn": str(task_dir / "flights.jsonl")}, {"learn": str(task_dir / "sports.jsonl")}],
    }
    data.update(over)
    return data


def test_valid_spec_resolves_paths_relative_to_the_spec(tmp_path, task_dir):
    (tmp_path / "tasks").mkdir()
    for f in task_dir.iterdir():
        (tmp_path / "tasks" / f.name).write_text(f.read_text())
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"method": {"name": "o-lora", "orth_weight": 0.2},
                                 "replay": {"share": 0.1, "policy": "reservoir"},
                                 "experiences": [{"learn": "tasks/flights.jsonl"}, {"forget": "flights"}]}))
    spec = load_spec(p)
    assert spec.experiences[0].learn == str(tmp_path / "tasks" / "flights.jsonl")
    assert spec.method.config == {"orth_weight": 0.2}
    # a path up from the spec's folder is recorded without the `..` (sweep 50: `/specs/../tasks/x.csv` in every
    # adapter's record, gone once the spec's folder was moved)
    (tmp_path / "specs").mkdir()
    up = tmp_path / "specs" / "up.yaml"
    up.write_text(yaml.safe_dump({"method": "o-lora", "experiences": [{"learn": "../tasks/flights.jsonl"}]}))
    assert load_spec(up).experiences[0].learn == str(tmp_path / "tasks" / "flights.jsonl")
    from loraplex.data import load_task

    assert load_task(str(tmp_path / "specs" / ".." / "tasks" / "flights.jsonl")).ref == str(tmp_path / "tasks" / "flights.jsonl")
    # ... as the system reads it: after a link, `..` goes up from the link's target (sweep 52: a lexical `..` read
    # another file, tmp/tasks/flights.jsonl here, for the one the user named)
    real = tmp_path / "real" / "proj"
    (real / "specs").mkdir(parents=True)
    (real / "tasks").mkdir()
    for f in task_dir.iterdir():
        (real / "tasks" / f.name).write_text(f.read_text())
    (tmp_path / "linked").symlink_to(real / "specs")
    (real / "specs" / "up.yaml").write_text(up.read_text())
    assert load_spec(tmp_path / "linked" / "up.yaml").experiences[0].learn == str(real / "tasks" / "flights.jsonl")
    canon = spec.canonical()
    assert canon["method"] == {"name": "o-lora", "orth_weight": 0.2}
    assert canon["trainer"]["lr"] == pytest.approx(2e-3)
    assert canon["forgetting"]["name"] == "gs-lora" and "sparsity_weight" in canon["forgetting"]  # defaults pinned


@pytest.mark.parametrize("over, where", [
    ({"lern": 1}, "'lern'"),
    ({"trainer": {"stepz": 3}}, "'stepz' in trainer"),
    ({"experiences": [{"lern": "airline"}]}, "'lern' in experiences[0]"),
    ({"replay": {"budget": 5, "polcy": "reservoir"}}, "'polcy' in replay"),
])
def test_unknown_keys_are_named(task_dir, over, where):
    with pytest.raises(InvalidSpec, match="unknown key " + where.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(_spec(task_dir, **over))


def test_method_config_unknown_key_is_named(task_dir):
    with pytest.raises(InvalidSpec, match="orth_wieght"):
        parse_spec(_spec(task_dir, method={"name": "o-lora", "orth_wieght": 1}))


def test_unknown_method_lists_the_known_ones(task_dir):
    with pytest.raises(UnknownComponent, match="seq-lora"):
        parse_spec(_spec(task_dir, method="ewc"))


def test_missing_task_file(task_dir):
    with pytest.raises(TaskNotFound, match="no such task file"):
        parse_spec(_spec(task_dir, experiences=[{"learn": str(task_dir / "nope.jsonl")}]))


def test_a_mistyped_embedded_name_is_named_as_a_task_not_a_file(tmp_path, task_dir):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"method": "o-lora", "experiences": [{"learn": "airlines"}]}))
    with pytest.raises(TaskNotFound, match=r"unknown task 'airlines' \(did you mean airline"):
        load_spec(p)
    (tmp_path / "airlines").write_text("")  # a file of that name beside the spec is read as the task file
    with pytest.raises(Exception, match=str(tmp_path / "airlines")):
        load_spec(p)


def test_epochs_are_held_to_the_step_bound(task_dir):
    with pytest.raises(InvalidSpec, match="trainer.epochs: Input should be less than or equal to 10000000"):
        parse_spec(_spec(task_dir, trainer={"epochs": 1e300}))
    spec = parse_spec(_spec(task_dir, trainer={"epochs": 2, "batch_size": 4}))
    with pytest.raises(InvalidSpec, match=r"trainer.epochs: 2 passes over 6,000,000 rows, 1 new rows a step, are "
                                          r"12,000,000 steps, more than 10,000,000"):
        spec.trainer.steps_for(6_000_000, 1)  # each unit's count is checked before a run starts (test_cli_errors)
    assert spec.trainer.steps_for(10, 2) == 10  # 2 passes over 10 rows, 2 new rows a step (replay filling the rest)


@pytest.mark.parametrize("exps, msg", [
    ([{"forget": "flights"}], "has not learned it"),
    ([{"learn": "F"}, {"forget": "sports"}], "has not learned it"),
    ([{"learn": "F"}, {"forget": "flights", "labels": ["meh"]}], "no label 'meh'"),
    ([{"learn": "F"}, {"forget": "flights"}, {"forget": "flights"}], "already forgotten"),
    ([{"learn": "F"}, {"learn": "F"}], "learned twice"),
    ([{"learn": "F", "forget": "x"}], "exactly one of"),
    # sweep 18 F7: an empty learn was read as the spec's own folder; a description's fault was blamed on the
    # task file; pydantic's "valid tuple" for what YAML calls a list
    ([{"learn": ""}], r"^stream spec: experiences\[0\]\.learn: empty"),
    ([{"learn": "F", "description": "d\x00e"}], r"^stream spec: experiences\[0\]\.description: the description holds "
                                                r"a control character"),
    ({"learn": "F"}, r"^stream spec: experiences: expected a list$"),
    ([{"learn": "F"}, {"forget": "flights", "labels": "good"}], r"experiences\[1\]\.labels: expected a list$"),
])
def test_bad_experiences(task_dir, exps, msg):
    fill = lambda e: {k: (str(task_dir / "flights.jsonl") if v == "F" else v) for k, v in e.items()}  # noqa: E731
    exps = [fill(e) for e in exps] if isinstance(exps, list) else fill(exps)
    with pytest.raises(InvalidSpec, match=msg):
        parse_spec(_spec(task_dir, experiences=exps))


@pytest.mark.parametrize("over, msg", [
    ({"trainer": {"steps": 3, "epochs": 1}}, "not both"),
    ({"replay": {"budget": 3, "share": 0.1}}, "exactly one"),
    ({"name": "../x"}, "name"),
    ({"experiences": []}, "experiences"),
    # a loss weight of 1e300 overflowed the loss at the first replayed batch: a stream diverged mid-run
    ({"replay": {"budget": 3, "distill": 1e300}}, "distill: Input should be less than or equal to 1000000"),
    ({"forgetting": {"name": "gs-lora", "sparsity_weight": 1e300}}, "sparsity_weight: Input should be less than or equal"),
    ({"method": {"name": "o-lora", "orth_weight": 1e300}}, "orth_weight: Input should be less than or equal"),
])
def test_bad_settings(task_dir, over, msg):
    with pytest.raises(InvalidSpec, match=msg):
        parse_spec(_spec(task_dir, **over))


def test_yaml_errors_are_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(InvalidSpec, match="not valid YAML"):
        load_spec(p)
    with pytest.raises(InvalidSpec, match="no such stream spec"):
        load_spec(tmp_path / "absent.yaml")


def test_first_difference():
    a = {"trainer": {"steps": 3, "lr": 1}, "experiences": [{"learn": "a"}]}
    assert first_difference(a, a) is None
    assert first_difference(a, {"trainer": {"steps": 4, "lr": 1}, "experiences": [{"learn": "a"}]}) == "trainer.steps"
    assert first_difference(a, {"trainer": {"steps": 3, "lr": 1}, "experiences": []}).startswith("experiences")


def test_one_file_however_spelled_is_one_task(tmp_path, task_dir):
    """`t/../t/flights.jsonl` was "another file" named like `t/flights.jsonl` (and the fix offered, a sidecar
    name, could not work: one file has one sidecar); forgetting it by that path was "not learned"; a link to
    it was learned a second time under the link's name, without a word (sweep 18 F14)."""
    t = tmp_path / "t"
    t.mkdir()
    for f in task_dir.iterdir():
        (t / f.name).write_text(f.read_text())
    (t / "alias.jsonl").symlink_to(t / "flights.jsonl")
    for second in ("t/../t/flights.jsonl", "t/alias.jsonl"):
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump({"method": "o-lora", "experiences": [{"learn": "t/flights.jsonl"}, {"learn": second, "description": "the same rows"}]}))
        with pytest.raises(InvalidSpec, match=r"experiences\[1\]: task '(flights|alias)' is learned twice"):
            load_spec(p)
    p.write_text(yaml.safe_dump({"method": "o-lora", "experiences": [{"learn": "t/flights.jsonl"},
                                                                      {"forget": "t/../t/flights.jsonl"}]}))
    assert load_spec(p).experiences[1].forget == "flights"


def test_forget_labels_are_kept_in_the_tasks_spelling_without_a_warning(task_dir):
    """Sweep 46: the labels mapped to the task's spelling were stored as a list where the spec holds a tuple:
    every stream with `forget: labels:` printed pydantic's serializer warnings."""
    import warnings

    exps = [{"learn": str(task_dir / "markets.jsonl")}, {"forget": "markets", "labels": ["up"]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = parse_spec(_spec(task_dir, experiences=exps))
        spec.canonical()
    assert spec.experiences[1].labels == ("up",)
