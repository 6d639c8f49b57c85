"""The Regularizer protocol and the `REGULARIZERS` catalog.

A regularizer adds one visible term to the training loss (`ContinualModule.training_step` logs it as
`loss/<name>`). It is a plain object with explicit hooks, called by the stream loop around each
experience, never a Lightning callback (callbacks cannot change the loss):

    on_experience_start(ctx)  look at the model and the slot about to train (which slots are old, ...)
    penalty(module)           the term for this step, a scalar tensor (or None: nothing to add)
    on_experience_end(ctx)    finish (e.g. prune), return diagnostics recorded with the experience
    state_dict() / load_state_dict(state)   JSON-able state carried across experiences (saved per
                              experience in the run directory, so a resumed run continues exactly)

`ExperienceContext` is what the hooks see: the experience's index, the model, the slot being trained
and the slots of earlier experiences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from loraplex.catalog import Catalog
from loraplex.continual.slots import SlotRef


@dataclass
class ExperienceContext:
    """What a regularizer's hooks see about the experience that is about to run (or just ran)."""

    index: int
    """The unit's position in the stream (0-based: its row of the accuracy matrix; 0 for a one-off request)."""
    model: Any
    """The model (with its LoRA banks) being trained."""
    slot: SlotRef
    """The slot trained in this experience: module name -> slot index."""
    previous: list[SlotRef] = field(default_factory=list)
    """Slots of the adapters trained before, in the same kind of modules (frozen now)."""


class Regularizer(Protocol):
    name: str

    def on_experience_start(self, ctx: ExperienceContext) -> None: ...

    def penalty(self, module: Any) -> Any: ...  # scalar tensor or None

    def on_experience_end(self, ctx: ExperienceContext) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


REGULARIZERS: Catalog[Regularizer] = Catalog(
    "regularizer",
    modules=["loraplex.continual.regularizers.o_lora", "loraplex.continual.regularizers.gs_lora"],
)
