"""`--set KEY=VALUE`: one parser for every command (router fit, query, serve, generate fit)."""

import pytest

from loraplex.cli._options import parse_sets
from loraplex.errors import InvalidSpec


def test_values_keys_and_nesting():
    cfg = parse_sets(["top-k=2", "temperature = 0.5", "shared=true", "cvae.steps=500", "cvae.hidden=[64, 64]",
                      "generator=sg", "note=a=b"])
    assert cfg == {"top_k": 2, "temperature": 0.5, "shared": True, "cvae": {"steps": 500, "hidden": [64, 64]},
                   "generator": "sg", "note": "a=b"}
    assert parse_sets(None) == {} and parse_sets([]) == {}


@pytest.mark.parametrize("bad", ["top_k", "=2", " =2", "a..b=1", "a.=1"])
def test_malformed_items_are_refused(bad):
    with pytest.raises(InvalidSpec, match="--set"):
        parse_sets([bad])


def test_a_value_cannot_also_be_a_group():
    with pytest.raises(InvalidSpec, match="not a group"):
        parse_sets(["cvae=1", "cvae.steps=2"])


@pytest.mark.parametrize("raw", ["1_0", "0.0_1", "1_000"])
def test_a_number_with_underscores_is_refused(raw):
    """JSON does not read `1_0`; pydantic then read the text as Python does, 10: a typo taken as a value
    (sweep 15)."""
    with pytest.raises(InvalidSpec, match="not a number as JSON writes it"):
        parse_sets([f"top_k={raw}"])
    assert parse_sets(["name=my_router"]) == {"name": "my_router"}  # text with underscores stays text


def test_a_wrong_type_is_named_as_the_set_option(settings):
    """The API's strict check named the CLI's `--set` value as `query(): route_threshold` (sweep 15)."""
    from loraplex import api
    from loraplex.errors import UserInputError

    for router, item in (("auto", "route_threshold=abc"), (None, "top_k=two")):
        with pytest.raises(UserInputError) as exc:
            api.query(["x"], router=router, config=parse_sets([item]), settings=settings)
        assert str(exc.value).startswith(f"--set {item.split('=')[0]} must be"), str(exc.value)


def test_query_labels_follow_the_task_files_label_rules():
    """A label holding U+202E or a control character was refused in a task file but taken from `--labels` and
    the server's `labels` (review): one rule, `tasks.label_problem`."""
    from loraplex.errors import UserInputError
    from loraplex.tasks import checked_labels

    for bad, words in (("pos\u202e", "bidirectional control character"), ("p\x07s", "control character")):
        with pytest.raises(UserInputError, match=f"labels: the label .* holds a {words}"):
            checked_labels([bad, "neg"])
    assert checked_labels(["pos", "neg"]) == ("pos", "neg")
