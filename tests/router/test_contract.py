"""Contract tests over every registered router: gate shapes, exactly k non-zero, finite aux loss,
gradients only where they belong, save/load and shortlists give the same output."""

import copy
import math

import numpy as np
import pytest
import torch

from loraplex.experts.layers import inject, routed_layers
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.router.base import ROUTERS, LearnedRouter

LEARNED = [n for n in ROUTERS.names() if issubclass(ROUTERS.get(n).factory, LearnedRouter)]
VARIANTS = [pytest.param(n, {}, id=n) for n in LEARNED] + [
    pytest.param("token-gate", {"shared": True}, id="token-gate-shared"),
    pytest.param("token-gate", {"shared": "block"}, id="token-gate-block")]
"""Every learned router, and token-gate's shared gates (one per layer input, one per block)."""
MODULES = ("query", "value", "attention.output.dense")
RANKS = (2, 4, 3, 4)


def _adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for e, r in enumerate(RANKS):
        w = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(name.endswith(m) for m in MODULES):
                w[name] = (torch.randn(r, mod.in_features, generator=g) * 0.3, torch.randn(mod.out_features, r, generator=g) * 0.3)
        out.append(Adapter(LoraSpec(r=r, alpha=2 * r), w))
    return out


@pytest.fixture(scope="module")
def bert(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    x = tok(["the flight was late again", "great match goal team", "apple phone"], return_tensors="pt", padding=True)
    return model, tok, x


def _routed(bert, name, order=None, **cfg):
    model, _, _ = bert
    m = copy.deepcopy(model)
    ads = _adapters(model)
    if order is not None:
        ads = [ads[i] for i in order]
    inject(m, ads)
    router = ROUTERS.build(name, cfg)
    router.attach(m)
    router.set_expert_tasks([f"t{i}" for i in range(len(RANKS))])
    return m, router


def _routings(m, x):
    for layer in routed_layers(m).values():
        layer.record = True
    out = m(**x).last_hidden_state
    return out, {n: l.last_routing for n, l in routed_layers(m).items()}


@pytest.mark.parametrize("name, cfg", VARIANTS)
def test_gate_shapes_and_exactly_k_nonzero(bert, name, cfg):
    m, router = _routed(bert, name, **cfg)
    _, _, x = bert
    with torch.no_grad():
        _, routings = _routings(m, x)
    B, T = x["input_ids"].shape
    E = len(RANKS)
    for lname, r in routings.items():
        bank = routed_layers(m)[lname].bank
        S = E if router.slot == "adapter" else E * bank.rank
        assert r.gates.shape == (B, T, S)
        K = min(router.top_k, E if router.slot == "adapter" else int((bank.rank_mask > 0).sum()))
        assert r.topk_idx.shape == (B, T, K)
        nnz = (r.gates != 0).sum(-1)
        assert torch.all(nnz == K), f"{name}: {lname} has {nnz.unique().tolist()} non-zero gates, expected {K}"
        if router.slot == "rank":  # padding ranks are never selected
            assert torch.all(r.gates[..., bank.rank_mask == 0] == 0)
        pa = r.per_adapter()
        assert pa.shape == (B, T, E) and torch.allclose(pa.sum(-1), torch.ones(B, T), atol=1e-5)


@pytest.mark.parametrize("name, cfg", VARIANTS)
def test_aux_loss_finite_and_gradients_reach_only_the_router(bert, name, cfg):
    m, router = _routed(bert, name, **cfg)
    _, _, x = bert
    for layer in routed_layers(m).values():
        for p in layer.bank.parameters():
            p.requires_grad_(False)
    m.train()
    router.ctx.set_task("t1")
    out, routings = _routings(m, x)
    auxes = [r.aux_loss for r in routings.values() if r.aux_loss is not None]
    assert auxes, f"{name}: a supervised forward gives an auxiliary loss"
    aux = torch.stack(auxes).sum()
    assert math.isfinite(float(aux))
    (out.pow(2).mean() + aux).backward()
    router_params = {id(p) for p in router.parameters()}
    with_grad = [n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and all(id(dict(m.named_parameters())[n]) in router_params for n in with_grad), with_grad
    assert all(p.grad is not None for p in router.parameters())


@pytest.mark.parametrize("name", [n for n in LEARNED if ROUTERS.get(n).factory.joint_capable])
def test_joint_mode_trains_experts_too(bert, name):
    m, router = _routed(bert, name, joint=True)
    _, _, x = bert
    m.train()
    out, routings = _routings(m, x)
    out.pow(2).mean().backward()
    banks = [l.bank for l in routed_layers(m).values()]
    assert any(b.A.grad is not None and b.A.grad.abs().sum() > 0 for b in banks)
    assert any(b.B.grad is not None and b.B.grad.abs().sum() > 0 for b in banks)
    base_grads = [n for n, p in m.named_parameters() if p.grad is not None and ".bank." not in n and ".router." not in n]
    assert not base_grads, base_grads


@pytest.mark.parametrize("name, cfg", VARIANTS)
def test_save_load_gives_the_same_output(bert, name, cfg):
    m, router = _routed(bert, name, **cfg)
    _, _, x = bert
    m.train()  # move SMoRA's balancing bias away from zero so it is part of what must be saved
    router.ctx.set_task("t2")
    for _ in range(3):
        m(**x)
    m.eval()
    with torch.no_grad():
        want = m(**x).last_hidden_state
    tensors = router.state_tensors()
    m2, r2 = _routed(bert, name, **cfg)
    r2.load_tensors(tensors)
    with torch.no_grad():
        got = m2(**x).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("name, cfg", VARIANTS)
def test_keep_experts_reorders_consistently(bert, name, cfg):
    """A router restricted to a (here: permuted, complete) expert list over a bank in that order routes the same."""
    m, router = _routed(bert, name, **cfg)
    _, _, x = bert
    with torch.no_grad():
        want = m(**x).last_hidden_state
    order = [2, 0, 3, 1]
    tensors = router.state_tensors()
    R = max(RANKS)
    from loraplex.router.load import _build_gates

    m2 = copy.deepcopy(bert[0])
    ads = _adapters(bert[0])
    inject(m2, [ads[i] for i in order], rank=R)
    r2 = ROUTERS.build(name, cfg)
    _build_gates(r2, m2, tensors, len(RANKS))
    r2.load_tensors(tensors)
    r2.keep_experts(order)
    r2.attach(m2)
    with torch.no_grad():
        got = m2(**x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_retrieval_contract():
    from loraplex.router.retrieval import Signatures

    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    desc = unit(rng.normal(size=(5, 16))).astype(np.float32)
    proto = unit(rng.normal(size=(5, 16))).astype(np.float32)
    proto[3] = np.nan  # an adapter without a prototype
    sig = Signatures([f"a{i}" for i in range(5)], desc, proto)
    q = unit(desc[[1, 3]] + 0.05 * rng.normal(size=(2, 16))).astype(np.float32)
    for k in (1, 2, 3):
        r = ROUTERS.build("retrieval", {"top_k": k, "prototype_weight": 0.3})
        s = r.scores(q, sig)
        g = r.gates(s)
        assert s.shape == g.shape == (2, 5) and np.all(np.isfinite(s))
        assert np.all((g > 0).sum(1) == k) and np.allclose(g.sum(1), 1.0)
        assert list(np.argmax(g, axis=1)) == [1, 3]
    r = ROUTERS.build("retrieval", {})
    assert r.shortlist(r.scores(q, sig), 2)[:2] in ([1, 3], [3, 1])


def test_unknown_router_lists_the_known_ones():
    from loraplex.errors import UnknownComponent

    with pytest.raises(UnknownComponent, match="token-gate"):
        ROUTERS.get("gate-of-babel")


def test_factorised_gate_above_the_break_even_rank_is_applied_as_its_product():
    """A factorised gate whose factors cost a token more than the full gate (r (d_in + E) > d_in E, e.g.
    rank 64 over 32 adapters) is applied as W_up W_down: the same logits and factor gradients as the two
    steps, within float rounding."""
    from loraplex.router.base import RouteContext
    from loraplex.router.token_gate import TokenGate, TokenGateConfig

    torch.manual_seed(0)
    cfg = TokenGateConfig(gate_rank=12, top_k=2)
    gate = TokenGate(RouteContext(), 16, 8, cfg)  # 12 (16 + 8) > 16 * 8
    assert gate.collapses() and not TokenGate(RouteContext(), 16, 64, cfg).collapses()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    gate.double()
    logits = gate._route(h).logits
    two_steps = (h @ gate.down.T) @ gate.weight.T
    torch.testing.assert_close(logits, two_steps)
    logits.pow(2).sum().backward()
    got = gate.down.grad.clone(), gate.weight.grad.clone()
    gate.zero_grad()
    ((h @ gate.down.T) @ gate.weight.T).pow(2).sum().backward()
    torch.testing.assert_close(got[0], gate.down.grad)
    torch.testing.assert_close(got[1], gate.weight.grad)


def test_factorised_token_gate_computes_low_rank_logits_and_round_trips(bert):
    """token-gate with gate_rank: logits = W_up (W_down h), k non-zero gates, trainable factors, and the
    stored factors rebuild the same router (also restricted to a permuted expert list)."""
    from loraplex.errors import InvalidSpec
    from loraplex.router.load import _build_gates

    _, _, x = bert
    m, router = _routed(bert, "token-gate", gate_rank=3, shared=True)
    out, routings = _routings(m, x)
    name, layer = next(iter(routed_layers(m).items()))
    gate = router.gates[name]
    assert gate.down.shape[0] == 3 and gate.weight.shape == (len(RANKS), 3)
    for n, rt in routings.items():
        assert int((rt.gates != 0).sum(-1).max()) == 2
    m.train()
    router.ctx.set_task("t1")
    loss = m(**x).last_hidden_state.pow(2).mean() + sum(l.last_routing.aux_loss for l in routed_layers(m).values())
    loss.backward()
    assert gate.down.grad is not None and gate.down.grad.abs().sum() > 0 and gate.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        want = m(**x).last_hidden_state
        h = torch.randn(2, 5, gate.down.shape[1])
        torch.testing.assert_close(gate._route(h).logits, h @ gate.down.T @ gate.weight.T)
    tensors = router.state_tensors()
    assert f"{name}.down" in tensors
    m2 = copy.deepcopy(bert[0])
    order = [2, 0, 3, 1]
    inject(m2, [_adapters(bert[0])[i] for i in order], rank=max(RANKS))
    r2 = ROUTERS.build("token-gate", {"gate_rank": 3, "shared": True})
    _build_gates(r2, m2, tensors, len(RANKS))
    r2.load_tensors(tensors)
    r2.keep_experts(order)
    r2.attach(m2)
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    assert not gate.collapses()  # 3 (d_in + 4) < 4 d_in: the factors are cheaper per token
    with pytest.raises(InvalidSpec, match="gate_rank"):
        ROUTERS.build("token-gate", {"gate_rank": 0})
    # a rank above the input size is no factorisation: gate_rank=100000 took 24 GB before (sweep 15)
    from loraplex.errors import UserInputError

    d_in = gate.down.shape[1]
    with pytest.raises(UserInputError, match=f"gate_rank {d_in + 1} is above the gate's input size {d_in}"):
        _routed(bert, "token-gate", gate_rank=d_in + 1)
    # fresh experts are bounded too (the mixer took 1,000,000 of them; the rank router any rank)
    for method, cfg, said in [("mixer", {"n_experts": 1_000_000}, "n_experts: Input should be less than or equal to 256"),
                              ("mixer", {"n_experts": 200, "rank": 64}, "the fresh experts' bank holds at most 4,096 ranks"),
                              ("rank", {"rank": 1_000_000}, "rank: Input should be less than or equal to 4096")]:
        with pytest.raises(InvalidSpec, match=said):
            ROUTERS.build(method, cfg)


def test_block_token_gate_routes_every_projection_of_a_block_from_its_input(bert):
    """token-gate shared=block: one evaluation per transformer block, on the block's RMS-normalised input,
    and every routed projection of the block (q, v and the attention output, whose inputs differ) uses that
    one decision; equal to giving each projection its block's gates by hand; sparse equals dense; the stored
    gates rebuild the same router; gradients and the gate loss reach the gates."""
    from loraplex.router.load import _build_gates
    from loraplex.router.token_gate import BlockGate

    _, _, x = bert
    m, router = _routed(bert, "token-gate", shared="block", init_std=1.0)
    layers = routed_layers(m)
    blocks = {router.gates[n].block for n in layers}
    assert blocks == {f"encoder.layer.{i}" for i in range(m.config.num_hidden_layers)}
    assert len({id(g) for g in router.gates.values()}) == len(blocks)
    seen, evals = {}, []
    for b in blocks:  # the block inputs this forward sees, and how often each gate is evaluated
        m.get_submodule(b).register_forward_pre_hook(lambda mod, args, b=b: seen.__setitem__(b, args[0].detach()))
    for g in {id(g): g for g in router.gates.values()}.values():
        route = g._route
        g._route = lambda h, route=route: evals.append(1) or route(h)
    with torch.no_grad():
        out, routings = _routings(m, x)
    assert len(evals) == len(blocks)
    by_block = {}
    for n, r in routings.items():
        g = router.gates[n]
        h = seen[g.block]
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        top, idx = (h @ g.weight.T).topk(2, dim=-1)
        want = torch.zeros_like(r.gates).scatter(-1, idx, torch.softmax(top, -1))
        torch.testing.assert_close(r.gates, want)
        by_block.setdefault(g.block, set()).add(id(r))
    assert all(len(ids) == 1 for ids in by_block.values())  # one Routing per block, shared by its projections
    # each projection given its block's gates by hand (no router) computes the same model
    for n, layer in layers.items():
        layer.router, layer.static_gates = None, routings[n].gates
    with torch.no_grad():
        torch.testing.assert_close(m(**x).last_hidden_state, out, rtol=1e-5, atol=1e-5)
    router.attach(m)
    for layer in layers.values():
        layer.static_gates = None
        layer.bank.dispatch = "sparse"
    with torch.no_grad():
        torch.testing.assert_close(m(**x).last_hidden_state, out, rtol=1e-4, atol=1e-4)
    for layer in layers.values():
        layer.bank.dispatch = "auto"
    # training: the gate loss and the task loss reach every block's gate
    m.train()
    router.ctx.set_task("t2")
    task_loss = m(**x).last_hidden_state.pow(2).mean()
    aux = [l.last_routing.aux_loss for l in layers.values()]
    assert all(a is not None and torch.isfinite(a) for a in aux)
    (task_loss + sum(aux)).backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in router.gates.values())
    m.eval()
    router.ctx.set_task(None)
    # stored per projection, rebuilt with the block's width, the same output
    tensors = router.state_tensors()
    m2 = copy.deepcopy(bert[0])
    inject(m2, _adapters(bert[0]))
    r2 = ROUTERS.build("token-gate", {"shared": "block", "init_std": 1.0})
    _build_gates(r2, m2, tensors, len(RANKS))
    r2.load_tensors(tensors)
    r2.attach(m2)
    assert all(isinstance(g, BlockGate) for g in r2.gates.values())
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).last_hidden_state, m(**x).last_hidden_state, rtol=1e-5, atol=1e-5)
    # detached: the block hooks go with the router's
    r2.detach_hook()
    assert not r2._block_hooks


