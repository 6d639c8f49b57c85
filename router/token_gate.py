"""token-gate: MeteoRA token gating over frozen registered adapters.

Xu, Lai, Huang, "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", arXiv 2405.13053.

Every adapted projection gets its own gate, a bias-free linear map W_g (E, d_in). For a token's input
h_t at that projection:

    l_t   = W_g h_t                                   # (E,) one logit per adapter
    K_t   = top-k(l_t)                                # k = 2 by default
    g_t,e = exp(l_t,e / T) / sum_{j in K_t} exp(l_t,j / T)   for e in K_t, 0 otherwise
    y_t   = W h_t + sum_{e in K_t} g_t,e * s_e * B_e A_e h_t

(MeteoRA's fast path: softmax over the selected logits only, temperature T, k = 1 gives weight 1.)
Routing is per token and per layer, so a prompt that joins texts of two tasks can switch adapters
mid-sequence.

Training (adapters frozen, only the gates learn), as MeteoRA does: the task loss of the routed model
plus the gate loss, a cross-entropy between each gate's logits and the index of the adapter of the
token's task, averaged over tokens and gates:

    L = L_task + lambda * mean_layers mean_t CE(l_t, y_task(t))

Here each training row is labelled with its task (ContinualModule calls `on_task_forward`); padding
tokens are excluded through the attention mask. W_g starts at N(0, 0.02^2) (MeteoRA draws N(0, 1),
which on 384-dim inputs gives near one-hot gates before any training).

With hundreds of adapters the gate itself becomes the cost: at E = 512 a full W_g has as many
multiply-adds per token as a 576 x 512 projection, so the gates of a Llama-shaped layer add about half
of the layer's own arithmetic whatever the dispatch does (bench/routing.py --part speed).
`gate_rank = r` factorises W_g = W_up W_down (W_down (r, d_in), W_up (E, r)), a low-rank gate, so a
token costs (d_in + E) r instead of d_in E. This is loraplex's option, not MeteoRA's: it caps the
logits at rank r, which is no limit when r is at least the number of tasks the router is trained on
(the gate loss asks it to separate those tasks, not all E directions).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from loraplex.catalog import MAX_COUNT, Options, options
from loraplex.errors import UserInputError
from loraplex.experts.bank import tensor_version
from loraplex.router.base import ROUTERS, Gate, LearnedRouter, RouteContext, Routing, topk_scatter
from loraplex.router.losses import gate_cross_entropy


class TokenGateConfig(Options):
    """MeteoRA token gating."""

    model_config = options()

    top_k: int = Field(2, ge=1, le=MAX_COUNT)
    """Adapters mixed per token (k)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature over the selected logits (larger: flatter mixtures)."""
    gate_loss: float = Field(1.0, ge=0)
    """Weight of the gate cross-entropy on task-labelled tokens (MeteoRA's gate loss)."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the gates' initial weights."""
    shared: bool = False
    """One gate per layer input: projections of one module fed the same input (q, k, v) share a gate, evaluated once."""
    gate_rank: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Factorise each gate as W_g = W_up W_down with W_down (r, d_in), W_up (E, r): (d_in + E) r multiply-adds per
    token instead of d_in E (None: MeteoRA's full (E, d_in) gate)."""


class TokenGate(Gate):
    """One projection's gate: logits W_g h, top-k, softmax with temperature over the selected logits."""

    def __init__(self, ctx: RouteContext, d_in: int, n_experts: int, cfg: TokenGateConfig):
        super().__init__(ctx, n_experts, 1)
        self.cfg = cfg
        r = cfg.gate_rank
        if r is not None and r > d_in:  # W_down (r, d_in) would be no factorisation, only memory (1e5: 24 GB)
            raise UserInputError(f"gate_rank {r} is above the gate's input size {d_in}: a factorised gate's rank is "
                                 f"at most {d_in} (leave it unset for MeteoRA's full gate)")
        if r is None:
            self.down = None
            self.weight = nn.Parameter(torch.randn(n_experts, d_in) * cfg.init_std)  # (E, d_in)
        else:  # the logits keep the full gate's initial spread: Var(l) = d_in init_std^2 Var(h)
            self.down = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)  # (r, d_in)
            self.weight = nn.Parameter(torch.randn(n_experts, r) * cfg.init_std * (d_in / r) ** 0.5)  # (E, r)
        self._last = None  # shared gates: (weakref to the last input, its version, its Routing)

    def forward(self, h: torch.Tensor) -> Routing:  # h (B, T, d_in)
        if self.cfg.shared:
            last = self._last
            if last is not None and last[0]() is h and last[1] == tensor_version(h) and last[3] == torch.is_grad_enabled():
                return last[2]  # the same input tensor as the previous projection: one evaluation per layer input
            routing = self._route(h)
            routing.dispatch["shared"] = True  # the banks of q, k, v pack their common input once
            self._last = (weakref.ref(h), tensor_version(h), routing, torch.is_grad_enabled())
            return routing
        return self._route(h)

    def _route(self, h: torch.Tensor) -> Routing:  # h (B, T, d_in)
        h = h.to(self.weight.dtype)
        if self.down is not None:
            h = F.linear(h, self.down)  # (B, T, r)
        logits = F.linear(h, self.weight)  # (B, T, E)
        k = min(self.cfg.top_k, self.n_experts)
        top, idx = logits.topk(k, dim=-1)  # (B, T, K)
        w = torch.softmax(top / self.cfg.temperature, dim=-1)
        gates = topk_scatter(w, idx, self.n_experts)  # (B, T, E)
        aux = None
        if self.training and self.ctx.target is not None and self.cfg.gate_loss > 0:
            valid = self.ctx.valid(h)
            aux = self.cfg.gate_loss * gate_cross_entropy(logits, self.ctx.target, valid) / self.ctx.n_layers
        return Routing(gates, idx, aux, logits, self.n_experts)

    def keep_experts(self, keep: torch.Tensor) -> None:
        self._last = None
        self.weight = nn.Parameter(self.weight.data[keep].clone(), requires_grad=self.weight.requires_grad)
        self.n_experts = len(keep)


@ROUTERS.register("token-gate", TokenGateConfig, summary="MeteoRA: a top-k gate per projection, per token")
class TokenGateRouter(LearnedRouter):
    """MeteoRA token gating (arXiv 2405.13053): trained on task-labelled tokens, adapters frozen."""

    slot = "adapter"
    method = "token-gate"

    def make_gate(self, layer) -> Gate:
        if not self.config.shared:
            return TokenGate(self.ctx, layer.bank.d_in, layer.bank.n_experts, self.config)
        # one gate per (parent module, input size): q, k, v of one attention block share it
        key = (layer.name.rsplit(".", 1)[0], layer.bank.d_in, layer.bank.n_experts)
        shared = self.__dict__.setdefault("_shared", {})
        if key not in shared:
            shared[key] = TokenGate(self.ctx, layer.bank.d_in, layer.bank.n_experts, self.config)
        return shared[key]
