"""StackedBanks: a slot written with a few batched copies holds exactly what `set_expert` module by module
puts there (ranks below R padded, modules the adapter leaves alone emptied), and the model computes the same."""

import pytest
import torch
from torch import nn

from loraplex.experts.layers import StackedBanks, inject_new, routed_layers, use_gates
from loraplex.experts.spec import Adapter, LoraSpec

SHAPES = {"q": (6, 6), "v": (6, 4), "o": (6, 6)}  # q and o share a shape: one group; v another
NAMES = [f"layers.{i}.{p}" for i in range(3) for p in SHAPES]


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Module()
    m.layers = nn.ModuleList(nn.Module() for _ in range(3))
    for layer in m.layers:
        for p, (d_in, d_out) in SHAPES.items():
            setattr(layer, p, nn.Linear(d_in, d_out))
    inject_new(m, LoraSpec(r=4), NAMES, n_experts=3)
    return m


def _adapter(seed, rank, modules):
    g = torch.Generator().manual_seed(seed)
    w = {n: (torch.randn(rank, SHAPES[n[-1]][0], generator=g), torch.randn(SHAPES[n[-1]][1], rank, generator=g))
         for n in modules}
    return Adapter(LoraSpec(r=rank, alpha=3.0 * rank, target_modules=("q", "v")), w)


def _forward(m, x, slot):
    g = torch.zeros(1, 1, 3)
    g[0, 0, slot] = 1.0
    with use_gates(m, g):
        return [layer(x) for layer in (m.layers[i].q for i in range(3))] + [m.layers[0].v(x)]


def test_a_stacked_write_equals_set_expert_module_by_module():
    ads = [_adapter(1, 4, [n for n in NAMES if not n.endswith("o")]), _adapter(2, 2, [n for n in NAMES if n.endswith("q")])]
    ref, m = _model(), _model()
    banks = StackedBanks(m)
    assert len(banks.groups) == 2
    for e, ad in [(0, ads[0]), (2, ads[1]), (0, ads[1])]:  # slot 0 rewritten by an adapter of fewer modules
        for name, layer in routed_layers(ref).items():  # what the slot bank did before: module by module
            if name in ad.weights:
                layer.bank.set_expert(e, *ad.weights[name], ad.scaling(name))
            else:
                layer.bank.set_expert(e, torch.zeros(1, layer.bank.d_in), torch.zeros(layer.bank.d_out, 1), 0.0)
                layer.bank.rank_mask[e * 4:(e + 1) * 4] = 0.0
        banks.write(e, banks.pack(ad))
    # slot 1 was never written: PEFT's initialisation (the same seed) in both
    for (name, a), b in zip(routed_layers(ref).items(), routed_layers(m).values()):
        for part in ("A", "B", "rank_mask", "scaling"):
            torch.testing.assert_close(getattr(b.bank, part), getattr(a.bank, part), rtol=0, atol=0, msg=f"{name}.{part}")
    x = torch.randn(2, 5, 6)
    for slot in range(3):
        for y, want in zip(_forward(m, x, slot), _forward(ref, x, slot)):
            torch.testing.assert_close(y, want)
    banks.write(2, None)
    assert all(float(layer.bank.A[8:12].abs().sum()) == 0 and float(layer.bank.scaling[2]) == 0
               for layer in routed_layers(m).values())


def test_an_adapter_that_does_not_fit_is_refused():
    banks = StackedBanks(_model())
    with pytest.raises(ValueError, match="do not fit"):
        banks.pack(_adapter(3, 5, ["layers.0.q"]))  # rank 5 > the banks' 4
