"""Issue #11, through the CLI: every input below was accepted (or crashed with exit 70, or printed a usage
box, or a pydantic URL). Each must now be refused with one `error:` line naming the problem, a non-zero
exit, no traceback, and the registry exactly as it was (its fingerprint compared before and after)."""

import json
import shutil
import sqlite3

import pytest

from tests.conftest import registry_state
from tests.test_cli_bad_input import _assert_clean_failure, _register, seeded  # noqa: F401  (fixture)

CFG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _refused(result, home, before, match, code=2):
    _assert_clean_failure(result, home, before, match)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "pydantic.dev" not in result.stderr and "internal error" not in result.stderr


def _with_config(src, dst, text_or_update):
    shutil.copytree(src, dst)
    if isinstance(text_or_update, str):
        (dst / CFG).write_text(text_or_update)
    else:
        cfg = json.loads((src / CFG).read_text())
        cfg.update(text_or_update)
        (dst / CFG).write_text(json.dumps(cfg))
    return dst


# ---- LoRA settings: every message names the field and the rule --------------------------------------

BAD_SETTINGS = [
    ({"r": 0}, "r: input should be greater than or equal to 1"),
    ({"r": -4}, "r: input should be greater than or equal to 1"),
    ({"r": 1000000}, "r: input should be less than or equal to 4096"),
    ({"r": 4.7}, "r: input should be a valid integer"),
    ({"r": "4"}, "r: input should be a valid integer"),
    ({"lora_alpha": -8}, "lora_alpha: input should be greater than 0"),
    ({"lora_alpha": float("nan")}, "lora_alpha: input should be a finite number"),
    ({"lora_alpha": "inf"}, "lora_alpha: input should be a valid number"),
    ({"lora_alpha": "@1e309"}, "lora_alpha: input should be a finite number"),
    ({"lora_dropout": 1.5}, "lora_dropout: input should be less than 1"),
    ({"use_rslora": "false"}, "use_rslora: input should be a valid boolean"),
    ({"alpha_pattern": {"query": -2}}, "alpha_pattern.query: input should be greater than 0"),
    ({"alpha_pattern": {"(query": 2}}, "alpha_pattern: key '(query' is not a valid regular expression"),
    ({"rank_pattern": {"[q": 4}}, "rank_pattern: key '[q' is not a valid regular expression"),
    ({"rank_pattern": {"query": 4.5}}, "rank_pattern.query: input should be a valid integer"),
    ({"rank_pattern": ["query"]}, "rank_pattern: expected an object"),
    # PEFT reads an unset target_modules as its default list for the model type and drops the other tensors (sweep 53)
    ({"target_modules": None}, "target_modules: not set; PEFT would then adapt its default modules"),
]


@pytest.mark.parametrize("update,match", BAD_SETTINGS, ids=[f"{k}={v!r}"[:40] for (u, _) in BAD_SETTINGS for k, v in u.items()])
def test_bad_lora_settings(cli, seeded, tiny_bert, tmp_path, update, match):
    text = json.dumps({**json.loads((seeded / CFG).read_text()), **update})
    text = text.replace('"@1e309"', "1e309")  # a literal JSON number that overflows to inf
    d = _with_config(seeded, tmp_path / "bad", text)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, match)


UNSUPPORTED = [
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights: 'pissa'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights: 'olora'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights: 'loftq'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights: 'corda'"),
    ({"init_lora_weights": "eva"}, "init_lora_weights: 'eva'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"use_qalora": True}, "use_qalora"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"exclude_modules": ["key"]}, "exclude_modules"),
    ({"target_modules": {"query": 1}}, "target_modules: expected a list"),
    ({"target_modules": ["query", "value", "no_such_layer"]}, "target_modules: 'no_such_layer' matches no module"),
    ({"target_modules": "(query"}, "target_modules: '(query' is not a valid regular expression"),
    # settings of newer PEFT variants that loraplex does not know: refused by name, not dropped (sweep 5)
    ({"alora_invocation_tokens": [1, 2, 3]}, "alora_invocation_tokens: a PEFT setting loraplex does not implement"),
    ({"kasa_config": {"k": 1}}, "kasa_config: a PEFT setting loraplex does not implement"),
    ({"megatron_config": {"x": 1}}, "megatron_config: a PEFT setting"),
    ({"some_future_variant": True}, "some_future_variant: a PEFT setting"),
    ({"some_future_count": 0}, "some_future_count: a PEFT setting"),  # 0 is a value (it read as false)
    # tensors for modules target_modules does not select: PEFT leaves them unloaded (sweep 12)
    ({"target_modules": ["query"]}, "target_modules ['query'] does not select "),
    ({"target_modules": ".*query"}, "target_modules '.*query' does not select "),
    ({"target_modules": []}, "target_modules [] does not select "),
    ({"lora_bias": True}, "lora_bias: a bias on LoRA's B matrix"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out: expected true or false"),
    ({"layers_to_transform": "zero"}, "layers_to_transform: expected a layer index"),
    ({"layers_to_transform": [0, -1]}, "layers_to_transform: expected layer indices"),
    ({"layers_to_transform": True}, "layers_to_transform: expected layer indices"),
    ({"layers_to_transform": [0]}, "layers_to_transform [0] does not include 'encoder.layer.1."),
    ({"layers_to_transform": 1, "layers_pattern": "layer"}, "layers_to_transform 1 does not include 'encoder.layer.0."),
    ({"layers_to_transform": [0, 1], "layers_pattern": "(layer"}, "layers_pattern: '(layer' is not a valid regular"),
    # a regex names no layer: PEFT refuses layers_pattern with one and ignores layers_to_transform (sweep 64 F2)
    ({"target_modules": r".*\.(query|value)", "layers_to_transform": [0]},
     "layers_to_transform: cannot be used with a regular-expression target_modules"),
    ({"target_modules": r".*\.(query|value)", "layers_pattern": "layer"},
     "layers_pattern: cannot be used with a regular-expression target_modules"),
    ({"layers_pattern": "layer"}, "layers_pattern: 'layer' is set without layers_to_transform"),
    # sweep 64 F6, F7: `false` is not PEFT's word for no bias; a base named by a number is no name (the server's
    # load endpoint registered it)
    ({"bias": False}, 'bias: expected one of PEFT\'s "none", "all", "lora_only", got False'),
    # sweep 66: a pattern `re` compiles and `regex` reads otherwise; a layers_pattern with its own group
    ({"rank_pattern": {"[[:foo:]]": 4}}, "rank_pattern: key '[[:foo:]]' is not a valid regular expression"),
    ({"layers_to_transform": [0], "layers_pattern": "(layer|layers)"}, "layers_to_transform [0] does not include 'encoder.layer.1."),
    ({"base_model_name_or_path": 42}, "base_model_name_or_path: expected a model name or directory (a string), got 42"),
]


@pytest.mark.parametrize("update,match", UNSUPPORTED, ids=[m[:30] for _, m in UNSUPPORTED])
def test_unsupported_peft_features_are_refused_by_name(cli, seeded, tiny_bert, tmp_path, update, match):
    d = _with_config(seeded, tmp_path / "bad", update)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, match)


@pytest.mark.parametrize("update", [{"target_modules": r".*\.(query|value)"}, {"layers_to_transform": [0, 1]},
                                    {"layers_to_transform": [1, 0], "layers_pattern": ["h", "layer"]},
                                    # a pattern at the start of the module's name, as PEFT matches it
                                    {"layers_to_transform": [0, 1], "layers_pattern": "encoder.layer"}])
def test_targets_and_layers_that_select_every_adapted_module_pass(cli, seeded, tiny_bert, tmp_path, update):
    d = _with_config(seeded, tmp_path / "ok", update)
    r = _register(cli, d, name="ok", base=tiny_bert)
    assert r.exit_code == 0, r.output


def test_a_number_past_the_digit_limit_is_one_line(cli, seeded, tiny_bert, tmp_path):
    text = json.dumps({**json.loads((seeded / CFG).read_text()), "r": "@big"}).replace('"@big"', "8" * 5001)
    d = _with_config(seeded, tmp_path / "bad", text)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "not valid JSON here (a number with more than 4,300 digits)")


def test_peft_defaults_of_unknown_settings_pass(cli, seeded, tiny_bert, tmp_path):
    """What peft's own LoraConfig saves (every field at its default) registers: an unknown key holding nothing passes."""
    d = _with_config(seeded, tmp_path / "ok", {"kasa_config": None, "use_bdlora": None, "arrow_config": None,
                                                "megatron_core": "megatron.core", "qalora_group_size": 16,
                                                "runtime_config": {"ephemeral_gpu_offload": False}, "future": {}})
    r = _register(cli, d, name="ok", base=tiny_bert)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("dup", ["adapter-name", "prefix"])
