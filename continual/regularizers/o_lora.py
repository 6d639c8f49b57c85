"""O-LoRA: "Orthogonal Subspace Learning for Language Model Continual Learning" (Wang et al., EMNLP 2023
Findings, arXiv 2310.14152).

Each task t gets its own LoRA (A_t, B_t); the adapters of earlier tasks are frozen, and the new one is
trained so that the subspace its A_t reads from is orthogonal to the subspaces the earlier A_i read
from. The paper's loss, summed over every adapted layer:

    L = L_task + lambda_1 * sum_{i<t} L_orth(A_i, A_t),    L_orth(A_i, A_t) = sum_{j,k} |O_{i,t}[j,k]|,
    O_{i,t} = A_i A_t^T    (A: (r, d_in); the reference code takes the absolute value, the paper squares it)

and the model answers with every adapter summed (`gates=None` in our banks), so no task id is needed.

What this implementation changes, and why. The reference code sums |A_i A_t^T| over all entries,
all earlier tasks and all layers with unnormalised rows. Two failures follow: (1) the term grows with
r^2 * t * layers * ||a||^2 and is commonly thousands of times the task loss at the start, so the task
is barely learned; (2) the cheapest way to lower it is to shrink A_t, and the new adapter collapses
towards zero (it then learns nothing). Here:

    L_orth = orth_weight * mean_layers mean_{j,k} |cos(a_t,j, a_i,k)|    over the real rows of all earlier slots,

i.e. each row of A is scaled to unit length before the product and entries are averaged, not summed.
The term lies in [0, 1] whatever the rank, the number of tasks or layers (normalisation), so
`orth_weight` means the same thing in every run. It is invariant to the scale of each row, so its
gradient is orthogonal to that row (d/da f(a/|a|) is perpendicular to a): the penalty can rotate the
new adapter's rows but never shrink them, which removes the collapse mode (guard). The run records
`a_norm_ratio` (the new A's Frobenius norm at the end over its norm at initialisation, minimum over
layers) so a collapse would show; a test trains on the penalty alone and checks the norm holds.
The paper's optional L2 term on the new adapter (lambda_2, 0 in its experiments) is not implemented.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from loraplex.catalog import MAX_WEIGHT, Options, options
from loraplex.continual.regularizers.base import REGULARIZERS, ExperienceContext
from loraplex.experts.layers import routed_layers


class OLoraConfig(Options):
    model_config = options()

    orth_weight: float = Field(0.5, ge=0, le=MAX_WEIGHT)
    """lambda_1: weight of the mean |cosine| between the new adapter's A rows and the earlier ones'."""


@REGULARIZERS.register("o-lora", OLoraConfig, summary="O-LoRA: new adapter's A orthogonal to earlier adapters' A")
class OrthogonalSubspace:
    name = "o_lora"

    def __init__(self, config: OLoraConfig):
        self.config = config
        self._pairs: list[tuple[Any, torch.Tensor, torch.Tensor]] = []  # (bank, new rows, old rows)
        self._init_norms: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    # ---- hooks --------------------------------------------------------------------------------
    def on_experience_start(self, ctx: ExperienceContext) -> None:
        self._pairs = []
        self._init_norms = {}
        layers = routed_layers(ctx.model)
        for name, e in ctx.slot.items():
            bank = layers[name].bank
            R = bank.rank
            new = torch.arange(e * R, e * R + bank.expert_rank(e), device=bank.A.device)  # (r,)
            old_slots = [p[name] for p in ctx.previous if name in p and p[name] != e]
            old = [torch.arange(s * R, s * R + bank.expert_rank(s), device=bank.A.device) for s in old_slots]
            old = torch.cat(old) if old else new[:0]
            self._init_norms[name] = float(bank.A.detach()[new].norm())
            if old.numel() and new.numel():
                self._pairs.append((bank, new, old))

    def orthogonality(self) -> torch.Tensor | None:
        """mean over layers of mean |cos(a_new, a_old)|: a scalar in [0, 1] (None before a second task)."""
        if not self._pairs:
            return None
        terms = []
        for bank, new, old in self._pairs:
            a_new = F.normalize(bank.A[new].float(), dim=-1)  # (r, d_in)
            a_old = F.normalize(bank.A[old].detach().float(), dim=-1)  # (r_old, d_in)
            terms.append((a_new @ a_old.T).abs().mean())  # (r, r_old) -> scalar
        return torch.stack(terms).mean()

    def penalty(self, module: Any) -> torch.Tensor | None:
        if self.config.orth_weight == 0:
            return None
        o = self.orthogonality()
        return None if o is None else self.config.orth_weight * o

    def on_experience_end(self, ctx: ExperienceContext) -> dict[str, Any]:
        with torch.no_grad():
            o = self.orthogonality()
            layers = routed_layers(ctx.model)
            ratios = []
            for name, e in ctx.slot.items():
                bank = layers[name].bank
                s = e * bank.rank
                now = float(bank.A.detach()[s : s + bank.expert_rank(e)].norm())
                if self._init_norms.get(name):
                    ratios.append(now / self._init_norms[name])
        out = {"orth_cos": None if o is None else round(float(o), 5),
               "a_norm_ratio": round(min(ratios), 4) if ratios else None}
        self.history.append({"experience": ctx.index, **out})
        self._pairs = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
