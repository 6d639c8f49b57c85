"""LoraBank math against an explicit per-expert loop (the definition it must equal)."""

import pytest
import torch

from loraplex.experts.bank import LoraBank


def _bank(E=3, R=4, d_in=6, d_out=5, ranks=(4, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = LoraBank(d_in, d_out, E, R)
    experts = []
    for e, r in enumerate(ranks):
        A = torch.randn(r, d_in, generator=g)
        B = torch.randn(d_out, r, generator=g)
        s = 0.5 + e
        bank.set_expert(e, A, B, s)
        experts.append((A, B, s))
    return bank, experts


def _loop(x, experts, gates):
    out = 0
    for e, (A, B, s) in enumerate(experts):
        w = 1.0 if gates is None else gates[..., e : e + 1]
        out = out + w * (x @ A.T @ B.T) * s
    return out


def test_per_adapter_gates_equal_loop():
    bank, experts = _bank()
    x = torch.randn(2, 7, 6)
    gates = torch.softmax(torch.randn(2, 7, 3), -1)
    torch.testing.assert_close(bank(x, gates), _loop(x, experts, gates), rtol=1e-5, atol=1e-5)


def test_no_gates_sums_all_adapters():
    bank, experts = _bank()
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(bank(x), _loop(x, experts, None), rtol=1e-5, atol=1e-5)


def test_broadcast_sequence_gates():
    bank, experts = _bank()
    x = torch.randn(2, 7, 6)
    gates = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]])  # (B, 1, E): one adapter per row
    got = bank(x, gates)
    torch.testing.assert_close(got[0], _loop(x[:1], experts[:1], None)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], _loop(x[1:], experts[2:], None)[0], rtol=1e-5, atol=1e-5)


def test_per_rank_gates_select_rank_one_components():
    bank, experts = _bank()
    x = torch.randn(1, 3, 6)
    gates = torch.zeros(1, 3, 12)
    gates[..., 1] = 1.0  # expert 0, rank 1 only
    A, B, s = experts[0]
    want = (x @ A[1:2].T @ B[:, 1:2].T) * s
    torch.testing.assert_close(bank(x, gates), want, rtol=1e-5, atol=1e-5)


def test_padding_ranks_are_masked_even_if_gated():
    bank, experts = _bank()
    with torch.no_grad():
        bank.A[4 + 3] = 7.0  # a padded row of expert 1 (rank 2 of R=4)
        bank.B[:, 4 + 3] = 7.0
    x = torch.randn(1, 2, 6)
    torch.testing.assert_close(bank(x, torch.ones(1, 2, 12)), _loop(x, experts, None), rtol=1e-5, atol=1e-5)


def test_expert_roundtrip_unpads():
    bank, experts = _bank()
    A, B = bank.expert(1)
    assert A.shape == (2, 6) and B.shape == (5, 2)
    torch.testing.assert_close(A, experts[1][0])
    assert bank.expert_rank(1) == 2


def test_wrong_gate_width_is_an_error():
    bank, _ = _bank()
    with pytest.raises(ValueError, match="slots"):
        bank(torch.randn(1, 2, 6), torch.ones(1, 2, 5))


def test_freeze_experts_zeroes_their_gradients():
    bank, _ = _bank()
    bank.freeze_experts([True, False, True])
    bank(torch.randn(2, 3, 6)).pow(2).sum().backward()
    gA = bank.A.grad.view(3, 4, 6)
    assert gA[0].abs().sum() == 0 and gA[2].abs().sum() == 0
    assert gA[1, :2].abs().sum() > 0


def test_delta_weight_matches_forward():
    bank, _ = _bank()
    x = torch.randn(4, 6)
    torch.testing.assert_close(x @ bank.delta_weight().T, bank(x), rtol=1e-4, atol=1e-5)
    w = [0.2, 0.0, 1.5]
    torch.testing.assert_close(x @ bank.delta_weight(w).T, bank(x, torch.tensor(w).expand(4, 3)), rtol=1e-4, atol=1e-5)


def test_init_expert_is_peft_init():
    bank = LoraBank(16, 8, 2, 4)
    bank.init_expert(1, 4, 2.0, generator=torch.Generator().manual_seed(0))
    A, B = bank.expert(1)
    assert A.abs().max() <= 1 / 16**0.5 and A.abs().sum() > 0
    assert B.abs().sum() == 0