def test_a_tensor_given_twice_is_refused(cli, seeded, tiny_bert, tmp_path, dup):
    """Two tensors for one module's lora_A (with and without peft's adapter name, or its `base_model.model.`
    prefix): one used to be dropped without a word, which one depending on the file's order."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / dup
    shutil.copytree(seeded, d)
    sd = load_file(str(d / WEIGHTS))
    key = sorted(k for k in sd if "lora_A" in k)[0]
    twin = key.replace(".weight", ".default.weight") if dup == "adapter-name" else key.removeprefix("base_model.model.")
    assert twin != key
    sd[twin] = sd[key] + 1
    save_file(sd, str(d / WEIGHTS))
    before = registry_state(cli.home)
    match = "has two lora_A tensors" if dup == "adapter-name" else "is stored twice"
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, match)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_plain_inits_are_accepted(cli, seeded, tiny_bert, tmp_path, init):
    d = _with_config(seeded, tmp_path / "ok", {"init_lora_weights": init})
    r = _register(cli, d, name="ok", base=tiny_bert)
    assert r.exit_code == 0, r.output


# ---- weights -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage,match", [
    ("nan", "contains NaN"), ("inf", "contains Inf"), ("huge", "above the 1e+06 limit"),
    ("int8", "dtype int8"), ("bool", "dtype bool"),
    # each value a legal float16, their product over the rank ~1e10: the forward was NaN (sweep 64 F3)
    ("fp16-overflow", "(scaling x lora_B @ lora_A) reaches magnitude"),
])
def test_bad_weights(cli, seeded, tiny_bert, tmp_path, damage, match):
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / damage
    shutil.copytree(seeded, d)
    sd = load_file(str(d / WEIGHTS))
    key = sorted(k for k in sd if "lora_A" in k)[0]
    if damage == "nan":
        sd[key][0, 0] = float("nan")
    elif damage == "inf":
        sd[key][0, 0] = float("inf")
    elif damage == "huge":
        sd = {k: v * 1e30 for k, v in sd.items()}
    elif damage == "fp16-overflow":
        sd = {k: torch.full_like(v, 60000.0).half() for k, v in sd.items()}
    else:
        sd = {k: (v * 10).to(getattr(torch, damage)) for k, v in sd.items()}
    save_file(sd, str(d / WEIGHTS))
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, match)


# ---- eval, --home, task files ------------------------------------------------------------------------

@pytest.mark.parametrize("limit", ["0", "-3"])
def test_eval_limit_below_one(cli, seeded, limit):
    before = registry_state(cli.home)
    _refused(cli("eval", "good", "--task", "airline", "--limit", limit), cli.home, before, "--limit must be at least 1")


@pytest.mark.parametrize("args", [("adapters", "list"), ("adapters", "search", "x"), ("registry", "check")])
def test_home_that_is_not_a_directory(cli, seeded, args):
    before = registry_state(cli.home)
    _refused(cli(*args, "--home", "/dev/null"), cli.home, before, "registry home /dev/null is not a directory")
    # a home below a file can never be made: it read as an empty, consistent registry, exit 0 (sweep 24)
    _refused(cli(*args, "--home", "/dev/null/sub/reg"), cli.home, before,
             "registry home /dev/null/sub/reg cannot be made: /dev/null is not a directory")


def _rows(labels):
    return "\n".join(json.dumps({"text": f"text {i}", "label": lab}) for i, lab in enumerate(labels)) + "\n"


@pytest.mark.parametrize("kind,match", [
    ("repeated-labels", "lists 'a' more than once"),
    ("list-label", "'label' must be a string, not a list"),
    ("object-label", "'label' must be a string, not a dict"),
    ("list-in-labels", "'labels' must be a non-empty list of strings"),
    ("nested-sidecar", "nested too deeply"),
    ("huge-sidecar", "at most 1,048,576 are allowed"),
])
def test_bad_task_files(cli, seeded, tiny_bert, tmp_path, kind, match):
    f, side = tmp_path / "t.jsonl", tmp_path / "t.task.json"
    f.write_text(_rows("abab" * 3))
    meta = {"description": "classify", "labels": ["a", "b"]}
    if kind == "repeated-labels":
        meta["labels"] = ["a", "b", "a"]
    elif kind == "list-label":
        f.write_text(_rows("abab") + json.dumps({"text": "x", "label": ["a"]}) + "\n")
    elif kind == "object-label":
        f.write_text(_rows("abab") + json.dumps({"text": "x", "label": {"a": 1}}) + "\n")
    elif kind == "list-in-labels":
        meta["labels"] = [["a"], "b"]
    side.write_text(json.dumps(meta))
    if kind == "nested-sidecar":
        side.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "huge-sidecar":
        side.write_text(json.dumps({**meta, "pad": "x" * (2 << 20)}))
    before = registry_state(cli.home)
    _refused(cli("train", f, "--name", "t", "--base", tiny_bert), cli.home, before, match)


def test_csv_field_longer_than_csv_default_limit_is_read(cli, seeded, tiny_bert, tmp_path):
    f = tmp_path / "long.csv"
    f.write_text("text,label\n" + "w " * 70_000 + ",a\nshort,a\n")  # one field of 140,000 characters
    before = registry_state(cli.home)
    # read fine (no csv.Error / exit 70): refused for its content, one label only
    _refused(cli("train", f, "--name", "t", "--base", tiny_bert, "--description", "x"), cli.home, before,
             "at least two labels")


# ---- inputs that crashed with exit 70 ----------------------------------------------------------------

def test_base_config_that_is_a_json_list(cli, seeded, tmp_path):
    base = tmp_path / "listbase"
    base.mkdir()
    (base / "config.json").write_text("[1, 2, 3]")
    before = registry_state(cli.home)
    _refused(_register(cli, seeded, base=str(base)), cli.home, before, "expected a JSON object")


def test_adapter_config_nested_100000_deep(cli, seeded, tiny_bert, tmp_path):
    d = _with_config(seeded, tmp_path / "deep", "[" * 100_000 + "]" * 100_000)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "nested too deeply")


def test_adapter_config_too_large(cli, seeded, tiny_bert, tmp_path):
    cfg = json.loads((seeded / CFG).read_text())
    d = _with_config(seeded, tmp_path / "big", json.dumps({**cfg, "pad": "x" * (2 << 20)}))
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "at most 1,048,576")


def test_undecodable_byte_in_description(cli, seeded, tiny_bert):
    before = registry_state(cli.home)
    r = cli("adapters", "register", seeded, "--name", "new", "--description", "caf\udcff tweets", "--base", tiny_bert)
    _refused(r, cli.home, before, "not valid UTF-8")


# ---- resources ---------------------------------------------------------------------------------------

def test_train_devices_beyond_the_machine(cli, seeded, tiny_bert):
    before = registry_state(cli.home)
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, "--devices", "99"), cli.home, before,
             "99 devices asked for")
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, "--devices", "0"), cli.home, before,
             "devices: must be at least 1")


def test_devices_minus_one_without_a_gpu(cli, seeded, tiny_bert):
    """-1 (Lightning's "every GPU") went through to Lightning's CPU accelerator, which refuses it: exit 70."""
    from loraplex.settings import check_devices

    before = registry_state(cli.home)
    if _has_cuda():
        import torch

        assert check_devices(-1, "auto") == torch.cuda.device_count()
        return
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, "--devices", "-1"), cli.home, before,
             "devices: -1 asks for every GPU, and this machine has none")


def _spec(tmp_path, trainer, extra=""):
    p = tmp_path / "s.yaml"
    p.write_text(extra + json.dumps({"name": "s", "method": "seq-lora", "trainer": trainer,
                                     "experiences": [{"learn": "airline"}]}) + "\n")
    return p


def test_stream_devices_beyond_the_machine(cli, seeded, tmp_path):
    before = registry_state(cli.home)
    spec = _spec(tmp_path, {"devices": 64, "strategy": "ddp"})
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, "trainer: devices: 64 devices asked for")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("option, value, match", [
    ("--strategy", "bogus", "strategy: unknown Lightning strategy 'bogus'"),
    ("--precision", "8-bit", "precision: Input should be '32-true'"),
    # accepted names that Lightning cannot run here: were exit 70 after the bare base's evaluation
    pytest.param("--strategy", "fsdp", "Lightning cannot run accelerator='auto', strategy='fsdp'",
                 marks=pytest.mark.skipif(_has_cuda(), reason="fsdp runs where there is a GPU")),
    ("--precision", "transformer-engine", "Lightning cannot run accelerator='auto', strategy='auto', precision='transformer-engine'"),
    # Lightning replaced it with bf16-mixed on a CPU (a warning with a file path, then trained in another precision)
    pytest.param("--precision", "16-mixed", "Lightning cannot run precision='16-mixed' on this machine's CPUAccelerator: "
                 "it would train in 'bf16-mixed' instead", marks=pytest.mark.skipif(_has_cuda(), reason="a GPU runs it")),
])
def test_unknown_lightning_settings(cli, seeded, tiny_bert, tmp_path, option, value, match):
    """Were exit 70 from inside Lightning's Trainer; now refused before any run directory exists."""
    before = registry_state(cli.home)
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, option, value), cli.home, before, match)
    _refused(cli("router", "fit", "r", "--router", "token-gate", option, value), cli.home, before, match)
    spec = _spec(tmp_path, {option[2:]: value})
    where = "trainer: " if match.startswith("Lightning") else "trainer."
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, f"{where}{match}")
    assert not (cli.home / "runs").exists() or not any((cli.home / "runs").iterdir())


def test_numbers_with_underscores_are_refused_as_set_refuses_them(cli, seeded, tiny_bert):
    """`--steps 1_0` trained 10 steps and `--lr 1_0` used 10.0, where `--set top_k=1_0` is refused as a typo read
    as a value (sweep 35): one rule for every number."""
    before = registry_state(cli.home)
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, "--steps", "1_0"), cli.home, before,
             "Invalid value for '--steps': '1_0' is not a number as written")
    _refused(cli("router", "fit", "r", "--router", "token-gate", "--lr", "1_0"), cli.home, before,
             "Invalid value for '--lr': '1_0' is not a number as written")
    _refused(cli("query", "1_0", "--batch-size", "3_2"), cli.home, before, "'3_2' is not a number as written")


