"""Leave-one-out fits (bench/library_generators.py): the held-out task never reaches the generator."""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import UserInputError
from loraplex.generators import workflow
from loraplex.generators.base import GENERATORS, GenContext

from .conftest import FAST, TOY_TASKS

NAMES = [f"{n}-lora" for n in TOY_TASKS]


def test_without_drops_the_member_its_snapshots_and_its_description(toy_registry):
    _, reg = toy_registry
    full = workflow.training_set(reg, NAMES)
    held = "music-lora"
    data = full.without([held])
    assert data.members == ["flights-lora", "phones-lora"]
    assert all(src != held for src, _ in data.sources) and len(data.sources) == 10
    assert data.tasks == [full.tasks[0], full.tasks[2]]
    assert TOY_TASKS["music"][0] not in data.descriptions and data.desc_embeddings.shape[0] == 2
    # every kept vector is the same vector, owned by the same (renumbered) member, at the same progress
    for j, (src, step) in enumerate(data.sources):
        i = full.sources.index((src, step))
        assert torch.equal(data.vectors[j], full.vectors[i])
        assert data.members[data.owner[j]] == full.members[full.owner[i]] == src
        assert data.progress[j] == full.progress[i]
    # the same as reading the other members from the registry in the first place
    direct = workflow.training_set(reg, ["flights-lora", "phones-lora"])
    assert torch.equal(direct.vectors, data.vectors) and direct.owner == data.owner


def test_the_bench_split_never_shows_the_held_out_task(toy_registry):
    from bench.library_generators import leave_one_out

    settings, reg = toy_registry
    full = workflow.training_set(reg, NAMES)
    for held in NAMES:
        data = leave_one_out(full, held)
        assert held not in data.members and all(src != held for src, _ in data.sources)
        entry = GENERATORS.get("sg-lora")
        gen = entry.factory(entry.make_config(FAST), GenContext(settings, reg.embedder_name, data.base))
        gen.fit(data)
        assert gen.known.shape[0] == 2 and gen.space.coords.shape[0] == 10  # fitted on the others' vectors only


def test_the_t2l_folds_never_show_a_held_out_task(toy_registry):
    """bench/library_t2l.py's k folds: each task is held out exactly once, and a fold's training set has no
    held-out task's adapter, snapshot, description or task (the map it fits reads only those)."""
    from bench.library_t2l import fold

    _, reg = toy_registry
    full = workflow.training_set(reg, NAMES)
    tasks = list(TOY_TASKS)
    seen = []
    for f in range(2):
        held, data = fold(full, tasks, 2, f)
        seen += held
        gone = {f"{t}-lora" for t in held}
        assert gone and not gone & set(data.members) and all(src not in gone for src, _ in data.sources)
        assert not {TOY_TASKS[t][0] for t in held} & set(data.descriptions)
        assert data.desc_embeddings.shape[0] == len(data.members) == len(tasks) - len(held)
    assert sorted(seen) == sorted(tasks)


def test_without_refuses_unknown_or_every_member(toy_registry):
    _, reg = toy_registry
    full = workflow.training_set(reg, NAMES)
    with pytest.raises(UserInputError, match="not members"):
        full.without(["nope-lora"])
    with pytest.raises(UserInputError, match="nothing to learn from"):
        full.without(NAMES)


def test_a_results_file_of_another_run_is_refused_not_merged(tmp_path):
    """bench/library_generators.py merged its rows into whatever file --out named, the published results by
    default (sweep 42: a scratch home's 2-step run replaced a row of the 61-task table): rows resume only a run
    of the same recipe, and --out is checked before any work."""
    import argparse
    import json

    from bench.library import out_file
    from bench.library_generators import resumed_rows

    ap = argparse.ArgumentParser()
    recipe = {"home": "/h", "members": 61, "eval_limit": 150}
    out = tmp_path / "rows.json"
    assert resumed_rows(out, recipe, ap) == {}
    out.write_text(json.dumps({"airline": {"oracle": 0.8, "recipe": recipe}}))
    assert resumed_rows(out, recipe, ap)["airline"]["oracle"] == 0.8
    for other in ({**recipe, "members": 5}, {**recipe, "home": "/scratch"}):
        with pytest.raises(SystemExit):
            resumed_rows(out, other, ap)
    out.write_text(json.dumps({"airline": {"oracle": 0.8}}))  # a file written before rows carried their recipe
    with pytest.raises(SystemExit):
        resumed_rows(out, recipe, ap)
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        out_file(str(tmp_path))
    assert out_file(str(tmp_path / "new" / "r.json")) == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # the check leaves no file behind, nor the folders it made (sweep 43)


def test_refine_bench_reads_its_variants_and_reports_gain_and_cost():
    """bench/library_refine.py: BLOCKS:STEPS variants (bad ones named), and its tables' means: a refused task
    counts as the base in the gain and is left out of the cost."""
    import argparse

    from bench.library_refine import missing, report, variants_arg

    assert variants_arg("0:20, 1:5") == [(0, 20), (1, 5)]
    for bad, msg in (("1", "BLOCKS:STEPS"), ("1:0", "below 1"), ("-1:3", "below 0"), ("1:2,1:2", "named twice")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            variants_arg(bad)
    rows = [
        {"task": "a", "family": "f", "base": 0.5, "oracle": 1.0, "icm": 0.6, "icm_sec": 0.2,
         "b0s2": 1.0, "b0s2_sec": 2.0, "b1s2": 0.75, "b1s2_sec": 0.5},
        {"task": "b", "family": "g", "base": 0.2, "oracle": 0.6, "icm": 0.2, "b0s2": 0.2, "b1s2": 0.2, "refused": "far"},
        {"task": "c", "family": "g", "base": 0.9, "oracle": 0.92, "icm": 0.9, "icm_sec": 0.1,  # gains < 5 points
         "b0s2": 0.9, "b0s2_sec": 1.0, "b1s2": 0.9, "b1s2_sec": 1.0},
    ]
    # a resumed run with another variant measures that one only; a row holding every variant is done
    assert not missing(rows[0], [(0, 2), (1, 2)]) and missing(rows[0], [(0, 2), (3, 2)]) and missing(None, [])
    assert not missing(rows[1], [(1, 2)])  # refused: nothing to time
    assert missing({k: v for k, v in rows[0].items() if k != "icm_sec"}, [(1, 2)])
    lines = report(rows, [(0, 2), (1, 2)], 0.05, {"a": 20.0, "b": 20.0})
    overall = next(line for line in lines if line.startswith("all"))
    assert overall.split() == ["all", "2", "10.0%", "50.0%", "25.0%"]
    assert [line.split()[-3:] for line in lines if line.startswith(("seconds", "x vs"))] == [
        ["0.20", "2.00", "0.50"], ["100", "10", "40"]]
    # nothing to read is said, not a traceback (sweep 54): no gaining task; only a refused one; no training times
    assert report(rows[2:], [(0, 2), (1, 2)], 0.05, {})[-1].endswith("nothing to report")
    lines = report(rows[1:2], [(0, 2), (1, 2)], 0.05, {})
    assert [line.split()[-3:] for line in lines if line.startswith(("seconds", "x vs"))] == [["-", "-", "-"]] * 2
    lines = report(rows[:1], [(0, 2), (1, 2)], 0.05, {})
    assert [line.split()[-3:] for line in lines if line.startswith("x vs")] == [["-", "-", "-"]]
