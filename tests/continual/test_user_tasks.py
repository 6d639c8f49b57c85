"""User task files in forgetting requests and streams: a label with no training rows, two tasks of one
name, a task file changed under a resumed run, a forgotten label with no test rows."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from loraplex import api
from loraplex.continual.metrics import forget_request_summary
from loraplex.continual.spec import parse_spec
from loraplex.data import load_task
from loraplex.errors import InvalidSpec, LoraplexError, UserInputError
from loraplex.settings import Settings
from tests.conftest import make_peft_adapter, registry_state
from tests.continual.conftest import make_spec


def _declared(root, name="dec", n=30):
    """A task file whose sidecar declares a label ('unused') that no row has."""
    rows = [{"text": f"text number {i} {'fine' if i % 2 else 'poor'}", "label": "good" if i % 2 else "bad"}
            for i in range(n)]
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{name}.task.json").write_text(json.dumps({"description": "graded opinions",
                                                        "labels": ["bad", "good", "unused"]}))
    return path


def _spec_data(exps, **trainer):
    return {"base": "minilm", "method": "o-lora", "trainer": {"steps": 2, **trainer}, "experiences": exps}


def _register(cli, src, name, task, base):
    res = cli("adapters", "register", src, "--name", name, "--task", task, "--base", base, "--description", "x")
    assert res.exit_code == 0, res.output


def _one_line_error(res, code=2):
    err = res.stderr.strip()
    assert res.exit_code == code, res.output
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in res.output
    return err


# ---- 3: a label with no training row is refused before anything trains ------------------------


def test_spec_refuses_to_forget_a_label_without_training_rows(tmp_path, task_dir, cli, tiny_bert):
    f = _declared(tmp_path)
    assert "unused" in load_task(str(f)).labels
    exps = [{"learn": str(f)}, {"learn": str(task_dir / "flights.jsonl")}, {"forget": "dec", "labels": ["unused"]}]
    with pytest.raises(InvalidSpec, match=r"experiences\[2\]: cannot forget label 'unused' of task 'dec': its "
                                          r"training split has no row with that label$"):
        parse_spec(_spec_data(exps), root=tmp_path)
    # the rows a stream forgets are the first train_limit training rows: a label past them is refused too
    markets = load_task(str(task_dir / "markets.jsonl"))
    other = next(lab for lab in markets.labels if lab != markets.train[0].label)
    exps = [{"learn": str(task_dir / "markets.jsonl")}, {"forget": "markets", "labels": [other]}]
    with pytest.raises(InvalidSpec, match=rf"cannot forget label '{other}' of task 'markets': its first 1 training "
                                          r"rows \(trainer.train_limit\) have no row with that label"):
        parse_spec(_spec_data(exps, train_limit=1), root=tmp_path)
    parse_spec(_spec_data(exps), root=tmp_path)  # without the limit it has rows
    # through the CLI: one line, exit 2, no unit trained, nothing registered
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=2, replay=False, experiences=[
        {"learn": str(task_dir / "flights.jsonl")}, {"learn": str(f)}, {"forget": "dec", "labels": ["unused"]}])
    before = registry_state(cli.home)
    err = _one_line_error(cli("stream", "run", spec, "--out", tmp_path / "run", "--quiet"))
    assert "cannot forget label 'unused' of task 'dec'" in err
    assert registry_state(cli.home) == before and not (tmp_path / "run" / "state").exists()


def test_forget_request_refuses_a_label_without_training_rows(tmp_path, cli, tiny_bert):
    f = _declared(tmp_path)
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    _register(cli, src, "d", f, tiny_bert)
    before = registry_state(cli.home)
    err = _one_line_error(cli("forget", "dec", "--labels", "unused", "--adapters", "d", "--base", tiny_bert,
                              "--steps", "2", "--quiet"))
    assert err == ("error: cannot forget label 'unused' of task 'dec': its training split has no row with that "
                   "label"), err
    assert registry_state(cli.home) == before


def test_gs_lora_with_no_rows_to_forget_is_a_loraplex_error():
    from loraplex.continual.forgetting import FORGETTERS, forget_request

    task = type("T", (), {"name": "dec"})()
    with pytest.raises(LoraplexError, match="no training rows to forget"):
        forget_request(model=None, tokenizer=None, head=None, fingerprint=None,
                       forgetter=FORGETTERS.build("gs-lora", {}),
                       task=task, labels=["unused"], forget_rows=[], retained=[], tasks={}, trainer=None, seed=0,
                       run_dir=None, device="cpu")


# ---- 4: two tasks of one name ---------------------------------------------------------------------


def _reviews(tmp_path, task_dir):
    paths = []
    for v, src in (("v1", "flights"), ("v2", "markets")):
        d = tmp_path / v
        d.mkdir()
        shutil.copy(task_dir / f"{src}.jsonl", d / "reviews.jsonl")
        (d / "reviews.task.json").write_text(json.dumps({"description": f"reviews {v}"}))
        paths.append(d / "reviews.jsonl")
    return paths


def test_forget_refuses_two_tasks_of_one_name(tmp_path, task_dir, cli, tiny_bert):
    v1, v2 = _reviews(tmp_path, task_dir)
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    for name, f in (("rev-v1", v1), ("rev-v2", v2)):
        _register(cli, src, name, f, tiny_bert)
    before = registry_state(cli.home)
    for extra in ((), ("--labels", "good")):
        err = _one_line_error(cli("forget", "reviews", *extra, "--adapters", "rev-v1,rev-v2", "--base", tiny_bert,
                                  "--steps", "2", "--quiet"))
        assert err == (f"error: two tasks of the composition are named 'reviews': {v1}, {v2}; forget needs one "
                       "task per name"), err
    assert registry_state(cli.home) == before


def test_stream_names_both_files_of_one_task_name(tmp_path, task_dir):
    v1, v2 = _reviews(tmp_path, task_dir)
    with pytest.raises(InvalidSpec, match=rf"experiences\[0\] \({v1}\) and experiences\[2\] \({v2}\) are both named "
                                          "'reviews'"):
        parse_spec(_spec_data([{"learn": str(v1)}, {"learn": str(task_dir / "sports.jsonl")}, {"learn": str(v2)}]))
    with pytest.raises(InvalidSpec, match=r"experiences\[1\]: task 'reviews' is learned twice"):  # one file twice
        parse_spec(_spec_data([{"learn": str(v1)}, {"learn": str(v1)}]))


# ---- 10: a resume after a task file changed --------------------------------------------------------


def test_resume_refuses_a_changed_task_file(tmp_path, tiny_bert, task_dir):
    f = tmp_path / "tasks" / "flights.jsonl"
    f.parent.mkdir()
    shutil.copy(task_dir / "flights.jsonl", f)
    shutil.copy(task_dir / "flights.task.json", f.parent / "flights.task.json")
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=2, replay=False, experiences=[{"learn": str(f)}])
    s = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    run = tmp_path / "run"
    api.run_stream(spec, out=run, progress=False, settings=s)
    info = json.loads((run / "run.json").read_text())
    assert set(info["task_fingerprints"]) == {str(f)}
    original = f.read_text()
    f.write_text(original.replace('"good"}', '"bad"}', 1))  # one row's label changed
    with pytest.raises(UserInputError, match=rf"^{run}: task file {f} changed since this run started \(its rows or "
                                             r"labels differ\); restore it, or start a new run$"):
        api.run_stream(spec, resume=run, progress=False, settings=s)
    f.write_text(original)
    assert api.run_stream(spec, resume=run, progress=False, settings=s).resumed_from == 1
    # its sidecar's description changed: a causal LM's prompt says it (sweep 50: resumed on the new one)
    side = f.parent / "flights.task.json"
    card = json.loads(side.read_text())
    side.write_text(json.dumps({**card, "description": "Something else entirely."}))
    with pytest.raises(UserInputError, match=rf"^{run}: task file {f}: its description changed since this run started"):
        api.run_stream(spec, resume=run, progress=False, settings=s)
    side.write_text(json.dumps(card))
    # a run directory written before fingerprints were kept still resumes
    del info["task_fingerprints"]
    (run / "run.json").write_text(json.dumps(info))
    assert api.run_stream(spec, resume=run, progress=False, settings=s).resumed_from == 1


# ---- 12: a forgotten label with no test row ---------------------------------------------------------


def test_forget_summary_without_forgotten_rows_says_it_measured_nothing():
    cell = {"accuracy": 0.8, "n": 5, "labels": {"a": [3, 4], "b": [1, 1]}}
    s = forget_request_summary({"t": cell}, {"t": cell}, "t", ["c"], [], 3)
    assert s["forgot"] is None and s["forgotten_before"] is None
    assert s["warning"] == "no test row has label 'c' (of the 5 evaluated): the forgetting was not measured"
    empty = {"t": {"accuracy": None, "n": 0, "labels": {}}}
    whole = forget_request_summary(empty, empty, "t", None, [], 3, split="validation")
    assert whole["forgot"] is None
    assert whole["warning"] == "task 't' has no validation row: the forgetting was not measured"


def test_forget_of_a_label_with_no_test_row_warns(tmp_path, task_dir, cli, tiny_bert):
    f = task_dir / "flights.jsonl"
    flights = load_task(str(f))
    first = flights.test[0].label  # --eval-limit 1: the one evaluated row has this label
    other = next(lab for lab in flights.labels if lab != first)
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    _register(cli, src, "m", f, tiny_bert)
    res = cli("forget", "flights", "--labels", other, "--adapters", "m", "--base", tiny_bert, "--steps", "2",
              "--eval-limit", "1", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["forgot"] is None and got["forgotten_before"] is None and got["forgotten_after"] is None
    want = f"no test row has label '{other}' (of the 1 evaluated): the forgetting was not measured"
    assert got["warning"] == want and f"warning: {want}" in res.stderr


def test_forget_finds_a_task_file_by_a_relative_path_and_quotes_labels(tmp_path, task_dir, cli, tiny_bert, monkeypatch):
    """`forget ./v1/reviews.jsonl` said the composition never learned it (only the absolute path or the name
    worked), and an unknown label's message joined the labels unquoted, so "meh, ok" read as two."""
    v1, _ = _reviews(tmp_path, task_dir)
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    _register(cli, src, "rev-v1", v1, tiny_bert)
    monkeypatch.chdir(v1.parent)
    before = registry_state(cli.home)
    err = _one_line_error(cli("forget", f"./{v1.name}", "--labels", "nope", "--adapters", "rev-v1", "--base", tiny_bert,
                              "--steps", "2", "--quiet"))
    assert err.startswith("error: task 'reviews' has no label 'nope' (labels: '"), err
    assert registry_state(cli.home) == before


