"""ParamLayout: an adapter's state dict flattened to one vector, and back.

A generator learns a distribution over adapters, so it needs every adapter it reads or writes as a
point of one fixed space. A `ParamLayout` fixes that space: the adapted modules in sorted order, each
with its rank r and its (d_in, d_out), and the spec (alpha, patterns) a generated adapter carries. The
vector is the concatenation, module by module, of A (r, d_in) then B (d_out, r), each row-major:

    vec = [A_1.ravel(), B_1.ravel(), A_2.ravel(), B_2.ravel(), ...]   # (P,), P = sum_m r_m (d_in + d_out)

`flatten(adapter) -> (P,)` and `unflatten(vec) -> Adapter` are exact inverses (`tests/generators`).
An adapter of another layout (a missing or extra module, another rank or another width) is refused
with `IncompatibleAdapter` naming the first module that differs, before any tensor is copied.
`groups()` names the 2 x modules tensors (`<module>.A`, `<module>.B`) with their slices: the
generators normalise each tensor separately, because A (initialised at ~1/sqrt(d_in)) and B
(initialised at zero) live on very different scales.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.errors import IncompatibleAdapter, InvalidSpec
from loraplex.experts.spec import Adapter, LoraSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModuleSlot:
    """One adapted module: its name, rank, widths and where its A and B sit in the vector."""

    name: str
    rank: int
    d_in: int
    d_out: int
    offset: int

    @property
    def size(self) -> int:
        return self.rank * (self.d_in + self.d_out)

    @property
    def a_slice(self) -> slice:
        return slice(self.offset, self.offset + self.rank * self.d_in)

    @property
    def b_slice(self) -> slice:
        return slice(self.offset + self.rank * self.d_in, self.offset + self.size)


class ParamLayout:
    """The fixed order and shapes that map an adapter to a (P,) vector and back."""

    def __init__(self, spec: LoraSpec, modules: list[tuple[str, int, int, int]]):
        if not modules:
            raise InvalidSpec("a parameter layout needs at least one module")
        self.spec = spec
        slots, offset = [], 0
        for name, rank, d_in, d_out in sorted(modules):
            slot = ModuleSlot(name, int(rank), int(d_in), int(d_out), offset)
            slots.append(slot)
            offset += slot.size
        self.slots: tuple[ModuleSlot, ...] = tuple(slots)
        self.size = offset
        self._by_name = {s.name: s for s in slots}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def of(cls, adapter: Adapter) -> "ParamLayout":
        """The layout of an adapter (its modules, ranks and widths; its spec)."""
        mods = [(m, a.shape[0], a.shape[1], b.shape[0]) for m, (a, b) in adapter.weights.items()]
        return cls(adapter.spec, mods)

    def to_json(self) -> str:
        return json.dumps({
            "spec": self.spec.model_dump(mode="json"),
            "modules": [[s.name, s.rank, s.d_in, s.d_out] for s in self.slots],
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ParamLayout":
        data = json.loads(text)
        return cls(LoraSpec.model_validate(data["spec"]), [tuple(m) for m in data["modules"]])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.slots == other.slots

    def __hash__(self) -> int:
        return hash(self.slots)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return [s.name for s in self.slots]

    def groups(self) -> list[tuple[str, slice]]:
        """(`<module>.A` | `<module>.B`, its slice of the vector), in vector order."""
        out = []
        for s in self.slots:
            out.append((f"{s.name}.A", s.a_slice))
            out.append((f"{s.name}.B", s.b_slice))
        return out

    def describe(self) -> str:
        ranks = sorted({s.rank for s in self.slots})
        return f"{len(self.slots)} modules, rank {'/'.join(map(str, ranks))}, {self.size:,} parameters"

    # ---- checks ------------------------------------------------------------------------------
    def check(self, adapter: Adapter, *, name: str = "adapter", against: str = "the generator's layout") -> None:
        """Raise IncompatibleAdapter naming the first module where `adapter` differs from this layout."""
        have = adapter.weights
        for s in self.slots:
            if s.name not in have:
                raise IncompatibleAdapter(
                    f"{name} does not match {against}: it has no module {s.name!r} (the layout has {self.describe()})")
            a, b = have[s.name]
            got = (int(a.shape[0]), int(a.shape[1]), int(b.shape[0]))
            if got != (s.rank, s.d_in, s.d_out):
                raise IncompatibleAdapter(
                    f"{name} does not match {against} at module {s.name!r}: rank {got[0]}, "
                    f"{got[1]} -> {got[2]} features, where the layout has rank {s.rank}, {s.d_in} -> {s.d_out}")
        extra = sorted(set(have) - set(self._by_name))
        if extra:
            raise IncompatibleAdapter(
                f"{name} does not match {against}: its module {extra[0]!r} is not in the layout ({self.describe()})")

    # ---- the map -----------------------------------------------------------------------------
    def flatten(self, adapter: Adapter, *, name: str = "adapter", against: str = "the generator's layout") -> "torch.Tensor":
        """The adapter as one float32 vector (P,), in the layout's scaling: each module's B is multiplied by
        the adapter's scaling over the layout's (its lora_alpha / r, or / sqrt(r) with rsLoRA), so the vectors
        of adapters of other alphas stand for their updates as they are applied, and `unflatten` (the layout's
        spec) gives each its own update back. Raw A and B were compared, and every generated adapter took the
        first member's scaling (one of alpha 64 came out 8x too weak beside one of alpha 8; sweep 28)."""
        import torch

        self.check(adapter, name=name, against=against)
        parts = []
        for s in self.slots:
            a, b = adapter.weights[s.name]
            ours = self.spec.scaling_for(s.name, s.rank)
            if ours == 0:
                raise IncompatibleAdapter(f"the layout's scaling of module {s.name!r} is 0 (lora_alpha 0): nothing "
                                          "generated in it could change the base")
            fold = adapter.scaling(s.name) / ours
            parts.append(a.detach().reshape(-1).float().cpu())  # (r * d_in,)
            parts.append((b.detach().float().cpu() * fold).reshape(-1))  # (d_out * r,)
        return torch.cat(parts)  # (P,)

    def unflatten(self, vec: "torch.Tensor") -> Adapter:
        """The adapter a (P,) vector stands for (tensors are copies, float32, contiguous)."""
        if vec.dim() != 1 or vec.numel() != self.size:
            raise IncompatibleAdapter(
                f"a vector of shape {tuple(vec.shape)} does not fit this layout ({self.describe()})")
        vec = vec.detach().float().cpu()
        weights = {}
        for s in self.slots:
            a = vec[s.a_slice].reshape(s.rank, s.d_in).clone()  # (r, d_in)
            b = vec[s.b_slice].reshape(s.d_out, s.rank).clone()  # (d_out, r)
            weights[s.name] = (a, b)
        return Adapter(self.spec, weights)
