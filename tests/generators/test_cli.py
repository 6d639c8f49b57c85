"""The `loraplex generate` commands end to end on tiny random models, and their refusals."""

from __future__ import annotations

import json

import pytest

from tests.conftest import registry_state

from .conftest import TOY_TASKS, add_toy, write_task

FAST = ["--set", "cvae.steps=150"]
NEW_DESC = "Classify the sentiment of tweets about flights and trains, delays and late crews."


def _json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _trained(cli, tiny_bert, tmp_path, *, rows: int, steps: int) -> dict:
    """The toy tasks written under tmp_path/tasks, an adapter NAME-lora trained on each by `loraplex train`."""
    root = tmp_path / "tasks"
    root.mkdir()
    files = {n: write_task(root, n, d, topic, n=rows) for n, (d, topic) in TOY_TASKS.items()}
    for n, f in files.items():
        _json(cli("train", f, "--name", f"{n}-lora", "--base", tiny_bert, "--steps", str(steps), "--rank", "4",
                  "--batch-size", "8", "--quiet", "--json"))
    return files


def test_train_fit_generate_export_eval(cli, tiny_bert, tmp_path):
    """Adapters trained by `loraplex train` (with their snapshots) -> `generate fit` -> `generate adapter`."""
    files = _trained(cli, tiny_bert, tmp_path, rows=60, steps=10)
    fit = _json(cli("generate", "fit", "g", "--method", "sg-lora", *FAST, "--json"))
    assert fit["members"] == [f"{n}-lora" for n in TOY_TASKS] and fit["vectors"] == 15
    out = _json(cli("generate", "adapter", NEW_DESC, "--generator", "g", "--name", "trains-lora", "--json"))
    assert out["parents"][0]["name"] == "flights-lora" and out["method"] == "sg-lora"
    show = _json(cli("adapters", "show", "trains-lora", "--json"))
    assert show["origin"] == "generated" and show["extra"]["generator"] == "g"
    assert {"kind": "generated-from", "target": "adapter:flights-lora"} in show["edges"]
    assert [p["name"] for p in show["extra"]["parents"]] == [p["name"] for p in out["parents"]]
    assert _json(cli("adapters", "search", "tweets about trains and delays", "-k", "1", "--json"))[0]["name"] == "trains-lora"
    r = cli("adapters", "export", "trains-lora", tmp_path / "peft")
    assert r.exit_code == 0 and (tmp_path / "peft" / "adapter_model.safetensors").exists()
    ev = _json(cli("eval", "trains-lora", "--task", files["flights"], "--json"))
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["n"] > 0
    text = cli("generate", "adapter", NEW_DESC, "--generator", "g", "--name", "trains-2")
    assert text.exit_code == 0 and "parents" in text.stdout and "flights-lora" in text.stdout
    assert cli("registry", "check").exit_code == 0
    # it records its nearest parent's task, so a query routed to it is answered (it was "no label set")
    assert show["task"] == str(files["flights"]) and show["extra"]["labels_from"] == "flights-lora"
    ans = _json(cli("query", "tweets about trains and delays", "--adapters", "trains-lora", "--json"))
    assert ans["answer"] in ("bad", "good")
    # eval with no --task reads that parent's task: it says so (it was evaluated on it without a word)
    own = _json(cli("eval", "trains-lora", "--limit", "4", "--json"))
    assert own["task_from"] == "flights-lora" and own["task"] == "flights"
    said = cli("eval", "trains-lora", "--limit", "4", "--quiet")
    assert "(generated; evaluated on the task of flights-lora, whose labels it answers with) on flights" in said.stdout
    assert "task_from" not in ev  # a task named with --task is the one asked for