def test_block_token_gate_refusals(bert):
    from types import SimpleNamespace

    from loraplex.errors import InvalidSpec, UserInputError

    for v, said in [("yes", "'yes'"), (1, "1"), ("input", "'input'")]:
        with pytest.raises(InvalidSpec, match=f"shared: expected true, false or block, got {said}"):
            ROUTERS.build("token-gate", {"shared": v})
    router = ROUTERS.build("token-gate", {"shared": "block"})
    layer = SimpleNamespace(name="pooler.dense", bank=SimpleNamespace(d_in=8, n_experts=4))
    with pytest.raises(UserInputError, match="'pooler.dense' is in no numbered transformer block"):
        router.make_gate(layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_token_gate_on_cuda_sparse_equals_dense(bert):
    """The block gate's hooks, its one Routing per block and the token dispatch on CUDA (the bank's bf16
    equality is tests/experts/test_token_dispatch.py's)."""
    _, _, x = bert
    m, _ = _routed(bert, "token-gate", shared="block", init_std=1.0)
    m = m.to("cuda")
    xc = {k: v.to("cuda") for k, v in x.items()}
    outs = {}
    for dispatch in ("sparse", "dense"):
        for layer in routed_layers(m).values():
            layer.bank.dispatch = dispatch
        with torch.no_grad():
            outs[dispatch] = m(**xc).last_hidden_state
    assert outs["sparse"].is_cuda
    torch.testing.assert_close(outs["sparse"], outs["dense"], rtol=1e-4, atol=1e-4)
