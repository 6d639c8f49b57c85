"""retrieval: route a query to the nearest adapters by their signatures; nothing is trained.

Every registered adapter has a signature in the registry: the embedding d_i of its description and,
when its training task is known, the prototype p_i of its training inputs (the renormalised mean of
their embeddings). A query q (embedded by the registry's embedder; unit vectors, so dot = cosine) scores

    score_i = (1 - w) * <q, d_i> + w * <q, p_i>       (w = prototype_weight; <q, d_i> alone without p_i)

and is routed to its k best adapters with gates constant over the whole sequence:

    g_i = exp(score_i / tau) / sum_{j in top-k} exp(score_j / tau)  for i in top-k, 0 otherwise

set as static (B, 1, E) gates (`experts.layers.use_gates`), one row per query.

When the caller says which answers it wants (the label set of the task a query is scored on: evaluation,
`RoutedModel.scores_and_routes`), the score adds the match between that label set L and the labels L_i
of each adapter's task,

    score_i += label_weight * |L & L_i| / |L | L_i|     (Jaccard over lower-cased label names; 0 without L_i)

The text alone cannot tell "is this kaomoji happy or sad?" from "which animal is this kaomoji?" (the
same input suits both), while the labels asked for can: an adapter trained to answer exactly those
labels is the one to use. Faiss still picks the `candidates` by text; the label term re-ranks them.

Registering an adapter makes it routable at once: the registry's faiss index (registry/index.py) is
caught up on the next search.

The score is <q, c_i> with c_i = (1 - w) d_i + w p_i, linear in q: over a whole registry, faiss over the
c_i (the registry's routing index, `registry/index.py`) finds the `candidates` best-scoring adapters
directly, exactly where the index is flat (below 10,000 adapters; from 10,000 on it is IVF, which agreed
with the exact top 99% of the time at 10,000, bench/results/scale-latency.txt), and they make the bank.
The same scores give learned routers a shortlist: restricted to the S adapters nearest a batch of
queries (`LearnedRouter.keep_experts`), a registry of thousands of adapters costs per token what a bank
of S does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pydantic import Field, model_validator

from loraplex.catalog import MAX_COUNT, MAX_TEMPERATURE, MIN_TEMPERATURE, Options, options
from loraplex.models import current_sha
from loraplex.registry.index import Hit, nearest_adapters, of_base, routing_vectors
from loraplex.router.base import ROUTERS
from loraplex.tasks import folded_labels


class RetrievalConfig(Options):
    """Retrieval routing by adapter signatures."""

    model_config = options()

    top_k: int = Field(1, ge=1, le=MAX_COUNT)
    """Adapters mixed per query."""
    temperature: float = Field(0.05, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Softmax temperature over the selected adapters' scores."""
    prototype_weight: float = Field(0.8, ge=0, le=1)
    """Weight of the training-input prototype in the score (the rest is the description)."""
    candidates: int = Field(64, ge=1, le=MAX_COUNT)
    """Adapters faiss keeps (best routing scores over the whole registry) to make the bank from."""
    label_weight: float = Field(0.25, ge=0, le=1)
    """Weight of the label-set match (Jaccard) when the caller names the labels it wants answered."""

    @model_validator(mode="after")
    def _mix_within_candidates(self) -> "RetrievalConfig":
        if self.top_k > self.candidates:  # the mix is drawn from the candidates: it was cut down without a word
            raise ValueError(f"top_k={self.top_k} is more than candidates={self.candidates}, the adapters it mixes from")
        return self


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


def adapter_labels(reg, name: str) -> tuple[str, ...] | None:
    """The label set of adapter `name`'s task (`record_labels` of its record)."""
    return record_labels(reg, reg.get_adapter(name))


def record_labels(reg, rec) -> tuple[str, ...] | None:
    """The label set of an adapter record's task, from what the record holds of the task (its card), else
    from the task itself; None when it records no task with labels."""
    return task_labels(reg, rec.task, rec.extra.get("task_cards"))


def task_labels(reg, task: str | None, cards: dict[str, Any] | None = None) -> tuple[str, ...] | None:
    """The label set of task `task` (`Registry.task_labels`)."""
    return reg.task_labels(task, cards)


def label_overlap(labels: Sequence[str], expert_labels: Sequence[Sequence[str] | None]) -> np.ndarray:
    """(E,) Jaccard overlap of a label set with each adapter's (read as `labels_task` reads them: case,
    Unicode normalisation and format characters aside, stripped; 0 where none)."""
    want = folded_labels(labels)
    out = np.zeros(len(expert_labels), dtype=np.float32)
    for i, lab in enumerate(expert_labels):
        have = folded_labels(lab)
        if want and have:
            out[i] = len(want & have) / len(want | have)
    return out


@ROUTERS.register("retrieval", RetrievalConfig, summary="nearest adapters by signature (faiss), constant gates; no training")
class RetrievalRouter:
    """Signature retrieval: no training; constant gates per sequence."""

    method = "retrieval"
    slot = "adapter"

    def __init__(self, config: RetrievalConfig):
        self.config = config

    def scores(self, queries: np.ndarray, sig: Signatures) -> np.ndarray:
        """(Q, E) scores of unit query vectors (Q, D) against the signatures: <q, c_i>, c_i the routing
        vectors (`registry.index.routing_vectors`, the ones the registry-wide faiss index holds)."""
        q = np.asarray(queries, dtype=np.float32)  # (Q, D)
        return (q @ routing_vectors(sig.desc, sig.proto, self.config.prototype_weight).T).astype(np.float32)

    def label_bonus(self, labels: Sequence[str] | None, expert_labels: Sequence[Sequence[str] | None]) -> np.ndarray | None:
        """(E,) label_weight * Jaccard(labels, each adapter's labels), or None when no labels are asked for."""
        if not labels or self.config.label_weight == 0:
            return None
        return self.config.label_weight * label_overlap(labels, expert_labels)

    def gates(self, scores: np.ndarray, k: int | None = None) -> np.ndarray:
        """(Q, E) weights: softmax over each row's top-k scores, zeros elsewhere."""
        k = min(k or self.config.top_k, scores.shape[1])
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, K); ties: the first listed
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
        """Names of the adapters nearest to any of the queries by the routing score (faiss over the
        registry's routing vectors, so these are the exact top `candidates` of a flat index), of one base.

        Without `base`, the base of the single nearest adapter is used (adapters of different bases
        cannot share a bank). Adapters registered against another fingerprint of that base (its config
        changed since) are left out: they cannot be loaded on it.
        """
        best: dict[str, Hit] = {}  # name -> its best hit over the queries
        for hits in nearest_adapters(reg, queries, self.config.candidates, weight=self.config.prototype_weight):
            for hit in hits:
                if hit.name not in best or hit.score > best[hit.name].score:
                    best[hit.name] = hit
        order = sorted(best.values(), key=lambda h: -h.score)
        if not order:
            return []
        want = base or order[0].base
        return [h.name for h in of_base(order, want, current_sha(want, reg.settings))]