def test_icm_lora_from_examples(cli, toy_registry, tmp_path):
    f = tmp_path / "few.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                           [("great flight crew", "good"), ("awful late plane", "bad"), ("love the seat", "good")]) + "\n")
    _json(cli("generate", "fit", "icm", "--method", "icm-lora", *FAST, "--json"))
    out = _json(cli("generate", "adapter", NEW_DESC, "--generator", "icm", "--name", "few-lora", "--examples", f, "--json"))
    assert out["method"] == "icm-lora" and len(out["parents"]) == 3
    # more examples than it reads in context (n_examples, 8): a seeded draw, said, the same in any row order (it read
    # the file's first 8: a sorted file gave another adapter than the same rows shuffled; sweep 61)
    rows = [(f"great flight number {i}", "good") for i in range(12)] + [(f"awful late plane {i}", "bad") for i in range(12)]
    for order, rs in (("sorted", rows), ("mixed", rows[::2] + rows[1::2])):
        (tmp_path / f"{order}.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rs))
    a = cli("generate", "adapter", NEW_DESC, "--generator", "icm", "--name", "many-a", "--examples", tmp_path / "sorted.jsonl",
            "--json")
    assert a.exit_code == 0 and "icm-lora reads 8 of the 24 examples in context" in a.stderr, a.output
    b = _json(cli("generate", "adapter", NEW_DESC, "--generator", "icm", "--name", "many-b", "--examples",
                  tmp_path / "mixed.jsonl", "--json"))
    assert json.loads(a.stdout)["parents"] == b["parents"]
    assert cli("adapters", "remove", "many-a").exit_code == 0 and cli("adapters", "remove", "many-b").exit_code == 0
    assert _json(cli("adapters", "show", "few-lora", "--json"))["extra"]["labels_from"] in ("flights-lora", "music-lora",
                                                                                           "phones-lora")
    # examples whose labels no parent's task has: the adapter answers with the examples' own labels
    g = tmp_path / "weather.jsonl"
    g.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                           [("sunny skies all day", "nice"), ("storm and rain", "awful"), ("warm and bright", "nice")]))
    _json(cli("generate", "adapter", "weather nice or awful", "--generator", "icm", "--name", "wx", "--examples", g, "--json"))
    show = _json(cli("adapters", "show", "wx", "--json"))
    assert show["task"] == "examples:wx" and show["extra"]["labels_from"] == "examples"
    ans = _json(cli("query", "storm and rain", "--adapters", "wx", "--json"))
    assert ans["answer"] in ("nice", "awful") and ans["task"] == "wx"
    ev = cli("eval", "wx", "--task", "examples:wx")  # a label set with no rows to evaluate on: said so
    assert ev.exit_code == 2 and "task 'wx' has no test rows" in ev.stderr and "never was one" in ev.stderr, ev.output
    assert cli("registry", "check").exit_code == 0
    assert cli("adapters", "remove", "wx").exit_code == 0
    # a sidecar beside the examples is not read: said, not dropped quietly (sweep 18 F13)
    (tmp_path / "weather.task.json").write_text(json.dumps({"label_texts": {"nice": "good weather"}}))
    r = cli("generate", "adapter", "weather nice or awful", "--generator", "icm", "--name", "wx2", "--examples", g)
    assert r.exit_code == 0 and f"warning: {tmp_path / 'weather.task.json'} is not read" in r.stderr, r.output
    assert "else with the bare label names" in r.stderr  # not "answers with the bare label names" always (sweep 61)
    assert cli("adapters", "remove", "wx2").exit_code == 0
    lst = _json(cli("generate", "list", "--json"))
    assert [g["name"] for g in lst] == ["icm"]
    # a generator's members cannot be removed while it exists; the generator can
    before = registry_state(cli.home)
    r = cli("adapters", "remove", "music-lora")
    assert r.exit_code == 2 and "generator 'icm'" in r.stderr and registry_state(cli.home) == before
    assert cli("generate", "remove", "icm").exit_code == 0
    assert cli("adapters", "remove", "music-lora").exit_code == 0


@pytest.fixture
def fitted(cli, toy_registry):
    _json(cli("generate", "fit", "g", "--method", "sg-lora", *FAST, "--json"))
    return cli


