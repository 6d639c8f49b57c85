"""LoraBank's token-level sparse dispatch (per-token gates) equals its dense path: values and gradients
with respect to x, A, B and the gates, for the gates every router makes, mixed ranks, padding and k = 1, 2, 4."""

import pytest
import torch

from loraplex.experts.bank import LoraBank
from loraplex.router.base import topk_scatter

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(autouse=True, params=["csr", "grouped"])
def kernel(request, monkeypatch):
    """Every test here runs with each kernel of the token dispatch forced (LoraBank.kernel): csr, the sparse
    rows auto takes on CPU without adapter gradients, and grouped, the sorted blocks it takes otherwise
    (a test parametrized on `kernel` itself runs with the kernels it names)."""
    monkeypatch.setattr(LoraBank, "kernel", request.param)
    return request.param


def _cpu_only(kernel, device="cpu"):
    if kernel == "csr" and device != "cpu":
        pytest.skip("auto takes the csr kernel on CPU only")


def _bank(E=12, R=4, d_in=16, d_out=10, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bank = LoraBank(d_in, d_out, E, R)
    for e in range(E):
        r = 1 + (e % R)  # mixed ranks, padded to R
        bank.set_expert(e, torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + 0.1 * e)
    return bank.to(device=device, dtype=dtype)


def _token_gates(B, T, E, k, seed=0, pad=None):
    """Top-k softmax gates as token-gate makes them; rows past `pad[b]` tokens are all zero (padding)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, E, generator=g)
    top, idx = logits.topk(k, dim=-1)
    gates = topk_scatter(torch.softmax(top, -1), idx, E)
    if pad is not None:
        for b, n in enumerate(pad):
            gates[b, n:] = 0.0
    return gates


def _run(bank, dispatch, x, gates):
    bank.dispatch = dispatch
    bank.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    gates = gates.detach().clone().requires_grad_(True)
    out = bank(x, gates)
    out.float().pow(2).sum().backward()
    return out.detach(), x.grad, bank.A.grad.clone(), bank.B.grad.clone(), gates.grad


def _assert_equal(bank, x, gates, tol=1e-5, selected=None):
    s = _run(bank, "sparse", x, gates)
    d = _run(bank, "dense", x, gates)
    def close(a, b, name):  # relative to the tensor's scale (sums of squares make large gradients)
        a, b = a.float(), b.float()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1.0)), msg=f"{name} differs")

    for name, a, b in zip(("out", "x", "A", "B"), s[:4], d[:4]):
        close(a, b, name)
    # gate gradients agree on the selected slots (and on zero-weight slots the top-k filled when a token
    # uses fewer than k); the sparse path gives zero elsewhere
    sel = (gates != 0) | (s[4] != 0)
    close(s[4][sel], d[4][sel], "gates")
    assert int(sel.sum(-1).max()) <= max(1, int((gates != 0).sum(-1).max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_token_sparse_equals_dense(k, device, kernel):
    _cpu_only(kernel, device)
    bank = _bank(device=device)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(k), device="cpu").to(device)
    gates = _token_gates(3, 7, 12, k, seed=k).to(device)
    _assert_equal(bank, x, gates)


def test_frozen_adapters_train_only_the_gates_and_input():
    """A router trained over frozen adapters (A, B without gradients): the sparse path's backward, which
    then keeps less for backward, still gives the dense path's input and gate gradients."""
    bank = _bank()
    bank.A.requires_grad_(False)
    bank.B.requires_grad_(False)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(8))
    gates = _token_gates(3, 7, 12, 2, seed=8)
    grads = []
    for dispatch in ("sparse", "dense"):
        bank.dispatch = dispatch
        xx, gg = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        out = bank(xx, gg)
        out.pow(2).sum().backward()
        grads.append((out.detach(), xx.grad, gg.grad))
    (so, sx, sg), (do, dx, dg) = grads
    torch.testing.assert_close(so, do, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sx, dx, rtol=1e-4, atol=1e-4)
    sel = gates != 0
    torch.testing.assert_close(sg[sel], dg[sel], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_delta_added_into_the_base_output(dispatch):
    """`into`: the bank adds its delta into the base projection's output in place (no separate delta
    tensor), with the same values and gradients as base + delta, the base output's gradient included."""
    bank = _bank()
    bank.dispatch = dispatch
    W = torch.randn(10, 16, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(6))
    gates = _token_gates(3, 7, 12, 2, seed=6)
    runs = []
    for fused in (True, False):
        bank.zero_grad(set_to_none=True)
        w, xx, gg = W.clone().requires_grad_(True), x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        base = xx @ w.T
        out = bank(xx, gg, into=base) if fused else base + bank(xx, gg)
        if fused:
            assert out.data_ptr() == base.data_ptr()  # added in place
        out.pow(2).sum().backward()
        runs.append((out.detach(), w.grad, xx.grad, gg.grad, bank.A.grad, bank.B.grad))
    for name, a, b in zip(("out", "W", "x", "gates", "A", "B"), *runs):
        # float32 sums in another order: relative error ~3e-5 on gradients of magnitude ~1e3 (AMX CPUs)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} differs")
    with torch.inference_mode():  # and under inference mode, as the server runs it
        base = x @ W.T
        torch.testing.assert_close(bank(x, gates, into=base.clone()), base + bank(x, gates))
    # an `into` of another dtype is not written in place: the sum comes back as a new tensor
    half = (x @ W.T).to(torch.float64)
    got = bank(x, gates, into=half)
    assert got.dtype == torch.float64 and got.data_ptr() != half.data_ptr()


def test_kept_layout_of_frozen_b_follows_changes():
    """Frozen B: the token path keeps its (E, R, d_out) copy between forwards and makes it anew when B
    changes in place (a new adapter written into a slot), so the output follows the new weights."""
    bank = _bank()
    bank.A.requires_grad_(False)
    bank.B.requires_grad_(False)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(7))
    gates = _token_gates(2, 5, 12, 2, seed=7)
    bank.dispatch = "sparse"
    first = bank(x, gates)
    kept = bank.__dict__["_b_kept"][1]
    assert bank(x, gates).equal(first) and bank.__dict__["_b_kept"][1] is kept  # reused while B is unchanged
    g = torch.Generator().manual_seed(9)
    for e in range(12):
        bank.set_expert(e, torch.randn(2, 16, generator=g), torch.randn(10, 2, generator=g), 1.0)
    after = bank(x, gates)
    bank.dispatch = "dense"
    torch.testing.assert_close(after, bank(x, gates), rtol=1e-5, atol=1e-5)
    assert not after.equal(first)
    bank.dispatch = "sparse"
    # a copy kept under inference mode serves a later forward that trains the input (64 tokens: one block
    # per expert, so the grouped matmuls read the kept copy itself, not a gathered one)
    x, gates = torch.randn(4, 16, 16, generator=g), _token_gates(4, 16, 12, 2, seed=9)
    bank.set_expert(0, torch.randn(2, 16, generator=g), torch.randn(10, 2, generator=g), 1.0)  # B changes again
    with torch.inference_mode():
        bank(x, gates)
    xx = x.clone().requires_grad_(True)
    bank(xx, gates).pow(2).sum().backward()
    assert xx.grad is not None


