"""The help of an option that sets a config field is the field's docstring, as pydantic reads it.

The CLI reads the docstrings from the config modules' source (cli/_options.field_doc) so that it
imports neither torch nor lightning; pydantic reads them with `use_attribute_docstrings`. The two must
agree for every option built by `field_option`, in every command that has it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.core import TyperOption

from loraplex.cli import _options, app
from loraplex.continual.spec import LoraSettings, TrainerSettings
from loraplex.generators.refine import RefineConfig
from loraplex.training import LightningSettings, TrainConfig

# (command path, option) -> (config, field): every option whose help comes from a field's docstring.
MAPPED = {
    ("train", "--rank"): (LoraSettings, "rank"),
    ("train", "--alpha"): (LoraSettings, "alpha"),
    ("train", "--targets"): (LoraSettings, "targets"),
    ("train", "--steps"): (TrainConfig, "steps"),
    ("train", "--lr"): (TrainConfig, "lr"),
    ("train", "--batch-size"): (TrainConfig, "batch_size"),
    ("train", "--seed"): (TrainConfig, "seed"),
    ("train", "--train-limit"): (TrainConfig, "train_limit"),
    ("train", "--val-limit"): (TrainConfig, "val_limit"),
    ("train", "--devices"): (LightningSettings, "devices"),
    ("train", "--strategy"): (LightningSettings, "strategy"),
    ("train", "--precision"): (LightningSettings, "precision"),
    ("router fit", "--steps"): (TrainConfig, "steps"),
    ("router fit", "--lr"): (TrainConfig, "lr"),
    ("router fit", "--batch-size"): (TrainConfig, "batch_size"),
    ("router fit", "--seed"): (TrainConfig, "seed"),
    ("router fit", "--devices"): (LightningSettings, "devices"),
    ("router fit", "--strategy"): (LightningSettings, "strategy"),
    ("router fit", "--precision"): (LightningSettings, "precision"),
    ("forget", "--lr"): (TrainerSettings, "lr"),  # forget's --steps and --eval-limit: hand-written (no experiences)
    ("forget", "--batch-size"): (TrainerSettings, "batch_size"),
    ("generate adapter", "--refine-steps"): (RefineConfig, "steps"),
    ("generate adapter", "--refine-blocks"): (RefineConfig, "blocks"),
}
SYNTAX = {("train", "--targets"): "comma-separated",
          ("generate adapter", "--refine-steps"): "needs --examples with a label on each",
          ("generate adapter", "--refine-blocks"): "with --refine-steps"}


def _command(path: str):
    cmd = typer.main.get_command(app)
    for word in path.split():
        cmd = cmd.commands[word]
    return cmd


def _option(path: str, name: str) -> TyperOption:
    return next(p for p in _command(path).params if isinstance(p, TyperOption) and name in p.opts)


@pytest.mark.parametrize(("where", "config_field"), list(MAPPED.items()), ids=[" ".join(w) for w in MAPPED])
def test_option_help_is_the_field_docstring(where, config_field):
    config, field = config_field
    doc = config.model_fields[field].description
    assert doc, f"{config.__name__}.{field} has no docstring"
    syntax = SYNTAX.get(where)
    assert _option(*where).help == (f"{doc} ({syntax})" if syntax else doc)


def test_every_field_option_is_checked():
    """Each option built from a field is in MAPPED (with that field), so none escapes the check above."""
    refs = {f"{c.__module__}:{c.__name__}.{f}" for c, f in MAPPED.values()}
    assert _options.FIELD_OPTIONS
    for name, ref in _options.FIELD_OPTIONS:
        assert ref in refs, f"{name} ({ref}) is not in MAPPED"
    built = {(name, ref) for name, ref in _options.FIELD_OPTIONS}
    for (_, name), (c, f) in MAPPED.items():
        assert (name, f"{c.__module__}:{c.__name__}.{f}") in built


def test_field_doc_reads_inherited_fields_and_refuses_missing_ones():
    assert _options.field_doc("loraplex.training:TrainConfig.devices") == LightningSettings.model_fields[
        "devices"].description
    with pytest.raises(LookupError):
        _options.field_doc("loraplex.training:TrainConfig.no_such_field")


def test_cli_start_up_imports_no_heavy_module():
    """Reading the docstrings for the help imports none of the config modules (nor torch, lightning)."""
    code = ("import sys, loraplex.cli; heavy = [m for m in ('torch', 'lightning', 'transformers', 'peft', "
            "'loraplex.training', 'loraplex.continual.spec') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_labels_and_task_paths_are_split_at_commas_only(cli, monkeypatch, tmp_path):
    """`forget --labels "not good"` asked for 'not' and 'good', and `router eval --tasks "dir with space/x.jsonl"`
    for three paths: labels and paths may hold spaces; adapter names may not."""
    from loraplex import api

    seen = {}
    monkeypatch.setattr(api, "forget", lambda task, **kw: seen.update(forget=kw["labels"], adapters=kw["adapters"]) or 1 / 0)
    monkeypatch.setattr(api, "evaluate_router", lambda name, **kw: seen.update(tasks=kw["tasks"]) or 1 / 0)
    for args in (("forget", "t", "--labels", "not good, very good", "--adapters", "a b,c"),
                 ("router", "eval", "r", "--tasks", "dir with space/x.jsonl,y.csv")):
        try:
            cli(*args)
        except ZeroDivisionError:
            pass
    assert seen == {"forget": ["not good", "very good"], "adapters": ["a", "b", "c"],
                    "tasks": ["dir with space/x.jsonl", "y.csv"]}


def test_a_label_that_holds_a_comma_is_named_in_double_quotes(cli, monkeypatch):
    """A label such as "yes, mostly" could not be named in `forget --labels` or `query --labels` (split at
    its comma): double quotes hold it, as in a CSV row; an unclosed quote is one line naming the option."""
    from loraplex import api

    seen = {}
    monkeypatch.setattr(api, "forget", lambda task, **kw: seen.update(forget=kw["labels"]) or 1 / 0)
    monkeypatch.setattr(api, "query", lambda queries, **kw: seen.update(query=kw["labels"]) or 1 / 0)
    for args in (("forget", "t", "--labels", '"yes, mostly", no'), ("query", "q", "--labels", '"yes, mostly",no')):
        try:
            cli(*args)
        except ZeroDivisionError:
            pass
    assert seen == {"forget": ["yes, mostly", "no"], "query": ["yes, mostly", "no"]}
    r = cli("forget", "t", "--labels", '"yes, mostly')
    assert r.exit_code == 2 and "--labels" in r.output and "double quotes" in r.output


def test_a_nested_metric_is_shown_formatted():
    """`adapters show` of a forgetting adapter printed its losses as a Python dict repr, unrounded (sweep 13)."""
    from loraplex.cli._output import _kv_value

    assert _kv_value({"accuracy": 1.0, "losses": {"distill": 0.0234712, "forget": 1.80991}, "n": 3}) == \
        "accuracy=1.0000, losses={distill=0.0235, forget=1.8099}, n=3"


def test_catalog_lists_take_no_home(cli):
    """`tasks list` and `models list` read no registry: a --home there was accepted and ignored (sweep 13)."""
    for cmd in (("tasks", "list"), ("models", "list")):
        r = cli(*cmd, "--home", "")
        assert r.exit_code == 2 and "No such option: --home" in r.stderr, r.output


def test_the_rank_help_names_the_bound_the_config_keeps():
    from loraplex.continual.spec import LoraSettings
    from loraplex.experts.spec import MAX_RANK

    assert f"at most {MAX_RANK:,}" in LoraSettings.model_fields["rank"].description
