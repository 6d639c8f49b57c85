"""Routed models against real `peft`: one-hot gates give the adapter's own output (fp32, 1e-5), a
heterogeneous batch equals peft's mixed-batch inference, merged weights equal peft's merge, and mixed
ranks (2 and 6 in one padded bank) change nothing. BERT-, Llama- and GPT-2-shaped tiny models."""

import pytest
import torch

from loraplex.experts.layers import inject, routed_layers, use_gates
from loraplex.experts.peft_io import read_peft_dir
from loraplex.router.base import Routing
from tests.conftest import make_peft_adapter
from tests.experts.test_peft_interop import CASES, _inputs, _load_base, _out

TOL = 1e-5


@pytest.fixture(params=sorted(CASES))
def two_adapters(request, tiny_bert, tiny_llama, tiny_gpt2, tmp_path):
    """(kind, base dir, case, [peft dir rank 2, peft dir rank 6])"""
    kind = request.param
    base_dir = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    c = CASES[kind]
    extra = {"fan_in_fan_out": True} if c.get("fan_in_fan_out") else {}
    dirs = [make_peft_adapter(base_dir, tmp_path / f"a{r}", r=r, alpha=3 * r, targets=c["targets"], causal=c["causal"],
                              seed=5 + r, **extra) for r in (2, 6)]
    return kind, base_dir, c, dirs


def _peft_model(base_dir, c, dirs):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_load_base(base_dir, c["causal"]), str(dirs[0]), adapter_name="a0")
    pm.load_adapter(str(dirs[1]), adapter_name="a1")
    return pm.eval()


def _ours(base_dir, c, dirs):
    model = _load_base(base_dir, c["causal"])
    inject(model, [read_peft_dir(d)[0] for d in dirs])
    return model


class OneHot(torch.nn.Module):
    """A stand-in router that gives every token of row b the adapter rows[b]."""

    def __init__(self, rows, E):
        super().__init__()
        self.rows, self.E = rows, E

    def forward(self, h):  # (B, T, d_in)
        g = torch.zeros(h.shape[0], h.shape[1], self.E)
        g[torch.arange(h.shape[0]), :, torch.as_tensor(self.rows)] = 1.0
        return Routing(g, None, None, None, self.E)


def test_one_hot_router_gates_equal_peft(two_adapters):
    kind, base_dir, c, dirs = two_adapters
    x = _inputs(base_dir)
    pm = _peft_model(base_dir, c, dirs)
    ours = _ours(base_dir, c, dirs)
    bare = _out(_load_base(base_dir, c["causal"]), x)
    for e in range(2):
        pm.set_adapter(f"a{e}")
        ref = _out(pm, x)
        assert (ref - bare).abs().max() > 1e-3
        for layer in routed_layers(ours).values():
            layer.router = OneHot([e, e], 2)
        assert (_out(ours, x) - ref).abs().max() < TOL, f"{kind}: adapter {e} through the router path"


@pytest.mark.parametrize("sparse", [True, False])
def test_heterogeneous_batch_equals_peft_mixed_batch(two_adapters, sparse):
    kind, base_dir, c, dirs = two_adapters
    x = _inputs(base_dir)  # two rows
    pm = _peft_model(base_dir, c, dirs)
    with torch.no_grad():
        o = pm(**x, adapter_names=["a1", "a0"])
    ref = o.logits if hasattr(o, "logits") else o.last_hidden_state
    ours = _ours(base_dir, c, dirs)
    for layer in routed_layers(ours).values():
        layer.bank.sparse = sparse
    gates = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # (B, 1, E): row 0 -> a1, row 1 -> a0
    with use_gates(ours, gates):
        got = _out(ours, x)
    assert (got - ref).abs().max() < TOL


def test_merged_one_hot_equals_peft_merge(two_adapters):
    from loraplex.experts.layers import is_conv1d

    kind, base_dir, c, dirs = two_adapters
    ours = _ours(base_dir, c, dirs)
    for e in range(2):
        from peft import PeftModel

        merged = PeftModel.from_pretrained(_load_base(base_dir, c["causal"]), str(dirs[e])).merge_and_unload()
        ref = merged.state_dict()
        w = [0.0, 0.0]
        w[e] = 1.0
        for name, layer in routed_layers(ours).items():
            delta = layer.bank.delta_weight(w)  # (d_out, d_in)
            if is_conv1d(layer.base):
                delta = delta.T
            torch.testing.assert_close(layer.base.weight + delta, ref[f"{name}.weight"], atol=1e-6, rtol=0)
