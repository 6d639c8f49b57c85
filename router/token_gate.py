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

`shared` says how many projections one gate serves. False (MeteoRA as published): a gate per projection.
True: one gate per layer input, evaluated once for the projections fed that input (q, k, v of an
attention block; MeteoRA's accelerated form). "block": one gate per transformer block, loraplex's
option, not MeteoRA's: the gate reads the block's input (the residual stream entering it, RMS-normalised
without weights because its scale grows with depth, as the norm in front of a Llama block's projections
does) once, and every routed projection of the block (q, k, v, o, the MLP's) uses that one decision, as
a Mixtral block routes its experts from one gate. A token then takes one gate evaluation and one sort
of its assignments per block instead of one per layer input (at E = 512 on MiniLM, about half the
gates' arithmetic). The block is the projection's first numbered ancestor (`encoder.layer.3`,
`model.layers.3`: `experts.layers.block_name`), its width the model config's hidden size. A BlockGate keeps
the Routing of the forward under way on itself, as the shared gate does: one forward at a time per model
(the server runs its forwards on one thread).
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from loraplex.catalog import MAX_COUNT, MAX_SCALE, MAX_TEMPERATURE, MAX_WEIGHT, MIN_TEMPERATURE, Options, options
from loraplex.errors import UserInputError
from loraplex.experts.bank import tensor_version
from loraplex.experts.layers import block_name, routed_layers
from loraplex.router.base import ROUTERS, Gate, LearnedRouter, RouteContext, Routing, topk_scatter
from loraplex.router.losses import gate_cross_entropy


class TokenGateConfig(Options):
    """MeteoRA token gating."""

    model_config = options()

    top_k: int = Field(2, ge=1, le=MAX_COUNT)
    """Adapters mixed per token (k)."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Softmax temperature over the selected logits (larger: flatter mixtures)."""
    gate_loss: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the gate cross-entropy on task-labelled tokens (MeteoRA's gate loss)."""
    init_std: float = Field(0.02, gt=0, le=MAX_SCALE)
    """Standard deviation of the gates' initial weights."""
    shared: bool | Literal["block"] = False
    """true: one gate per layer input (the projections fed one input, q, k, v, share it, evaluated once);
    "block": one gate per transformer block, read from the block's input and used by all its projections."""
    gate_rank: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Factorise each gate as W_g = W_up W_down with W_down (r, d_in), W_up (E, r): (d_in + E) r multiply-adds per
    token instead of d_in E (None: MeteoRA's full (E, d_in) gate)."""

    @field_validator("shared", mode="before")
    @classmethod
    def _sharing(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "block":  # pydantic's lax union read "yes" and 1 as true
            return v
        raise ValueError(f"expected true, false or block, got {v!r}")


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
            self._last = (weakref.ref(h), tensor_version(h), routing, torch.is_grad_enabled())
            return routing
        return self._route(h)

    def _route(self, h: torch.Tensor) -> Routing:  # h (B, T, d_in)
        h = h.to(self.weight.dtype)
        logits = F.linear(h, self.gate_matrix()) if self.collapses() else F.linear(
            h if self.down is None else F.linear(h, self.down), self.weight)  # (B, T, E)
        k = min(self.cfg.top_k, self.n_experts)
        top, idx = logits.topk(k, dim=-1)  # (B, T, K)
        w = torch.softmax(top / self.cfg.temperature, dim=-1)
        gates = topk_scatter(w, idx, self.n_experts)  # (B, T, E)
        aux = None
        if self.training and self.ctx.target is not None and self.cfg.gate_loss > 0:
            valid = self.ctx.valid(h)
            aux = self.cfg.gate_loss * gate_cross_entropy(logits, self.ctx.target, valid) / self.ctx.n_layers
        return Routing(gates, idx, aux, logits, self.n_experts)

    def collapses(self) -> bool:
        """Whether a factorised gate is applied as its product W_up W_down (E, d_in): when r (d_in + E) > d_in E,
        as with rank 64 over 32 adapters on MiniLM (26,624 multiply-adds per token against 12,288), the two
        factors cost a token more than the full gate they multiply to (the product itself costs E r d_in once
        per forward, not per token). The same logits up to float rounding, and the same gradients (autograd
        goes through the product)."""
        if self.down is None:
            return False
        r, d_in = self.down.shape
        return r * (d_in + self.n_experts) > d_in * self.n_experts

    def gate_matrix(self) -> torch.Tensor:
        """The (E, d_in) gate: W_g, or W_up W_down for a factorised one."""
        return self.weight if self.down is None else self.weight @ self.down

    def keep_experts(self, keep: torch.Tensor) -> None:
        self._last = None
        self.weight = nn.Parameter(self.weight.data[keep].clone(), requires_grad=self.weight.requires_grad)
        self.n_experts = len(keep)


class BlockGate(TokenGate):
    """shared="block": one gate per transformer block. `begin(h)` (a forward pre-hook on the block) evaluates
    it once on the block's input h (B, T, width), RMS-normalised; every routed projection of the block then
    receives that Routing whatever its own input, and the banks share its sort (`Routing.dispatch`)."""

    def __init__(self, ctx: RouteContext, width: int, n_experts: int, cfg: TokenGateConfig, block: str):
        super().__init__(ctx, width, n_experts, cfg)
        self.block = block
        self.width = width
        self._routing: Routing | None = None

    def begin(self, h: torch.Tensor) -> None:
        if h.shape[-1] != self.width:
            raise UserInputError(f"block {self.block!r} takes inputs of width {h.shape[-1]}, its gate was made "
                                 f"for {self.width} (shared=block reads the model's hidden size; use shared=true)")
        x = h.to(self.weight.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # the residual stream's scale grows with depth
        routing = self._route(x)
        self._routing = routing

    def end(self) -> None:
        self._routing = None  # the block's projections hold what they need (their last_routing)

    def forward(self, h: torch.Tensor) -> Routing:  # h (B, T, d_in): the projection's input, any width
        r = self._routing
        if r is None or r.gates.shape[:-1] != h.shape[:-1]:
            raise UserInputError(f"the gate of block {self.block!r} was not evaluated on this forward's input: "
                                 f"shared=block routes only projections called inside their block (use shared=true)")
        return r

    def keep_experts(self, keep: torch.Tensor) -> None:
        self._routing = None
        super().keep_experts(keep)


@ROUTERS.register("token-gate", TokenGateConfig, summary="MeteoRA: a top-k gate per projection, per token")
class TokenGateRouter(LearnedRouter):
    """MeteoRA token gating (arXiv 2405.13053): trained on task-labelled tokens, adapters frozen."""

    slot = "adapter"
    method = "token-gate"

    def make_gate(self, layer) -> Gate:
        if not self.config.shared:
            return TokenGate(self.ctx, layer.bank.d_in, layer.bank.n_experts, self.config)
        shared = self.__dict__.setdefault("_shared", {})
        if self.config.shared == "block":
            block = block_name(layer.name)
            if block is None:
                raise UserInputError(f"shared=block: projection {layer.name!r} is in no numbered transformer block "
                                     f"(use shared=true, one gate per layer input)")
            width = self.__dict__.get("_widths", {}).get(block, layer.bank.d_in)  # a stored gate: its own width
            key = (block, width, layer.bank.n_experts)
            if key not in shared:
                shared[key] = BlockGate(self.ctx, width, layer.bank.n_experts, self.config, block)
            return shared[key]
        # one gate per (parent module, input size): q, k, v of one attention block share it
        key = (layer.name.rsplit(".", 1)[0], layer.bank.d_in, layer.bank.n_experts)
        if key not in shared:
            shared[key] = TokenGate(self.ctx, layer.bank.d_in, layer.bank.n_experts, self.config)
        return shared[key]

    def attach(self, model: nn.Module, only=None) -> None:
        if self.config.shared != "block":
            return super().attach(model, only)
        width = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        if width <= 0:
            raise UserInputError("shared=block reads each block's input, of the model's hidden size, and this "
                                 "model's config names none (use shared=true)")
        names = [n for n in routed_layers(model) if only is None or n in set(only)]
        self.__dict__["_widths"] = {b: width for b in map(block_name, names) if b is not None}
        super().attach(model, only)
        blocks = {id(g): g for n, g in self.gates.items() if n in names and isinstance(g, BlockGate)}
        for g in blocks.values():
            module = model.get_submodule(g.block)
            self._block_hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, g=g: g.begin(_hidden_states(g.block, args, kwargs)), with_kwargs=True))
            self._block_hooks.append(module.register_forward_hook(lambda m, args, out, g=g: g.end()))

    @property
    def _block_hooks(self) -> list:
        return self.__dict__.setdefault("_block_hook_handles", [])

    def detach_hook(self) -> None:
        super().detach_hook()
        while self._block_hooks:
            self._block_hooks.pop().remove()


def _hidden_states(block: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """A transformer block's input: its first positional argument or its `hidden_states` keyword."""
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise UserInputError(f"block {block!r} was called without hidden states (B, T, width) as its first "
                             f"argument: shared=block cannot read its input (use shared=true)")
    return h
