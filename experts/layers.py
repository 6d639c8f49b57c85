"""RoutedLinear and the functions that put adapter banks into (and take them out of) a base model.

`inject(model, adapters)` wraps every adapted projection of any Hugging Face model (nn.Linear, and
GPT-2's Conv1D whose weight is stored (d_in, d_out)) in a `RoutedLinear(base, bank)`:

    h (B, T, D) -> gates (B, T, S) -> base(h) + bank(h, gates)

Where gates come from, in order of precedence:
  1. `layer.router` (a module h -> Routing with `.gates`), set by the routing part;
  2. `layer.static_gates`, set for a forward by `use_gates(model, gates)`: constant over a sequence
     ((B, 1, S): retrieval routing, a heterogeneous batch where each row names its adapter);
  3. None: every adapter summed with weight 1 (a single adapter is then plain LoRA).
`adapters_disabled(model)` turns the delta off (the bare base, e.g. for label anchors).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from loraplex.experts.bank import LoraBank
from loraplex.experts.spec import Adapter, LoraSpec, unread_module


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D): y = x @ W + b with W (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a Linear or Conv1D module, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


class RoutedLinear(nn.Module):
    """A frozen base projection plus a LoraBank whose adapters are mixed by gates."""

    def __init__(self, base: nn.Module, bank: LoraBank, name: str = ""):
        super().__init__()
        self.base = base
        self.bank = bank
        self.name = name
        self.router: nn.Module | None = None
        self.static_gates: torch.Tensor | None = None
        self.enabled = True
        self.record = False  # keep the last Routing (for traces and auxiliary losses)
        self.last_routing = None
        self.siblings: list[RoutedLinear] = []  # layers the model feeds the same input (link_same_input)

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads .weight of projections (dtype checks)
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, d_in)
        out = self.base(x)  # (B, T, d_out)
        if not self.enabled:
            return out
        gates, dense_gate_grad, plans, topk = None, False, None, None
        if self.router is not None:
            dense_gate_grad = bool(getattr(self.router, "straight_through", False))
            routing = self.router(x)
            gates, plans, topk = routing.gates, routing.dispatch, routing.topk_idx  # (B, T, S); plans shared per Routing
            if self.record or self.training:
                self.last_routing = routing
        elif self.static_gates is not None:
            gates = self.static_gates  # (B, 1, S) or (1, 1, S)
        # the bank adds its delta into the base output (in place where safe: LoraBank `into`). A linear's output
        # for (B, T, d) input is a view of its (B*T, d_out) product: added into in place, autograd copied the whole
        # gradient of that product in backward (CopySlices: about 1.3 ms a MiniLM projection, 2.5% of a routed
        # forward and backward at E=32), so the product itself is given, and viewed back after.
        into = out
        root = out._base if out._is_view() else None
        if (root is not None and root.dim() == 2 and root.is_contiguous() and root.dtype == out.dtype
                and root.shape == (out.shape[:-1].numel(), out.shape[-1])):
            into = root
        group = [s.bank for s in self.siblings] if plans is not None else ()
        res = self.bank(x.to(self.bank.A.dtype), gates, dense_gate_grad=dense_gate_grad, plans=plans, topk=topk,
                        into=into, group=group)
        return res if res.shape == out.shape else res.view(out.shape)


def block_name(name: str) -> str | None:
    """The transformer block holding module `name`: its name up to its first numbered component
    (`model.layers.3.self_attn.q_proj` -> `model.layers.3`, and a MoE expert's projection, numbered twice,
    belongs to its layer's block too); None outside numbered blocks. Traces group by it (router/model.py)
    and token-gate's `shared=block` gates by it."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else None


def parent_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding submodule `name`, the attribute it is held under)."""
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def routed_layers(model: nn.Module) -> dict[str, RoutedLinear]:
    """Every RoutedLinear in the model, by the name of the projection it wraps."""
    return {m.name: m for m in model.modules() if isinstance(m, RoutedLinear)}


def inject(
    model: nn.Module,
    adapters: Sequence[Adapter],
    *,
    modules: Sequence[str] | None = None,
    rank: int | Mapping[str, int] | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, RoutedLinear]:
    """Wrap the union of the adapters' modules (or `modules`) in RoutedLinear with a bank of E = len(adapters).

    Adapter e fills slot e of each bank where it adapts that module; where it does not, slot e stays
    zero (that adapter leaves the module unchanged). `rank` forces R, for every module or per module
    name (defaults to the largest rank present). Banks are kept in `dtype` (float32 by default, for exact LoRA math under a bf16 base).
    The base's parameters are frozen. Returns the wrapped layers by module name.
    """
    if routed_layers(model):
        raise ValueError("model already has adapter banks; call eject(model) first")
    if not adapters:
        raise ValueError("inject needs at least one adapter")
    # modules no loraplex head reads (BERT's pooler: `spec.unread_module`) are kept in an adapter and its export
    # but not wrapped: the pooler takes a (B, d) first-token tensor, which a routed layer's (B, 1, S) gates did
    # not fit (every query over a PEFT `all-linear` adapter was an internal error; sweep 28)
    names = list(modules) if modules is not None else sorted({m for a in adapters for m in a.modules
                                                              if not unread_module(m)})
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        base = model.get_submodule(name)
        dims = linear_dims(base)
        if dims is None:
            raise ValueError(f"module {name!r} is a {type(base).__name__}, not a Linear or Conv1D")
        ranks = [a.rank(name) for a in adapters if name in a.weights]
        forced = rank.get(name) if isinstance(rank, Mapping) else rank
        R = forced or max(ranks or [1])
        device = base.weight.device
        bank = LoraBank(dims[0], dims[1], len(adapters), R, dropout=dropout, dtype=dtype, device=device)
        for e, a in enumerate(adapters):
            if name in a.weights:
                A, B = a.weights[name]
                bank.set_expert(e, A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype), a.scaling(name))
        layer = RoutedLinear(base, bank, name)
        parent, child = parent_module(model, name)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def inject_new(
    model: nn.Module,
    spec: LoraSpec,
    modules: Sequence[str],
    *,
    n_experts: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, RoutedLinear]:
    """Fresh trainable adapters (PEFT's initialisation) in n_experts slots of each listed module."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in modules:
        base = model.get_submodule(name)
        dims = linear_dims(base)
        if dims is None:
            raise ValueError(f"module {name!r} is a {type(base).__name__}, not a Linear or Conv1D")
        r = spec.rank_for(name)
        bank = LoraBank(dims[0], dims[1], n_experts, r, dropout=spec.dropout, dtype=dtype, device=base.weight.device)
        for e in range(n_experts):
            bank.init_expert(e, r, spec.scaling_for(name, r), generator=gen)
        layer = RoutedLinear(base, bank, name)
        parent, child = parent_module(model, name)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def eject(model: nn.Module) -> None:
    """Put the original projections back (the banks are dropped)."""
    for name, layer in routed_layers(model).items():
        parent, child = parent_module(model, name)
        setattr(parent, child, layer.base)


class StackedBanks:
    """A model's banks grouped by shape (d_in, d_out, slots, rank), each group's A, B, rank mask and
    scalings stacked into one tensor of which the banks' own are views (same layout, same forward).
    Slot e of every bank of a group is then written with one copy per tensor (`write` of what `pack`
    made), where `LoraBank.set_expert` makes several per module: a serving slot bank loads an adapter
    into a slot in a few copies, whatever the number of layers. The banks' tensors stop being trainable."""

    def __init__(self, model: nn.Module):
        by_shape: dict[tuple[int, int, int, int], list[tuple[str, LoraBank]]] = {}
        for name, layer in sorted(routed_layers(model).items()):
            b = layer.bank
            by_shape.setdefault((b.d_in, b.d_out, b.n_experts, b.rank), []).append((name, b))
        self.groups: list[tuple[list[str], tuple[int, int, int, int], dict[str, torch.Tensor]]] = []
        for shape, members in by_shape.items():
            banks = [b for _, b in members]
            t = {k: torch.stack([getattr(b, k).detach() for b in banks]) for k in ("A", "B", "rank_mask", "scaling")}
            for i, b in enumerate(banks):
                b.A = nn.Parameter(t["A"][i], requires_grad=False)  # (E*R, d_in), a view of t["A"]
                b.B = nn.Parameter(t["B"][i], requires_grad=False)  # (d_out, E*R)
                b.rank_mask, b.scaling = t["rank_mask"][i], t["scaling"][i]
            self.groups.append(([n for n, _ in members], shape, t))

    def pack(self, adapter: Adapter) -> list[tuple[torch.Tensor, ...]]:
        """The adapter in the groups' layout, on the host: per group (A (L, R, d_in), B (L, d_out, R),
        rank mask (L, R), scalings (L,)), zero-padded up to R and zero for the modules it leaves alone
        (pinned memory when the banks are on a GPU, so `write` copies asynchronously)."""
        with _one_thread():
            return [self._pack(adapter, names, shape, t) for names, shape, t in self.groups]

    @staticmethod
    def _pack(adapter: Adapter, names: list[str], shape: tuple[int, int, int, int],
              t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        d_in, d_out, _, R = shape
        L = len(names)
        A = torch.zeros(L, R, d_in, dtype=t["A"].dtype)
        B = torch.zeros(L, d_out, R, dtype=t["B"].dtype)
        mask = torch.zeros(L, R, dtype=t["rank_mask"].dtype)
        scaling = torch.zeros(L, dtype=t["scaling"].dtype)
        for i, name in enumerate(names):
            if name not in adapter.weights:
                continue
            a, b = adapter.weights[name]
            r = a.shape[0]
            if a.shape != (r, d_in) or b.shape != (d_out, r) or r > R:
                raise ValueError(f"{name}: expert shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit a bank "
                                 f"of d_in={d_in}, d_out={d_out}, R={R}")
            A[i, :r], B[i, :, :r], mask[i, :r], scaling[i] = a, b, 1.0, adapter.scaling(name)
        parts = (A, B, mask, scaling)
        if t["A"].device.type == "cuda":
            parts = tuple(p.pin_memory() for p in parts)
        return parts

    @torch.no_grad()
    def write(self, e: int, packed: Sequence[tuple[torch.Tensor, ...]] | None) -> None:
        """Slot e of every bank set to a packed adapter (None: emptied): four copies per group."""
        with _one_thread():
            for (names, (d_in, d_out, E, R), t), parts in zip(self.groups, packed or [None] * len(self.groups)):
                if not 0 <= e < E:
                    raise IndexError(f"slot {e} out of range for banks of {E}")
                L = len(names)
                dst = (t["A"].view(L, E, R, d_in)[:, e], t["B"].view(L, d_out, E, R)[:, :, e],
                       t["rank_mask"].view(L, E, R)[:, e], t["scaling"][:, e])
                for d, src in zip(dst, parts or [None] * 4):
                    d.zero_() if src is None else d.copy_(src, non_blocking=True)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's CPU ops on one intra-op thread during the block. A slot's copy (some 10^5 elements) is
    big enough for torch to split over its threads, and the OpenMP barrier that follows costs far more
    than the split saves whenever the cores are busy (smollm2's slot write, 2 loaded cores: 0.36 ms on
    one thread, 19-34 ms on two; loraplex/embedders.py does the same for short batches)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def extract(model: nn.Module, spec: LoraSpec, expert: int = 0) -> Adapter:
    """Read adapter `expert` back out of the model's banks (padding removed)."""
    weights = {}
    for name, layer in routed_layers(model).items():
        if layer.bank.expert_rank(expert) > 0:
            weights[name] = layer.bank.expert(expert)
    return Adapter(spec, weights)


@contextmanager
def swapped(model: nn.Module, attr: str, value: Any) -> Iterator[None]:
    """Every routed layer's `attr` set to `value` during the block, restored after."""
    layers = list(routed_layers(model).values())
    old = [getattr(layer, attr) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, attr, value)
        yield
    finally:
        for layer, v in zip(layers, old):
            setattr(layer, attr, v)


def use_gates(model: nn.Module, gates: torch.Tensor | None):
    """Constant gates (B, 1, S) for every routed layer during the block."""
    return swapped(model, "static_gates", gates)


def adapters_disabled(model: nn.Module):
    """The bare base model during the block."""
    return swapped(model, "enabled", False)


@torch.no_grad()
def merge(model: nn.Module, adapter: Adapter, weight: float = 1.0) -> None:
    """Fold an adapter into the base weights in place: W += weight * scaling * B @ A (transposed for Conv1D)."""
    for name, (A, B) in adapter.weights.items():
        base = model.get_submodule(name)
        if isinstance(base, RoutedLinear):
            base = base.base
        dims = linear_dims(base)
        if dims is None:
            raise ValueError(f"cannot merge into {name!r}: a {type(base).__name__}")
        delta = (B.double() @ A.double()) * (adapter.scaling(name) * weight)  # (d_out, d_in)
        if is_conv1d(base):
            delta = delta.T
        base.weight.add_(delta.to(base.weight.dtype))


def set_router(model: nn.Module, make_router: Callable[[str, RoutedLinear], nn.Module | None]) -> None:
    """Attach a router per routed layer (make_router(name, layer) -> module or None)."""
    layers = routed_layers(model)
    for name, layer in layers.items():
        layer.router = make_router(name, layer)
    link_same_input(layers)


SAME_INPUT = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
              ("gate_proj", "up_proj"))
"""Projections that Hugging Face models call on one input tensor, by their names under one parent module
(BERT and RoBERTa; Llama, Mistral, Qwen and the like, attention and MLP; DistilBERT)."""


def link_same_input(layers: Mapping[str, RoutedLinear]) -> None:
    """Tell each routed layer which others take the same input (`SAME_INPUT`) through the same gate
    module, so that their banks' token dispatch gathers it once and does their down projections in one
    matmul (LoraBank._down). Layers with gates of their own get different gates, so nothing to share:
    they are not linked (the first would compute the others' products for nothing). Only a hint: a bank
    checks that the input and the plan are the very ones before it uses what another computed."""
    groups: dict[tuple[str, int, int], list[RoutedLinear]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        i = next((i for i, names in enumerate(SAME_INPUT) if child in names), None)
        layer.siblings = []
        if i is not None and layer.router is not None:
            groups.setdefault((parent, i, id(layer.router)), []).append(layer)
    for members in groups.values():
        for layer in members:
            layer.siblings = [m for m in members if m is not layer]
