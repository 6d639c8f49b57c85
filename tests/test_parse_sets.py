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
