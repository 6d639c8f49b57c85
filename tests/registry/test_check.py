"""`registry check`: consistent registries pass; damage is found; --repair rebuilds derived state."""

import numpy as np

from loraplex import api
from loraplex.registry.index import INDEX_FILE, SignatureIndex
from loraplex.registry.lineage import GRAPH_FILE
from tests.conftest import make_peft_adapter


def _setup(settings, tiny_bert, tmp_path, n=2):
    make_peft_adapter(tiny_bert, tmp_path / "p")
    for i in range(n):
        api.register(tmp_path / "p", name=f"a{i}", description=f"task number {i}", base=str(tiny_bert), settings=settings)
    return api.open_registry(settings)


def test_fresh_registry_is_consistent(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    api.search("task", settings=settings)
    api.graph(settings)
    rep = api.check(settings=settings)
    assert rep.ok, rep.problems
    assert rep.counts["adapters"] == 2


def test_damaged_blob_is_a_problem(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    rec = reg.get_adapter("a0")
    reg.blob_path(rec.blob).write_bytes(b"not the data")
    rep = api.check(settings=settings)
    assert not rep.ok and any("a0" in p for p in rep.problems)
    assert not api.check(repair=True, settings=settings).ok  # lost data cannot be repaired


def test_orphans_are_notes_and_repair_removes_them(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    reg.put_blob(b"an interrupted write left me here")
    tmp = reg.blob_dir / "ab" / ".tmp-123"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"x")
    rep = api.check(settings=settings)
    assert rep.ok and any("no record points at" in n for n in rep.notes)
    rep = api.check(repair=True, settings=settings)
    assert rep.ok and not any("no record points at" in n for n in rep.notes)
    assert not tmp.exists()


def test_cache_that_claims_current_but_disagrees_is_a_problem(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    idx = SignatureIndex.sync(reg)
    # a current-generation index whose vector for one adapter is wrong
    bad = SignatureIndex.build(idx.dim, idx.ids, -reg.embeddings_by_id(idx.ids), reg.generation())
    bad.save(reg.home / INDEX_FILE)
    rep = api.check(settings=settings)
    assert not rep.ok and any("index" in p for p in rep.problems)
    assert api.check(repair=True, settings=settings).ok


def test_corrupt_graph_cache_and_repair(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    (reg.home / GRAPH_FILE).write_text("{not json")
    assert not api.check(settings=settings).ok
    rep = api.check(repair=True, settings=settings)
    assert rep.ok and "rebuilt the lineage graph" in rep.repaired


def test_stale_caches_are_consistent(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    api.search("task", settings=settings)
    api.graph(settings)
    api.register(tmp_path / "p", name="late", description="registered after the caches", base=str(tiny_bert), settings=settings)
    rep = api.check(settings=settings)
    assert rep.ok and any("lags" in n for n in rep.notes)
    assert np.isfinite(reg.signatures()[2]).all()