def test_lightning_settings_follow_lightning():
    """The precisions loraplex accepts are Lightning's, and its older spellings read as Lightning reads them."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    from loraplex.training import LightningSettings

    ours = typing.get_args(LightningSettings.model_fields["precision"].annotation)
    assert set(ours) == set(typing.get_args(_PRECISION_INPUT_STR))
    assert LightningSettings(precision=64).precision == "64-true"  # (16 reads as 16-mixed, refused on a CPU)
    if _has_cuda():
        assert LightningSettings(precision=16).precision == "16-mixed"
    assert LightningSettings(precision="bf16").precision == "bf16-mixed"
    assert LightningSettings(strategy="ddp_find_unused_parameters_true").strategy == "ddp_find_unused_parameters_true"


def test_stream_spec_with_a_20mb_comment(cli, seeded, tmp_path):
    before = registry_state(cli.home)
    spec = _spec(tmp_path, {"steps": 1}, extra="#" + "x" * (20 << 20) + "\n")
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, "at most 1,048,576")


# ---- a full disk -------------------------------------------------------------------------------------

def test_disk_full_while_writing_a_blob(cli, seeded, tiny_bert, tmp_path, monkeypatch):
    import errno

    import loraplex.registry.store as store

    d = _with_config(seeded, tmp_path / "other", {"lora_alpha": 12})  # new weights' blob is the same; force a new one
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / WEIGHTS))
    save_file({k: v * 2 for k, v in sd.items()}, str(d / WEIGHTS))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "atomic_file", full)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "the disk is full", code=1)


@pytest.mark.parametrize("message", ["database or disk is full"])
def test_disk_full_in_the_database(cli, seeded, tiny_bert, tmp_path, monkeypatch, message):
    from contextlib import contextmanager

    from safetensors.torch import load_file, save_file

    import loraplex.registry.store as store

    d = tmp_path / "other"
    shutil.copytree(seeded, d)
    sd = load_file(str(d / WEIGHTS))
    save_file({k: v * 3 for k, v in sd.items()}, str(d / WEIGHTS))  # a blob that does not exist yet

    @contextmanager
    def full(self):
        raise sqlite3.OperationalError(message)
        yield  # pragma: no cover

    monkeypatch.setattr(store.Registry, "transaction", full)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "the disk is full", code=1)


# ---- usage errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (("adapters", "search", "x", "-k", "many"), "invalid value for '-k'"),
    (("adapters", "register"), "missing argument"),
    (("adapters", "list", "--bogus"), "no such option: --bogus"),
    (("--bogus",), "no such option: --bogus"),
])
def test_usage_errors_are_one_line(cli, seeded, args, match):
    before = registry_state(cli.home)
    r = cli(*args)
    _refused(r, cli.home, before, match)
    assert "Usage:" not in r.output and "╭" not in r.output


# ---- registry check applies register's rules ---------------------------------------------------------

def _db(home):
    return sqlite3.connect(home / "registry.db", isolation_level=None)


@pytest.mark.parametrize("damage,match", [
    ("nan-weights", "contains NaN"),
    ("inf-alpha", "alpha: input should be a finite number"),
    ("bad-regex", "rank_pattern: key '(' is not a valid regular expression"),
])
def test_check_finds_what_register_refuses(cli, seeded, damage, match):
    import torch

    from loraplex.registry.store import Registry

    reg = Registry(cli.home)
    rec, adapter = reg.load_adapter("good")
    conn = _db(cli.home)
    if damage == "nan-weights":
        a, b = adapter.weights[adapter.modules[0]]
        a = a.clone()
        a[0, 0] = float("nan")
        adapter.weights[adapter.modules[0]] = (a, b)
        sha = reg.put_blob(adapter.to_bytes())
        conn.execute("UPDATE adapters SET blob = ? WHERE name = 'good'", (sha,))
    else:
        spec = json.loads(conn.execute("SELECT spec FROM adapters WHERE name = 'good'").fetchone()[0])
        if damage == "inf-alpha":
            text = json.dumps({**spec, "alpha": "@"}).replace('"@"', "1e309")
        else:
            text = json.dumps({**spec, "rank_pattern": {"(": 4}})
        conn.execute("UPDATE adapters SET spec = ? WHERE name = 'good'", (text,))
    conn.close()
    del torch
    r = cli("registry", "check", "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.stdout)
    assert not rep["ok"] and any(match.lower() in p.lower() for p in rep["problems"]), rep["problems"]
    assert "Traceback" not in r.output
    r = cli("adapters", "remove", "good")  # a damaged record can still be removed
    assert r.exit_code == 0, r.output
    assert cli("registry", "check").exit_code == 0


def test_reregistering_repairs_a_damaged_blob(cli, seeded, tiny_bert):
    from loraplex.registry.store import Registry

    rec = Registry(cli.home).get_adapter("good")
    path = Registry(cli.home).blob_path(rec.blob)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    assert cli("registry", "check").exit_code == 1
    r = _register(cli, seeded, name="again", base=tiny_bert)
    assert r.exit_code == 0, r.output
    assert Registry(cli.home).get_adapter("again").blob == rec.blob
    r = cli("registry", "check")
    assert r.exit_code == 0, r.output  # the blob was rewritten: both records read back intact


@pytest.mark.parametrize("env, match", [
    (("LORAPLEX_DEVICE", "cuda:3"), "LORAPLEX_DEVICE='cuda:3': Input should be 'auto', 'cpu', 'cuda' or 'mps'"),
    (("LORAPLEX_DTYPE", "int3"), "LORAPLEX_DTYPE='int3'"),
    (("LORAPLEX_DEVICE", "mps"), "device 'mps' was asked for"),
])
def test_bad_device_or_dtype_settings(cli, seeded, monkeypatch, env, match):
    """A device or dtype the settings do not allow, or a device this machine lacks: one line, exit 2."""
    import torch

    if env[1] == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    before = registry_state(cli.home)
    monkeypatch.setenv(*env)
    _refused(cli("eval", "good", "--task", "airline", "--limit", "2"), cli.home, before, match)


@pytest.mark.parametrize("value, match", [
    ("nosuch", "LORAPLEX_EMBEDDER='nosuch': unknown embedder (known: hash, minilm)"),
    ("minilm", "LORAPLEX_EMBEDDER='minilm', but the registry at"),
])
def test_embedder_setting_that_cannot_apply(cli, seeded, monkeypatch, value, match):
    """An unknown embedder, or another one than the registry's signatures were made with, was silently
    not used by search; now refused by name."""
    before = registry_state(cli.home)
    monkeypatch.setenv("LORAPLEX_EMBEDDER", value)
    _refused(cli("adapters", "search", "airline complaints"), cli.home, before, match)
    monkeypatch.setenv("LORAPLEX_EMBEDDER", "hash")
    assert cli("adapters", "search", "airline complaints").exit_code == 0


def test_an_embedder_the_registry_cannot_take_is_refused_before_training(cli, seeded, monkeypatch, tiny_bert, tmp_path):
    """train, forget and a stream registered with the registry's embedder only at the end: they trained (a
    stream left a half-made run directory), then were refused. Now before anything is trained or written."""
    import loraplex.continual.fit as fit
    import loraplex.continual.request as request

    for module, fn in ((fit, "fit_adapter"), (request, "forget")):
        monkeypatch.setattr(module, fn, lambda *a, **k: pytest.fail("trained before the embedder was checked"))
    monkeypatch.setenv("LORAPLEX_EMBEDDER", "minilm")
    before = registry_state(cli.home)
    task = tmp_path / "t.jsonl"
    task.write_text("".join(f'{{"text": "row {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(8)))
    (tmp_path / "t.task.json").write_text('{"description": "Tell rows of kind a from rows of kind b."}')
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nbase: {tiny_bert}\nmethod: seq-lora\ntrainer: {{steps: 1}}\n"
                    f"experiences: [{{learn: {task}}}]\n")
    for args in (["train", str(task), "--name", "t", "--base", str(tiny_bert), "--steps", "1"],
                 ["stream", "run", str(spec), "--out", str(tmp_path / "run")],
                 ["forget", "t", "--adapters", "good"]):
        _refused(cli(*args), cli.home, before, "LORAPLEX_EMBEDDER='minilm', but the registry at")
    assert not (tmp_path / "run").exists() and not list((cli.home / "runs").glob("train-*"))


def test_an_embedder_passed_as_a_keyword_is_named_as_one(cli, seeded, monkeypatch):
    """A Python caller that passed `embedder=` was told to change LORAPLEX_EMBEDDER, which it had not set."""
    from loraplex.errors import InvalidSpec
    from loraplex.registry.store import Registry
    from loraplex.settings import Settings

    monkeypatch.delenv("LORAPLEX_EMBEDDER", raising=False)
    reg = Registry.open(Settings.load(home=cli.home, embedder="minilm"))
    with pytest.raises(InvalidSpec, match=r"^embedder='minilm', but the registry at .* made its signatures with "
                                          r"'hash': pass 'hash', or another registry home$"):
        reg.embedder_name
    assert Registry.open(Settings.load(home=cli.home)).embedder_name == "hash"  # not named: the stored one


def test_router_options_that_cannot_apply(cli, seeded, tiny_bert):
    """top_k over more experts than the router has, and --shortlist where no stored router takes it, were
    stored or ignored silently."""
    before = registry_state(cli.home)
    r = cli("router", "fit", "r", "--router", "token-gate", "--adapters", "good", "--tasks", "airline",
            "--top-k", "5", "--steps", "1", "--quiet")
    _refused(r, cli.home, before, "router 'token-gate' would choose among 1 adapter")  # named before top_k
    r = cli("router", "fit", "r", "--router", "rank", "--adapters", "good", "--tasks", "airline",
            "--top-k", "99", "--steps", "1", "--quiet")
    _refused(r, cli.home, before, "top_k=99 is more than the 4 ranks router 'rank' would choose among")
    _refused(cli("query", "late flight", "--shortlist", "2"), cli.home, before, "--shortlist limits a stored router")
    _refused(cli("query", "late flight", "--router", "retrieval", "--shortlist", "1"), cli.home, before,
             "retrieval ranks the adapters itself")


@pytest.mark.parametrize("args, match", [
    (["--host", "999.1.1.1"], "--host '999.1.1.1': not an address this machine can listen on"),
    (["--backend", "notaurl"], "--backend 'notaurl': expected the URL of an OpenAI-compatible server"),
    (["--backend", "ftp://127.0.0.1/v1"], "--backend 'ftp://127.0.0.1/v1'"),
    # sweep 36: sent as Basic authentication and shown to clients in every 502 naming the backend
    (["--backend", "http://user:s3cret@127.0.0.1:8001/v1"], "--backend: credentials in the URL are not supported"),
    (["--backend-api-key", "k"], "--backend-api-key (or LORAPLEX_BACKEND_API_KEY) is the key of a --backend server"),
    (["--backend", "http://127.0.0.1:8001/v1", "--backend-api-key", "a b"], "--backend-api-key (or LORAPLEX_BACKEND_API_KEY) must be"),
    (["--port", "{taken}"], "cannot listen on 127.0.0.1:{taken}"),
    # the batching thread died on inf (every request then hung while /health said ok), waited 1e12 ms on others
    (["--max-wait-ms", "inf"], "--max-wait-ms must be a number from 0 to 10,000 (got inf)"),
    (["--max-wait-ms", "nan"], "--max-wait-ms must be a number from 0 to 10,000 (got nan)"),
    (["--max-wait-ms", "1e12"], "--max-wait-ms must be a number from 0 to 10,000"),
    (["--max-batch", "100000000"], "--max-batch must be a whole number from 1 to 4,096"),
    (["--max-loras", "100000000"], "--max-loras must be from 1 to 4,096"),
    # sweep 35: "" served without a router; a number with underscores was read as Python reads it (18509)
    (["--router", ""], "--router must name a stored router, got ''"),
    (["--router", "auto"], "--router 'auto' is not a stored router"),
    (["--port", "18_509"], "'18_509' is not a number as written (no underscores: '18509'?)"),
])
def test_serve_refuses_what_it_cannot_listen_on_or_forward_to(cli, seeded, args, match):
    """Checked before the model loads: one line, exit 2, no banner."""
    import socket

    before = registry_state(cli.home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        taken = str(s.getsockname()[1])
        args = [a.replace("{taken}", taken) for a in args]
        r = cli("serve", *args)
    _refused(r, cli.home, before, match.replace("{taken}", taken))
    assert "loraplex serve:" not in r.stderr
    assert "s3cret" not in r.stderr  # a refused URL's credentials are not echoed either


@pytest.mark.parametrize("args, match", [
    (["--name", "auto"], "adapter name 'auto' is reserved"),
    (["--name", "MiniLM"], "adapter name 'MiniLM' is reserved"),
    (["--description", "a\x01b"], "the description holds a control character"),
    (["--description", "scooters \u202eboog"], "the description holds a bidirectional override or isolate ('\\u202e'"),
    (["--task", ""], "the task is empty"),
])
def test_register_refuses_names_and_fields_that_cannot_work(cli, seeded, tiny_bert, args, match):
    """A name the server and `query` resolve to something else first, a control character in a description,
    an empty task: all were registered."""
    before = registry_state(cli.home)
    opts = {"--name": "new", "--description": "airline tweets", "--base": str(tiny_bert)}
    opts.update(dict(zip(args[::2], args[1::2])))
    _refused(cli("adapters", "register", seeded, *[x for kv in opts.items() for x in kv]), cli.home, before, match)


def test_paths_too_long_and_empty_lists(cli, seeded, tiny_bert, tmp_path):
    before = registry_state(cli.home)
    long = "/tmp/" + "x" * 300
    _refused(cli("adapters", "register", long, "--name", "t4", "--description", "d", "--base", tiny_bert),
             cli.home, before, "File name too long")
    _refused(cli("adapters", "export", "good", long), cli.home, before, "File name too long")
    _refused(cli("query", "late flight", "--adapters", ""), cli.home, before, "--adapters is empty")
    _refused(cli("query", "late flight", "--adapters", " , "), cli.home, before, "--adapters is empty")


def test_stream_spec_with_a_key_given_twice(cli, seeded, tmp_path):
    before = registry_state(cli.home)
    spec = tmp_path / "dup.yaml"
    spec.write_text("name: s\ntrainer: {steps: 1, steps: 2}\nexperiences:\n  - learn: airline\n")
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, "the key 'steps' is given twice")


@pytest.mark.parametrize("key", ["", "s\u00e9kret", "two words"])
def test_serve_refuses_an_api_key_no_client_could_send(cli, seeded, key, monkeypatch):
    before = registry_state(cli.home)
    r = cli("serve", "--api-key", key, "--port", "0")
    _refused(r, cli.home, before, "--api-key (or LORAPLEX_API_KEY) must be non-empty visible ASCII")
    monkeypatch.setenv("LORAPLEX_API_KEY", key)  # "" in the environment served with no key at all (sweep 14)
    _refused(cli("serve", "--port", "0"), cli.home, before, "--api-key (or LORAPLEX_API_KEY) must be non-empty")


def test_a_directory_in_place_of_the_database_is_damage_not_an_empty_registry(cli, seeded):
    """A registry.db that is a directory was read as "no adapters registered" (exit 0)."""
    (cli.home / "registry.db").unlink()
    (cli.home / "registry.db").mkdir()
    for args in (("adapters", "list"), ("registry", "check")):
        r = cli(*args)
        assert r.exit_code != 0 and "registry.db is not a file" in r.output, r.output
        assert "Traceback" not in r.output


def test_a_truncated_database_beside_stored_blobs_is_damage_not_an_empty_registry(cli, seeded):
    """A 0-byte registry.db (SQLite opens it as a new database) with blobs beside it read as "no adapters
    registered" and `registry check` called it consistent."""
    import gc

    assert any((cli.home / "blobs").iterdir())
    gc.collect()  # the registration's connection, closed (its WAL written back), as after a process ends
    for extra in ("registry.db-wal", "registry.db-shm"):
        (cli.home / extra).unlink(missing_ok=True)
    (cli.home / "registry.db").write_bytes(b"")
    for args in (("adapters", "list"), ("registry", "check")):
        r = cli(*args)
        assert r.exit_code != 0 and "registry.db is empty (0 bytes) but adapters are stored" in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert (cli.home / "registry.db").stat().st_size == 0


