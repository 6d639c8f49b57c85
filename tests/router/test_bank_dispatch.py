"""LoraBank's sparse dispatch (sequence-constant gates) equals its dense path, values and gradients."""

import pytest
import torch

from loraplex.experts.bank import LoraBank


def _bank(E=6, R=4, d_in=10, d_out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = LoraBank(d_in, d_out, E, R)
    for e in range(E):
        r = 1 + (e % R)  # mixed ranks, padded to R
        bank.set_expert(e, torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + 0.25 * e)
    return bank


def _both(bank, x, gates):
    bank.sparse = True
    sparse = bank(x, gates)
    bank.sparse = False
    dense = bank(x, gates)
    return sparse, dense


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_equals_dense_per_row(k):
    bank = _bank()
    x = torch.randn(5, 9, 10)
    gates = torch.zeros(5, 1, 6)
    for b in range(5):
        idx = torch.randperm(6, generator=torch.Generator().manual_seed(b))[:k]
        gates[b, 0, idx] = torch.rand(k, generator=torch.Generator().manual_seed(10 + b)) + 0.1
    sparse, dense = _both(bank, x, gates)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_sparse_broadcast_gates_and_uneven_rows():
    bank = _bank()
    x = torch.randn(3, 4, 10)
    g1 = torch.zeros(1, 1, 6)
    g1[0, 0, 2] = 1.0  # one adapter for the whole batch
    torch.testing.assert_close(*_both(bank, x, g1), rtol=1e-5, atol=1e-5)
    g2 = torch.zeros(3, 1, 6)
    g2[0, 0, 1] = 1.0
    g2[1, 0, [0, 5]] = torch.tensor([0.3, 0.7])  # rows select different numbers of adapters
    torch.testing.assert_close(*_both(bank, x, g2), rtol=1e-5, atol=1e-5)


def test_sparse_gradients_equal_dense():
    grads = []
    for sparse in (True, False):
        bank = _bank()
        bank.sparse = sparse
        x = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        gates = torch.zeros(2, 1, 6)
        gates[0, 0, 4] = 1.0
        gates[1, 0, 1] = 1.0
        bank(x, gates).pow(2).sum().backward()
        grads.append((x.grad, bank.A.grad, bank.B.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_path_used_when_many_selected():
    bank = _bank()
    x = torch.randn(2, 3, 10)
    gates = torch.rand(2, 1, 6) + 0.1  # every adapter: the dense path is cheaper
    torch.testing.assert_close(*_both(bank, x, gates), rtol=1e-5, atol=1e-5)
