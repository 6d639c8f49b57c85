"""Regularizer contract, parametrized over the REGULARIZERS catalog, plus each method's own properties."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.continual.regularizers import REGULARIZERS, ExperienceContext
from loraplex.continual.regularizers.gs_lora import block_of, ffn_modules
from loraplex.continual.slots import add_slot, train_only
from loraplex.experts.layers import routed_layers
from loraplex.experts.spec import LoraSpec
from loraplex.models import load_base

MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
           "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
           "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]


@pytest.fixture
def two_slots(tiny_bert, settings):
    """A tiny BERT with two slots in every listed module: slot 0 old (trained), slot 1 new."""
    lb = load_base(str(tiny_bert), settings)
    spec = LoraSpec(r=2, alpha=4)
    old = add_slot(lb.model, spec, MODULES, generator=torch.Generator().manual_seed(0))
    new = add_slot(lb.model, spec, MODULES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in routed_layers(lb.model).values():
            layer.bank.B.normal_(std=0.1)
    train_only(lb.model, new)
    ctx = ExperienceContext(index=1, model=lb.model, slot=new, previous=[old])
    return lb, ctx


def _build(name):
    return REGULARIZERS.build(name, {}, **({"model_type": "bert"} if name == "gs-lora" else {}))


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_contract(name, two_slots):
    lb, ctx = two_slots
    reg = _build(name)
    assert isinstance(reg.name, str) and reg.name
    reg.on_experience_start(ctx)
    pen = reg.penalty(None)
    assert pen is not None and pen.dim() == 0 and torch.isfinite(pen) and float(pen) >= 0
    pen.backward()
    for layer in routed_layers(lb.model).values():
        g = layer.bank.A.grad
        assert g is not None and g[:2].abs().sum() == 0  # frozen slot 0 gets no gradient
    diag = reg.on_experience_end(ctx)
    json.dumps(diag)
    state = json.loads(json.dumps(reg.state_dict()))
    other = _build(name)
    other.load_state_dict(state)
    assert other.state_dict() == reg.state_dict()


def test_o_lora_penalty_is_normalised_and_scale_invariant(two_slots):
    lb, ctx = two_slots
    reg = REGULARIZERS.build("o-lora", {"orth_weight": 1.0})
    reg.on_experience_start(ctx)
    p1 = float(reg.penalty(None))
    assert 0 < p1 < 1
    with torch.no_grad():
        for layer in routed_layers(lb.model).values():
            layer.bank.A[2:4] *= 1000.0  # the new slot's rows
    assert float(reg.penalty(None)) == pytest.approx(p1, rel=1e-5)


def test_o_lora_drives_orthogonality_without_collapse(two_slots):
    """The collapse guard: minimising the penalty alone rotates the new A, it does not shrink it."""
    lb, ctx = two_slots
    reg = REGULARIZERS.build("o-lora", {"orth_weight": 1.0})
    reg.on_experience_start(ctx)
    params = [p for p in lb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)
    start = float(reg.orthogonality())
    for _ in range(60):
        opt.zero_grad()
        reg.penalty(None).backward()
        opt.step()
    end = float(reg.orthogonality())
    diag = reg.on_experience_end(ctx)
    assert end < 0.5 * start
    assert diag["a_norm_ratio"] > 0.9


def test_o_lora_first_task_has_no_penalty(two_slots):
    lb, ctx = two_slots
    reg = REGULARIZERS.build("o-lora", {})
    reg.on_experience_start(ExperienceContext(0, lb.model, ctx.slot, previous=[]))
    assert reg.penalty(None) is None


@pytest.mark.parametrize("prune_by", ["delta", "norm"])
def test_gs_lora_groups_by_block_and_prunes(two_slots, prune_by):
    lb, ctx = two_slots
    ffn = ffn_modules(list(routed_layers(lb.model)), "bert")
    assert "encoder.layer.0.attention.output.dense" not in ffn
    slot = {m: ctx.slot[m] for m in ffn}
    fctx = ExperienceContext(2, lb.model, slot)
    reg = REGULARIZERS.build("gs-lora", {"sparsity_weight": 1.0, "prune_threshold": 0.5, "prune_by": prune_by}, model_type="bert")
    reg.on_experience_start(fctx)
    assert reg.groups == {"encoder.layer.0": ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"],
                          "encoder.layer.1": ["encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]}
    with torch.no_grad():  # block 1 shrinks to 1% of its norm: pruned; block 0 keeps its norm
        layers = routed_layers(lb.model)
        for m in reg.groups["encoder.layer.1"]:
            layers[m].bank.A[2:4] *= 0.01
            layers[m].bank.B[:, 2:4] *= 0.01
    diag = reg.on_experience_end(fctx)
    assert diag["groups_total"] == 2 and diag["groups_survived"] == 1
    assert diag["surviving_modules"] == reg.groups["encoder.layer.0"]
    assert routed_layers(lb.model)["encoder.layer.1.output.dense"].bank.A[2:4].abs().sum() == 0


def test_block_of():
    assert block_of("encoder.layer.3.output.dense", ("intermediate.dense", "output.dense")) == "encoder.layer.3"
    assert block_of("model.layers.2.mlp.up_proj", ("gate_proj", "up_proj", "down_proj")) == "model.layers.2.mlp"
    assert block_of("transformer.h.1.mlp.c_fc", ("mlp.c_fc", "mlp.c_proj")) == "transformer.h.1"