def test_padding_mask_and_uneven_k():
    bank = _bank()
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(3))
    gates = _token_gates(4, 9, 12, 2, pad=[9, 5, 1, 0])  # padded tokens have all-zero gates
    gates[0, 0] = 0.0
    gates[0, 0, 3] = 1.0  # one token uses a single adapter while others use two
    _assert_equal(bank, x, gates)
    bank.dispatch = "sparse"
    out = bank(x, gates)
    assert bool((out[3] == 0).all()) and bool((out[2, 1:] == 0).all())  # padding gets no delta


def test_2d_input_and_experts_without_tokens():
    bank = _bank(E=40)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    gates = torch.zeros(5, 40)
    gates[:, 7] = 0.6
    gates[:, 31] = -0.4  # negative weights are kept with their sign; 38 experts get no token
    _assert_equal(bank, x, gates)


def test_mixer_straight_through_gates():
    """Mixer's gates carry gradient to every slot: the forward matches, and auto stays dense while training."""
    from loraplex.router.base import RouteContext
    from loraplex.router.mixer import MixerConfig, MixerGate

    torch.manual_seed(0)
    bank = _bank(E=16)
    gate = MixerGate(RouteContext(), 16, 16, MixerConfig(top_k=2))
    x = torch.randn(2, 6, 16)
    gates = gate(x).gates
    bank.dispatch = "sparse"
    sparse = bank(x, gates.detach())
    bank.dispatch = "dense"
    torch.testing.assert_close(sparse, bank(x, gates.detach()), rtol=1e-5, atol=1e-5)
    # auto with dense_gate_grad: the dense path, so every slot's gate gets its true gradient
    bank.dispatch = "auto"
    g1 = gates.detach().clone().requires_grad_(True)
    bank(x, g1, dense_gate_grad=True).pow(2).sum().backward()
    g2 = gates.detach().clone().requires_grad_(True)
    bank.dispatch = "dense"
    bank(x, g2).pow(2).sum().backward()
    torch.testing.assert_close(g1.grad, g2.grad)
    assert bool((g1.grad[gates.detach() == 0] != 0).any())