def test_a_directory_in_place_of_the_lock_is_one_line_and_changes_nothing(cli, seeded):
    """A directory named registry.lock made every write end in "error: Is a directory" (exit 2, as if the
    user's input were wrong)."""
    from tests.conftest import registry_state

    before = registry_state(cli.home)
    (cli.home / "registry.lock").unlink()
    (cli.home / "registry.lock").mkdir()
    r = cli("adapters", "remove", "good")
    assert r.exit_code == 1 and "cannot take the registry lock" in r.output and "registry.lock" in r.output, r.output
    assert "Traceback" not in r.output and registry_state(cli.home) == before


def test_a_special_file_in_place_of_the_lock_is_refused_as_check_says_and_repaired(cli, seeded, tiny_bert):
    """A FIFO named registry.lock opens read-write and takes flock, so writes went on while `registry check` said
    "every write fails" and called the registry inconsistent, and `--repair` could not mend it (sweep 67). Writes
    are refused as check says, in one line, and `registry check --repair` removes it."""
    import os

    from tests.conftest import registry_state

    lock = cli.home / "registry.lock"
    lock.unlink()
    os.mkfifo(lock)
    before = registry_state(cli.home)
    for args in (("adapters", "remove", "good"),
                 ("adapters", "register", seeded, "--name", "z1", "--description", "x", "--base", tiny_bert)):
        r = cli(*args)
        err = r.stderr.strip()
        assert r.exit_code == 1 and err.startswith("error: cannot take the registry lock") and "not a regular file" \
            in err and len(err.splitlines()) == 1, err
        assert registry_state(cli.home) == before
    r = cli("registry", "check")
    assert r.exit_code == 1 and "registry check --repair` does" in r.output, r.output
    r = cli("registry", "check", "--repair")
    assert r.exit_code == 0 and "removed what stood in the registry lock's place (registry.lock: it is not a regular " \
        "file (a special file))" in r.output, r.output
    assert cli("adapters", "remove", "good").exit_code == 0


def test_a_writer_waiting_for_the_lock_says_so(cli, seeded):
    """A writer waited silently for up to 120 s while another process held the registry's lock (a stopped
    writer), then failed (sweep 67). After a second it says, once, what it waits for."""
    import fcntl
    import os
    import threading

    fd = os.open(cli.home / "registry.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: held against this process's writers too
    threading.Timer(4.0, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd))).start()  # > LOCK_NOTE_S on a slow machine
    r = cli("adapters", "remove", "good")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if "waiting for the registry lock" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: waiting for the registry lock at ") and \
        "another process holds it (for up to 120 s)" in lines[0], r.stderr


def test_register_with_a_task_file_without_a_description_takes_the_adapters(cli, seeded, tiny_bert, tmp_path):
    """`adapters register --description D --task bare.jsonl` was refused with "pass --description",
    which the user had passed: the adapter's description now stands in for the task's."""
    f = tmp_path / "bare.jsonl"
    f.write_text("\ufeff" + "\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in enumerate("abab")) + "\n")
    r = cli("adapters", "register", seeded, "--name", "bare", "--description", "is it a or b", "--task", f,
            "--base", tiny_bert)
    assert r.exit_code == 0, r.output
    from loraplex.registry.store import Registry

    reg = Registry(cli.home, embedder="hash")
    task = reg.load_task(reg.get_adapter("bare").task)
    assert task.description == "is it a or b" and task.labels == ("a", "b")


def test_register_refuses_a_task_whose_labels_the_base_reads_alike(cli, seeded, tiny_bert, tmp_path):
    """`train` refuses labels its base reads as one ('pos' and 'Pos' to an uncased encoder); `adapters
    register --task` recorded them, and every query routed to the adapter then failed, blaming the request
    (a 400 invalid_request_error from the server: sweep 23)."""
    f = tmp_path / "case.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}", "label": lab}) + "\n" for i, lab in enumerate(["good", "Good", "bad"] * 3)))
    before = registry_state(cli.home)
    r = cli("adapters", "register", seeded, "--name", "case", "--description", "polarity of reviews", "--task", f,
            "--base", tiny_bert)
    _refused(r, cli.home, before, f"task 'case' ({f}): labels 'good' and 'Good' read the same to this model")
    f.with_name("case.task.json").write_text(json.dumps({"description": "polarity",
                                                         "label_texts": {"Good": "very good"}}))
    r = cli("adapters", "register", seeded, "--name", "case", "--description", "polarity of reviews", "--task", f,
            "--base", tiny_bert)
    assert r.exit_code == 0, r.output  # texts that differ in words: a task it can answer


# ---- third sweep: task files, non-finite and out-of-range numbers, generated descriptions ------------

