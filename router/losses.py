"""Pure loss functions of routing tensors (no modules, no state): what the routers add to the task loss.

Notation: logits / probabilities (B, T, E) per token over E experts, `valid` (B, T) a boolean mask of the
tokens that count (padding excluded), N = number of valid tokens.

- `gate_cross_entropy` (MeteoRA's gate loss, arXiv 2405.13053): every token carries the index of the
  adapter of its task; the gate is trained as a classifier of that label,
      L_gate = -1/N sum_t log softmax(l_t)[y_t].
- `switch_balance` (Switch Transformer, arXiv 2101.03961, the balance half of LoRA-Mixer's RSL):
      L_bal = E * sum_e f_e * P_e,   f_e = share of top-k slots given to e,  P_e = mean_t p_t(e);
  it is 1 when routing is uniform and grows as it concentrates.
- `token_entropy` (the specialisation half of LoRA-Mixer's RSL, entropy shaping): the mean per-token
  routing entropy normalised by log E, in [0, 1]; minimising it makes each token's choice decisive.
- `marginal_entropy`: the entropy of the batch's mean routing distribution, normalised; high when the
  experts are used evenly (reported as a diagnostic).
- `rank_load`: how many times each slot was selected (for SMoRA's bias update, not a loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _valid(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, T) float weights of the tokens that count (all ones when no mask fits)."""
    if valid is None or valid.shape != x.shape[:2]:
        return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    return valid.to(device=x.device, dtype=x.dtype)


def gate_cross_entropy(logits: torch.Tensor, target: torch.Tensor | int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of per-token expert logits (B, T, E) against target experts.

    `target` is an int (every token of the forward belongs to one expert's task), a (B,) tensor (one per
    row) or a (B, T) tensor (per token); entries < 0 are ignored.
    """
    B, T, E = logits.shape
    if isinstance(target, int):
        tgt = torch.full((B, T), target, dtype=torch.long, device=logits.device)
    else:
        tgt = target.to(logits.device).long()
        if tgt.dim() == 1:
            tgt = tgt[:, None].expand(B, T)
    w = _valid(logits, valid) * (tgt >= 0).to(logits.dtype)  # (B, T)
    ce = F.cross_entropy(logits.float().reshape(B * T, E), tgt.clamp_min(0).reshape(B * T), reduction="none")
    return (ce.view(B, T) * w).sum() / w.sum().clamp_min(1.0)


def switch_balance(probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e for probabilities (B, T, E) and a 0/1 mask of the chosen experts (B, T, E)."""
    E = probs.shape[-1]
    w = _valid(probs, valid).unsqueeze(-1)  # (B, T, 1)
    n = w.sum().clamp_min(1.0)
    k = chosen.float().sum(-1, keepdim=True).clamp_min(1.0)  # slots per token
    f = (chosen.float() / k * w).sum((0, 1)) / n  # (E,) share of the top-k slots
    P = (probs.float() * w).sum((0, 1)) / n  # (E,) mean probability
    return E * (f.detach() * P).sum()


def token_entropy(probs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid tokens of H(p_t) / log E, in [0, 1]."""
    E = probs.shape[-1]
    if E < 2:
        return probs.new_zeros(())
    p = probs.float().clamp_min(1e-9)
    h = -(p * p.log()).sum(-1) / math.log(E)  # (B, T)
    w = _valid(h, valid)
    return (h * w).sum() / w.sum().clamp_min(1.0)


def marginal_entropy(probs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """H(mean_t p_t) / log E: 1 when the batch uses every expert equally."""
    E = probs.shape[-1]
    if E < 2:
        return probs.new_zeros(())
    w = _valid(probs, valid).unsqueeze(-1)
    P = (probs.float() * w).sum((0, 1)) / w.sum().clamp_min(1.0)
    P = P.clamp_min(1e-9)
    return -(P * P.log()).sum() / math.log(E)


def rank_load(topk_idx: torch.Tensor, n_slots: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(S,) number of valid tokens that selected each slot, from top-k indices (B, T, K)."""
    w = _valid(topk_idx, valid)  # (B, T)
    one_hot = torch.zeros(*topk_idx.shape[:2], n_slots, device=topk_idx.device)
    one_hot.scatter_(-1, topk_idx, 1.0)
    return (one_hot * w.unsqueeze(-1).float()).sum((0, 1))
