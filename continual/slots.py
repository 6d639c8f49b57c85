"""Slots: where each experience's adapter lives inside the model's LoRA banks, and how banks grow.

A continual run keeps every adapter it trains inside the `LoraBank`s of one model (see
`experts/bank.py`): an O-LoRA run holds one slot per task in each adapted projection, a GS-LoRA
forgetting request adds a slot to the feed-forward projections. A `SlotRef` says, per module, which
slot of that module's bank holds an adapter; `add_slot` appends a fresh slot (PEFT initialisation:
A ~ kaiming-uniform, B = 0) to each listed module, wrapping a bare projection in a `RoutedLinear` or
growing an existing bank from E to E + 1 slots (old slots are copied exactly, so the model's output
does not change). With `gates=None` every slot is summed, which is how O-LoRA answers without a task id.

`train_only(model, slot)` makes exactly one slot trainable: bank parameters of the listed modules
require grad with every other slot frozen by `LoraBank.freeze_experts`, everything else is frozen.

`bank_tensors` / `restore_banks` save and rebuild every bank of a model (tensors + layout), which is
how a run directory stores the model after each experience so that a resume continues exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from loraplex.experts.bank import LoraBank
from loraplex.experts.layers import RoutedLinear, linear_dims, parent_module, routed_layers
from loraplex.experts.spec import Adapter, LoraSpec

SlotRef = dict[str, int]  # module name -> slot index in that module's bank


def grown(bank: LoraBank, extra: int = 1, rank: int | None = None) -> LoraBank:
    """A copy of `bank` with `extra` empty slots appended and its rank padded up to `rank` (old slots,
    masks and scalings copied, so the bank computes the same delta)."""
    E, R = bank.n_experts, bank.rank
    R2 = max(R, rank or R)
    new = LoraBank(bank.d_in, bank.d_out, E + extra, R2, dtype=bank.A.dtype, device=bank.A.device)
    new.dropout = bank.dropout
    with torch.no_grad():
        new.A.view(E + extra, R2, -1)[:E, :R].copy_(bank.A.view(E, R, -1))  # (E, R, d_in)
        new.B.view(-1, E + extra, R2)[:, :E, :R].copy_(bank.B.view(-1, E, R))  # (d_out, E, R)
        new.rank_mask.view(E + extra, R2)[:E, :R].copy_(bank.rank_mask.view(E, R))
        new.scaling[:E].copy_(bank.scaling)
    return new


def add_slot(model: torch.nn.Module, spec: LoraSpec, modules: list[str], *, generator: torch.Generator,
             dtype: torch.dtype = torch.float32) -> SlotRef:
    """Append one freshly initialised adapter slot to each module's bank (creating banks as needed)."""
    layers = routed_layers(model)
    ref: SlotRef = {}
    for name in modules:
        layer = layers.get(name)
        r = spec.rank_for(name)
        if layer is None:
            base = model.get_submodule(name)
            dims = linear_dims(base)
            if dims is None:
                raise ValueError(f"module {name!r} is a {type(base).__name__}, not a Linear or Conv1D")
            for p in base.parameters():
                p.requires_grad_(False)
            bank = LoraBank(dims[0], dims[1], 1, r, dropout=spec.dropout, dtype=dtype, device=base.weight.device)
            layer = RoutedLinear(base, bank, name)
            parent, child = parent_module(model, name)
            setattr(parent, child, layer)
            slot = 0
        else:
            slot = layer.bank.n_experts
            layer.bank = grown(layer.bank, 1, r)
        layer.bank.init_expert(slot, r, spec.scaling_for(name, r), generator=generator)
        ref[name] = slot
    return ref


def train_only(model: torch.nn.Module, slot: SlotRef | None) -> list[torch.nn.Parameter]:
    """Freeze everything except `slot`'s rows of A and columns of B (None: freeze all). Returns the trainable params."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for name, layer in routed_layers(model).items():
        bank = layer.bank
        if slot is None or name not in slot:
            bank.freeze_experts([False] * bank.n_experts)  # drop old gradient hooks; nothing here trains
            continue
        mask = [e != slot[name] for e in range(bank.n_experts)]
        bank.A.requires_grad_(True)
        bank.B.requires_grad_(True)
        bank.freeze_experts(mask)
        trainable += [bank.A, bank.B]
    return trainable


def slot_weights(model: torch.nn.Module, slot: SlotRef) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Live (non-detached) views of each module's A (r, d_in) and B (d_out, r) in `slot` (for penalties)."""
    layers = routed_layers(model)
    out = {}
    for name, e in slot.items():
        bank = layers[name].bank
        r = bank.expert_rank(e)
        s = e * bank.rank
        out[name] = (bank.A[s : s + r], bank.B[:, s : s + r])
    return out


def extract_slot(model: torch.nn.Module, spec: LoraSpec, slot: SlotRef, *, modules: list[str] | None = None) -> Adapter:
    """The adapter held in `slot` (detached copies on CPU), optionally restricted to `modules`."""
    layers = routed_layers(model)
    weights = {}
    for name, e in sorted(slot.items()):
        if modules is not None and name not in modules:
            continue
        A, B = layers[name].bank.expert(e)
        weights[name] = (A.float().cpu(), B.float().cpu())
    return Adapter(spec, weights)


@torch.no_grad()
def zero_slot(model: torch.nn.Module, slot: SlotRef, modules: list[str]) -> None:
    """Set the listed modules' part of `slot` to exactly zero (a pruned group)."""
    layers = routed_layers(model)
    for name in modules:
        bank = layers[name].bank
        s = slot[name] * bank.rank
        bank.A[s : s + bank.rank].zero_()
        bank.B[:, s : s + bank.rank].zero_()


# ---------------------------------------------------------------------------------------------
# saving and restoring every bank of a model


def bank_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, layout): each bank's A, B, rank_mask, scaling and its shape, by module name."""
    tensors, layout = {}, {}
    for name, layer in sorted(routed_layers(model).items()):
        b = layer.bank
        for key in ("A", "B", "rank_mask", "scaling"):
            tensors[f"{name}::{key}"] = getattr(b, key).detach().float().cpu().contiguous()
        p = getattr(b.dropout, "p", 0.0)
        layout[name] = {"d_in": b.d_in, "d_out": b.d_out, "n_experts": b.n_experts, "rank": b.rank, "dropout": p}
    return tensors, layout


@torch.no_grad()
def restore_banks(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any],
                  *, dtype: torch.dtype = torch.float32) -> None:
    """Rebuild the banks described by `layout` on a bare model and load their tensors exactly."""
    if routed_layers(model):
        raise ValueError("model already has adapter banks")
    for name, info in layout.items():
        base = model.get_submodule(name)
        dims = linear_dims(base)
        if dims != (info["d_in"], info["d_out"]):
            raise ValueError(f"saved bank for {name!r} maps {info['d_in']} -> {info['d_out']}, the base's layer {dims}")
        for p in base.parameters():
            p.requires_grad_(False)
        bank = LoraBank(info["d_in"], info["d_out"], info["n_experts"], info["rank"], dropout=info.get("dropout", 0.0),
                        dtype=dtype, device=base.weight.device)
        for key in ("A", "B", "rank_mask", "scaling"):
            getattr(bank, key).copy_(tensors[f"{name}::{key}"])
        layer = RoutedLinear(base, bank, name)
        parent, child = parent_module(model, name)
        setattr(parent, child, layer)