def _task_file(tmp_path, kind):
    """A task file damaged as `kind` (what the first two sweeps missed), and the line its refusal names."""
    import os

    f = tmp_path / "t.jsonl"
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate("abab" * 3)]
    if kind == "fifo":
        os.mkfifo(f)  # was read forever: the command hung
        return f, "not a regular file"
    if kind == "dev-zero":
        f.symlink_to("/dev/zero")  # was read until memory ran out: MemoryError, exit 70
        return f, "not a regular file"
    if kind == "symlink-loop":
        (tmp_path / "u.jsonl").symlink_to(f)
        f.symlink_to(tmp_path / "u.jsonl")
        return f, "a symbolic link that leads to no file"
    if kind == "nan-label":
        f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"text": "x", "label": NaN}\n')
        return f, ":13: not a JSON object (NaN is not a JSON value)"
    if kind == "float-label":  # 1 and 1.0 became two labels, "1" and "1.0"
        rows = [{"text": f"text {i}", "label": [1, 1.0, 2][i % 3]} for i in range(12)]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f, "row 2: 'label' must be a string or a whole number, not the number 1.0"
    if kind == "invisible-label":
        rows[3]["label"] = "\u200b"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f, "row 4 has an empty label (no visible character)"
    if kind == "control-label":
        rows[0]["label"] = "a\x00"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f, "row 1: the label 'a\\x00' holds a control character"
    if kind == "label-text-of-no-label":
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "t.task.json").write_text(json.dumps({"description": "d", "label_texts": {"c": "a c"}}))
        return f, "'label_texts' gives a text for 'c', which is not a label of the task (a, b)"
    if kind == "latin-1":
        f = tmp_path / "t.csv"
        f.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
        return f, "t.csv:3: not UTF-8 text (byte b'\\xe9')"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "symlink-loop", "nan-label", "float-label", "invisible-label",
                                  "control-label", "label-text-of-no-label", "latin-1"])
def test_task_files_the_third_sweep(cli, seeded, tiny_bert, tmp_path, kind):
    f, match = _task_file(tmp_path, kind)
    before = registry_state(cli.home)
    _refused(cli("train", f, "--name", "t", "--base", tiny_bert, "--description", "x"), cli.home, before, match)


def test_examples_file_follows_the_task_file_rules(cli, seeded, tmp_path):
    """`generate adapter --examples` reads rows through the same checks (a FIFO hung, NaN was a label)."""
    before = registry_state(cli.home)
    for kind in ("fifo", "nan-label", "control-label"):
        d = tmp_path / kind
        d.mkdir()
        f, match = _task_file(d, kind)
        _refused(cli("generate", "adapter", "airline tweets", "--generator", "g", "--name", "n", "--examples", f),
                 cli.home, before, match)


@pytest.mark.parametrize("args, match", [
    (["train", "airline", "--name", "t", "--lr", "inf"], "invalid value for --lr: Input should be a finite number"),
    # a Unicode digit str.isdigit takes and int refuses; spawn pickled the model, fork registered "0 steps" (sweep 16)
    (["train", "airline", "--name", "t", "--devices", "\u00b2"], "devices: must be a number or 'auto', got '\u00b2'"),
    (["train", "airline", "--name", "t", "--strategy", "ddp_spawn"], "Lightning strategy 'ddp_spawn' is not supported"),
    (["router", "fit", "r", "--router", "token-gate", "--strategy", "ddp_fork"],
     "Lightning strategy 'ddp_fork' is not supported"),
    # a strategy that runs one device ran one, recorded as two (sweep 16)
    (["train", "airline", "--name", "t", "--strategy", "single_device", "--devices", "2"],
     "devices=2 with strategy='single_device': Lightning would run on 1 device(s)"),
    # pure float16 diverged at any learning rate, and the message blamed the learning rate (sweep 16)
    (["train", "airline", "--name", "t", "--precision", "16-true"], "16-true (pure float16) cannot train with AdamW"),
    (["train", "airline", "--name", "t", "--rank", "0"], "invalid value for --rank: Input should be greater"),  # was `r`
    # 1e300 overflowed float32 in Adam's first step: an internal error (sweep 16)
    (["train", "airline", "--name", "t", "--lr", "1e300"], "invalid value for --lr: Input should be less than or equal to 10"),
    (["router", "fit", "r", "--router", "token-gate", "--lr", "1e300"], "lr: Input should be less than or equal to 10"),
    # the training options' bounds said by the flag typed, not the config's field (`batch_size`)
    (["router", "fit", "r", "--router", "token-gate", "--train-limit", "0"],
     "invalid value for --train-limit: Input should be greater than or equal to 1"),
    (["train", "airline", "--name", "t", "--val-limit", "0"], "invalid value for --val-limit: Input should be greater"),
    (["train", "airline", "--name", "t", "--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["train", "airline", "--name", "t", "--seed", str(2 ** 70)], "seed: Input should be less than or equal to 4294967295"),
    (["forget", "airline", "--seed", "-1"], "--seed: must be a whole number from 0 to 4,294,967,295"),
    (["generate", "adapter", "airline tweets", "--generator", "g", "--name", "n", "--seed", str(2 ** 70)],
     "--seed: must be a whole number from 0 to 4,294,967,295"),
    (["generate", "adapter", "airline\x01 tweets", "--generator", "g", "--name", "n"],
     "the description holds a control character"),
    (["generate", "adapter", "airline " * 2000, "--generator", "g", "--name", "n"],
     "the description is 16,000 characters long"),
    (["query", "late flight", "--set", "temperature=Infinity"], "temperature: Input should be a finite number"),
    (["train", "airline", "--name", "t", "--batch-size", str(2 ** 70)],  # was exit 70 (islice past sys.maxsize)
     "invalid value for --batch-size: Input should be less than or equal to 65536"),
    (["query", "late flight", "--batch-size", str(10 ** 20)],  # was taken: one forward of every query (sweep 57)
     "--batch-size must be a whole number from 1 to 65,536"),
    (["router", "fit", "r", "--router", "token-gate", "--set", f"top_k={2 ** 64}"],
     "top_k: Input should be less than or equal to 2147483647"),
    (["router", "fit", "r", "--router", "token-gate", "--set", "temperature=Infinity"],
     "temperature: Input should be a finite number"),
    (["generate", "fit", "g", "--method", "sg-lora", "--adapters", "good", "--set", "temperature=Infinity"],
     "temperature: Input should be a finite number"),
    # positive but so small that scores divided by it overflow float32: NaN gates answered as routed (sweep 22)
    (["query", "late flight", "--router", "retrieval", "--set", "temperature=1e-45"],
     "temperature: Input should be greater than or equal to 0.001"),
    (["router", "fit", "r", "--router", "mixer", "--set", "temperature=1e-45"],
     "temperature: Input should be greater than or equal to 0.001"),
    (["query", "late flight", "--router", "retrieval", "--top-k", "3", "--set", "candidates=1"],  # mixed one, said nothing
     "invalid configuration for retrieval: top_k=3 is more than candidates=1, the adapters it mixes from"),
    (["router", "fit", "r", "--router", "mixer", "--adapters", "good,other", "--set", "n_experts=5"],  # was stored unused
     "n_experts shapes the fresh experts router 'mixer' makes when no --adapters are given"),
    (["router", "fit", "r", "--router", "rank", "--adapters", "good,other", "--joint", "--set", "rank=4"],
     "rank shapes the fresh experts router 'rank' makes when no --adapters are given"),
    (["generate", "fit", "g", "--method", "sg-lora", "--adapters", "good", "--set", "sample_scale=1e308"],
     "sample_scale: Input should be less than or equal to 1000"),
])
def test_numbers_that_cannot_work(cli, seeded, tiny_bert, args, match):
    """inf passed every `gt=0` bound (a learning rate of inf trained to NaN, a generator stored an infinite
    temperature), a seed out of NumPy's range was exit 70, a generated adapter's description skipped the
    rules a registered one follows."""
    before = registry_state(cli.home)
    if args[0] == "train":
        args = [*args, "--base", str(tiny_bert), "--steps", "1"]
    _refused(cli(*args), cli.home, before, match)


@pytest.mark.parametrize("trainer, seed, match", [
    ({"epochs": "@inf"}, 0, "trainer.epochs: Input should be a finite number"),  # was exit 70 (OverflowError)
    ({"lr": "@inf", "steps": 1}, 0, "trainer.lr: Input should be a finite number"),  # trained to NaN
    ({"steps": 1}, -5, "seed: Input should be greater than or equal to 0"),  # was exit 70
    ({"steps": 2 ** 70}, 0, "trainer.steps: Input should be less than or equal to 10000000"),
])
def test_stream_numbers_that_cannot_work(cli, seeded, tmp_path, trainer, seed, match):
    before = registry_state(cli.home)
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"name": "s", "method": "seq-lora", "seed": seed, "trainer": trainer,
                                "experiences": [{"learn": "airline"}]}).replace('"@inf"', ".inf") + "\n")
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, match)


def test_every_bounded_integer_option_has_an_upper_bound():
    """An int option with a lower bound and no upper one let 2**70 through to islice or torch (exit 70): each
    takes one of catalog's MAX_* bounds. Walks every pydantic model of the packages a user's options reach."""
    import importlib
    import inspect
    import pkgutil

    import annotated_types
    from pydantic import BaseModel

    import loraplex

    names = [m.name for m in pkgutil.iter_modules(loraplex.__path__, "loraplex.") if not m.ispkg]
    for sub in ("experts", "router", "generators", "continual", "continual.regularizers", "registry"):
        pkg = importlib.import_module(f"loraplex.{sub}")
        names += [m.name for m in pkgutil.iter_modules(pkg.__path__, f"loraplex.{sub}.") if not m.ispkg]
    unbounded, seen = [], 0
    for name in names:
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, BaseModel) or cls.__module__ != module.__name__:
                continue
            for field, f in cls.model_fields.items():
                kinds = {type(m) for m in f.metadata}
                seen += f.annotation in (int, int | None)
                if f.annotation in (int, int | None) and kinds & {annotated_types.Ge, annotated_types.Gt} \
                        and not kinds & {annotated_types.Le, annotated_types.Lt}:
                    unbounded.append(f"{cls.__module__}.{cls.__name__}.{field}")
    assert seen > 30 and not unbounded, (seen, unbounded)


