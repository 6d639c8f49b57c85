"""The signature indexes: faiss over the adapters' signatures (caches of the database).

Two indexes, built the same way:
- `index.npz`, over the description embeddings d_i (`adapters search`, descriptions against a text);
- `route-index.npz`, over the routing vectors c_i = (1 - w) d_i + w p_i (p_i the training-input
  prototype; c_i = d_i where there is none), for one prototype weight w. Retrieval routing scores a
  query q by <q, c_i>, which is linear in q, so faiss's top-k over c_i is exactly the routing top-k
  (no re-ranking of a description shortlist, which missed adapters whose prototype, not their
  description, is the nearest). Asking for another w rebuilds it.

Vectors are unit-norm, so inner product = cosine similarity. faiss ids are the adapters' row ids
(SQLite AUTOINCREMENT: never reused, so a removed adapter can never be confused with a new one).

Index type by size (measured on 2 CPU cores, 384-dim: bench/registry.py, bench/results/registry.txt):
- fewer than `IVF_THRESHOLD` (10,000) vectors: exact search, `IndexIDMap2(IndexFlatIP)`;
- from 10,000 on: `IndexIVFFlat` with nlist = 4 * sqrt(n) lists, trained on a sample, `nprobe` =
  max(8, nlist / 16) (at 100k vectors: flat ~11 ms, IVF ~1.1 ms p50 with recall@5 1.0 against exact).
  It is retrained when the registry has doubled since its training.

The index is never updated inside a writer's transaction (that would make every `register` rewrite a
file that grows with the registry). Writers only bump the database generation; `SignatureIndex.sync`
brings the cached index up to date by diffing ids (adds the new, removes the deleted) the first time
a search needs it, and saves it, with the generation it reflects and its id list, as one `index.npz`
written atomically (temp file + rename): faiss's own serialisation stored as a uint8 array, loaded
without pickle. The index is searched on the CPU even where a faiss-gpu build is installed: one query
over <= 100k vectors takes about a millisecond there, less than a copy to the GPU would cost.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from loraplex.errors import IntegrityError, MissingDependency
from loraplex.fsio import atomic_file

if TYPE_CHECKING:
    from loraplex.registry.store import Registry

IVF_THRESHOLD = 10_000
INDEX_FILE = "index.npz"
ROUTE_INDEX_FILE = "route-index.npz"
# The index last used for each file in this process (a long-lived process searches without reloading).
_IN_PROCESS: dict[str, "SignatureIndex"] = {}


def drop_cached(path: Path) -> None:
    """Forget this process's copy of the index saved at `path` (after the file is deleted)."""
    _IN_PROCESS.pop(str(path), None)


def routing_vectors(desc: np.ndarray, proto: np.ndarray, weight: float) -> np.ndarray:
    """(N, D) c_i = (1 - w) d_i + w p_i, or d_i where the prototype is missing (a NaN row)."""
    desc = np.asarray(desc, dtype=np.float32)
    proto = np.asarray(proto, dtype=np.float32)
    has = np.all(np.isfinite(proto), axis=1, keepdims=True)
    return np.where(has, (1 - weight) * desc + weight * np.where(has, proto, 0.0), desc).astype(np.float32)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency(
            "faiss is not installed: pip install 'loraplex[cpu]' (faiss-cpu) or 'loraplex[gpu]' (faiss-gpu)"
        ) from None
    return faiss


def _needs_rebuild(idx: "SignatureIndex | None", dim: int, n: int) -> bool:
    if idx is None or idx.index is None or idx.dim != dim:
        return True
    if idx.kind == "flat":
        return n >= IVF_THRESHOLD  # time to switch to IVF
    return n >= 2 * idx.trained_on  # IVF lists trained on half the data or less: retrain


