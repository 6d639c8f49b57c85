"""The routing loss functions on hand-made distributions."""

import math

import torch
import torch.nn.functional as F

from loraplex.router.losses import gate_cross_entropy, marginal_entropy, rank_load, switch_balance, token_entropy


def test_gate_cross_entropy_matches_torch_and_ignores_padding():
    logits = torch.randn(2, 3, 4)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    got = gate_cross_entropy(logits, 2, valid)
    keep = logits[valid]
    want = F.cross_entropy(keep, torch.full((keep.shape[0],), 2))
    torch.testing.assert_close(got, want)
    per_row = gate_cross_entropy(logits, torch.tensor([2, 2]), valid)
    torch.testing.assert_close(per_row, want)


def test_switch_balance_is_one_when_uniform_and_grows_when_collapsed():
    E = 4
    uniform = torch.full((1, 8, E), 1 / E)
    chosen = torch.zeros(1, 8, E, dtype=torch.bool)
    chosen[0, torch.arange(8), torch.arange(8) % E] = True
    assert abs(float(switch_balance(uniform, chosen)) - 1.0) < 1e-6
    collapsed = torch.zeros(1, 8, E)
    collapsed[..., 0] = 1.0
    assert float(switch_balance(collapsed, collapsed > 0)) > 3.9


def test_entropies_are_normalised():
    E = 5
    uniform = torch.full((2, 3, E), 1 / E)
    assert abs(float(token_entropy(uniform)) - 1.0) < 1e-5
    one_hot = F.one_hot(torch.arange(6).view(2, 3) % E, E).float()
    assert float(token_entropy(one_hot)) < 1e-5
    assert float(marginal_entropy(one_hot)) > 0.8  # sharp per token, spread over the batch
    assert math.isfinite(float(marginal_entropy(one_hot)))


def test_rank_load_counts_valid_tokens():
    idx = torch.tensor([[[0, 1], [1, 2]], [[3, 0], [3, 3]]])
    valid = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(rank_load(idx, 4, valid), torch.tensor([2.0, 2.0, 1.0, 1.0]))
