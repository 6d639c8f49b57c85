"""retrieval: route a query to the nearest adapters by their signatures; nothing is trained.

Every registered adapter has a signature in the registry: the embedding d_i of its description and,
when its training task is known, the prototype p_i of its training inputs (the renormalised mean of
their embeddings). A query q (embedded by the registry's embedder; unit vectors, so dot = cosine) scores

    score_i = (1 - w) * <q, d_i> + w * <q, p_i>       (w = prototype_weight; <q, d_i> alone without p_i)

and is routed to its k best adapters with gates constant over the whole sequence:

    g_i = exp(score_i / tau) / sum_{j in top-k} exp(score_j / tau)  for i in top-k, 0 otherwise

set as static (B, 1, E) gates (`experts.layers.use_gates`), one row per query. Registering an adapter
makes it routable at once: the registry's faiss index (registry/index.py) is caught up on the next search.

Over a whole registry, faiss narrows the adapters to the `candidates` nearest descriptions, and the
prototypes re-rank those. The same scores give learned routers a shortlist: restricted to the S
adapters nearest a batch of queries (`LearnedRouter.keep_experts`), a registry of thousands of adapters
costs per token what a bank of S does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loraplex.router.base import ROUTERS
from loraplex.registry.index import SignatureIndex


class RetrievalConfig(BaseModel):
    """Retrieval routing by adapter signatures."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(1, ge=1)
    """Adapters mixed per query."""
    temperature: float = Field(0.05, gt=0)
    """Softmax temperature over the selected adapters' scores."""
    prototype_weight: float = Field(0.8, ge=0, le=1)
    """Weight of the training-input prototype in the score (the rest is the description)."""
    candidates: int = Field(64, ge=1)
    """Adapters faiss keeps (nearest descriptions) before prototypes re-rank them, over a whole registry."""


@dataclass
class Signatures:
    """Signatures of E adapters in bank order: description embeddings and prototypes (NaN rows: none)."""

    names: list[str]
    desc: np.ndarray  # (E, D)
    proto: np.ndarray  # (E, D)

    @classmethod
    def of(cls, reg, names: Sequence[str]) -> "Signatures":
        _, nm, desc, proto = reg.signatures(list(names))
        return cls(list(nm), desc, proto)

    def subset(self, keep: Sequence[int]) -> "Signatures":
        k = list(keep)
        return Signatures([self.names[i] for i in k], self.desc[k], self.proto[k])


@ROUTERS.register("retrieval", RetrievalConfig, summary="nearest adapters by signature (faiss), constant gates; no training")
class RetrievalRouter:
    """Signature retrieval: no training; constant gates per sequence."""

    method = "retrieval"
    slot = "adapter"

    def __init__(self, config: RetrievalConfig):
        self.config = config

    def scores(self, queries: np.ndarray, sig: Signatures) -> np.ndarray:
        """(Q, E) scores of unit query vectors (Q, D) against the signatures."""
        q = np.asarray(queries, dtype=np.float32)  # (Q, D)
        s_desc = q @ sig.desc.T  # (Q, E)
        has = np.all(np.isfinite(sig.proto), axis=1)  # (E,)
        s_proto = q @ np.where(has[:, None], sig.proto, 0.0).T
        w = self.config.prototype_weight
        return np.where(has[None, :], (1 - w) * s_desc + w * s_proto, s_desc).astype(np.float32)

    def gates(self, scores: np.ndarray, k: int | None = None) -> np.ndarray:
        """(Q, E) weights: softmax over each row's top-k scores, zeros elsewhere."""
        k = min(k or self.config.top_k, scores.shape[1])
        idx = np.argsort(-scores, axis=1)[:, :k]  # (Q, K)
        top = np.take_along_axis(scores, idx, axis=1) / self.config.temperature
        w = np.exp(top - top.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        out = np.zeros_like(scores)
        np.put_along_axis(out, idx, w, axis=1)
        return out

    def shortlist(self, scores: np.ndarray, size: int) -> list[int]:
        """Union, in order of best score, of every query's `size` nearest adapters."""
        size = min(size, scores.shape[1])
        idx = np.argsort(-scores, axis=1)[:, :size]  # (Q, size)
        best = scores.max(axis=0)
        return sorted({int(i) for i in idx.reshape(-1)}, key=lambda i: -best[i])

    def candidates(self, reg, queries: np.ndarray, base: str | None = None) -> list[str]:
        """Names of the adapters faiss finds nearest (by description) to any of the queries, of one base.

        Without `base`, the base of the single nearest adapter is used (adapters of different bases
        cannot share a bank).
        """
        idx = SignatureIndex.sync(reg)
        scores, ids = idx.search(np.asarray(queries, dtype=np.float32), self.config.candidates)
        order: list[int] = []
        flat = sorted(((float(s), int(i)) for s_row, i_row in zip(scores, ids) for s, i in zip(s_row, i_row) if i >= 0),
                      reverse=True)
        for _, i in flat:
            if i not in order:
                order.append(i)
        names = reg.names_by_id(order)
        recs = [reg.get_adapter(names[i]) for i in order if i in names]
        if not recs:
            return []
        want = base or recs[0].base
        return [r.name for r in recs if r.base == want]
