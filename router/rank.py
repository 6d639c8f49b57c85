"""rank: SMoRA, every rank-1 component of the bank is an expert.

Zhao, Zhou, Zhang, Zhu, Shen, Li, Yang, Wang, Su, Kuang, Wei, Wu, Cheng, "Each Rank Could be an Expert:
Single-Ranked Mixture of Experts LoRA for Multi-task Learning", arXiv 2501.15103.

A bank of E adapters of rank R is one LoRA of rank S = E*R (experts/bank.py); SMoRA routes its S
rank-1 components b_i a_i^T individually. Per projection and token:

    s_t   = sigmoid(W_r h_t)                          # (S,) one gate per rank
    K_t   = top-k(s_t + b)                            # the bias b only steers selection
    g_t,i = s_t,i for i in K_t, 0 otherwise
    y_t   = W h_t + sum_{i in K_t} g_t,i * scaling_i * b_i (a_i^T h_t)

Load balancing without an auxiliary loss (the DeepSeek-V3 scheme SMoRA adopts): after each training
forward the bias of every rank moves toward equal use,

    b_i <- b_i + u * sign(mean_j c_j - c_i),          c_i = tokens that selected rank i in the batch

so over-used ranks become less likely to be selected and idle ones more, while the gate values g that
scale the ranks stay unbiased. Padding ranks of lower-rank adapters are never selected.

Two uses: over the ranks of frozen registered adapters (only W_r learns; optionally supervised with
each row's task through per-adapter logits, the mean of its ranks' logits, `gate_loss`), and as a
multi-task LoRA trained from scratch (`joint=True` with no adapters: one LoRA of rank `rank`, ranks
and router learned together on the tasks' data).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from loraplex.catalog import MAX_COUNT, MAX_SCALE, MAX_WEIGHT, Options, options
from loraplex.experts.spec import MAX_RANK
from loraplex.router.base import ROUTERS, Gate, LearnedRouter, RouteContext, Routing, topk_scatter
from loraplex.router.losses import gate_cross_entropy, rank_load


class RankConfig(Options):
    """SMoRA rank-wise routing."""

    model_config = options()

    top_k: int = Field(8, ge=1, le=MAX_COUNT)
    """Ranks (rank-1 experts) activated per token."""
    bias_rate: float = Field(0.005, ge=0, le=MAX_WEIGHT)
    """Step u of the load-balancing bias update (0 disables balancing)."""
    gate_loss: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the per-adapter gate cross-entropy on task-labelled tokens (0: unsupervised, as in SMoRA)."""
    joint: bool = False
    """Train the ranks together with the router (from scratch when no adapters are given)."""
    rank: int | None = Field(None, ge=1, le=MAX_RANK)
    """Total rank of the from-scratch LoRA (default: 8 per task; at most MAX_RANK, as any LoRA's)."""
    init_std: float = Field(0.02, gt=0, le=MAX_SCALE)
    """Standard deviation of the router's initial weights."""


class RankGate(Gate):
    def __init__(self, ctx: RouteContext, d_in: int, n_experts: int, rank: int, rank_mask: torch.Tensor, cfg: RankConfig):
        super().__init__(ctx, n_experts, rank)
        self.cfg = cfg
        S = n_experts * rank
        self.weight = nn.Parameter(torch.randn(S, d_in) * cfg.init_std)  # (S, d_in)
        self.register_buffer("bias", torch.zeros(S))  # (S,) selection bias, saved with the router
        self.register_buffer("valid", (rank_mask.detach().cpu() > 0).clone())  # (S,) real ranks

    def forward(self, h: torch.Tensor) -> Routing:  # h (B, T, d_in)
        logits = F.linear(h.to(self.weight.dtype), self.weight)  # (B, T, S)
        s = torch.sigmoid(logits)
        sel = (s + self.bias).masked_fill(~self.valid, float("-inf"))
        k = min(self.cfg.top_k, int(self.valid.sum()))
        idx = sel.topk(k, dim=-1).indices  # (B, T, K)
        gates = topk_scatter(s.gather(-1, idx), idx, s.shape[-1])  # (B, T, S)
        valid = self.ctx.valid(h)
        if self.training and self.cfg.bias_rate > 0:
            with torch.no_grad():
                load = rank_load(idx, s.shape[-1], valid)[self.valid]  # (S_valid,)
                self.bias[self.valid] += self.cfg.bias_rate * torch.sign(load.mean() - load)
        # per-adapter score: the mean logit of its real ranks
        m = self.valid.to(logits.dtype).view(self.n_experts, self.rank)  # (E, R)
        per_adapter = (logits.unflatten(-1, (self.n_experts, self.rank)) * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # (B, T, E)
        aux = None
        if self.training and self.ctx.target is not None and self.cfg.gate_loss > 0 and self.n_experts > 1:
            aux = self.cfg.gate_loss * gate_cross_entropy(per_adapter, self.ctx.target, valid) / self.ctx.n_layers
        return Routing(gates, idx, aux, per_adapter, self.n_experts)

    def keep_experts(self, keep: torch.Tensor) -> None:
        rows = (keep[:, None] * self.rank + torch.arange(self.rank, device=keep.device)).reshape(-1)
        self.weight = nn.Parameter(self.weight.data[rows].clone(), requires_grad=self.weight.requires_grad)
        self.bias = self.bias[rows].clone()
        self.valid = self.valid[rows].clone()
        self.n_experts = len(keep)


@ROUTERS.register("rank", RankConfig, summary="SMoRA: each rank an expert, sigmoid top-k, bias load balancing")
class RankRouter(LearnedRouter):
    """SMoRA (arXiv 2501.15103): rank-wise top-k gates, load balanced by a bias instead of a loss."""

    slot = "rank"
    method = "rank"
    joint_capable = True
    fresh_options = ("rank",)

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @classmethod
    def choices(cls, ranks: Sequence[int]) -> int:
        """Every rank of every expert is a slot."""
        return int(sum(ranks))

    @classmethod
    def stored_shape(cls, rows: int, n_experts: int) -> tuple[int, int]:
        return n_experts, rows // n_experts  # one row per rank of every expert

    @classmethod
    def bank_ranks(cls, gate_weights: dict[str, torch.Tensor], n_experts: int) -> dict[str, int] | None:
        return {m: int(w.shape[0]) // n_experts for m, w in gate_weights.items()}  # keep the stored rank layout

    def make_gate(self, layer) -> Gate:
        b = layer.bank
        return RankGate(self.ctx, b.d_in, b.n_experts, b.rank, b.rank_mask, self.config)

    @classmethod
    def fresh_experts(cls, config: RankConfig, n_tasks: int) -> tuple[int, int]:
        return 1, config.rank or 8 * n_tasks
