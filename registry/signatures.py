"""An adapter's signatures: what retrieval, search and the routers' task matching compare.

    description embedding   embed(reg, [description])[0]: the registry's embedder (fixed at its first
                            adapter, `Registry.embedder_name`), unit rows, (D,)
    input prototype         the mean embedding of up to 256 training inputs, renormalised, (D,);
                            None without inputs
    task signature          description embedding + mean embedding of up to 256 training inputs,
                            renormalised, (n_tasks, D): how a stored router matches a query's task

Every part that writes or compares signatures computes them here, with the registry's embedder, so
the vectors of one registry are always comparable.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from loraplex.embedders import get_embedder

PROTOTYPE_LIMIT = 256
"""Training inputs a prototype (or a task signature) averages at most."""


def embedder(reg: Any):
    """The registry's embedder (`loraplex.embedders`): `encode(texts) -> (N, D)` unit rows."""
    return get_embedder(reg.embedder_name)


def embed(reg: Any, texts: Sequence[str]) -> np.ndarray:
    """(N, D) embeddings of texts with the registry's embedder."""
    return embedder(reg).encode(list(texts))


def description_embedding(reg: Any, description: str) -> np.ndarray:
    """(D,) the embedding of one description."""
    return embed(reg, [description])[0]


def prototype(reg: Any, texts: Sequence[str], limit: int = PROTOTYPE_LIMIT) -> np.ndarray | None:
    """(D,) mean embedding (renormalised) of up to `limit` training inputs: the adapter's data signature."""
    if not texts:
        return None
    v = embed(reg, list(texts)[:limit]).mean(0)
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else None


def task_signatures(reg: Any, tasks: Sequence[Any]) -> np.ndarray:
    """(n_tasks, D) unit signatures of tasks: description embedding plus training-input mean embedding."""
    emb = embedder(reg)
    out = []
    for t in tasks:
        d = emb.encode([t.description])[0]
        texts = [e.text for e in t.train[:PROTOTYPE_LIMIT]]
        v = d + (emb.encode(texts).mean(0) if texts else 0)
        out.append(v / max(float(np.linalg.norm(v)), 1e-9))
    return np.stack(out).astype(np.float32)