def test_forgetting_the_only_learned_task_warns_that_nothing_was_retained(tmp_path, task_dir, cli, tiny_bert):
    """GS-LoRA's retention loss had no data when the composition learned only the task it erases; the
    request said only `retained - -> -` and registered the result without a word."""
    f = task_dir / "flights.jsonl"
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    _register(cli, src, "m", f, tiny_bert)
    res = cli("forget", "flights", "--adapters", "m", "--base", tiny_bert, "--steps", "2", "--eval-limit", "4",
              "--quiet", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert "nothing was retained: the composition learned only flights" in got["warning"], got["warning"]
    assert "warning: " in res.stderr and "remove its adapters instead" in res.stderr
    # `adapters list` put the erased rows' accuracy (low is success) in the accuracy column
    listed = {r["name"]: r for r in json.loads(cli("adapters", "list", "--json").stdout)}
    erased = listed[got["name"]]
    assert erased["accuracy"] is None and erased["forgotten_accuracy"] == got["forgotten_after"], erased
    assert "forgotten_accuracy" not in listed["m"]
    # exporting it alone said nothing of what it is (sweep 15)
    ex = cli("adapters", "export", got["name"], str(tmp_path / "exported"))
    assert ex.exit_code == 0 and f"warning: '{got['name']}' is a forgetting adapter" in ex.stderr
    assert "load it on top of those adapters, not alone" in ex.stderr and "m;" in ex.stderr
    # a labels request keeps the task's other labels: something was retained, no such warning
    keep = load_task(str(f)).labels[0]
    res = cli("forget", "flights", "--labels", keep, "--adapters", "m", "--base", tiny_bert, "--steps", "2",
              "--eval-limit", "4", "--quiet", "--json", "--name", "part")
    assert res.exit_code == 0, res.output
    assert "nothing was retained" not in (json.loads(res.stdout)["warning"] or "")


def test_a_spec_base_directory_is_read_beside_the_spec_and_a_resume_sees_its_weights_replaced(tmp_path, tiny_bert,
                                                                                                task_dir, monkeypatch):
    """`base: ../models/tiny` was read relative to the current directory (its task files relative to the spec),
    so the spec ran from its own folder only (sweep 18 F8). A resumed run compared the base's fingerprint,
    which reads the config only: weights replaced in the directory passed and the run went on on other
    weights (F9), or a tokenizer (F16); the run now keeps a digest of each of the base's files."""
    from loraplex.continual import stream
    from loraplex.continual.spec import load_spec
    from loraplex.errors import IncompatibleAdapter, Interrupted

    models = tmp_path / "models"
    shutil.copytree(tiny_bert, models / "tiny")
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = make_spec(specs / "s.yaml", tiny_bert, task_dir, steps=2, replay=False,
                     experiences=[{"learn": str(task_dir / "flights.jsonl")}, {"learn": str(task_dir / "sports.jsonl")}])
    spec.write_text(spec.read_text().replace(f"base: {tiny_bert}", "base: ../models/tiny"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_spec(spec).base == str(models / "tiny")
    s = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    run = tmp_path / "run"
    real = stream._StreamRun._register  # stopped once the first unit is saved
    monkeypatch.setattr(stream._StreamRun, "_register", lambda self, i: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(Interrupted):
        api.run_stream(spec, out=run, progress=False, settings=s)
    monkeypatch.setattr(stream._StreamRun, "_register", real)
    info = json.loads((run / "run.json").read_text())
    assert info["base_name"] == str(models / "tiny") and {"model.safetensors", "config.json"} <= set(info["base_files"])
    w = models / "tiny" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data)  # rewritten with the same bytes (a new time): still the same base
    cfg = models / "tiny" / "config.json"
    cfg.write_text(cfg.read_text())
    stat = w.stat()
    w.write_bytes(data[:-8] + bytes(b ^ 1 for b in data[-8:]))  # other weights of the same size
    os.utime(w, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and its time kept (sweep 18 F16)
    with pytest.raises(IncompatibleAdapter, match=rf"^{run}: base {models / 'tiny'} changed since this run started "
                                                  r"\(model.safetensors changed\); restore it, or start a new run$"):
        api.run_stream(spec, resume=run, progress=False, settings=s)
    w.write_bytes(data)
    (models / "tiny" / "added_tokens.json").write_text("{}")
    with pytest.raises(IncompatibleAdapter, match=r"\(added_tokens.json is new\)"):
        api.run_stream(spec, resume=run, progress=False, settings=s)
    (models / "tiny" / "added_tokens.json").unlink()
    (models / "tiny" / "README.md").write_text("notes")  # not what the model is loaded from
    old = json.loads((run / "spec.json").read_text())  # as a run started before base: was read beside the spec
    old["base"] = "../models/tiny"  # (relative to the directory it was started from: here)
    (run / "spec.json").write_text(json.dumps(old))
    assert api.run_stream(spec, resume=run, progress=False, settings=s).resumed_from == 1
