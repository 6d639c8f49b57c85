"""The router seam: `Routing` (what a gate returns), the `ROUTERS` catalog, and `LearnedRouter`, the base of
every router that attaches one small gate module per adapted projection.

A router only makes gates. Inside each `RoutedLinear` (experts/layers.py) the gate module maps the
projection's input h (B, T, d_in) to a `Routing`:

    gates     (B, T, S)   S = E (one weight per adapter) or E*R (one weight per rank, SMoRA)
    topk_idx  (B, T, K)   the selected slots (None for dense gates)
    aux_loss  scalar      added to the training loss by ContinualModule (None: no auxiliary loss)
    logits    (B, T, E)   per-adapter scores before selection (supervision, traces)

and the layer's `LoraBank` computes base(h) + B diag(gates * scaling) A h in two matmuls, whatever E is.
The router's stored weights are the state dict of its per-layer gate modules, keyed
`<projection name>.<parameter>`; a record stores them as one safetensors blob.

Every gate module of one model shares a `RouteContext`: the attention mask of the current forward
(captured by a forward pre-hook on the model, so padding never votes) and, during router training, the
expert index of the task the rows belong to (set per forward by ContinualModule's `on_task_forward`).

Retrieval routing (router/retrieval.py) attaches no modules: it sets constant (B, 1, E) gates per
sequence with `experts.layers.use_gates`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from loraplex.catalog import Catalog
from loraplex.errors import IntegrityError
from loraplex.experts.layers import routed_layers, set_router

ROUTERS: Catalog[Any] = Catalog(
    "router",
    modules=[
        "loraplex.router.token_gate",
        "loraplex.router.mixer",
        "loraplex.router.rank",
        "loraplex.router.retrieval",
    ],
)


@dataclass
class Routing:
    """What a gate returns for one forward of one projection."""

    gates: torch.Tensor  # (B, T, S)
    topk_idx: torch.Tensor | None = None  # (B, T, K)
    aux_loss: torch.Tensor | None = None  # scalar
    logits: torch.Tensor | None = None  # (B, T, E) per-adapter scores
    n_experts: int | None = None  # E (so per-rank gates can be summed per adapter)
    dispatch: dict = field(default_factory=dict, repr=False, compare=False)
    """The banks' token-dispatch plans for these gates (LoraBank._token_plan), built once and shared by
    every projection that receives this Routing (a shared gate's q, k and v)."""

    def per_adapter(self) -> torch.Tensor:
        """(B, T, E) weight of each adapter, normalised to sum 1 over adapters where any is used."""
        g = self.gates.detach().float()
        E = self.n_experts or g.shape[-1]
        if g.shape[-1] != E:  # per-rank gates: an adapter's weight is the sum of its ranks' gates
            g = g.unflatten(-1, (E, g.shape[-1] // E)).sum(-1)
        g = g.abs()
        return g / g.sum(-1, keepdim=True).clamp_min(1e-12)


@dataclass
class RouteContext:
    """Facts of the current forward shared by the gate modules of one model."""

    mask: torch.Tensor | None = None  # (B, T) bool, the attention mask of the current forward
    target: int | None = None  # expert index of the task of this forward's rows (router training)
    n_layers: int = 1  # how many gates the model has (aux losses are averaged over them)
    expert_of_task: dict[str, int] = field(default_factory=dict)

    def valid(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask if it fits x's (B, T), else None (e.g. one new token during cached generation)."""
        m = self.mask
        if m is None or m.shape != x.shape[:2] or m.device != x.device:
            return None
        return m

    def set_task(self, task: str | None) -> None:
        """Rows of the next forward belong to `task` (None: no supervision)."""
        self.target = self.expert_of_task.get(task) if task is not None else None


class Gate(nn.Module):
    """A per-layer gate. Subclasses implement `forward(h) -> Routing` and `keep_experts(keep)`."""

    def __init__(self, ctx: RouteContext, n_experts: int, rank: int):
        super().__init__()
        self.ctx = ctx  # a plain object: not a submodule, not saved
        self.n_experts = n_experts
        self.rank = rank

    def keep_experts(self, keep: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def topk_scatter(values: torch.Tensor, idx: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Dense (..., n_slots) tensor with `values` (..., K) at `idx` (..., K) and zeros elsewhere."""
    out = torch.zeros(*idx.shape[:-1], n_slots, dtype=values.dtype, device=values.device)
    return out.scatter(-1, idx, values)


class LearnedRouter:
    """Base of the learned routers: builds, attaches, saves and restricts one gate per routed layer.

    Subclasses set `slot` ("adapter" or "rank") and implement `make_gate(layer) -> Gate`. A config with
    `joint=True` trains the experts with the router (their weights are then stored with the router).
    """

    slot: ClassVar[str] = "adapter"
    method: ClassVar[str] = ""
    joint_capable: ClassVar[bool] = False
    fresh_options: ClassVar[tuple[str, ...]] = ()
    """Config options that only shape fresh experts (`fresh_experts`): refused over registered adapters."""

    def __init__(self, config: Any):
        self.config = config
        self.ctx = RouteContext()
        self.gates: dict[str, Gate] = {}
        self._hook = None

    # ---- building --------------------------------------------------------------------------
    def make_gate(self, layer) -> Gate:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def fresh_experts(cls, config: Any, n_tasks: int) -> tuple[int, int]:
        """(experts, rank) of the fresh LoRAs a joint router trains from scratch for `n_tasks` tasks."""
        raise NotImplementedError(f"{cls.method} routes registered adapters only")

    @property
    def joint(self) -> bool:
        return bool(getattr(self.config, "joint", False))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, "top_k", 1))

    @classmethod
    def choices(cls, ranks: Sequence[int]) -> int:
        """How many slots top-k picks among, for experts of these ranks: one per expert."""
        return len(ranks)

    def attach(self, model: nn.Module, only: Sequence[str] | None = None) -> None:
        """Give every RoutedLinear of `model` (or those named in `only`; the others keep static gates) its
        gate (created on first attach) and capture attention masks."""
        layers = routed_layers(model)
        if only is not None:
            keep = set(only)
            layers = {n: layer for n, layer in layers.items() if n in keep}
        if not layers:
            raise ValueError("the model has no adapter banks to route")
        for name, layer in layers.items():
            if name not in self.gates:
                self.gates[name] = self.make_gate(layer).to(layer.bank.A.device)
            self.gates[name].train(model.training)  # a gate follows its model's train/eval mode
        self.ctx.n_layers = len(layers)
        set_router(model, lambda name, layer: self.gates[name] if name in layers else layer.router)
        self.detach_hook()
        self._hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)

    def _capture_mask(self, module, args, kwargs):
        m = kwargs.get("attention_mask")
        self.ctx.mask = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    def detach_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def parameters(self) -> list[nn.Parameter]:
        return list({id(p): p for g in self.gates.values() for p in g.parameters()}.values())  # shared gates once

    def set_expert_tasks(self, tasks: list[str | None]) -> None:
        """Which task each expert was trained on (the supervision target of that task's rows)."""
        self.ctx.expert_of_task = {t: i for i, t in enumerate(tasks) if t is not None}

    # ---- saving and restoring ------------------------------------------------------------------
    @classmethod
    def stored_shape(cls, rows: int, n_experts: int) -> tuple[int, int]:
        """(experts, rank) of a stored gate with `rows` output rows over `n_experts` experts (the full
        count, before any shortlist): one row per adapter."""
        return rows, 1

    @classmethod
    def bank_ranks(cls, gate_weights: dict[str, torch.Tensor], n_experts: int) -> dict[str, int] | None:
        """projection -> the bank rank its stored gate expects (None: each adapter's own rank)."""
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every gate's tensors under its projection's name; a gate shared by several projections is
        stored once per projection (copies: safetensors refuses tensors that share memory)."""
        return {f"{name}.{k}": v.detach().cpu().clone() for name, g in sorted(self.gates.items())
                for k, v in g.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `state_tensors` (after `attach`); every gate must be covered exactly."""
        for name, g in self.gates.items():
            own = g.state_dict()
            sd = {k: tensors.get(f"{name}.{k}") for k in own}
            missing = [k for k, v in sd.items() if v is None]
            if missing:
                raise IntegrityError(f"router weights lack {name}.{missing[0]} (the record does not match its adapters)")
            bad = [k for k, v in sd.items() if v.shape != own[k].shape]
            if bad:
                raise IntegrityError(f"router weight {name}.{bad[0]} has shape {tuple(sd[bad[0]].shape)}, "
                                     f"expected {tuple(own[bad[0]].shape)}")
            g.load_state_dict(sd)

    # ---- shortlists --------------------------------------------------------------------------
    def keep_experts(self, keep: list[int]) -> None:
        """Restrict every gate to experts `keep` (in that order), e.g. a retrieved shortlist."""
        idx = torch.as_tensor(keep, dtype=torch.long)
        for g in {id(g): g for g in self.gates.values()}.values():  # a shared gate is restricted once
            g.keep_experts(idx.to(next(g.buffers(), next(g.parameters())).device))
