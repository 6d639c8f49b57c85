"""The slot bank: `size` LoRA slots in every adapted projection of one model, shared by every request.

Each row of a batch picks its slots with its own gates (B, 1, S) (the bank's gather-BMM dispatch
then runs rows of different adapters in one forward). Adapters are copied into slots on demand and
the least recently used one is evicted (vLLM's max_loras, S-LoRA's unified paging); an adapter read
from its blob stays in host memory (`host_size`, LRU), as S-LoRA keeps adapters in host memory and
pages them into the device's bank, so a slot miss costs a copy rather than a read. Host copies are kept
pre-stacked in the bank's layout (`experts.layers.StackedBanks`: the banks of one shape share one
tensor per part), so loading an adapter into a slot is four copies per bank shape, not several per
module. The bank grows (re-made, resident adapters read again into their slots, host copies dropped)
when an adapter adapts a module it lacks or has a larger rank. It knows adapters only through
`read(name) -> (record, adapter)`, given by the engine.

An adapter removed or registered anew (another blob under its name) while rows still generate with it
keeps its slot for those rows, under a hidden key (`name` + NUL + old blob) that no request can name:
a request arriving after the change loads the new weights into a slot of their own, and the hidden slot
is freed once no running row uses the name (`forget`). Hidden slots count against the bank's size
(`hidden`). Slots of running rows (`keep`) are never evicted: classification and new rows load beside them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from loraplex.errors import OutOfMemory, out_of_memory
from loraplex.experts.layers import StackedBanks, eject, inject_new, parent_module, routed_layers
from loraplex.experts.spec import LoraSpec


HIDDEN = "\0"  # joins a replaced adapter's name and its old blob (a name never holds a control character)


def _named(key: str) -> str:
    return key.split(HIDDEN, 1)[0]


class SlotBank:
    def __init__(self, model, size: int, *, read: Callable[[str], tuple[Any, Any]], host_size: int = 256,
                 events: Any = None):
        self.model, self.size, self.read, self.host_size, self.events = model, size, read, host_size, events
        self.slots: OrderedDict[str, tuple[int, str]] = OrderedDict()  # name -> (slot, blob sha), LRU first
        self.host: OrderedDict[str, tuple[Any, Any]] = OrderedDict()  # name -> (record, packed), LRU first
        self.shape: tuple[tuple[str, ...], int] | None = None  # (modules, rank) once the bank exists
        self.banks: StackedBanks | None = None

    def _build(self, modules: Sequence[str], rank: int) -> None:
        """(Re)make the bank for `modules` at `rank`. The resident slots keep what they hold, copied from
        the old bank (zero-padded to the new rank, zero on new modules): nothing is read again, so a slot
        hidden for running rows of a changed adapter (which no name can read any more) survives a growth.

        All or nothing: when the new bank cannot be made (its memory, on a GPU or the host), the old
        layers are put back as they were, so every resident adapter answers with its own weights still,
        and OutOfMemory says what the growth would have needed."""
        old = routed_layers(self.model) if self.shape is not None else {}
        kept: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for name, layer in old.items():
            b = layer.bank
            kept[name] = {slot: (*b.expert(slot), float(b.scaling[slot])) for slot, _ in self.slots.values()}
        try:
            eject(self.model)
            inject_new(self.model, LoraSpec(r=rank), list(modules), n_experts=self.size)
            banks = StackedBanks(self.model)
            for e in range(self.size):
                banks.write(e, None)
            for name, layer in routed_layers(self.model).items():
                for slot, (A, B, scaling) in kept.get(name, {}).items():
                    if A.shape[0]:
                        layer.bank.set_expert(slot, A, B, scaling)
        except (RuntimeError, MemoryError) as exc:
            eject(self.model)  # what was made of the new bank
            for name, layer in old.items():
                parent, child = parent_module(self.model, name)
                setattr(parent, child, layer)
            if out_of_memory(exc):
                size = self._bytes(modules, rank)
                size_said = next(f"{size / 2**b:.1f} {u}" for b, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                                 if size >= 2**b or b == 0)
                raise OutOfMemory(f"the slot bank cannot grow to rank {rank} over {len(modules)} projections "
                                  f"({self.size} slots, {size_said}): out of memory") from None
            raise
        self.shape = (tuple(modules), rank)
        self.banks = banks
        self.host.clear()  # packed for the old layout

    def _bytes(self, modules: Sequence[str], rank: int) -> int:
        """Memory a bank of `size` slots at `rank` over `modules` takes (A and B, float32)."""
        widths = 0
        for m in modules:
            lin = self.model.get_submodule(m)
            lin = getattr(lin, "base", lin)  # a routed layer (the old bank, put back): its projection
            widths += getattr(lin, "in_features", 0) + getattr(lin, "out_features", 0)
        return 4 * self.size * rank * widths

    def _load(self, name: str):
        """An adapter's record and its tensors packed in the bank's layout (host memory, else read); grows
        the bank if it must."""
        if name in self.host:
            self.host.move_to_end(name)
            return self.host[name]
        rec, ad = self.read(name)
        self.events.read()
        mods, rank = self.shape or ((), 1)
        need = tuple(sorted(set(mods) | set(ad.modules)))
        r = max([rank] + [ad.rank(m) for m in ad.modules])
        if self.shape is None or need != mods or r != rank:
            try:
                self._build(need, r)
            except OutOfMemory as exc:
                raise OutOfMemory(f"cannot load adapter '{name}' (rank {r}): {exc}; the adapters loaded "
                                  "before are served as they were (serve with a smaller --max-loras, or "
                                  "register the adapter at a lower rank)") from None
        self.host[name] = (rec, self.banks.pack(ad))
        while len(self.host) > self.host_size:
            self.host.popitem(last=False)
        return self.host[name]

    def prepare(self, name: str) -> None:
        """Read adapter `name` into host memory (growing the bank if it must) without taking a slot: raises
        what loading it raises, so a failing adapter can be told from the others of a batch."""
        self._load(name)

    def ensure(self, names: Sequence[str], keep: set[str] = frozenset()) -> dict[str, int]:
        """Slots of `names` (at most `size`), loading the missing ones over the least recently used
        adapter that neither `names` nor `keep` (adapters of rows still generating) holds."""
        names = list(dict.fromkeys(names))
        if not self.fits(names, keep):
            held = len(set(names) | {k for k in keep if k in self.slots}) + self.hidden()
            raise ValueError(f"{held} adapters at once; the bank has {self.size} slots")
        for n in names:
            if n in self.slots:
                self.slots.move_to_end(n)
                self.events.cache(True)
                continue
            self.events.cache(False)
            rec, packed = self._load(n)
            used = {s for s, _ in self.slots.values()}
            free = [e for e in range(self.size) if e not in used]
            if not free:  # evict the least recently used adapter this batch does not need and no running row uses
                victim = next((v for v in self.slots if v not in names and _named(v) not in keep), None)
                if victim is None:
                    raise ValueError(f"every slot of the bank ({self.size}) is in use by running rows")
                free = [self.slots.pop(victim)[0]]
                self.events.evicted()
            self.banks.write(free[0], packed)
            self.slots[n] = (free[0], rec.blob)
        self.events.resident(len(self.slots))
        return {n: self.slots[n][0] for n in names}

    def gates(self, routes: Sequence[Sequence[tuple[str, float]]], keep: set[str] = frozenset(),
              device: Any = "cpu") -> torch.Tensor | None:
        """(B, 1, S) gates over the slots, row i mixing routes[i]'s (adapter, weight) pairs (None while
        no adapter was ever loaded: the bare model)."""
        slots = self.ensure([a for r in routes for a, _ in r], keep)  # makes the bank on first use
        if self.shape is None:
            return None
        g = torch.zeros(len(routes), 1, self.size, device=device)
        for i, r in enumerate(routes):
            for a, w in r:
                g[i, 0, slots[a]] = float(w)
        return g

    def fits(self, names: set[str] | Sequence[str], keep: set[str] = frozenset()) -> bool:
        """Whether `names` can have slots at once beside those `keep` (adapters of running rows) holds: the
        one capacity rule (a running row's adapter counts once, resident or hidden; hidden slots count)."""
        return len(set(names) | {k for k in keep if k in self.slots}) + self.hidden() <= self.size

    def hidden(self) -> int:
        """Slots held for running rows of adapters that have changed since (no request can name them)."""
        return sum(HIDDEN in k for k in self.slots)

    def forget(self, blobs: dict[str, str], keep: set[str] = frozenset()) -> bool:
        """Drop adapters whose blob is no longer `blobs[name]` (removed or registered anew); those in
        `keep` (running rows use them) stay, hidden from new requests, until those rows are done.
        Returns whether any had to stay."""
        stale = False
        for key, (slot, blob) in list(self.slots.items()):
            name = _named(key)
            if key == name and blobs.get(name) == blob:
                continue
            if name in keep:
                stale = True
                if key == name:  # the name now means other weights: a new request must not find these
                    self.slots[f"{name}{HIDDEN}{blob}"] = self.slots.pop(key)
                continue
            del self.slots[key]
            self.banks.write(slot, None)
        for name, (rec, _) in list(self.host.items()):
            if blobs.get(name) != rec.blob:
                del self.host[name]
        self.events.resident(len(self.slots))
        return stale