def test_auto_choice_by_cost(kernel):
    calls = []
    E = LoraBank.CSR_FACTOR if kernel == "csr" else LoraBank.SPARSE_FACTOR  # the kernel's break-even E/k
    bank = _bank(E=E)
    orig = bank._forward_tokens
    bank._forward_tokens = lambda *a: calls.append(a[2]) or orig(*a)
    x = torch.randn(2, 3, 16)
    bank(x, _token_gates(2, 3, E, 2))  # E*R < F * 2R: dense
    assert calls == []
    bank(x, _token_gates(2, 3, E, 1))  # E*R >= F * 1R: sparse
    assert calls == [1]
    bank.dispatch = "sparse"
    bank(x, _token_gates(2, 3, E, 4))
    assert calls == [1, 4]
    bank.dispatch = "dense"
    bank(x, _token_gates(2, 3, E, 1))
    assert calls == [1, 4]
    bank.dispatch = "bogus"
    with pytest.raises(ValueError):
        bank(x, _token_gates(2, 3, E, 1))


def test_rank_gates_stay_dense():
    """Per-rank gates (S = E*R, SMoRA) never take the token path (see LoraBank's docstring)."""
    bank = _bank(E=12, R=4)
    bank.dispatch = "sparse"
    bank._forward_tokens = lambda *a: pytest.fail("per-rank gates must stay dense")
    g = _token_gates(2, 3, 48, 2)
    bank(torch.randn(2, 3, 16), g)


