"""What a request names and how its rows are routed: the data the engine, the scheduler and the HTTP
routes pass between them (Target, Route), the engine's counters (Events), and a route's summary as
the `routing` object of an answer. Plain data: no model, no registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from loraplex.errors import NotFound

__all__ = ["ModelUnknown", "Target", "Route", "Events", "route_summary", "top_adapters"]


class ModelUnknown(NotFound):
    """A `model` this server does not serve (404)."""


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: kind is base, adapter, router or auto."""

    kind: str
    name: str

    @property
    def lane(self) -> str:
        """Requests of one lane share forwards: the slot bank, or one router's model."""
        return f"router:{self.name}" if self.kind == "router" else "bank"


@dataclass
class Route:
    """A row's routing on the slot bank: (adapter, weight) pairs (empty: the bare base)."""

    adapters: list[tuple[str, float]] = field(default_factory=list)
    decision: str | None = None  # `auto` only: route, generate or base
    reason: str | None = None  # `auto` only: the scores and thresholds behind the decision
    nearest: str | None = None  # `auto` only: the adapter of the best routing score (first of a routed one's)


class Events:
    """Counters the engine reports to (the metrics module overrides these)."""

    def cache(self, hit: bool) -> None: ...

    def evicted(self) -> None: ...

    def resident(self, n: int) -> None: ...

    def read(self) -> None: ...


def route_summary(r: Route) -> dict[str, Any]:
    """A bank row's `routing`: its adapters by weight (those above 5e-4, as `query` lists them: auto's top-k
    named a second adapter at weight 0.0 the CLI left out; sweep 33) and, for `auto`, the decision and why."""
    out: dict[str, Any] = {"adapters": [{"name": a, "weight": round(w, 4)}
                                        for a, w in sorted(r.adapters, key=lambda x: -x[1]) if w > 5e-4]}
    if r.decision is not None:
        out.update(decision=r.decision, reason=r.reason, nearest=r.nearest)
    return out


def top_adapters(names: Sequence[str], weights: np.ndarray, k: int | None = None) -> list[dict[str, Any]]:
    """A router's adapters by weight, as `query` lists them: every one above 5e-4 (or the `k` heaviest). The
    request's `routing` kept only 4, so two adapters holding a tenth of the weight went unsaid (sweep 30)."""
    order = np.argsort(-np.asarray(weights))[:k]
    return [{"name": names[int(e)], "weight": round(float(weights[e]), 4)} for e in order if weights[e] > 5e-4]
