"""The routing index: faiss over c_i = (1 - w) d_i + w p_i gives exactly the retrieval router's ranking."""

import numpy as np
import pytest
import torch

from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.registry.check import check
from loraplex.registry.index import ROUTE_INDEX_FILE, SignatureIndex, routing_vectors
from loraplex.registry.record import AdapterDraft
from loraplex.registry.store import Registry
from loraplex.router.retrieval import RetrievalConfig, RetrievalRouter, Signatures


def _unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _registry(tmp_path, n=40, d=16, seed=0, base_of=lambda i: "toy"):
    rng = np.random.default_rng(seed)
    reg = Registry(tmp_path / "h", embedder="hash")
    desc, proto = _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(n, d)))
    a = Adapter(LoraSpec(r=1, alpha=1), {"m": (torch.ones(1, 4), torch.ones(4, 1))})
    for i in range(n):
        dr = AdapterDraft(name=f"a{i:02d}", base=base_of(i), base_sha="0" * 64, family="encoder", description=f"a{i}",
                          spec=a.spec)
        # every fifth adapter has no prototype: its routing vector is its description
        reg.add_adapter(dr, a, embedding=desc[i], prototype=None if i % 5 == 0 else proto[i], embedder="hash")
    return reg, rng


@pytest.mark.parametrize("weight", [0.0, 0.8, 1.0])
def test_candidates_are_the_exact_top_of_the_routing_score(tmp_path, weight):
    reg, rng = _registry(tmp_path)
    ret = RetrievalRouter(RetrievalConfig(prototype_weight=weight, candidates=5))
    _, names, desc, proto = reg.signatures()
    full = Signatures(names, desc, proto)
    for q in _unit(rng.normal(size=(20, 16))):
        exact = np.argsort(-ret.scores(q[None], full)[0])[:5]
        assert ret.candidates(reg, q[None]) == [names[i] for i in exact]


def test_description_only_shortlist_would_miss_the_prototype_match(tmp_path):
    """A query equal to one adapter's prototype: it is that adapter's best score at w=0.8, though its
    description is far; a shortlist by description alone (the old way) can leave it out."""
    reg, _ = _registry(tmp_path)
    _, names, desc, proto = reg.signatures()
    target = 7
    q = proto[target]
    by_desc = np.argsort(-(desc @ q))[:3]
    assert target not in by_desc  # the description shortlist misses it
    ret = RetrievalRouter(RetrievalConfig(prototype_weight=0.8, candidates=3))
    assert ret.candidates(reg, q[None])[0] == names[target]


def test_routing_index_follows_writes_and_weight(tmp_path):
    reg, rng = _registry(tmp_path, n=10)
    idx = SignatureIndex.sync(reg, weight=0.8)
    assert idx.weight == 0.8 and (tmp_path / "h" / ROUTE_INDEX_FILE).is_file()
    _, _, desc, proto = reg.signatures()
    assert np.allclose(idx.vectors()[np.argsort(idx.ids)], routing_vectors(desc, proto, 0.8), atol=1e-6)
    reg.remove_adapter("a03")
    idx2 = SignatureIndex.sync(reg, weight=0.8)
    assert "a03" not in reg.names_by_id(idx2.ids.tolist()).values() and len(idx2.ids) == 9
    other = SignatureIndex.sync(reg, weight=0.5)  # another weight: rebuilt, not reused
    _, _, desc, proto = reg.signatures()
    assert other.weight == 0.5
    assert np.allclose(other.vectors()[np.argsort(other.ids)], routing_vectors(desc, proto, 0.5), atol=1e-6)


def test_candidates_keep_one_base(tmp_path):
    reg, rng = _registry(tmp_path, n=12, base_of=lambda i: "toy" if i % 2 else "other")
    ret = RetrievalRouter(RetrievalConfig(candidates=12))
    q = _unit(rng.normal(size=(1, 16)))
    got = ret.candidates(reg, q, base="toy")
    assert got and all(reg.get_adapter(n).base == "toy" for n in got) and len(got) == 6
    first = ret.candidates(reg, q)
    assert len({reg.get_adapter(n).base for n in first}) == 1


