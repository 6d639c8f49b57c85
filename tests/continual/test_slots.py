"""Slots: growing banks keeps the model's output, one slot trains, banks save and restore exactly."""

from __future__ import annotations

import torch

from loraplex.continual.slots import add_slot, bank_tensors, extract_slot, restore_banks, train_only
from loraplex.experts.layers import routed_layers
from loraplex.experts.spec import LoraSpec
from loraplex.models import load_base

ATTN = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value"]


def _model(tiny_bert, settings):
    lb = load_base(str(tiny_bert), settings)
    return lb


def _out(lb):
    enc = lb.tokenizer(["flight late again", "great crew"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return lb.model(**enc).last_hidden_state


def test_add_slot_grows_banks_without_changing_outputs(tiny_bert, settings):
    lb = _model(tiny_bert, settings)
    spec = LoraSpec(r=2, alpha=4)
    s0 = add_slot(lb.model, spec, ATTN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # make slot 0 do something
        for layer in routed_layers(lb.model).values():
            layer.bank.B.normal_()
    before = _out(lb)
    s1 = add_slot(lb.model, spec, ATTN, generator=torch.Generator().manual_seed(1))
    assert s0 == {m: 0 for m in ATTN} and s1 == {m: 1 for m in ATTN}
    assert all(layer.bank.n_experts == 2 for layer in routed_layers(lb.model).values())
    torch.testing.assert_close(_out(lb), before)  # a fresh slot has B = 0
    a0 = extract_slot(lb.model, spec, s0)
    assert sorted(a0.weights) == sorted(ATTN) and a0.rank(ATTN[0]) == 2


def test_train_only_moves_one_slot(tiny_bert, settings):
    lb = _model(tiny_bert, settings)
    spec = LoraSpec(r=2, alpha=4)
    s0 = add_slot(lb.model, spec, ATTN, generator=torch.Generator().manual_seed(0))
    s1 = add_slot(lb.model, spec, ATTN, generator=torch.Generator().manual_seed(1))
    params = train_only(lb.model, s1)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in lb.model.named_parameters() if ".bank." not in n)
    old = extract_slot(lb.model, spec, s0)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    enc = lb.tokenizer(["flight late again"], return_tensors="pt")
    for _ in range(3):
        opt.zero_grad()
        lb.model(**enc).last_hidden_state.pow(2).mean().backward()
        opt.step()
    after0, after1 = extract_slot(lb.model, spec, s0), extract_slot(lb.model, spec, s1)
    for m in ATTN:
        assert torch.equal(after0.weights[m][0], old.weights[m][0]) and torch.equal(after0.weights[m][1], old.weights[m][1])
        assert after1.weights[m][1].abs().sum() > 0  # B of the trained slot left zero


def test_banks_restore_exactly(tiny_bert, settings):
    lb = _model(tiny_bert, settings)
    spec = LoraSpec(r=2, alpha=4)
    add_slot(lb.model, spec, ATTN, generator=torch.Generator().manual_seed(0))
    add_slot(lb.model, LoraSpec(r=1, alpha=2), ["encoder.layer.0.intermediate.dense"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in routed_layers(lb.model).values():
            layer.bank.B.normal_()
    want = _out(lb)
    tensors, layout = bank_tensors(lb.model)
    fresh = _model(tiny_bert, settings)
    restore_banks(fresh.model, tensors, layout)
    torch.testing.assert_close(_out(fresh), want, rtol=0, atol=0)


def test_grown_pads_rank_and_keeps_the_delta():
    from loraplex.continual.slots import grown
    from loraplex.experts.bank import LoraBank

    bank = LoraBank(6, 5, 2, 2)
    g = torch.Generator().manual_seed(0)
    for e in range(2):
        bank.set_expert(e, torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 0.5 + e)
    big = grown(bank, 1, rank=4)
    assert (big.n_experts, big.rank) == (3, 4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(big(x), bank(x))
    torch.testing.assert_close(big.expert(1)[0], bank.expert(1)[0])
