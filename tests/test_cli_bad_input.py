"""Every bad input named in the foundation issue, through the CLI: one clear line on stderr, a non-zero
exit code, no traceback, and the registry exactly as it was."""

import json
import shutil

import pytest

from tests.conftest import make_peft_adapter, registry_state, save_tiny


@pytest.fixture
def seeded(cli, tiny_bert, tmp_path):
    """A registry holding one adapter `good`, plus a PEFT dir to play with."""
    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "peft")
    r = cli("adapters", "register", peft_dir, "--name", "good", "--description", "airline tweets", "--base", tiny_bert)
    assert r.exit_code == 0, r.output
    return peft_dir


def _assert_clean_failure(result, home, before, match):
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output and "Traceback" not in err
    assert match.lower() in err.lower(), err
    assert registry_state(home) == before


def _register(cli, path, name="new", base=None, **extra):
    args = ["adapters", "register", path, "--name", name, "--description", "some task"]
    if base:
        args += ["--base", base]
    for k, v in extra.items():
        args += [f"--{k}", v]
    return cli(*args)


def test_path_that_does_not_exist(cli, seeded, tiny_bert, tmp_path):
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, tmp_path / "nope", base=tiny_bert), cli.home, before, "no such file")


def test_directory_without_adapter_files(cli, seeded, tiny_bert, tmp_path):
    (tmp_path / "empty").mkdir()
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, tmp_path / "empty", base=tiny_bert), cli.home, before, "adapter_config.json")
    d = tmp_path / "cfg-only"
    d.mkdir()
    shutil.copy(seeded / "adapter_config.json", d)
    _assert_clean_failure(_register(cli, d, base=tiny_bert), cli.home, before, "no adapter_model.safetensors")


def test_pickle_only_adapter(cli, seeded, tiny_bert, tmp_path):
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy(seeded / "adapter_config.json", d)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, d, base=tiny_bert), cli.home, before, "pickle")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_truncated_or_corrupt_safetensors(cli, seeded, tiny_bert, tmp_path, damage):
    d = tmp_path / damage
    shutil.copytree(seeded, d)
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 5, "header": b"\xff" * 8 + data[8:]}[damage])
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, d, base=tiny_bert), cli.home, before, "safetensors")


def test_adapter_whose_shapes_do_not_fit_the_base(cli, seeded, tmp_path):
    from transformers import BertConfig, BertModel

    other = tmp_path / "wide-bert"
    save_tiny("bert", tmp_path / "w")  # writes the vocab/tokenizer next to it
    wide = BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=90))
    wide.save_pretrained(other)
    d = make_peft_adapter(other, tmp_path / "wide-peft")
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, d, base=str(save_tiny("bert", tmp_path / "w"))), cli.home, before, "features")


def test_adapter_whose_target_modules_do_not_exist_in_the_base(cli, seeded, tiny_bert, tiny_llama, tmp_path):
    d = make_peft_adapter(tiny_llama, tmp_path / "llama-peft", targets=("q_proj", "v_proj"), causal=True)
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, d, base=str(tiny_bert)), cli.home, before, "does not exist in base")


def test_duplicate_name(cli, seeded, tiny_bert):
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, seeded, name="good", base=tiny_bert), cli.home, before, "already exists")


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "x" * 101])
def test_unsafe_names(cli, seeded, tiny_bert, name):
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, seeded, name=name, base=tiny_bert), cli.home, before, "name")


@pytest.mark.parametrize("args", [
    ("adapters", "show", "missing"),
    ("adapters", "remove", "missing"),
    ("adapters", "export", "missing", "OUT"),
    ("eval", "missing", "--task", "airline"),
])
def test_unknown_adapter_name(cli, seeded, tmp_path, args):
    before = registry_state(cli.home)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    _assert_clean_failure(cli(*args), cli.home, before, "no adapter named 'missing'")


def test_unknown_task_name(cli, seeded, tiny_bert):
    before = registry_state(cli.home)
    _assert_clean_failure(cli("train", "no-such-task", "--name", "t", "--base", tiny_bert), cli.home, before, "unknown task")
    _assert_clean_failure(cli("eval", "good", "--task", "no-such-task"), cli.home, before, "unknown task")
    _assert_clean_failure(_register(cli, seeded, base=tiny_bert, task="no-such-task"), cli.home, before, "unknown task")


def test_unknown_base_model(cli, seeded):
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, seeded, base="no-such-model"), cli.home, before, "unknown base model")