def test_check_finds_a_tampered_routing_index_and_repair_rebuilds_it(tmp_path):
    reg, _ = _registry(tmp_path, n=6)
    idx = SignatureIndex.sync(reg, weight=0.8)
    bad = SignatureIndex.build(idx.dim, idx.ids, np.ones((len(idx.ids), idx.dim), np.float32) / 4, idx.generation,
                               weight=0.8, stamp=idx.stamp)
    bad.save(tmp_path / "h" / ROUTE_INDEX_FILE)
    rep = check(reg)
    assert any("routing index vectors differ" in p for p in rep.problems)
    rep = check(reg, repair=True)
    assert "rebuilt the routing index" in rep.repaired
    assert not [p for p in check(reg).problems if "index" in p]


def test_signatures_by_name_keep_the_order_asked(tmp_path):
    reg, _ = _registry(tmp_path, n=8)
    _, names, _, _ = reg.signatures(["a05", "a01", "a05"])
    assert names == ["a05", "a01", "a05"]
    _, names, _, _ = reg.signatures_by_id(reg.adapter_ids()[::-1].tolist())
    assert names == [f"a{i:02d}" for i in range(7, -1, -1)]


def test_a_database_restored_from_a_backup_is_not_served_the_later_caches(tmp_path):
    """The caches compared generation numbers only: a registry.db restored from a backup reached the same
    generation again with another adapter under the same id, and search answered with the other one's vector."""
    import sqlite3

    reg, rng = _registry(tmp_path, n=6)
    backup = tmp_path / "backup.db"
    with sqlite3.connect(reg.db_path) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    a = Adapter(LoraSpec(r=1, alpha=1), {"m": (torch.ones(1, 4), torch.ones(4, 1))})

    def add(name, vec):
        dr = AdapterDraft(name=name, base="toy", base_sha="0" * 64, family="encoder", description=name, spec=a.spec)
        reg.add_adapter(dr, a, embedding=vec, prototype=vec, embedder="hash")

    v1, v2 = _unit(rng.normal(size=(2, 16)))
    add("w1", v1)
    assert SignatureIndex.sync(reg).generation == reg.generation()  # the index now holds w1 under the new id
    reg.close()
    for extra in ("registry.db-wal", "registry.db-shm"):
        (reg.home / extra).unlink(missing_ok=True)
    backup.replace(reg.db_path)
    reg2 = Registry(tmp_path / "h", embedder="hash")
    reg = reg2
    add("w2", v2)  # the same generation and the same id as w1 had
    idx = SignatureIndex.sync(reg)
    order = np.argsort(idx.ids)
    assert np.allclose(idx.vectors()[order], reg.embeddings_by_id(np.sort(idx.ids)), atol=1e-5)
    assert not [p for p in check(reg).problems if "index" in p]


@pytest.mark.parametrize("built", [False, True])
def test_an_adapter_removed_while_the_index_syncs_is_left_out(tmp_path, monkeypatch, built):
    """Sweep 41: the sync read the adapter ids, then (separately) their signatures; an adapter removed between
    the two (a server's unload) left fewer vectors than ids, and faiss's assertion failed every `auto` request
    deciding at that moment (500s). The ids that still exist are indexed; the next sync sees the rest."""
    reg, _ = _registry(tmp_path, n=12)
    if built:  # an index already there: the adapter added since is the one removed mid-sync
        SignatureIndex.sync(reg, weight=0.8)
        a = Adapter(LoraSpec(r=1, alpha=1), {"m": (torch.ones(1, 4), torch.ones(4, 1))})
        reg.add_adapter(AdapterDraft(name="late", base="toy", base_sha="0" * 64, family="encoder", description="late",
                                     spec=a.spec), a, embedding=_unit(np.ones(16)), embedder="hash")
    real = reg.adapter_ids
    ghost = {}

    def ids_then_removed(**kw):
        got = real(**kw)
        ghost["id"] = int(got.max())
        reg.remove_adapter(reg.names_by_id([ghost["id"]])[ghost["id"]])  # gone before its signature is read
        return got

    monkeypatch.setattr(reg, "adapter_ids", ids_then_removed)
    idx = SignatureIndex.sync(reg, weight=0.8, save=False)
    assert ghost["id"] not in set(idx.ids.tolist()) and len(idx.ids) == idx.index.ntotal == reg.count()