@pytest.mark.parametrize("method", ["token-gate", "mixer", "rank", "retrieval"])
def test_every_router_through_routed_linear(method):
    """A RoutedLinear driven by each router gives the same output and gradients with either dispatch."""
    from torch import nn

    from loraplex.experts.layers import RoutedLinear
    from loraplex.router.base import ROUTERS

    torch.manual_seed(1)
    E, R, d = 16, 4, 16
    bank = _bank(E=E, R=R, d_in=d, d_out=d)
    layer = RoutedLinear(nn.Linear(d, d), bank, "proj")
    router = ROUTERS.build(method, {"top_k": 2}) if method != "retrieval" else None
    if router is not None:
        layer.router = router.make_gate(layer).eval()  # eval: SMoRA's bias must not move between the two runs
    x = torch.randn(3, 5, d)
    if method == "retrieval":
        g = torch.zeros(3, 1, E)
        g[torch.arange(3), 0, torch.tensor([2, 9, 15])] = 1.0
        layer.static_gates = g
    results = []
    for dispatch in ("sparse", "dense"):
        bank.dispatch = dispatch
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out = layer(xx)
        out.pow(2).sum().backward()
        gate_grads = [p.grad.clone() for p in (layer.router.parameters() if layer.router else []) if p.grad is not None]
        results.append((out.detach(), xx.grad, bank.A.grad, bank.B.grad, gate_grads))
    (o1, x1, a1, b1, g1), (o2, x2, a2, b2, g2) = results
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp_min(1.0)))

    for a, b in ((o1, o2), (a1, a2), (b1, b2)):
        close(a, b)
    if method != "mixer":  # forced sparse gives the mixer's straight-through gate no gradient off the top-k
        close(x1, x2)  # (x's gradient passes through the gate too)
        assert len(g1) == len(g2)
        for a, b in zip(g1, g2):
            close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_sparse_equals_dense_cuda_bf16(kernel):
    _cpu_only(kernel, "cuda")
    bank = _bank(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 64, 16, device="cuda", dtype=torch.bfloat16)
    gates = _token_gates(4, 64, 12, 2).to("cuda", torch.bfloat16)
    _assert_equal(bank, x, gates, tol=3e-2)


def test_shared_token_gate_evaluated_once_per_layer_input():
    """token-gate with shared=True: q, k, v of one block share one gate and one evaluation of it."""
    from torch import nn

    from loraplex.experts.layers import RoutedLinear
    from loraplex.router.base import ROUTERS

    torch.manual_seed(2)
    router = ROUTERS.build("token-gate", {"top_k": 2, "shared": True})
    layers = {n: RoutedLinear(nn.Linear(16, 16), _bank(E=8, d_in=16, d_out=16, seed=i), n)
              for i, n in enumerate(["blk.q", "blk.k", "blk.v", "other.q"])}
    gates = {n: router.make_gate(layer) for n, layer in layers.items()}
    assert gates["blk.q"] is gates["blk.k"] is gates["blk.v"] and gates["other.q"] is not gates["blk.q"]
    calls = []
    gates["blk.q"].register_forward_hook(lambda *a: calls.append(1))
    route = gates["blk.q"]._route
    evals = []
    gates["blk.q"]._route = lambda h: evals.append(1) or route(h)
    for n in ("blk.q", "blk.k", "blk.v"):
        layers[n].router = gates[n]
    x = torch.randn(2, 5, 16)
    outs = [layers[n](x) for n in ("blk.q", "blk.k", "blk.v")]
    assert len(calls) == 3 and len(evals) == 1
    layers["blk.q"](x.clone())  # a different input tensor: evaluated again
    assert len(evals) == 2
    # the shared routing equals an unshared gate with the same weights
    solo = ROUTERS.build("token-gate", {"top_k": 2}).make_gate(layers["blk.k"])
    solo.load_state_dict(gates["blk.k"].state_dict())
    layers["blk.k"].router = solo
    torch.testing.assert_close(layers["blk.k"](x), outs[1])


def test_shared_gate_parameters_listed_once():
    from loraplex.router.base import ROUTERS

    router = ROUTERS.build("token-gate", {"shared": True})
    g = router.make_gate(type("L", (), {"name": "a.q", "bank": _bank(E=4)})())
    router.gates = {"a.q": g, "a.k": g}
    assert len(router.parameters()) == 1



