"""The faiss signature index: exact search, catch-up after writes, IVF beyond the threshold, damage."""

import numpy as np
import pytest
import torch

from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.registry import index as index_mod
from loraplex.registry.index import INDEX_FILE, SignatureIndex
from loraplex.registry.record import AdapterDraft
from loraplex.registry.store import Registry


def _add(reg, name, vec):
    a = Adapter(LoraSpec(r=1, alpha=1), {"m": (torch.ones(1, 4), torch.ones(4, 1))})
    d = AdapterDraft(name=name, base="toy", base_sha="0" * 64, family="encoder", description=name, spec=a.spec)
    return reg.add_adapter(d, a, embedding=vec, embedder="hash")


def _unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_search_and_catch_up(tmp_path):
    reg = Registry(tmp_path / "h", embedder="hash")
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 5)
    for i, v in enumerate(vecs):
        _add(reg, f"a{i}", v)
    idx = SignatureIndex.sync(reg)
    assert idx.kind == "flat" and idx.generation == reg.generation()
    scores, ids = idx.search(vecs[3], 2)
    assert reg.names_by_id([int(ids[0, 0])])[int(ids[0, 0])] == "a3" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # writes after the save: the cached index lags, then catches up by diffing ids
    reg.remove_adapter("a3")
    _add(reg, "new", vecs[3])
    cached = SignatureIndex.load(tmp_path / "h" / INDEX_FILE)
    assert cached.generation < reg.generation()
    idx2 = SignatureIndex.sync(reg)
    _, ids2 = idx2.search(vecs[3], 1)
    assert reg.names_by_id([int(ids2[0, 0])])[int(ids2[0, 0])] == "new"
    assert sorted(idx2.ids.tolist()) == reg.adapter_ids().tolist()


def test_damaged_index_is_rebuilt(tmp_path):
    reg = Registry(tmp_path / "h", embedder="hash")
    rng = np.random.default_rng(1)
    for i, v in enumerate(_unit(rng, 3)):
        _add(reg, f"a{i}", v)
    SignatureIndex.sync(reg)
    (tmp_path / "h" / INDEX_FILE).write_bytes(b"garbage")
    idx = SignatureIndex.sync(reg)
    assert len(idx.ids) == 3


def test_switches_to_ivf_past_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "IVF_THRESHOLD", 64)
    rng = np.random.default_rng(2)
    centers = _unit(rng, 8)
    vecs = np.concatenate([c + 0.05 * rng.normal(size=(40, 16)) for c in centers]).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(1, len(vecs) + 1)
    idx = SignatureIndex.build(16, ids, vecs, generation=1)
    assert idx.kind == "ivf"
    flat = SignatureIndex.build(16, ids[:10], vecs[:10], generation=1)
    assert flat.kind == "flat"
    _, got = idx.search(vecs[:50], 1)
    assert (got[:, 0] == ids[:50]).mean() >= 0.95