def test_auto_finds_its_bases_adapters_behind_a_crowd_of_another_bases(tmp_path):
    """Sweep 41: auto searched the 32 nearest adapters of every base, then kept the served base's; 32 of another
    base nearer than all of its own left none, and the request fell to the bare base ("no adapter of base ... in
    the registry"). The search goes deeper until the base's own are found."""
    from loraplex.router import auto as auto_router

    rng = np.random.default_rng(3)
    reg = Registry(tmp_path / "h", embedder="hash")
    a = Adapter(LoraSpec(r=1, alpha=1), {"m": (torch.ones(1, 4), torch.ones(4, 1))})
    u, v = np.eye(16)[0], np.eye(16)[1]
    for i in range(120):  # 110 of "other" around u, 10 of "toy" around v
        toy = i % 12 == 0
        vec = _unit((v if toy else u) + 0.1 * rng.normal(size=16))
        reg.add_adapter(AdapterDraft(name=f"{'t' if toy else 'o'}{i:03d}", base="toy" if toy else "other",
                                     base_sha="0" * 64, family="encoder", description=f"a{i}", spec=a.spec),
                        a, embedding=vec, prototype=None, embedder="hash")
    q = _unit(u + 0.3 * v)[None]
    cfg = auto_router.parse_config({})
    from loraplex.registry.index import nearest_adapters
    assert {h.base for h in nearest_adapters(reg, q, auto_router.SEARCHED, weight=cfg.prototype_weight)[0]} == {"other"}
    [hits] = auto_router.nearest_hits(reg, q, cfg, "toy", "0" * 64)
    assert len(hits) == 10 and {h.base for h in hits} == {"toy"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_auto_finds_labelled_adapters_behind_a_crowd_of_taskless_ones(tmp_path):
    """Sweep 43: a request to be answered with a label set kept, of its 32 nearest adapters, those recording one;
    32 task-less imports nearer than every labelled adapter left none, and it went to the bare base. The search
    goes deeper for adapters that record labels."""
    from loraplex.router import auto as auto_router

    rng = np.random.default_rng(4)
    reg = Registry(tmp_path / "h", embedder="hash")
    a = Adapter(LoraSpec(r=1, alpha=1), {"m": (torch.ones(1, 4), torch.ones(4, 1))})
    u, v = np.eye(16)[0], np.eye(16)[1]
    for i in range(60):  # 50 imports without a task around u, 10 trained adapters (a task with labels) around v
        labelled = i % 6 == 0
        card = {"t.jsonl": {"name": "t", "description": "d", "labels": ["bad", "good"]}} if labelled else {}
        reg.add_adapter(AdapterDraft(name=f"{'l' if labelled else 'i'}{i:03d}", base="toy", base_sha="0" * 64,
                                     family="encoder", description=f"a{i}", spec=a.spec,
                                     task="t.jsonl" if labelled else None, extra={"task_cards": card}),
                        a, embedding=_unit((v if labelled else u) + 0.1 * rng.normal(size=16)), prototype=None,
                        embedder="hash")
    q = _unit(u + 0.3 * v)[None]
    cfg = auto_router.parse_config({"route_threshold": 0.0})
    [d] = auto_router.decide(reg, ["x"], cfg, base="toy", base_sha="0" * 64, queries=q, labels=[()])
    assert d.action == "route" and d.nearest.startswith("l") and all(h.name.startswith("l") for h in d.hits), d