@pytest.mark.parametrize("kind", ["missing-column", "empty", "unknown-label", "no-description", "bad-json"])
def test_malformed_task_file(cli, seeded, tiny_bert, tmp_path, kind):
    f = tmp_path / "task.jsonl"
    side = tmp_path / "task.task.json"
    desc = ["--description", "classify"]
    if kind == "missing-column":
        f = tmp_path / "task.csv"
        f.write_text("text,category\nhello,a\nbye,b\n")
        match = "missing column 'label'"
    elif kind == "empty":
        f.write_text("")
        match = "no examples"
    elif kind == "unknown-label":
        f.write_text("\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in enumerate("abcab")) + "\n")
        side.write_text(json.dumps({"description": "classify", "labels": ["a", "b"]}))
        match = "not one of"
    elif kind == "no-description":
        f.write_text("\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in enumerate("abab")) + "\n")
        desc = []
        match = "no task description"
    else:
        f.write_text('{"text": "a", "label": "x"}\nnot json\n')
        match = "not a JSON object"
    before = registry_state(cli.home)
    _assert_clean_failure(cli("train", f, "--name", "t", "--base", tiny_bert, *desc), cli.home, before, match)


def test_export_refuses_to_overwrite(cli, seeded, tmp_path):
    out = tmp_path / "exp"
    assert cli("adapters", "export", "good", out).exit_code == 0
    before = registry_state(cli.home)
    _assert_clean_failure(cli("adapters", "export", "good", out), cli.home, before, "--overwrite")
    assert cli("adapters", "export", "good", out, "--overwrite").exit_code == 0


def test_empty_search_text(cli, seeded):
    before = registry_state(cli.home)
    _assert_clean_failure(cli("adapters", "search", "  "), cli.home, before, "empty")


def test_happy_path_listing_commands(cli, seeded):
    r = cli("adapters", "list", "--json")
    assert r.exit_code == 0 and [a["name"] for a in json.loads(r.stdout)] == ["good"]
    r = cli("adapters", "show", "good", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["description"] == "airline tweets"
    r = cli("adapters", "search", "airline", "-k", "3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == "good"
    r = cli("adapters", "graph", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["nodes"][0]["id"] == "adapter:good"
    r = cli("registry", "check", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    assert cli("adapters", "list").exit_code == 0
    assert cli("adapters", "remove", "good").exit_code == 0
    assert json.loads(cli("adapters", "list", "--json").stdout) == []


@pytest.mark.parametrize("args", [
    ("adapters", "register", "", "--name", "x", "--description", "d"),
    ("stream", "report", ""),
    ("stream", "run", ""),
    ("generate", "adapter", "airline tweets", "--generator", "g", "--name", "n", "--examples", ""),
    ("query", "--input", ""),
])
def test_an_empty_path_is_refused_not_read_as_the_working_directory(cli, args):
    """The CLI's Path arguments made "" the working directory: `adapters register ""` in a PEFT folder registered
    it, elsewhere the refusal named a folder the user never gave (sweep 55)."""
    before = registry_state(cli.home)
    r = cli(*args)
    _assert_clean_failure(r, cli.home, before, "a path is empty")
    assert r.exit_code == 2


@pytest.mark.parametrize("damage,match", [
    ("sparse", "its header claims 0 bytes of a 67,108,864-byte file"),
    ("appended", "where its header accounts for"),
    ("not-a-header", "its header is not a safetensors header"),
])
def test_a_safetensors_file_is_judged_by_its_header_first(cli, seeded, tiny_bert, tmp_path, monkeypatch, damage, match):
    """The whole file was read into memory before its 8-byte header was looked at: a 3 GB file of zeros took
    3.4 GB to be called corrupt (sweep 64 F4). Now the header is read first, and no bad file is read whole."""
    import json as _json
    from pathlib import Path

    d = tmp_path / damage
    shutil.copytree(seeded, d)
    f = d / "adapter_model.safetensors"
    if damage == "sparse":
        f.unlink()
        with open(f, "wb") as out:
            out.truncate(64 << 20)
    elif damage == "appended":
        f.write_bytes(f.read_bytes() + b"\x00" * 16)
    else:
        body = _json.dumps(["not", "a", "header"]).encode()
        f.write_bytes(len(body).to_bytes(8, "little") + body)
    whole = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: pytest.fail(f"{p} read whole") if p == f else whole(p))
    before = registry_state(cli.home)
    _assert_clean_failure(_register(cli, d, base=tiny_bert), cli.home, before, match)


def test_register_with_a_task_takes_its_description(cli, seeded, tmp_path):
    """`adapters register --task airline` without --description was refused ("a description is required") while
    the task has one, and `--help` showed the option as optional (sweep 68): the task's own is taken, as `train`
    takes it; with neither, the refusal says what to give."""
    from loraplex.data import load_task

    before = registry_state(cli.home)
    r = cli("adapters", "register", seeded, "--name", "nodesc")
    _assert_clean_failure(r, cli.home, before, "a description is required: it is how the adapter is found and "
                          "routed to (give a description, or a task that has one)")
    _assert_clean_failure(cli("adapters", "register", seeded, "--name", "nodesc", "--task", "airline", "--description",
                              "  "), cli.home, before, "the description is empty")  # given blank: not "not given"
    rows = "\n".join(json.dumps({"text": f"text {i}", "label": ["yes", "no"][i % 2]}) for i in range(8))
    (tmp_path / "bare.jsonl").write_text(rows + "\n")  # a task file with no description of its own
    _assert_clean_failure(cli("adapters", "register", seeded, "--name", "nodesc", "--task", tmp_path / "bare.jsonl"),
                          cli.home, before, "no task description")
    r = cli("adapters", "register", seeded, "--name", "nodesc", "--task", "airline")
    assert r.exit_code == 0, r.output
    r = cli("adapters", "show", "nodesc", "--json")
    assert json.loads(r.stdout)["description"] == load_task("airline").description