def test_empty_and_unexpandable_paths(cli, seeded, tmp_path, monkeypatch):
    """An empty --home or export directory meant the current directory; a `~user` of no such user was exit 70
    (pathlib's RuntimeError); a directory named adapter_config.json in the export directory got the weights
    written beside it before the rename failed, naming a temporary path."""
    before = registry_state(cli.home)
    _refused(cli("adapters", "list", "--home", ""), cli.home, before, "home='': an empty path")
    _refused(cli("adapters", "list", "--home", "~no-such-user-x/r"), cli.home, before,
             "home='~no-such-user-x/r': cannot expand '~no-such-user-x'")
    _refused(cli("adapters", "export", "good", ""), cli.home, before, "a path is empty: name a file or directory")
    (tmp_path / "ex" / "adapter_config.json").mkdir(parents=True)
    _refused(cli("adapters", "export", "good", tmp_path / "ex", "--overwrite"), cli.home, before,
             "adapter_config.json: is not a regular file")
    assert [p.name for p in (tmp_path / "ex").iterdir()] == ["adapter_config.json"]
    spec = _spec(tmp_path, {"snapshots": 10**9})
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, "trainer.snapshots: Input should be less than or equal to 1000")
    monkeypatch.setenv("LORAPLEX_HOME", "~no-such-user-x/r")
    _refused(cli("adapters", "list"), cli.home, before, "LORAPLEX_HOME='~no-such-user-x/r'")


@pytest.mark.parametrize("var", ["RANK", "LOCAL_RANK", "SLURM_PROCID"])
def test_a_stray_rank_variable_is_refused_not_a_silent_worker(cli, seeded, tiny_bert, monkeypatch, var):
    """`RANK=1` left in a shell made `train` a DDP worker: it trained, registered nothing, printed nothing and
    exited 0. A rank counts only beside a world of several processes (WORLD_SIZE, SLURM_NTASKS)."""
    for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    before = registry_state(cli.home)
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, "--steps", "1"), cli.home, before,
             f"{var}=1 says this process is a worker of a distributed run, but no WORLD_SIZE")
    from loraplex.ranks import process_rank

    monkeypatch.setenv("WORLD_SIZE" if var != "SLURM_PROCID" else "SLURM_NTASKS", "2")
    assert process_rank() >= 1  # a real worker


def test_router_eval_limit_and_forget_base_are_checked(cli, seeded):
    """`router fit --eval-limit 0` evaluated every row and -1 every row but the last; `forget --adapters A
    --base B` trained on A's base, ignoring --base."""
    before = registry_state(cli.home)
    for limit in ("0", "-1"):
        _refused(cli("router", "fit", "r", "--router", "token-gate", "--adapters", "good", "--eval-limit", limit),
                 cli.home, before, f"--eval-limit must be a whole number from 1 to 2,147,483,647, not {limit}")
    _refused(cli("forget", "airline", "--adapters", "good", "--base", "smollm2"), cli.home, before,
             "adapters good are of base")


@pytest.mark.parametrize("args, match", [
    (["router", "fit", "r", "--router", "token-gate", "--set", "shared=yes"], "shared: expected true, false or block, got 'yes'"),
    (["router", "fit", "r", "--router", "token-gate", "--set", "shared=1"], "shared: expected true, false or block, got 1"),
    (["router", "fit", "r", "--router", "token-gate", "--set", "top_k=true"], "top_k: expected a number, got true"),
    (["generate", "fit", "g", "--method", "sg-lora", "--adapters", "good", "--set", "top_k=true"],
     "top_k: expected a number, got true"),
])
def test_a_switch_is_not_a_number_nor_a_number_a_switch(cli, seeded, args, match):
    """pydantic's lax mode read `true` as 1 for a count and "yes" or 1 as true for a switch (catalog.Options)."""
    before = registry_state(cli.home)
    _refused(cli(*args), cli.home, before, match)


def test_stream_steps_true_is_not_one(cli, seeded, tmp_path):
    before = registry_state(cli.home)
    _refused(cli("stream", "run", _spec(tmp_path, {"steps": True}), "--quiet"), cli.home, before,
             "trainer.steps: expected a number, got true")


def test_a_training_that_diverges_says_so(cli, seeded, tiny_bert, monkeypatch):
    """A learning rate of 1e308 trained to NaN and was then blamed on the adapter ("lora_A contains NaN").
    Learning rates are now bounded (at 10), so the loss is made infinite here: the weights end NaN."""
    from loraplex.training import ContinualModule

    step = ContinualModule.training_step
    monkeypatch.setattr(ContinualModule, "training_step", lambda self, *a: step(self, *a) * float("inf"))
    before = registry_state(cli.home)
    _refused(cli("train", "airline", "--name", "t", "--base", tiny_bert, "--steps", "2", "--quiet",
                 "--eval-limit", "4"), cli.home,
             before, "training diverged: after 2 steps the trained weights hold NaN or infinity")


def test_debug_and_malloc_settings_read_as_written(cli, seeded, monkeypatch):
    from loraplex.cli._errors import debugging

    for off in ("", "0", "false", "No", "off"):
        monkeypatch.setenv("LORAPLEX_DEBUG", off)
        assert not debugging(), off
    monkeypatch.setenv("LORAPLEX_DEBUG", "1")
    assert debugging()
    # the traceback, then the error line and its exit code as without it (sweep 47: every error was Python's
    # uncaught exception, exit 1, bad input included)
    res = cli("eval", "nope-adapter", "--limit", "2")
    assert res.exit_code == 2 and "Traceback" in res.stderr, res.output
    assert res.stderr.strip().splitlines()[-1].startswith("error: no adapter named 'nope-adapter'"), res.stderr
    import loraplex.allocator as allocator

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv("LORAPLEX_MALLOC", "bogus")
    with pytest.raises(Exception, match="LORAPLEX_MALLOC='bogus': expected keep"):
        allocator.keep_heap()
    monkeypatch.setattr(allocator, "_done", None)


def test_files_that_are_not_regular_or_repeat_a_key(cli, seeded, tiny_bert, tmp_path):
    """A spec or PEFT file that is a directory or /dev/zero was "no such ..." (it exists); a key given twice in
    adapter_config.json kept the last silently and the tensors were blamed; a spec key that is not text was
    Python's "keywords must be strings"; an unknown method left out the spec's path; `target_modules: [""]`
    was "expected a list ..., got list"."""
    before = registry_state(cli.home)
    (tmp_path / "dir.yaml").mkdir()
    _refused(cli("stream", "run", tmp_path / "dir.yaml", "--quiet"), cli.home, before, "dir.yaml: a directory, not a stream spec")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    _refused(cli("stream", "run", tmp_path / "zero.yaml", "--quiet"), cli.home, before, "zero.yaml: not a regular file")
    spec = tmp_path / "keyint.yaml"
    spec.write_text("method: seq-lora\n1: 2\nexperiences: [{learn: airline}]\n")
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, "keyint.yaml: the key 1 is not a name")
    spec.write_text("method: foo-lora\nexperiences: [{learn: airline}]\n")
    _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, "keyint.yaml: unknown continual method 'foo-lora'")
    d = tmp_path / "dup"
    shutil.copytree(seeded, d)
    (d / CFG).write_text((d / CFG).read_text().replace('{', '{"r": 4, ', 1))
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "the key 'r' is given twice in one object")
    d = _with_config(seeded, tmp_path / "empty-target", {"target_modules": ["query", ""]})
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "target_modules: entry 1 is an empty module name")
    d = tmp_path / "wdir"
    shutil.copytree(seeded, d)
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).mkdir()
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "adapter_model.safetensors: a directory")


def test_a_home_that_cannot_be_written_is_still_read(cli, seeded, monkeypatch):
    """A read-only home (a read-only mount, another user's registry): every command, `adapters list` too, said
    "registry database ... is unreadable", since SQLite could not create its -shm file. Reading works now; a
    write is refused at the lock. (Root ignores file modes, so the test makes os.access say no.)"""
    import os

    import loraplex.registry.database as database

    home = str(cli.home)
    real = os.access
    monkeypatch.setattr(database.os, "access", lambda p, mode, *a, **k: False if str(p) == home else real(p, mode, *a, **k))
    r = cli("adapters", "list")
    assert r.exit_code == 0 and "good" in r.stdout, r.output
    r = cli("registry", "check")
    assert r.exit_code == 0 and "consistent" in r.stdout, r.output


def test_repeated_sets_generator_top_k_and_labels_forgotten_twice(cli, seeded, tiny_bert, tmp_path):
    """A --set key given twice kept the last silently; `generate fit --set top_k=100` over one adapter passed;
    a stream could name a label twice, forget it twice, or forget every label one request at a time (the spec
    refuses forgetting the whole task twice, or every label at once)."""
    before = registry_state(cli.home)
    _refused(cli("query", "hi", "--set", "top_k=1", "--set", "top_k=2"), cli.home, before, "--set top_k is given twice")
    from tests.conftest import make_peft_adapter

    other = make_peft_adapter(tiny_bert, tmp_path / "peft2", seed=2)  # weights of its own (identical ones are refused)
    assert cli("adapters", "register", other, "--name", "good2", "--description", "news articles",
               "--base", tiny_bert).exit_code == 0
    before = registry_state(cli.home)
    _refused(cli("generate", "fit", "g", "--method", "sg-lora", "--adapters", "good,good2", "--set", "top_k=100"),
             cli.home, before, "top_k=100 is more than the 2 adapters the generator learns from")
    for forgets, match in [([["negative", "negative"]], "label 'negative' is named twice"),
                           ([["negative"], ["negative"]], "label 'negative' of 'airline' is already forgotten"),
                           ([["negative"], ["neutral"], ["positive"]], "forget the whole task instead")]:
        spec = tmp_path / "f.yaml"
        spec.write_text(json.dumps({"method": "seq-lora", "trainer": {"steps": 1}, "experiences": [
            {"learn": "airline"}, *({"forget": "airline", "labels": labels} for labels in forgets)]}))
        _refused(cli("stream", "run", spec, "--quiet"), cli.home, before, match)


