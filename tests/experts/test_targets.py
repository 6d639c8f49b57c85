"""Which modules a new adapter adapts (`LoraSpec.resolve_targets`): every target the user names must adapt
something the loss reaches (sweep 16: a typo beside a real target was dropped silently and still stored in
the spec; BERT's pooler, which no head reads, failed training with an internal error)."""

import pytest

from loraplex.errors import IncompatibleAdapter
from loraplex.experts.spec import LoraSpec

BERT = [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")] + [
    f"encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("attention.output", "intermediate", "output")] + [
    "pooler.dense"]


def test_default_and_named_targets():
    assert len(LoraSpec(r=4).resolve_targets(BERT, "bert")) == 8  # query, key, value, attention.output.dense
    assert len(LoraSpec(r=4, target_modules=["query", "key"]).resolve_targets(BERT, "bert")) == 4
    dense = LoraSpec(r=4, target_modules=["dense"]).resolve_targets(BERT, "bert")
    assert len(dense) == 6 and "pooler.dense" not in dense  # the pooler is left out: nothing reads it


def test_a_target_that_matches_nothing_is_named_even_beside_one_that_does():
    with pytest.raises(IncompatibleAdapter, match="target module 'qurey' matches no linear layer of this bert model"):
        LoraSpec(r=4, target_modules=["query", "qurey"]).resolve_targets(BERT, "bert")
    with pytest.raises(IncompatibleAdapter, match="match no linear layer"):
        LoraSpec(r=4, target_modules=["qurey"]).resolve_targets(BERT, "bert")


def test_a_target_of_only_unread_modules_is_refused():
    with pytest.raises(IncompatibleAdapter, match="matches only pooler.dense, which no loraplex head reads"):
        LoraSpec(r=4, target_modules=["pooler.dense"]).resolve_targets(BERT, "bert")
