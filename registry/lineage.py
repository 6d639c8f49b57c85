"""The lineage graph (networkx), a cache rebuilt from the database.

Nodes are `adapter:NAME` (kind "adapter", with base, task, origin) and `task:REF` (kind "task").
Edges, in a MultiDiGraph keyed by kind, point from an adapter to what it came from:

    trained-from    adapter -> the adapter it continued from (a continual stream's previous expert)
    generated-from  adapter -> the experts a generator drew on
    merged-from     adapter -> the adapters merged into it
    forgets         adapter -> the task a GS-LoRA adapter erases
    trained-on      adapter -> the task it was trained on
    similar         adapter -> adapter, weight = cosine similarity of their descriptions: each
                    adapter's `SIMILAR_K` nearest neighbours at or above `SIMILAR_MIN` (one edge per pair)

A parent that has since been removed stays in the graph as a node with `removed: true`, so the history
of what was derived from it remains readable. The cache (`graph.json`) holds the node-link JSON and
the database generation it reflects; it is rebuilt when it lags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loraplex.errors import IntegrityError
from loraplex.fsio import atomic_file

if TYPE_CHECKING:
    import networkx as nx

    from loraplex.registry.store import Registry

GRAPH_FILE = "graph.json"
SIMILAR_K = 3
SIMILAR_MIN = 0.5


def build_graph(reg: "Registry") -> "nx.MultiDiGraph":
    import networkx as nx

    g = nx.MultiDiGraph()
    records = reg.list_adapters()
    for r in records:
        g.add_node(f"adapter:{r.name}", kind="adapter", name=r.name, base=r.base, task=r.task, origin=r.origin)
    for name, target, kind in reg.edges():
        if target not in g:
            tkind, tname = target.split(":", 1)
            attrs: dict[str, Any] = {"kind": tkind, "name": tname}
            if tkind == "adapter":
                attrs["removed"] = True
            g.add_node(target, **attrs)
        g.add_edge(f"adapter:{name}", target, key=kind, kind=kind)
    _, names, emb, _ = reg.signatures()
    for i, j, s in similar_pairs(emb):
        g.add_edge(f"adapter:{names[i]}", f"adapter:{names[j]}", key="similar", kind="similar", weight=round(float(s), 4))
    return g


def similar_pairs(emb: np.ndarray, k: int = SIMILAR_K, min_sim: float = SIMILAR_MIN, chunk: int = 1024) -> list[tuple[int, int, float]]:
    """Pairs (i < j) where j is among i's k nearest (or i among j's) with cosine >= min_sim."""
    n = len(emb)
    if n < 2:
        return []
    pairs: dict[tuple[int, int], float] = {}
    kk = min(k, n - 1)
    for start in range(0, n, chunk):
        sims = emb[start : start + chunk] @ emb.T  # (c, N)
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # no self edges
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        for r in range(sims.shape[0]):
            i = start + r
            for j in top[r]:
                s = float(sims[r, j])
                if s >= min_sim:
                    key = (min(i, int(j)), max(i, int(j)))
                    pairs[key] = s
    return sorted((i, j, s) for (i, j), s in pairs.items())


def to_json(g: "nx.MultiDiGraph") -> dict[str, Any]:
    import networkx as nx

    return nx.node_link_data(g, edges="edges")


def _save(path: Path, stamp: str, data: dict[str, Any]) -> None:
    with atomic_file(path, prefix=".graph-", suffix=".json") as f:
        f.write(json.dumps({"generation": int(stamp.split(":", 1)[0]), "stamp": stamp, "graph": data},
                           sort_keys=True).encode())


def load_cached(reg: "Registry") -> tuple[str, dict[str, Any]] | None:
    """(stamp, node-link data) of the cache (Database.stamp: the state it reflects), None if absent;
    IntegrityError if damaged."""
    path = reg.home / GRAPH_FILE
    if not path.is_file():
        if path.exists():
            raise IntegrityError(f"the lineage graph cache {path} is not a file; run `loraplex registry check --repair`")
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return str(obj.get("stamp") or f"{int(obj['generation'])}:"), obj["graph"]
    except Exception as exc:
        raise IntegrityError(f"the lineage graph cache {path} is damaged ({type(exc).__name__})") from None


def graph_json(reg: "Registry", *, save: bool = True) -> dict[str, Any]:
    """The node-link JSON of the current graph (from the cache when it is current)."""
    stamp = reg.stamp()
    try:
        cached = load_cached(reg)
    except IntegrityError:
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    data = to_json(build_graph(reg))
    if save and reg.exists:
        try:
            with reg.write_lock(timeout=reg.CACHE_LOCK_S):  # best effort: a read does not wait for it
                if reg.stamp() == stamp:
                    _save(reg.home / GRAPH_FILE, stamp, data)
        except Exception:
            pass  # an unsaved cache is rebuilt next time
    return data


def canonical(data: dict[str, Any]) -> tuple[set, set]:
    """Comparable sets of nodes and edges of node-link data (for `registry check`)."""
    nodes = {(n["id"], json.dumps({k: v for k, v in n.items() if k != "id"}, sort_keys=True)) for n in data.get("nodes", [])}
    edges = {(e["source"], e["target"], e.get("kind"), e.get("weight")) for e in data.get("edges", [])}
    return nodes, edges