class SignatureIndex:
    """A faiss index plus the ids it holds and the registry state it reflects (`stamp`, Database.stamp:
    its generation and that write's random mark, so a restored database's same generation is another state)."""

    def __init__(self, dim: int, index=None, ids: np.ndarray | None = None, generation: int = -1, trained_on: int = 0,
                 weight: float | None = None, stamp: str | None = None):
        self.dim = dim
        self.stamp = f"{generation}:" if stamp is None else stamp
        self.weight = weight  # None: description embeddings; else the routing vectors' prototype weight
        self.index = index
        self.ids = np.zeros(0, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self.generation = generation
        self.trained_on = trained_on

    # ---- building ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self.index is None:
            return "empty"
        return "ivf" if "IVF" in type(self.index).__name__ else "flat"

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vecs: np.ndarray, generation: int,
              weight: float | None = None, stamp: str | None = None) -> "SignatureIndex":
        faiss = _faiss()
        n = len(ids)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if n >= IVF_THRESHOLD:
            nlist = int(4 * math.sqrt(n))
            quant = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = vecs[rng.choice(n, size=min(n, 40 * nlist), replace=False)]
            index.train(sample)
            index.nprobe = max(8, nlist // 16)
            index.add_with_ids(vecs, ids)
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            if n:
                index.add_with_ids(vecs, ids)
        return cls(dim, index, ids, generation, trained_on=n, weight=weight, stamp=stamp)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        faiss = _faiss()
        blob = faiss.serialize_index(self.index) if self.index is not None else np.zeros(0, np.uint8)
        meta = json.dumps({"generation": self.generation, "stamp": self.stamp, "dim": self.dim,
                           "trained_on": self.trained_on, "weight": self.weight})
        with atomic_file(path, prefix=".index-", suffix=".npz") as f:
            np.savez(f, index=np.asarray(blob, dtype=np.uint8), ids=self.ids,
                     meta=np.frombuffer(meta.encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path: Path) -> "SignatureIndex | None":
        """The saved index, or None if there is none; IntegrityError if the file is damaged."""
        if not path.is_file():
            if path.exists():  # a directory (or other non-file) where the cache goes: never saved into, reported
                raise IntegrityError(f"the signature index {path} is not a file; run `loraplex registry check --repair`")
            return None
        faiss = _faiss()
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                ids = z["ids"].astype(np.int64)
                blob = z["index"]
            index = faiss.deserialize_index(blob) if blob.size else None
        except Exception as exc:
            raise IntegrityError(f"the signature index {path} is damaged ({type(exc).__name__}); run `loraplex registry check --repair`") from None
        if index is not None and index.ntotal != len(ids):
            raise IntegrityError(f"the signature index {path} holds {index.ntotal} vectors but lists {len(ids)} ids")
        w = meta.get("weight")
        return cls(int(meta["dim"]), index, ids, int(meta["generation"]), int(meta.get("trained_on", 0)),
                   None if w is None else float(w), meta.get("stamp"))

    # ---- keeping up with the database --------------------------------------------------------
    @classmethod
    def sync(cls, reg: "Registry", *, weight: float | None = None, save: bool = True) -> "SignatureIndex":
        """The index for the registry's current generation (loaded, caught up, or rebuilt): over the
        description embeddings, or with `weight` over the routing vectors of that prototype weight."""
        path = reg.home / (INDEX_FILE if weight is None else ROUTE_INDEX_FILE)
        stamp = reg.stamp()
        gen = int(stamp.split(":", 1)[0])
        dim = reg.signature_dim()
        mem = _IN_PROCESS.get(str(path))
        if mem is not None and mem.stamp == stamp and mem.dim == dim and mem.weight == weight:
            return mem
        try:
            idx = cls.load(path)
        except IntegrityError:
            idx = None  # a damaged cache is rebuilt, never trusted
        if idx is not None and idx.weight != weight:
            idx = None  # routing vectors of another prototype weight
        if idx is not None and idx.stamp == stamp and idx.dim == dim:
            _IN_PROCESS[str(path)] = idx
            return idx
        if idx is not None and (idx.generation > gen or reg.stamp(idx.generation) != idx.stamp):
            idx = None  # built from a state this database never went through (restored, replaced): ids may be reused
        db_ids = reg.adapter_ids(routable=weight is not None)  # routing: no forgetting adapter is a candidate

        def vectors(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(the ids that still exist, their vectors): an adapter removed since `db_ids` was read (a server's
            unload) has none, and faiss asserted on more ids than vectors (sweep 41: a 500 for every request
            deciding at that moment); the next sync sees its removal's stamp."""
            found, _, desc, proto = reg.signatures_by_id(ids)
            found = np.asarray(found, dtype=np.int64)
            return found, (desc if weight is None else routing_vectors(desc, proto, weight))

        if _needs_rebuild(idx, dim, len(db_ids)):
            ids, vecs = vectors(db_ids) if len(db_ids) else (db_ids, np.zeros((0, dim), np.float32))
            idx = cls.build(dim, ids, vecs, gen, weight=weight, stamp=stamp)
        else:
            have = set(idx.ids.tolist())
            want = set(db_ids.tolist())
            gone = np.array(sorted(have - want), dtype=np.int64)
            new = np.array(sorted(want - have), dtype=np.int64)
            if len(gone):
                idx.index.remove_ids(gone)
                idx.ids = idx.ids[~np.isin(idx.ids, gone)]
            if len(new):
                new, vecs = vectors(new)
                if len(new):
                    idx.index.add_with_ids(vecs, new)
                    idx.ids = np.concatenate([idx.ids, new])
            idx.generation, idx.stamp = gen, stamp
        if save and dim:
            try:
                with reg.write_lock(timeout=reg.CACHE_LOCK_S):  # best effort: a read does not wait for it
                    if reg.stamp() == stamp:  # nobody wrote meanwhile: this index is current
                        idx.save(path)
            except Exception:
                pass  # a cache that could not be saved is rebuilt next time
        _IN_PROCESS[str(path)] = idx
        return idx

    # ---- searching ---------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), ids (Q, k)); ids are -1 where fewer than k vectors exist."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.index is None or self.index.ntotal == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        k = min(k, int(self.index.ntotal))
        faiss = _faiss()
        threads = faiss.omp_get_max_threads()
        if len(q) <= 4:  # a single query is latency-bound: OpenMP's fork/join costs more than it saves
            faiss.omp_set_num_threads(1)
        try:
            scores, ids = self.index.search(q, k)
        finally:
            faiss.omp_set_num_threads(threads)
        return scores, ids

    def vectors(self) -> np.ndarray | None:
        """The stored vectors in `ids` order (flat indexes only; None for IVF)."""
        if self.kind != "flat":
            return None
        return np.stack([self.index.reconstruct(int(i)) for i in self.ids]) if len(self.ids) else np.zeros((0, self.dim), np.float32)


class Hit(NamedTuple):
    """One adapter a search found for a query."""

    score: float
    """The routing score <q, (1-w) d + w p>."""
    name: str
    """The adapter's name."""
    base: str
    """The adapter's base model (adapters of different bases cannot share a bank)."""
    base_sha: str
    """The fingerprint of the base it was registered against: one that no longer matches the base's current
    fingerprint (its config changed) cannot be loaded on it, so it is no candidate (`of_base`)."""


def of_base(hits: list[Hit], base: str, sha: str | None) -> list[Hit]:
    """The hits of adapters registered against base `base` as its fingerprint is now (`sha`; None: not known,
    so not filtered on)."""
    return [h for h in hits if h.base == base and (sha is None or h.base_sha == sha)]


def nearest_adapters(reg: "Registry", queries: np.ndarray, k: int, *, weight: float) -> list[list[Hit]]:
    """Per query row, its k nearest adapters by the routing score, best first: the faiss search over the
    routing vectors (synced first) with the ids resolved in one lookup. The one place the retrieval
    router's candidates and auto's decision read the index."""
    idx = SignatureIndex.sync(reg, weight=weight)
    scores, ids = idx.search(np.asarray(queries, dtype=np.float32), k)
    found = reg.names_and_bases_by_id(sorted({int(i) for i in ids.reshape(-1) if i >= 0}))
    return [[Hit(float(s), *found[int(i)]) for s, i in zip(s_row, i_row) if int(i) in found]
            for s_row, i_row in zip(scores, ids)]