def test_query_sweep_six(cli, seeded, tmp_path, monkeypatch, capsys):
    """An empty --router with --adapters was exit 70; bytes that are not UTF-8 in an argument were exit 70 wherever
    they reached a file, a table or a tokenizer; --input read /dev/zero until memory ran out and kept a BOM;
    --top-k silently beat --set top_k."""
    before = registry_state(cli.home)
    _refused(cli("query", "late flight", "--router", "", "--adapters", "good"), cli.home, before,
             "--router must name a router")
    _refused(cli("query", "late flight", "--set", "top_k=1", "--top-k", "2"), cli.home, before, "give one")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    _refused(cli("query", "--input", tmp_path / "zero.txt"), cli.home, before, "not a regular file")
    (tmp_path / "bom.txt").write_bytes("\ufeffhello bom\n".encode())
    r = cli("query", "--input", tmp_path / "bom.txt", "--json", "--labels", "good,bad")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["query"] == "hello bom", r.output
    from loraplex.cli import main

    monkeypatch.setattr("sys.argv", ["loraplex", "adapters", "show", b"x\xe9".decode("utf-8", "surrogateescape")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "argument 3 ('x\ufffd') is not valid UTF-8 text" in capsys.readouterr().err


def test_list_options_with_an_empty_entry_or_a_name_twice(cli, seeded):
    """`--adapters a,,b` dropped the empty entry without a word; `router eval --tasks a,a` counted a task twice."""
    before = registry_state(cli.home)
    _refused(cli("query", "late flight", "--adapters", "good,,good2"), cli.home, before, "has an empty entry between commas")
    _refused(cli("query", "late flight", "--adapters", "good,"), cli.home, before, "has an empty entry between commas")
    _refused(cli("query", "late flight", "--adapters", "good,good"), cli.home, before, "--adapters names 'good' twice")


def test_user_text_cannot_drive_the_terminal(cli, seeded):
    """Control characters in a query (ESC starts a colour or a window-title sequence, NUL, BEL) and a
    right-to-left override were written raw to stdout; error lines quoting an argument likewise. They
    are shown as escapes now, and a 5,000-character search text is cut short in the table's title."""
    r = cli("query", "late\x00 flight \x1b]0;owned\x07 and \x1b[31mred\u202e", "--labels", "always,never", "--trace")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x00" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout
    assert "query: late\\x00 flight \\x1b]0;owned\\x07 and \\x1b[31mred\\u202e" in r.stdout
    r = cli("adapters", "show", "nope\x1b[2J")
    assert r.exit_code != 0 and "\x1b" not in r.stderr and "nope\\x1b[2J" in r.stderr
    r = cli("adapters", "search", "a" * 5000)
    assert r.exit_code == 0, r.output
    title = r.stdout.splitlines()[0]
    assert "(5,000 characters)" in title and len(title) < 200, title
    r = cli("adapters", "show", "b" * 5000)
    assert r.exit_code != 0 and len(r.stderr) < 1200 and "characters)" in r.stderr


def test_auto_trace_when_auto_answers_without_routing(cli, seeded):
    """`query --router auto --trace` ended in exit 70 (KeyError 'tokens') when auto answered with the bare
    base (or generated an adapter): there is no routed forward to trace, and it now says so."""
    r = cli("query", "late flight", "--router", "auto", "--set", "route_threshold=1", "--trace")
    assert r.exit_code == 0, r.output
    assert "decision: base" in r.stdout and "(no per-token trace: base used no routed forward)" in r.stdout
    assert "answer: -" in r.stdout  # an encoder base without a label set has no answer (was the literal None)


def test_a_database_failure_under_a_command_is_one_line(cli, seeded, monkeypatch):
    """A damaged database page made `adapters export` and `register` end in exit 70 (DatabaseError)."""
    import sqlite3

    from loraplex.registry.store import Registry

    def malformed(self, *a, **k):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(Registry, "get_adapter", malformed)
    r = cli("adapters", "show", "good")
    assert r.exit_code == 1 and r.stderr.strip() == ("error: the registry database failed: database disk image is "
                                                     "malformed (run `loraplex registry check`)"), r.stderr


def test_adapters_of_two_bases_of_one_shape_are_not_used_together(cli, seeded, tiny_bert, tmp_path):
    """Two bases with the same fingerprint (a copy of the tiny BERT: one shape, and here even one set of
    weights, but another base by name) passed the fingerprint check: a router was fitted and stored that
    every later use refused, and a generator learned from both on one base (sweep 12)."""
    twin = tmp_path / "twin-bert"
    shutil.copytree(tiny_bert, twin)
    r = cli("adapters", "register", seeded, "--name", "twin", "--description", "airline tweets", "--base", twin)
    assert r.exit_code == 0, r.output
    before = registry_state(cli.home)
    for args, match in ((("router", "fit", "r", "--router", "mixer", "--adapters", "good,twin", "--steps", "1"),
                         "adapters of different base models cannot be"),
                        (("generate", "fit", "g", "--method", "sg-lora", "--adapters", "good,twin"),
                         "a generator learns from adapters of one base model; these differ: good ("),
                        (("query", "a delayed flight", "--adapters", "good,twin", "--top-k", "2"),
                         "adapters of different base models cannot be")):
        _refused(cli(*args), cli.home, before, match)


def test_a_router_over_one_adapter_is_refused(cli, seeded):
    """A token gate or mixer over one adapter always picks it: fitting one trained a no-op (sweep 12)."""
    before = registry_state(cli.home)
    for method in ("token-gate", "mixer"):
        _refused(cli("router", "fit", "r", "--router", method, "--adapters", "good", "--tasks", "airline", "--steps", "1"),
                 cli.home, before, f"router {method!r} would choose among 1 adapter: it needs at least 2 (adapters)")


def test_router_fit_option_and_set_for_one_key_are_refused(cli, seeded):
    """`--set top_k=1 --top-k 2`: --top-k won silently, while `--set top_k=1 --set top_k=2` is refused."""
    before = registry_state(cli.home)
    _refused(cli("router", "fit", "r", "--router", "mixer", "--adapters", "good", "--set", "top_k=1", "--top-k", "2"),
             cli.home, before, "top_k is given twice: by --top-k and by --set top_k=...")
    _refused(cli("router", "fit", "r", "--router", "mixer", "--adapters", "good", "--set", "joint=false", "--joint"),
             cli.home, before, "joint is given twice: by --joint and by --set joint=...")


def test_a_worker_keeps_its_rank_after_lightning_clears_world_size(monkeypatch):
    """Lightning's DDP teardown removes WORLD_SIZE from a worker's environment; the worker then printed a
    stray 'LOCAL_RANK=1 says this process is a worker ... but no WORLD_SIZE' and stored a router as rank 0."""
    from loraplex import ranks

    for v in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ranks, "_SEEN", {})
    assert ranks.is_worker()
    monkeypatch.delenv("WORLD_SIZE")
    assert ranks.is_worker()
    monkeypatch.setenv("LOCAL_RANK", "3")  # other rank variables: checked anew (a leftover is refused)
    with pytest.raises(Exception, match="LOCAL_RANK=3 says this process is a worker"):
        ranks.is_worker()


def test_a_config_without_lora_alpha_takes_peft_default(cli, seeded, tiny_bert, tmp_path):
    """PEFT reads a config with no lora_alpha as alpha 8 whatever r is; loraplex read it as alpha = r,
    so an r=4 adapter was scaled by 1 instead of PEFT's 2 (sweep 12)."""
    cfg = json.loads((seeded / CFG).read_text())
    assert cfg["r"] == 4
    del cfg["lora_alpha"]
    d = _with_config(seeded, tmp_path / "noalpha", json.dumps(cfg))
    assert _register(cli, d, name="noalpha", base=tiny_bert).exit_code == 0
    shown = json.loads(cli("adapters", "show", "noalpha", "--json").stdout)
    assert shown["spec"]["alpha"] == 8, shown["spec"]


def test_a_text_written_as_a_number_is_refused(cli, tmp_path):
    f = tmp_path / "nums.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in (("fine", "a"), (5, "b"), ("ok", "a"))))
    before = registry_state(cli.home)
    _refused(cli("train", f, "--name", "n", "--steps", "1"), cli.home, before, "row 2: 'text' must be a string, not the number 5")


def test_a_generator_over_identical_adapters_says_so(cli, seeded, tiny_bert):
    """Two registrations of one PEFT directory: the fit divided by zero spread and blamed its learning rate."""
    assert _register(cli, seeded, name="same", base=tiny_bert).exit_code == 0
    before = registry_state(cli.home)
    _refused(cli("generate", "fit", "g", "--method", "sg-lora", "--adapters", "good,same"), cli.home, before,
             "adapters 'good' and 'same' have identical weights: a generator learns from members that differ")


def test_eval_options_that_cannot_apply(cli, seeded):
    """`eval --vs-base` with no adapter printed the bare base alone; `--task ""` was read as the current
    directory (sweep 13)."""
    before = registry_state(cli.home)
    _refused(cli("eval", "--task", "airline", "--vs-base"), cli.home, before,
             "--vs-base compares an adapter with the bare base: name the adapter")
    _refused(cli("eval", "good", "--task", ""), cli.home, before, "--task is empty")
    for args in (("eval", "good", "--task", "airline"), ("eval", "--task", "airline")):  # an encoder reads no description
        _refused(cli(*args, "--description", "sort these tweets"), cli.home, before,
                 "--description changes nothing here: 'airline' is an embedded task with its own description")


def test_queries_on_stdin_that_are_not_utf8(cli, seeded):
    """Python decodes stdin with surrogateescape: a byte that is not UTF-8 reached the tokenizer as a lone
    surrogate (exit 70), with --input - and with no query at all (sweep 13)."""
    before = registry_state(cli.home)
    for args in (("query", "--input", "-"), ("query",)):
        _refused(cli(*args, input=b"my flight \xff was late\n"), cli.home, before, "stdin: not UTF-8 text (byte 10 is b'\\xff')")
    r = cli("query", "--input", "-", "--adapters", "good", "--labels", "late,on time", input="my flight was late\n".encode())
    assert r.exit_code == 0, r.output


def test_an_empty_base_is_refused(cli, seeded):
    """`--base ""` read as not given: eval used minilm, `adapters list` listed every base, forget trained (sweep 13)."""
    before = registry_state(cli.home)
    for args in (("eval", "--task", "airline", "--base", ""), ("adapters", "list", "--base", ""),
                 ("forget", "airline", "--adapters", "good", "--base", "")):
        _refused(cli(*args), cli.home, before, "Invalid value for '--base': is empty")


def test_several_devices_in_an_interactive_session_are_refused(monkeypatch):
    """With strategy "auto", Lightning forks for several devices in a REPL or notebook: the "trained for 0 steps"
    case that naming ddp_fork is refused for (review)."""
    import lightning.pytorch.trainer.connectors.accelerator_connector as connector
    from pydantic import ValidationError

    from loraplex.training import LightningSettings

    monkeypatch.setattr(connector, "_IS_INTERACTIVE", True)
    with pytest.raises(ValidationError, match="would train in forked or spawned processes"):
        LightningSettings(devices=2, accelerator="cpu")
    assert LightningSettings(devices=1).devices == 1


NO_USER = "~no-such-user-of-loraplex"


@pytest.mark.parametrize("args", [
    ["stream", "run", f"{NO_USER}/s.yaml"],
    ["stream", "report", f"{NO_USER}/run"],
    ["eval", "good", "--task", f"{NO_USER}/t.jsonl"],
    ["train", f"{NO_USER}/t.jsonl", "--name", "t"],
    ["adapters", "register", f"{NO_USER}/peft", "--name", "n", "--description", "airline tweets"],
    ["adapters", "export", "good", f"{NO_USER}/out"],
])
def test_a_path_of_a_user_that_does_not_exist(cli, seeded, args):
    """`~user` naming no user: pathlib's RuntimeError was an internal error (exit 70; sweep 21)."""
    before = registry_state(cli.home)
    _refused(cli(*args), cli.home, before, f"'{NO_USER}' names no user of this machine")


def test_several_devices_from_a_python_program_are_refused(monkeypatch):
    """From a script (or `python -c`), Lightning's DDP launcher re-ran the caller's whole program per extra device:
    every api call before `train` ran twice, and `python -c` was SIGKILLed (sweep 40). Only the loraplex command,
    whose re-run is the same command, trains on several devices; a Python program is told so."""
    from pydantic import ValidationError

    from loraplex import ranks
    from loraplex.training import LightningSettings

    monkeypatch.setattr(ranks, "COMMAND_LINE", False)
    with pytest.raises(ValidationError, match="Lightning's DDP launcher would run this whole program again"):
        LightningSettings(devices=2, accelerator="cpu", strategy="ddp")
    monkeypatch.setattr(ranks, "COMMAND_LINE", True)
    assert LightningSettings(devices=2, accelerator="cpu", strategy="ddp").devices == 2


@pytest.mark.parametrize("where", ["dir", CFG, "adapter_model.safetensors"])
def test_a_symbolic_link_loop_is_named_as_one(cli, seeded, tiny_bert, tmp_path, where):
    """A loop of links read as a missing file: "no adapter_config.json" for a file `ls` shows (sweep 64 F1)."""
    if where == "dir":
        d = tmp_path / "loop"
        d.symlink_to(d)
    else:
        d = _with_config(seeded, tmp_path / "ad", {})
        (d / where).unlink()
        (d / where).symlink_to(d / where)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "too many levels of symbolic links")