def test_shared_gate_dispatches_once_per_layer_input(kernel):
    """A shared token gate's q, k, v banks sort the tokens once and pack their common input once; the
    outputs and gradients equal the dense path."""
    from torch import nn

    from loraplex.experts.layers import RoutedLinear
    from loraplex.router.base import ROUTERS

    torch.manual_seed(3)
    router = ROUTERS.build("token-gate", {"top_k": 2, "shared": True, "init_std": 1.0})
    names = ["blk.q", "blk.k", "blk.v"]
    layers = {n: RoutedLinear(nn.Linear(16, 16), _bank(E=8, d_in=16, d_out=16, seed=i), n) for i, n in enumerate(names)}
    built = []
    for layer in layers.values():
        layer.router = router.make_gate(layer)
        layer.record = True
        layer.bank.dispatch = "sparse"
        name, key = ("_csr_plan", "csr") if kernel == "csr" else ("_token_plan", "plan")
        orig = getattr(layer.bank, name)
        setattr(layer.bank, name, lambda g, k, plans, *a, orig=orig, key=key: built.append((key, 8, k) not in plans)
                or orig(g, k, plans, *a))
    x = torch.randn(2, 5, 16, requires_grad=True)
    outs = [layers[n](x) for n in names]
    routing = layers["blk.q"].last_routing
    assert all(layers[n].last_routing is routing for n in names)
    assert built == [True, False, False]  # the plan is built by q and found by k and v
    sum(o.pow(2).sum() for o in outs).backward()
    g_shared = x.grad.clone()
    xr = x.detach().clone().requires_grad_(True)  # a new input tensor: the gate evaluates again
    for layer in layers.values():
        layer.bank.dispatch = "dense"
    ref = [layers[n](xr) for n in names]
    sum(o.pow(2).sum() for o in ref).backward()
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_shared, xr.grad, rtol=1e-4, atol=1e-4)
    # a different input tensor: the gate evaluates it again (no stale routing)
    x2 = x.detach().clone() + 1.0
    with torch.no_grad():
        layers["blk.q"].bank.dispatch = "sparse"
        y = layers["blk.q"](x2)
        layers["blk.q"].bank.dispatch = "dense"
        torch.testing.assert_close(y, layers["blk.q"](x2), rtol=1e-4, atol=1e-4)


