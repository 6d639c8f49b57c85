"""GS-LoRA's group-sparse regularizer: "Continual Forgetting for Pre-trained Vision Models" (Zhao et al.,
CVPR 2024, arXiv 2403.11530; extended in "Practical Continual Forgetting for Pre-trained Vision
Models", arXiv 2501.09705).

A forgetting request trains one LoRA on the feed-forward projections of every transformer block. The
LoRA parameters are split into groups, one per block (the (A, B) pairs of that block's feed-forward
projections, e.g. BERT's `intermediate.dense` and `output.dense`), and a group lasso drives whole
groups to zero so that only a few blocks are modified:

    L_structure = sum_g || theta_g ||_2,      theta_g = concat(A_m, B_m for the FFN modules m of block g)
    L = beta * L_forget + L_retain + alpha * L_structure        (alpha = sparsity_weight here)

(the data losses are in `continual/losses.py`; the composition is in `ContinualModule.training_step`).

Counting survivors. A subgradient method (Adam here, as in the reference code) leaves unneeded groups
hovering near zero rather than at exactly zero, and a group whose B stayed near zero changes nothing
even while its A (initialised non-zero) is still shrinking. So at the end of the experience each group
is measured by the update it makes, ||sum_m s_m B_m A_m||_F over its modules (`prune_by: delta`; or by
its parameter norm against its initial norm, `prune_by: norm`); groups below `prune_threshold` of the
largest group's update are set exactly to zero (never all), and the surviving groups are counted: the
run reports `groups_survived` of `groups_total`, and the registered forgetting adapter holds only the
surviving groups' modules. The evaluation that follows sees the pruned adapter.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from loraplex.catalog import MAX_WEIGHT, Options, options
from loraplex.continual.regularizers.base import REGULARIZERS, ExperienceContext
from loraplex.continual.slots import slot_weights, zero_slot
from loraplex.errors import IncompatibleAdapter
from loraplex.experts.layers import routed_layers
from loraplex.experts.spec import DEFAULT_TARGETS, FFN_TARGETS, matches_target


def ffn_modules(module_names: list[str], model_type: str, targets: tuple[str, ...] = ()) -> list[str]:
    """The feed-forward projections of a base (FFN_TARGETS), excluding attention projections.

    BERT's FFN output projection is named `...output.dense`, a suffix that `...attention.output.dense`
    also has; projections that match the model type's attention targets are therefore left out.
    """
    ffn = targets or FFN_TARGETS.get(model_type, ())
    if not ffn:
        raise IncompatibleAdapter(f"no feed-forward modules are known for model type {model_type!r}; "
                                  "name them in forgetting.targets")
    attn = DEFAULT_TARGETS.get(model_type, ()) if not targets else ()
    names = [n for n in module_names
             if any(matches_target(n, t) for t in ffn) and not any(matches_target(n, t) for t in attn)]
    if not names:
        raise IncompatibleAdapter(f"feed-forward targets {list(ffn)} match no linear layer of this {model_type} model")
    return sorted(names)


def block_of(module: str, targets: tuple[str, ...]) -> str:
    """The transformer block a feed-forward module belongs to: its name without the target suffix."""
    for t in sorted(targets, key=len, reverse=True):
        if module == t:
            return ""
        if module.endswith("." + t):
            return module[: -len(t) - 1]
    return module


class GroupSparseConfig(Options):
    model_config = options()

    sparsity_weight: float = Field(0.01, ge=0, le=MAX_WEIGHT)
    """alpha: weight of the group lasso sum_g ||theta_g||_2."""
    group_by: Literal["block", "module"] = "block"
    """Groups: one per transformer block (the paper) or one per adapted module."""
    prune_by: Literal["delta", "norm"] = "delta"
    """Survival criterion: the group's weight update ||sum_m s B_m A_m|| against the largest group's
    (delta), or its parameter norm against its norm at initialisation (norm)."""
    prune_threshold: float = Field(0.1, ge=0, lt=1)
    """A group survives if its criterion is at least this share (see prune_by)."""
    targets: tuple[str, ...] = ()
    """Feed-forward module suffixes that define blocks (default: FFN_TARGETS of the model type)."""


@REGULARIZERS.register("gs-lora", GroupSparseConfig, summary="GS-LoRA: group lasso over each block's FFN LoRA")
class GroupSparse:
    name = "gs_lora"

    def __init__(self, config: GroupSparseConfig, *, model_type: str = ""):
        self.config = config
        self.model_type = model_type
        self.groups: dict[str, list[str]] = {}
        self._slot: dict[str, int] = {}
        self._model = None
        self._init: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    def _group_key(self, module: str) -> str:
        if self.config.group_by == "module":
            return module
        targets = self.config.targets or FFN_TARGETS.get(self.model_type, ()) or (module.rsplit(".", 1)[-1],)
        return block_of(module, tuple(targets))

    # ---- hooks --------------------------------------------------------------------------------
    def on_experience_start(self, ctx: ExperienceContext) -> None:
        self._model, self._slot = ctx.model, dict(ctx.slot)
        self.groups = {}
        for m in sorted(ctx.slot):
            self.groups.setdefault(self._group_key(m), []).append(m)
        self._init = self.group_norms()

    def group_norms(self, *, live: bool = False) -> dict[str, Any]:
        """||theta_g||_2 per group (floats; tensors with grad when live=True)."""
        w = slot_weights(self._model, self._slot)
        out = {}
        for g, mods in self.groups.items():
            sq = sum((w[m][0].float() ** 2).sum() + (w[m][1].float() ** 2).sum() for m in mods)
            n = torch.sqrt(sq + 1e-12)
            out[g] = n if live else float(n.detach())
        return out

    @torch.no_grad()
    def group_deltas(self) -> dict[str, float]:
        """||s * B_m A_m||_F summed over each group's modules: how much the group changes the model."""
        layers = routed_layers(self._model)
        out = {}
        for g, mods in self.groups.items():
            total = 0.0
            for m in mods:
                bank, e = layers[m].bank, self._slot[m]
                A, B = bank.expert(e)
                total += float((B.float() @ A.float()).norm()) * float(bank.scaling[e])
            out[g] = total
        return out

    def penalty(self, module: Any) -> torch.Tensor | None:
        if not self.groups or self.config.sparsity_weight == 0:
            return None
        norms = self.group_norms(live=True)
        return self.config.sparsity_weight * torch.stack(list(norms.values())).sum()

    def on_experience_end(self, ctx: ExperienceContext) -> dict[str, Any]:
        norms = self.group_norms()
        ratio = {g: norms[g] / self._init[g] if self._init.get(g) else 0.0 for g in norms}
        deltas = self.group_deltas()
        top = max(deltas.values()) if deltas else 0.0
        share = {g: d / top if top > 0 else 0.0 for g, d in deltas.items()}
        crit = share if self.config.prune_by == "delta" else ratio
        keep = [g for g in norms if crit[g] >= self.config.prune_threshold]
        if not keep:
            keep = [max(crit, key=crit.get)]
        pruned = [g for g in norms if g not in keep]
        for g in pruned:
            zero_slot(ctx.model, self._slot, self.groups[g])
        out = {
            "groups_total": len(norms),
            "groups_survived": len(keep),
            "surviving_groups": keep,
            "surviving_modules": sorted(m for g in keep for m in self.groups[g]),
            "group_norm_ratio": {g: round(r, 4) for g, r in ratio.items()},
            "group_delta_share": {g: round(r, 4) for g, r in share.items()},
        }
        self.history.append({"experience": ctx.index, **{k: v for k, v in out.items() if k != "surviving_modules"}})
        self._model = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
