"""Contract tests of the registry store: round trip, hash check, names, duplicates, removal, components."""

import json

import numpy as np
import pytest
import torch

from loraplex import api
from loraplex.errors import AdapterNotFound, AlreadyExists, IntegrityError, InvalidName
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.registry.record import AdapterDraft, Edge, validate_name
from loraplex.registry.signatures import embed
from loraplex.registry.store import Registry


def _adapter(seed=0, r=2, d=8):
    g = torch.Generator().manual_seed(seed)
    spec = LoraSpec(r=r, alpha=4)
    return Adapter(spec, {"layer.0.q": (torch.randn(r, d, generator=g), torch.randn(d, r, generator=g)),
                          "layer.0.v": (torch.randn(r, d, generator=g), torch.randn(d, r, generator=g))})


def _draft(name, adapter, **kw):
    return AdapterDraft(name=name, base="toy", base_sha="f" * 64, family="encoder", description=kw.pop("description", f"task {name}"),
                        spec=adapter.spec, **kw)


def _vec(seed, d=16):
    v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "home", embedder="hash")


def test_roundtrip_records_and_tensors(reg):
    a = _adapter()
    snaps = [(10, _adapter(seed=5)), (20, _adapter(seed=6))]
    rec = reg.add_adapter(_draft("a", a, metrics={"accuracy": 0.9}, edges=(Edge.to_task("airline", "trained-on"),)),
                          a, embedding=_vec(0), prototype=_vec(1), snapshots=snaps, embedder="hash", fingerprint_json="{}")
    assert rec.name == "a" and rec.rank == 2 and rec.modules == 2 and rec.n_params == a.n_params
    assert [s.step for s in rec.snapshots] == [10, 20]
    rec2, back = reg.load_adapter("a")
    assert rec2 == rec
    for m in a.modules:
        assert torch.equal(back.weights[m][0], a.weights[m][0]) and torch.equal(back.weights[m][1], a.weights[m][1])
    s10 = reg.load_snapshot(rec, rec.snapshots[0])
    assert torch.equal(s10.weights["layer.0.q"][0], snaps[0][1].weights["layer.0.q"][0])
    ids, names, emb, proto = reg.signatures()
    assert names == ["a"] and np.allclose(emb[0], _vec(0)) and np.allclose(proto[0], _vec(1))
    assert reg.meta("embedder") == "hash" and reg.meta("dim") == "16"


def test_blobs_are_content_addressed_and_shared(reg):
    a = _adapter()
    r1 = reg.add_adapter(_draft("a", a), a, embedding=_vec(0), embedder="hash")
    r2 = reg.add_adapter(_draft("b", a), a, embedding=_vec(1), embedder="hash")
    assert r1.blob == r2.blob and len(reg.stored_blobs()) == 1
    reg.remove_adapter("a")
    assert len(reg.stored_blobs()) == 1, "a blob still referenced by b must stay"
    reg.remove_adapter("b")
    assert reg.stored_blobs() == {}


def test_tampered_blob_is_detected(reg):
    a = _adapter()
    rec = reg.add_adapter(_draft("a", a), a, embedding=_vec(0), embedder="hash")
    path = reg.blob_path(rec.blob)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        reg.load_adapter("a")
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        reg.load_adapter("a")


def test_duplicate_name_and_missing_name(reg):
    a = _adapter()
    reg.add_adapter(_draft("a", a), a, embedding=_vec(0), embedder="hash")
    with pytest.raises(AlreadyExists):
        reg.add_adapter(_draft("a", a), a, embedding=_vec(0), embedder="hash")
    with pytest.raises(AdapterNotFound):
        reg.get_adapter("zzz")
    assert reg.count() == 1


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a..b", "x\\y", "-lead", "a" * 101, "sp ace", "é"])
def test_invalid_names(bad):
    with pytest.raises(InvalidName):
        validate_name(bad)


@pytest.mark.parametrize("good", ["a", "airline-v2", "A.b_c-1", "x" * 100])
def test_valid_names(good):
    assert validate_name(good) == good


@pytest.mark.parametrize("literal", ["null", "true", "5", "1e3", "NaN"])
def test_names_that_read_as_json_values_are_refused_when_new(literal):
    """`--set generator=null` read the name as JSON null and used the default generator (sweep 35): a new name
    may not read as another JSON value; one a registry already holds is still a valid stored name."""
    with pytest.raises(InvalidName, match="where `--set KEY=VALUE` names it"):
        validate_name(literal, "generator")
    assert validate_name(literal, stored=True) == literal


def test_embedding_dimension_is_fixed(reg):
    a = _adapter()
    reg.add_adapter(_draft("a", a), a, embedding=_vec(0, d=16), embedder="hash")
    with pytest.raises(Exception, match="dimensions"):
        reg.add_adapter(_draft("b", a), a, embedding=_vec(0, d=8), embedder="hash")
    assert reg.count() == 1


