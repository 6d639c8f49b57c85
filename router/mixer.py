"""mixer: LoRA-Mixer, hard top-k routing with soft weights over LoRA experts in the attention projections.

Li, Song, Zhou, Zhang, Yu, Yang, "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention
Routing", arXiv 2507.00029.

LoRA-Mixer puts routed LoRA experts into the attention module's input/output projections (here: the
adapted projections, which for registered adapters are the attention projections by default, and in
the joint paradigm are created in exactly those, `DEFAULT_TARGETS`). Per projection and token:

    p_t   = softmax(W_r h_t / tau)                    # (E,) soft routing distribution
    K_t   = top-k(p_t)                                # hard selection
    hard  = p_t,e / sum_{j in K_t} p_t,j  for e in K_t, 0 otherwise
    g_t   = hard + p_t - stopgrad(p_t)                # straight-through: forward uses the hard top-k
                                                      # weights, the backward pass the soft p_t

The Routing Specialization Loss (RSL; "Specialization Balance Loss" in v1 of the paper) joins global
balance with input-aware specialisation by entropy shaping:

    L_RSL = lambda_bal * E * sum_e f_e P_e  +  lambda_spec * mean_t H(p_t) / log E

with f_e the share of top-k slots given to expert e and P_e its mean probability over the batch's
tokens (the first term is 1 for uniform use and pushes toward it; the second sharpens each token's
distribution, so experts are used evenly across inputs but decisively per input). Simplification: the
paper adapts the weight between the two terms during training; we keep both weights fixed (config).

Both paradigms: (i) routing over frozen registered adapters (only W_r learns), and (ii) `joint=True`:
experts and router trained together, starting from the registered adapters or, with no adapters, from
`n_experts` fresh LoRAs (PEFT initialisation) in the attention projections. Over registered task
adapters the gate may also be supervised with each row's task (`gate_loss`, MeteoRA's gate loss; 0
gives the paper's unsupervised routing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from loraplex.catalog import MAX_COUNT, MAX_SCALE, MAX_TEMPERATURE, MAX_WEIGHT, MIN_TEMPERATURE, Options, options
from loraplex.experts.spec import MAX_RANK
from loraplex.router.base import ROUTERS, Gate, LearnedRouter, RouteContext, Routing, topk_scatter
from loraplex.router.losses import gate_cross_entropy, switch_balance, token_entropy


MAX_FRESH_EXPERTS = 256
"""Fresh experts a mixer creates at most (`n_experts`)."""


class MixerConfig(Options):
    """LoRA-Mixer routing."""

    model_config = options()

    top_k: int = Field(2, ge=1, le=MAX_COUNT)
    """Experts selected per token (hard top-k)."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Softmax temperature of the routing distribution."""
    balance: float = Field(0.01, ge=0, le=MAX_WEIGHT)
    """Weight of RSL's balance term (E * sum f_e P_e)."""
    specialization: float = Field(0.01, ge=0, le=MAX_WEIGHT)
    """Weight of RSL's entropy-shaping term (mean per-token routing entropy)."""
    gate_loss: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the gate cross-entropy on task-labelled tokens (0: unsupervised, as in the paper)."""
    joint: bool = False
    """Train the experts together with the router (paradigm i) instead of routing frozen adapters."""
    n_experts: int | None = Field(None, ge=1, le=MAX_FRESH_EXPERTS)
    """Fresh experts to create when no adapters are given (default: one per task)."""
    rank: int = Field(8, ge=1, le=MAX_RANK)
    """Rank of fresh experts (their bank's total rank, n_experts x rank, is at most MAX_RANK: 1,000,000
    experts took every byte of memory)."""
    init_std: float = Field(0.02, gt=0, le=MAX_SCALE)
    """Standard deviation of the router's initial weights."""

    @model_validator(mode="after")
    def _bank_fits(self) -> "MixerConfig":
        if self.n_experts is not None and self.n_experts * self.rank > MAX_RANK:
            raise ValueError(f"n_experts x rank is {self.n_experts * self.rank:,}: the fresh experts' bank holds at "
                             f"most {MAX_RANK:,} ranks")
        return self


class MixerGate(Gate):
    straight_through = True  # gradients reach every slot's gate: the bank keeps its dense path in training
    def __init__(self, ctx: RouteContext, d_in: int, n_experts: int, cfg: MixerConfig):
        super().__init__(ctx, n_experts, 1)
        self.cfg = cfg
        self.weight = nn.Parameter(torch.randn(n_experts, d_in) * cfg.init_std)  # (E, d_in)

    def forward(self, h: torch.Tensor) -> Routing:  # h (B, T, d_in)
        logits = F.linear(h.to(self.weight.dtype), self.weight)  # (B, T, E)
        p = torch.softmax(logits / self.cfg.temperature, dim=-1)  # (B, T, E)
        k = min(self.cfg.top_k, self.n_experts)
        top, idx = p.topk(k, dim=-1)  # (B, T, K)
        hard = topk_scatter(top / top.sum(-1, keepdim=True), idx, self.n_experts)  # (B, T, E)
        gates = (hard - p).detach() + p  # straight-through: forward = hard, gradient = d p
        aux = None
        if self.training:
            valid = self.ctx.valid(h)
            chosen = hard.detach() > 0
            aux = (self.cfg.balance * switch_balance(p, chosen, valid)
                   + self.cfg.specialization * token_entropy(p, valid))
            if self.ctx.target is not None and self.cfg.gate_loss > 0:
                aux = aux + self.cfg.gate_loss * gate_cross_entropy(logits, self.ctx.target, valid)
            aux = aux / self.ctx.n_layers
        return Routing(gates, idx, aux, logits, self.n_experts)

    def keep_experts(self, keep: torch.Tensor) -> None:
        self.weight = nn.Parameter(self.weight.data[keep].clone(), requires_grad=self.weight.requires_grad)
        self.n_experts = len(keep)


@ROUTERS.register("mixer", MixerConfig, summary="LoRA-Mixer: hard top-k, soft weights, specialization-balance loss")
class MixerRouter(LearnedRouter):
    """LoRA-Mixer (arXiv 2507.00029): straight-through top-k routing with RSL; frozen or joint experts."""

    slot = "adapter"
    method = "mixer"
    joint_capable = True
    fresh_options = ("n_experts", "rank")

    def make_gate(self, layer) -> Gate:
        return MixerGate(self.ctx, layer.bank.d_in, layer.bank.n_experts, self.config)

    @classmethod
    def fresh_experts(cls, config: MixerConfig, n_tasks: int) -> tuple[int, int]:
        return config.n_experts or n_tasks, config.rank