@pytest.mark.parametrize("args, message", [
    (["generate", "fit", "x", "--method", "nope"], "unknown generator 'nope' (known: icm-lora, sg-lora)"),
    (["generate", "fit", "g", "--method", "sg-lora"], "a generator named 'g' already exists"),
    (["generate", "fit", "x", "--method", "sg-lora", "--adapters", "flights-lora"], "at least 2 adapters"),
    (["generate", "fit", "x", "--method", "sg-lora", "--adapters", "flights-lora,ghost"], "no adapter named 'ghost'"),
    (["generate", "fit", "x", "--method", "sg-lora", "--set", "top_k=0"], "invalid configuration for sg-lora: top_k"),
    (["generate", "fit", "x", "--method", "sg-lora", "--set", "bogus=1"], "bogus: unknown key"),
    (["generate", "fit", "x", "--method", "sg-lora", "--set", "nokey"], "--set takes KEY=VALUE"),
    (["generate", "adapter", NEW_DESC, "--generator", "ghost", "--name", "n"], "no generator named 'ghost'"),
    (["generate", "adapter", NEW_DESC, "--generator", "g", "--name", "flights-lora"], "already exists"),
    (["generate", "adapter", "  ", "--generator", "g", "--name", "n"], "a description of the task is required"),
    (["generate", "adapter", NEW_DESC, "--generator", "g", "--name", "bad/name"], "path separator"),
    (["generate", "adapter", NEW_DESC, "--generator", "g", "--name", "n", "--examples", "/nonexistent.jsonl"], "no such examples file"),
    (["generate", "adapter", NEW_DESC, "--generator", "g", "--name", "n", "--examples", "/tmp"],
     "/tmp: is a directory, expected an examples file"),  # "unknown task file type (none)" (sweep 18 F19)
    (["generate", "adapter", "zebra quantum origami volcano", "--generator", "g", "--name", "n"],
     "too far from every task generator 'g' learned from"),
])
def test_bad_input_is_one_line_and_changes_nothing(fitted, args, message):
    before = registry_state(fitted.home)
    r = fitted(*args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert registry_state(fitted.home) == before


def test_out_of_range_message_states_distance_and_threshold(fitted):
    r = fitted("generate", "adapter", "zebra quantum origami volcano", "--generator", "g", "--name", "n")
    assert "cosine distance 1.000" in r.stderr or "cosine distance 0.9" in r.stderr
    assert "beyond max_distance 0.55" in r.stderr


def test_icm_lora_needs_examples(cli, toy_registry):
    _json(cli("generate", "fit", "icm", "--method", "icm-lora", *FAST, "--json"))
    before = registry_state(cli.home)
    r = cli("generate", "adapter", NEW_DESC, "--generator", "icm", "--name", "n")
    assert r.exit_code == 2 and "pass --examples FILE" in r.stderr and registry_state(cli.home) == before


def test_a_member_with_another_layout_is_refused(cli, toy_registry, tiny_bert):
    settings, reg = toy_registry
    desc = "Classify the sentiment of tweets about the music festival, again."
    add_toy(reg, settings, tiny_bert, "odd-rank", None, desc, seed=99, rank=2)
    add_toy(reg, settings, tiny_bert, "odd-targets", None, desc, seed=98, targets=("query", "key", "value"))
    before = registry_state(cli.home)
    r = cli("generate", "fit", "x", "--method", "sg-lora", "--adapters", "flights-lora,music-lora,odd-rank")
    assert r.exit_code == 2 and "adapter 'odd-rank' does not match the layout of 'flights-lora' at module" in r.stderr
    assert "rank 2" in r.stderr and "rank 4" in r.stderr
    r = cli("generate", "fit", "x", "--method", "sg-lora", "--adapters", "flights-lora,odd-targets")
    assert r.exit_code == 2 and "its module 'encoder.layer.0.attention.self.key' is not in the layout" in r.stderr
    r = cli("generate", "fit", "x", "--method", "icm-lora", "--adapters", "flights-lora,odd-rank")
    assert r.exit_code == 2 and registry_state(cli.home) == before


def test_an_adapter_that_answers_with_a_composition_is_not_learned_from(cli, toy_registry, tiny_bert):
    """An o-lora stream's adapter trained with an earlier one summed in is not its task's adapter alone:
    named explicitly it is refused (the defaults already leave it out), and the registry is unchanged."""
    settings, reg = toy_registry
    add_toy(reg, settings, tiny_bert, "summed", None, "Classify the sentiment of tweets about concerts, summed.",
            seed=97, extra={"summed": True, "composition": ["flights-lora", "summed"], "method": {"name": "o-lora"}})
    before = registry_state(cli.home)
    r = cli("generate", "fit", "x", "--method", "sg-lora", "--adapters", "music-lora,summed")
    assert r.exit_code == 2 and "'summed' was trained by a continual stream (o-lora)" in r.stderr
    assert "a generator learns from adapters that answer alone" in r.stderr and registry_state(cli.home) == before
    fitted = _json(cli("generate", "fit", "x", "--method", "sg-lora", *FAST, "--json"))  # the defaults: without it
    assert "summed" not in fitted["members"] and len(fitted["members"]) == 3


def test_too_few_default_members_says_how_many_were_left_out(cli, settings, tiny_bert, toy_tasks):
    from loraplex import api

    reg = api.open_registry(settings)
    add_toy(reg, settings, tiny_bert, "flights-lora", toy_tasks["flights"], TOY_TASKS["flights"][0], seed=10)
    add_toy(reg, settings, tiny_bert, "summed", None, "Classify the sentiment of tweets about concerts, summed.",
            seed=97, extra={"summed": True, "composition": ["flights-lora", "summed"], "method": {"name": "o-lora"}})
    r = cli("generate", "fit", "x", "--method", "sg-lora")
    assert r.exit_code == 2 and "at least 2 trained adapters that answer alone; the registry holds 1 (1 more left out" in r.stderr


@pytest.mark.parametrize("edit", ["gone", "labels"])
def test_icm_lora_over_a_member_whose_task_file_is_gone_or_edited(cli, toy_registry, toy_tasks, edit):
    """icm-lora reads examples of each member's task: a file gone (the task was left on record only, with no
    rows) ended in an IndexError, and a file whose labels changed since training gave examples of labels the
    adapter never learned, without a word (sweep 18 F6). Both are one line naming the adapter and why."""
    f = toy_tasks["music"]
    if edit == "gone":
        f.rename(f.with_suffix(".away"))
        why = "the task file is gone"
    else:
        f.write_text(f.read_text().replace('"good"', '"fine"'))
        side = f.with_name("music.task.json")
        side.write_text(side.read_text().replace('"good"', '"fine"'))
        why = "changed since it was recorded (bad, good -> bad, fine)"
    before = registry_state(cli.home)
    r = cli("generate", "fit", "icm", "--method", "icm-lora", *FAST)
    assert r.exit_code == 2 and "icm-lora cannot read the task of adapter 'music-lora'" in r.stderr, r.output
    assert why in r.stderr and len(r.stderr.strip().splitlines()) == 1 and registry_state(cli.home) == before


def test_a_generated_adapter_answers_with_its_parents_own_labels(cli, tiny_bert, tmp_path):
    """After its task file's labels were renamed and another adapter trained on it, a child of the older
    adapter took the newer adapter's labels (the task file's newest card) while naming the older as
    `labels_from`, and `eval` scored it on the changed file (sweep 37): it takes its parent's own card."""
    files = _trained(cli, tiny_bert, tmp_path, rows=40, steps=4)
    f = files["flights"]
    f.write_text(f.read_text().replace('"good"', '"love"').replace('"bad"', '"hate"'))
    f.with_name("flights.task.json").write_text(json.dumps({"description": TOY_TASKS["flights"][0],
                                                            "labels": ["hate", "love"]}))
    _json(cli("train", f, "--name", "flights-new", "--base", tiny_bert, "--steps", "4", "--rank", "4",
              "--batch-size", "8", "--quiet", "--json"))
    _json(cli("generate", "fit", "g", "--method", "sg-lora", "--adapters", "flights-lora,music-lora,phones-lora",
              *FAST, "--json"))
    _json(cli("generate", "adapter", NEW_DESC, "--generator", "g", "--name", "child", "--json"))
    show = _json(cli("adapters", "show", "child", "--json"))
    assert show["extra"]["labels_from"] == "flights-lora"
    assert show["extra"]["task_cards"][str(f)]["labels"] == ["bad", "good"], show["extra"]
    assert _json(cli("query", "late plane delayed", "--adapters", "child", "--json"))["answer"] in ("bad", "good")
    ev = cli("eval", "child", "--limit", "4")  # the file's labels are not those it learned: refused, as for its parent
    assert ev.exit_code == 2 and "changed since" in ev.stderr, ev.output