def test_components_roundtrip_and_membership(reg):
    a = _adapter()
    reg.add_adapter(_draft("a", a), a, embedding=_vec(0), embedder="hash")
    w = {"gate.weight": torch.randn(3, 4)}
    c = reg.put_component("router", "r1", method="token-gate", base="toy", config={"top_k": 2}, tensors=w, members=["a"])
    assert c.members == ("a",)
    rec, tensors = reg.load_component("router", "r1")
    assert torch.equal(tensors["gate.weight"], w["gate.weight"]) and rec.config == {"top_k": 2}
    with pytest.raises(AdapterNotFound):
        reg.put_component("router", "r2", method="x", base="toy", config={}, tensors=w, members=["nope"])
    assert [x.name for x in reg.components_using("a")] == ["r1"]


def test_generation_bumps_on_every_write(reg):
    a = _adapter()
    g0 = reg.generation()
    reg.add_adapter(_draft("a", a), a, embedding=_vec(0), embedder="hash")
    g1 = reg.generation()
    reg.update_metrics("a", {"x": 1})
    assert g0 < g1 < reg.generation()
    assert reg.get_adapter("a").metrics == {"x": 1}


def test_reading_a_missing_registry_creates_nothing(tmp_path):
    r = Registry(tmp_path / "nothing")
    assert r.list_adapters() == [] and r.count() == 0 and r.generation() == 0
    assert not (tmp_path / "nothing").exists()


def test_api_remove_refuses_an_adapter_a_router_uses(settings, tiny_bert, tmp_path):
    from tests.conftest import make_peft_adapter

    make_peft_adapter(tiny_bert, tmp_path / "p")
    api.register(tmp_path / "p", name="a", description="d", base=str(tiny_bert), settings=settings)
    reg = api.open_registry(settings)
    reg.put_component("router", "r", method="token-gate", base=str(tiny_bert), config={}, tensors={"w": torch.zeros(1)}, members=["a"])
    with pytest.raises(Exception, match="used by router 'r'"):
        api.remove("a", settings)
    assert reg.has_adapter("a")


def test_show_and_graph(settings, tiny_bert, tmp_path):
    from tests.conftest import make_peft_adapter

    make_peft_adapter(tiny_bert, tmp_path / "p")
    api.register(tmp_path / "p", name="a", description="sentiment of airline tweets about flights", base=str(tiny_bert), settings=settings)
    api.register(tmp_path / "p", name="b", description="sentiment of airline tweets about delays", base=str(tiny_bert), settings=settings)
    reg = api.open_registry(settings)
    a = reg.get_adapter("a")
    # a derived adapter with lineage edges
    _, ad = reg.load_adapter("a")
    reg.add_adapter(AdapterDraft(name="c", base=a.base, base_sha=a.base_sha, family="encoder", description="merged",
                                 origin="merged", spec=ad.spec, edges=(Edge.to_adapter("a", "merged-from"), Edge.to_adapter("b", "merged-from"))),
                    ad, embedding=np.asarray(embed(reg, ["merged"])[0]), embedder="hash")
    info = api.show("c", settings)
    assert sorted(info["parents"]) == ["a", "b"]
    g = api.graph(settings)
    kinds = {(e["source"], e["target"], e["kind"]) for e in g["edges"]}
    assert ("adapter:c", "adapter:a", "merged-from") in kinds
    assert any(k == "similar" for _, _, k in kinds), "close descriptions get a similarity edge"
    json.dumps(g)  # node-link data is JSON
    api.remove("a", settings)
    g2 = api.graph(settings)
    removed = [n for n in g2["nodes"] if n["id"] == "adapter:a"]
    assert removed and removed[0].get("removed") is True
    # a new adapter under the removed parent's name would read as c's parent in show, graph and eval (sweep 32)
    from loraplex.errors import AlreadyExists

    with pytest.raises(AlreadyExists, match="'a' is the name of a removed adapter that 'c' came from"):
        api.register(tmp_path / "p", name="a", description="bbc topics", base=str(tiny_bert), settings=settings)
    assert api.show("c", settings)["parents"] == info["parents"] and not reg.has_adapter("a")


def test_a_run_id_that_cannot_be_written_is_the_registrys_fault_not_the_callers(settings, monkeypatch):
    """`forget` on a read-only registry home said "Read-only file system (.../.run-ids/...)" and exited 2, as
    bad input, where every other writer exits 1 naming the registry (sweep 62)."""
    import errno
    import os

    from loraplex.errors import LoraplexError, UserInputError
    from loraplex.registry.store import Registry

    reg = Registry.open(settings)
    real = os.open

    def read_only(path, *args, **kwargs):
        if ".run-ids" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(LoraplexError, match="the registry at .* cannot be written \\(Read-only file system") as err:
        reg.reserve_run_id("forget-x-1")
    assert not isinstance(err.value, UserInputError) and err.value.exit_code == 1
    monkeypatch.setattr(os, "open", real)
    (reg.home / ".run-ids").rmdir() if (reg.home / ".run-ids").is_dir() else None
    (reg.home / ".run-ids").write_text("a file in the folder's place")
    with pytest.raises(LoraplexError, match="a file is in the folder's place"):
        reg.reserve_run_id("forget-x-2")