def test_a_trained_update_passes_the_update_bound():
    """The update bound (scaling x B @ A) refuses overflow, not adapters as training leaves them: a random
    rank-16 pair of unit-variance values at alpha 32 (updates ~ 8) passes, its product 1e4 over the bound does not."""
    import torch

    from loraplex.errors import InvalidAdapter
    from loraplex.experts.spec import MAX_ABS_UPDATE, Adapter, LoraSpec

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 64, generator=g), torch.randn(48, 16, generator=g)
    Adapter(LoraSpec(r=16, alpha=32.0), {"layer.0.query": (a, b)}).check_weights()
    with pytest.raises(InvalidAdapter, match="reaches magnitude"):
        Adapter(LoraSpec(r=16, alpha=32.0), {"layer.0.query": (a * 100, b * 100)}).check_weights()
    assert MAX_ABS_UPDATE == 1e4


def test_non_finite_scores_give_no_answer(cli, seeded, monkeypatch):
    """An argmax over NaN scores named the first label: `query` answered, `eval` scored it (sweep 64 F3)."""
    import torch

    from loraplex.heads import EncoderHead

    monkeypatch.setattr(EncoderHead, "scores_of", lambda self, model, tok, emb, task: torch.full(
        (emb.shape[0], len(task.labels)), float("nan")))
    before = registry_state(cli.home)
    r = cli("query", "my flight was late", "--adapters", "good", "--labels", "happy,sad")
    _refused(r, cli.home, before, "scores are NaN or infinite for 1 of the 1 text(s)", code=1)


def test_the_server_labels_no_answer_from_non_finite_scores():
    """The server's /v1/classify answer: a NaN score was a 500 (NaN is not JSON) after the softmax (sweep 64 F3);
    NonFiniteScores is a LoraplexError, the server's 503 with the message."""
    import torch

    from loraplex.errors import LoraplexError, NonFiniteScores
    from loraplex.serve.classify import _labelled
    from loraplex.tasks import Task

    task = Task(name="t", description="d", labels=("a", "b"), train=(), validation=(), test=())
    assert _labelled(task, torch.tensor([0.1, 0.9]), {}, False)["label"] == "b"
    with pytest.raises(NonFiniteScores, match="NaN or infinite") as info:
        _labelled(task, torch.tensor([float("nan"), 0.9]), {}, False)
    assert isinstance(info.value, LoraplexError)


def test_halves_of_two_adapters_are_not_paired(cli, seeded, tiny_bert, tmp_path):
    """`X.lora_A.first.weight` with `X.lora_B.second.weight` was registered as one adapter (sweep 64 F5)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "halves"
    shutil.copytree(seeded, d)
    sd = load_file(str(d / WEIGHTS))
    save_file({k.replace(".lora_A.weight", ".lora_A.first.weight").replace(".lora_B.weight", ".lora_B.second.weight"): v
               for k, v in sd.items()}, str(d / WEIGHTS))
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "are stored under different adapter names")
    save_file({k.replace(".lora_A.weight", ".lora_A.first.weight").replace(".lora_B.weight", ".lora_B.first.weight"): v
               for k, v in sd.items()}, str(d / WEIGHTS))
    assert _register(cli, d, name="one", base=tiny_bert).exit_code == 0  # one adapter's name on both: as before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("update", [{"rank_pattern": {"(.*.*)*x": 2}}, {"target_modules": "(.*.*)*x|.*"}])
def test_a_backtracking_pattern_does_not_hang_registration(cli, seeded, tiny_bert, tmp_path, update):
    """`(.*.*)*x` against a 36-character module name backtracked without end under `re`: `adapters register` hung
    (killed after 60 s) and a server's load endpoint would have held a worker (sweep 64 F8)."""
    d = _with_config(seeded, tmp_path / "rd", update)
    r = _register(cli, d, name="rd", base=tiny_bert)
    assert r.exit_code == 0, r.output


def test_a_pattern_past_its_time_is_refused_by_name(monkeypatch):
    from loraplex.errors import InvalidAdapter
    from loraplex.experts import spec

    monkeypatch.setattr(spec, "PATTERN_TIMEOUT_S", 1e-9)
    with pytest.raises(InvalidAdapter, match=r"rank_pattern key .* takes too long to match the module name"):
        spec.LoraSpec(r=4, alpha=8.0, rank_pattern={"q(a|aa)*uery": 2}).rank_for("encoder.layer.0." + "a" * 5000)


def test_an_answer_with_more_adapters_than_shown_says_so(cli, seeded, tiny_bert):
    """The answer line showed 4 adapters and dropped the rest without a word (sweep 65)."""
    for i in range(4):
        assert _register(cli, seeded, name=f"copy{i}", base=tiny_bert).exit_code == 0
    r = cli("query", "late flight", "--adapters", "good,copy0,copy1,copy2,copy3", "--top-k", "5", "--labels", "late,on time")
    assert r.exit_code == 0, r.output
    assert "and 1 more (--json lists them)" in r.stdout, r.stdout


def test_pattern_keys_are_read_in_peft_form(tmp_path):
    """PEFT matches a key as `(.*\\.)?(KEY)$`: `query|value` is either module; without the group the alternation
    split the anchors, and an alpha_pattern gave value another alpha than PEFT's (sweep 66 F6)."""
    from loraplex.experts.spec import LoraSpec

    spec = LoraSpec(r=4, alpha=8.0, alpha_pattern={"query|value": 64.0})
    assert spec.alpha_for("encoder.layer.0.attention.self.value") == 64.0
    assert spec.alpha_for("encoder.layer.0.attention.self.query") == 64.0
    assert spec.alpha_for("encoder.layer.0.attention.self.value_extra") == 8.0


@pytest.mark.parametrize("end", ["Infinity", "1e400", '"12"'])
def test_a_header_offset_that_is_no_integer_is_corrupt(cli, seeded, tiny_bert, tmp_path, end):
    """`data_offsets` ending at Infinity or 1e400 made int() raise OverflowError: an internal error (sweep 66 F1)."""
    d = tmp_path / "inf"
    shutil.copytree(seeded, d)
    body = ('{"x.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, %s]}}' % end).encode()
    (d / WEIGHTS).write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 4)
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "its header is not a safetensors header")


def test_a_dangling_link_is_named_as_one(cli, seeded, tiny_bert, tmp_path):
    d = tmp_path / "dangling"
    shutil.copytree(seeded, d)
    (d / CFG).unlink()
    (d / CFG).symlink_to(tmp_path / "gone.json")
    before = registry_state(cli.home)
    _refused(_register(cli, d, base=tiny_bert), cli.home, before, "a symbolic link to")


def test_a_description_given_to_train_stays_that_adapters(cli, seeded, tiny_bert):
    """`train airline --description D` gave D to every later adapter trained on airline without one, even after
    the adapter that gave it was removed (the newest adapter's card stood in for the embedded task's own
    description; sweep 69): search and routing read it. An embedded task's description is its own."""
    import json as _json

    from loraplex.data import load_task

    own = load_task("airline").description
    base = ["--base", tiny_bert, "--steps", "1", "--eval-limit", "4", "--val-limit", "4", "--quiet"]
    assert cli("train", "airline", "--name", "x2", "--description", "Complaints from angry flyers", *base).exit_code == 0
    assert cli("train", "airline", "--name", "x3", *base).exit_code == 0

    def described(name):
        return _json.loads(cli("adapters", "show", name, "--json").stdout)["description"]

    assert described("x2") == "Complaints from angry flyers" and described("x3") == own