def test_shared_gate_under_inference_mode():
    """Inference tensors have no version counter: the shared gate still works."""
    from torch import nn

    from loraplex.experts.layers import RoutedLinear
    from loraplex.router.base import ROUTERS

    router = ROUTERS.build("token-gate", {"top_k": 2, "shared": True, "init_std": 1.0})
    layers = [RoutedLinear(nn.Linear(16, 16), _bank(E=8, d_in=16, d_out=16, seed=i), f"blk.{n}") for i, n in enumerate("qkv")]
    for layer in layers:
        layer.router = router.make_gate(layer)
        layer.bank.dispatch = "sparse"
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        xi = x.clone()
        sparse = [layer(xi) for layer in layers]
    for layer in layers:
        layer.bank.dispatch = "dense"
    with torch.no_grad():
        dense = [layer(x.clone()) for layer in layers]
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_router_topk_is_used_as_the_assignments(k):
    """Given the router's top-k indices, the token dispatch takes them as its assignments (it searches
    no gates): values and gradients equal the dense path, and a wrong selection would change the result."""
    E = 64
    bank = _bank(E=E)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 16, generator=g)
    top, idx = torch.randn(2, 7, E, generator=g).topk(k, dim=-1)
    gates = topk_scatter(torch.softmax(top, -1), idx, E)

    def run(dispatch, hint):
        bank.dispatch = dispatch
        bank.zero_grad(set_to_none=True)
        xx, gg = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        out = bank(xx, gg, topk=hint)
        out.pow(2).sum().backward()
        return out.detach(), xx.grad, bank.A.grad.clone(), gg.grad

    hinted, dense = run("auto", idx), run("dense", None)  # E >= 16 k: auto takes the sparse path
    for a, b in zip(hinted[:3], dense[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    sel = gates != 0
    torch.testing.assert_close(hinted[3][sel], dense[3][sel], rtol=1e-5, atol=1e-4)
    # the hint really is what decides: a selection that misses the gated experts computes something else
    wrong = (idx + 1) % E
    assert not torch.allclose(run("sparse", wrong)[0], dense[0], atol=1e-4)


@pytest.mark.parametrize("kernel", ["grouped"], indirect=True)  # block layouts are the grouped kernel's
@pytest.mark.parametrize("G", [1, 5, None])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("C", [1, 2, 4, 64])
def test_block_layouts_equal_dense(monkeypatch, C, in_place, G, kernel):
    """Every block size in both layouts (each expert's first block read in place with further blocks
    gathered, or every block gathered), worked through in chunks of G blocks (None: all at once), gives
    the dense path's values and gradients: a skewed batch where one expert holds most tokens, several
    hold one or two and some none."""
    import loraplex.experts.bank as bank_mod

    monkeypatch.setattr(bank_mod, "block_layout", lambda counts: (C, in_place))
    if G is not None:
        monkeypatch.setattr(bank_mod, "chunk_blocks", lambda device, C, width, itemsize: G)
    bank = _bank(E=12)
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(5))
    gates = _token_gates(4, 9, 12, 2, seed=5)
    gates[:3, :, 4] = 0.7  # expert 4 busy: 27 of the 36 tokens
    _assert_equal(bank, x, gates)


@pytest.mark.parametrize("kernel", ["grouped"], indirect=True)
def test_block_layout_choice(kernel):
    """In place when every expert holds a few tokens (no weights copied but the overflow's); packed when
    a few of many experts take all the tokens (empty in-place blocks would cost more)."""
    from loraplex.experts.bank import block_layout

    C, in_place = block_layout(torch.full((512,), 8))
    assert (C, in_place) == (8, True)
    skew = torch.zeros(512, dtype=torch.long)
    skew[:6] = torch.tensor([700, 600, 500, 400, 300, 200])
    C, in_place = block_layout(skew)
    assert not in_place
    assert block_layout(torch.tensor([3, 0, 1]))[0] >= 3  # never a block smaller than the floor's


@pytest.mark.parametrize("train_adapters", [True, False])
def test_same_input_projections_share_one_down_projection(monkeypatch, train_adapters, kernel):
    """q, k and v take one input: their banks gather it once and do their down projections in one matmul
    (LoraBank._down, banks of different ranks side by side); a projection on another input (the attention
    output) computes its own. Values and gradients (x, every bank's A and B, the gate) equal the dense path,
    with the adapters trained (A joined anew) or frozen (the joined A kept, and renewed when one changes)."""
    from torch import nn

    import loraplex.experts.bank as bank_mod
    from loraplex.experts.layers import RoutedLinear, link_same_input
    from loraplex.router.base import ROUTERS

    torch.manual_seed(4)
    router = ROUTERS.build("token-gate", {"top_k": 2, "shared": True, "init_std": 1.0})
    names = ["blk.query", "blk.key", "blk.value", "blk.out"]
    layers = {n: RoutedLinear(nn.Linear(16, 16), _bank(E=8, R=2 + i % 3, d_in=16, d_out=16, seed=i), n)
              for i, n in enumerate(names)}
    for layer in layers.values():
        layer.router = router.make_gate(layer)
    link_same_input(layers)
    assert [s.name for s in layers["blk.key"].siblings] == ["blk.query", "blk.value"] and not layers["blk.out"].siblings
    own = {n: RoutedLinear(nn.Linear(16, 16), _bank(E=8, d_in=16, d_out=16), n) for n in names}  # a gate each
    for layer in own.values():
        layer.router = ROUTERS.build("token-gate", {"top_k": 2}).make_gate(layer)
    link_same_input(own)  # their gates differ, so their plans do: nothing to share
    assert not any(layer.siblings for layer in own.values())
    for layer in layers.values():
        for p in layer.bank.parameters():
            p.requires_grad_(train_adapters)
    downs = []
    fn = bank_mod._CsrDown if kernel == "csr" else bank_mod._GroupedDown
    real = fn.apply  # the width of the joined A: (E*W, d_in) for csr, (E, W, d_in) for grouped
    monkeypatch.setattr(fn, "apply", lambda *a: downs.append(a[1].shape[1] if a[1].dim() == 3 else a[1].shape[0] // 8)
                        or real(*a))

    def run(dispatch, x, y):
        for layer in layers.values():
            layer.bank.dispatch = dispatch
            layer.zero_grad(set_to_none=True)  # its gate too (a submodule)
        x = x.detach().clone().requires_grad_(True)
        outs = [layers[n](x) for n in names[:3]] + [layers["blk.out"](y)]
        sum(o.pow(2).sum() for o in outs).backward()
        grads = [p.grad for layer in layers.values() for p in (layer.bank.A, layer.bank.B)] if train_adapters else []
        gate = [p.grad for p in {id(p): p for layer in layers.values() for p in layer.router.parameters()}.values()]
        assert all(g is not None for g in gate)
        return [o.detach() for o in outs], x.grad, grads, gate

    x, y = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    for _ in range(2):  # the second time with the joined A kept (frozen adapters)
        downs.clear()
        s, d = run("sparse", x, y), run("dense", x, y)
        assert downs == [2 + 3 + 4, 2]  # q, k, v in one matmul of their ranks side by side; the output its own
        for a, b in zip([*s[0], s[1], *s[2], *s[3]], [*d[0], d[1], *d[2], *d[3]]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp_min(1.0)))
    if not train_adapters:  # a changed A of k: the kept joined copy follows it
        with torch.no_grad():
            layers["blk.key"].bank.A.mul_(2.0)
        s, d = run("sparse", x, y), run("dense", x, y)
        torch.testing.assert_close(s[0][1], d[0][1], rtol=1e-5, atol=1e-5)
    # k called on another tensor than q's: it computes its own (what q left for it is not used)
    with torch.no_grad():
        for layer in layers.values():
            layer.bank.dispatch = "sparse"
        downs.clear()
        q = layers["blk.query"](x)
        k_other = layers["blk.key"](x + 1.0)
        for layer in layers.values():
            layer.bank.dispatch = "dense"
        torch.testing.assert_close(k_other, layers["blk.key"](x + 1.0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q, layers["blk.query"](x), rtol=1e-5, atol=1e-5)
        assert downs == [9, 9]  # k, on its own input, led a joined matmul of its own


@pytest.mark.parametrize("kernel", ["auto"], indirect=True)
def test_auto_kernel_choice(kernel):
    """kernel "auto": csr on CPU in float32/float64 while no adapter weight takes gradients in this forward
    (inference, a router trained over frozen adapters), grouped when A or B does (joint training) and for
    other dtypes; a kernel it does not know is refused."""
    bank = _bank(E=32)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():  # A and B take gradients, but not in this forward
        assert bank._uses_csr(x) and bank._uses_csr(x.double())
        assert not bank._uses_csr(x.bfloat16())
    assert not bank._uses_csr(x)
    bank.A.requires_grad_(False)
    assert not bank._uses_csr(x)  # B still trains
    bank.B.requires_grad_(False)
    assert bank._uses_csr(x)
    used = []
    for name in ("_csr_plan", "_token_plan"):
        orig = getattr(bank, name)
        setattr(bank, name, lambda *a, orig=orig, name=name: used.append(name) or orig(*a))
    bank(x, _token_gates(2, 3, 32, 2))
    bank.B.requires_grad_(True)
    bank(x, _token_gates(2, 3, 32, 2))
    assert used == ["_csr_plan", "_token_plan"]
    bank.kernel = "bogus"
    with pytest.raises(ValueError, match="kernel"):
        bank(x, _token_gates(2, 3, 32, 2))


def test_no_token_adds_nothing():
    """A batch of no rows, or rows of no tokens, passes through the token dispatch (the grouped plan failed
    to shape its empty blocks)."""
    bank = _bank()
    bank.dispatch = "sparse"
    for B, T in ((0, 5), (2, 0)):
        gates = _token_gates(B, T, 12, 2) if B * T else torch.zeros(B, T, 12)
        into = torch.randn(B, T, 10)
        assert bank(torch.randn(B, T, 16), gates, into=into.clone()).shape == (B, T, 10)
        assert bank(torch.randn(B, T, 16), gates).shape == (B, T, 10)
