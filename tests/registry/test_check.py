"""`registry check`: consistent registries pass; damage is found; --repair rebuilds derived state."""

import json
import re

import pytest
import numpy as np

from loraplex import api
from loraplex.registry.index import INDEX_FILE, SignatureIndex, drop_cached
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


def test_a_lock_path_that_is_a_directory_is_a_problem_and_an_empty_one_is_repaired(settings, tiny_bert, tmp_path):
    """registry.lock as a directory: every write failed ("cannot take the registry lock"), while check said
    "consistent" with a note, exit 0, and --repair failed the same way (sweep 62)."""
    reg = _setup(settings, tiny_bert, tmp_path, n=1)
    reg.lock_path.unlink()
    reg.lock_path.mkdir()
    rep = api.check(settings=settings)
    assert not rep.ok and any("registry.lock: it is a directory; remove it" in p for p in rep.problems), rep
    rep = api.check(repair=True, settings=settings)
    assert rep.ok and any("removed the empty directory registry.lock" in r for r in rep.repaired), rep
    assert reg.lock_path.is_file()  # taken as a lock again
    api.register(tmp_path / "p", name="after", description="a write works again", base=str(tiny_bert), settings=settings)
    (reg.lock_path.unlink(), reg.lock_path.mkdir(), (reg.lock_path / "x").write_text("kept"))
    rep = api.check(repair=True, settings=settings)  # one that holds files is not removed
    assert not rep.ok and (reg.lock_path / "x").read_text() == "kept"


def test_stored_files_are_readable_to_the_registrys_other_users(settings, tiny_bert, tmp_path, monkeypatch):
    """Blobs and caches were written 0600 (the temporary file's mode, renamed into place): another user of
    a registry shared read-only could list it but not query or evaluate, and `registry check` called every
    adapter damaged and said to remove it (sweep 24). They get the mode open() gives now, and a blob this
    user may not read is said as permissions, not damage."""
    import os
    import stat
    from pathlib import Path

    old = os.umask(0o022)
    try:
        reg = _setup(settings, tiny_bert, tmp_path)
        api.search("task", settings=settings)  # the signature index
        api.graph(settings)  # the lineage graph cache
    finally:
        os.umask(old)
    files = [reg.blob_path(r.blob) for r in reg.list_adapters()] + [reg.home / INDEX_FILE, reg.home / GRAPH_FILE]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    blob = reg.blob_path(reg.get_adapter("a0").blob)
    real = Path.read_bytes

    def denied(self):
        if self == blob:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    rep = api.check(settings=settings)
    said = [p for p in rep.problems if "'a0'" in p]
    assert said and "cannot be read by this user (permission denied)" in said[0] and "remove it" not in said[0], said


def test_orphans_are_notes_and_repair_moves_them_aside(settings, tiny_bert, tmp_path):
    """Repair deleted every blob no record pointed at: after a database restored from an older backup,
    those are the weights of the records that went missing. They are moved to orphaned-blobs/ now."""
    reg = _setup(settings, tiny_bert, tmp_path)
    sha = reg.put_blob(b"an interrupted write left me here")
    tmp = reg.blob_dir / "ab" / ".tmp-123"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"x")
    rep = api.check(settings=settings)
    assert rep.ok and any("no record points at" in n for n in rep.notes)
    rep = api.check(repair=True, settings=settings)
    assert rep.ok and not any("no record points at" in n for n in rep.notes)
    assert any("moved 1 unreferenced blob(s) to" in r for r in rep.repaired), rep.repaired
    assert not tmp.exists()
    kept = list((reg.home / "orphaned-blobs").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == b"an interrupted write left me here" and sha not in reg.stored_blobs()


def test_a_missing_database_beside_stored_blobs_is_named_not_a_new_registry(settings, tiny_bert, tmp_path):
    """registry.db deleted: the home read as a new, empty registry (`check` said consistent), the next write
    made a new database, and repair then deleted every stored adapter's weights."""
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    (reg.home / "registry.db").unlink()
    for extra in ("registry.db-wal", "registry.db-shm"):
        (reg.home / extra).unlink(missing_ok=True)
    for call in (lambda: api.list_adapters(settings), lambda: api.check(settings=settings)):
        with pytest.raises(IntegrityError, match="registry.db is missing but adapters are stored in"):
            call()


def test_cache_that_claims_current_but_disagrees_is_a_problem(settings, tiny_bert, tmp_path):
    reg = _setup(settings, tiny_bert, tmp_path)
    idx = SignatureIndex.sync(reg)
    # a current-generation index whose vector for one adapter is wrong
    bad = SignatureIndex.build(idx.dim, idx.ids, -reg.embeddings_by_id(idx.ids), reg.generation(), stamp=reg.stamp())
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


def test_remove_checks_the_adapters_users_again_under_the_lock(settings, tiny_bert, tmp_path, monkeypatch):
    """`adapters remove` checked for routers and generators over the adapter before it waited for the lock:
    a `generate fit` committed meanwhile was left over an adapter that was gone (both exited 0)."""
    from types import SimpleNamespace

    from loraplex.errors import UserInputError
    from loraplex.registry import adapters
    from loraplex.registry.store import Registry

    reg = _setup(settings, tiny_bert, tmp_path)
    name = reg.list_adapters()[0].name
    calls = []

    def using(self, adapter):  # nobody before the lock; a generator stored while remove waited for it
        calls.append(adapter)
        return [] if len(calls) == 1 else [SimpleNamespace(kind="generator", name="g2")]

    monkeypatch.setattr(Registry, "components_using", using)
    with pytest.raises(UserInputError, match=f"adapter '{name}' is used by generator 'g2'"):
        adapters.remove(reg, name)
    assert reg.has_adapter(name) and len(calls) == 2


def test_remove_on_a_full_disk_says_so(settings, tiny_bert, tmp_path, monkeypatch):
    """`adapters remove` on a full disk was exit 70 (OperationalError), and removing is how space is freed."""
    import contextlib
    import sqlite3

    from loraplex.errors import DiskFull
    from loraplex.registry.store import Registry

    reg = _setup(settings, tiny_bert, tmp_path)
    name = reg.list_adapters()[0].name

    @contextlib.contextmanager
    def full(self):
        raise sqlite3.OperationalError("database or disk is full")
        yield

    monkeypatch.setattr(Registry, "transaction", full)
    with pytest.raises(DiskFull, match=f"the disk is full: cannot remove adapter '{name}'"):
        api.remove(name, settings=settings)
    monkeypatch.undo()
    assert reg.has_adapter(name)


def test_records_damaged_inside_the_database_are_named(settings, tiny_bert, tmp_path):
    """JSON fields edited or damaged inside registry.db ended `adapters list`, `registry check` and `--repair`
    in exit 70 (JSONDecodeError, ValidationError); now each names its record, and the record can be removed."""
    import sqlite3

    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    bad, good = [r.name for r in reg.list_adapters()][:2]
    reg.close()
    with sqlite3.connect(reg.db_path) as c:
        c.execute("UPDATE adapters SET metrics = '{not json' WHERE name = ?", (bad,))
        c.execute("UPDATE adapters SET extra = '[1, 2]' WHERE name = ?", (good,))
    with pytest.raises(IntegrityError, match=f"adapter '{bad}': its stored record is damaged"):
        api.list_adapters(settings)
    rep = api.check(settings=settings)
    assert not rep.ok and len([p for p in rep.problems if "its stored record is damaged" in p]) == 2, rep.problems
    assert not api.check(repair=True, settings=settings).ok
    api.remove(bad, settings=settings)
    api.remove(good, settings=settings)
    assert api.check(settings=settings).ok


def test_a_component_whose_members_are_not_a_list_is_damaged(settings, tiny_bert, tmp_path):
    """A router's `members` stored as one string was read letter by letter ("routes over adapters that are
    gone: b, b, c") and no longer kept its adapters from removal (sweep 32): a damaged record, named."""
    import sqlite3

    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    names = [r.name for r in reg.list_adapters()][:2]
    reg.put_component("router", "r", method="token-gate", base=str(tiny_bert), config={}, tensors={}, members=names)
    reg.close()
    with sqlite3.connect(reg.db_path) as c:
        c.execute("UPDATE components SET members = ? WHERE name = 'r'", (json.dumps(names[0]),))
    with pytest.raises(IntegrityError, match="router 'r': its stored record is damaged"):
        reg.get_component("router", "r")
    rep = api.check(settings=settings)
    assert not rep.ok and any("router 'r': its stored record is damaged" in p for p in rep.problems), rep.problems
    with pytest.raises(IntegrityError, match=f"adapter {names[0]!r} is named by router 'r', whose stored record is"):
        api.remove(names[0], settings=settings)  # the adapter it still names went silently (sweep 34)
    api.remove(names[1], settings=settings)  # the others are not held up by the damage
    api.remove_router("r", settings=settings)
    api.remove(names[0], settings=settings)


def _edit(reg, sql, *args):
    import sqlite3

    reg.close()
    with sqlite3.connect(reg.db_path) as c:
        c.execute(sql, args)


@pytest.mark.parametrize("sql, named, repairable", [
    ("UPDATE meta SET value = 'abc' WHERE key = 'generation'", "its stored 'generation' is damaged", True),
    ("DELETE FROM meta WHERE key = 'dim'", "no signature dimension", True),
    ("UPDATE meta SET value = '7' WHERE key = 'dim'", "but its stored 'dim' (7)", True),
    ("UPDATE adapters SET embedding = substr(embedding, 1, 10) WHERE id = 1",
     "its stored description embedding is damaged (10 bytes", False),
    ("INSERT INTO edges VALUES (1, 'nocolon', 'trained-from')", "a stored lineage edge is damaged", False),
])
def test_damaged_counts_signatures_and_edges_are_named(settings, tiny_bert, tmp_path, sql, named, repairable):
    """Damage outside the records' JSON fields (the meta counts, a signature's bytes, a lineage edge) ended
    search, query, `registry check` and `--repair` in exit 70 (ValueError, AssertionError): now reading it is an
    IntegrityError naming it, check lists it, and --repair mends what the database itself can tell."""
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    api.search("task", settings=settings)
    api.graph(settings)
    _edit(reg, sql)
    for cache in (INDEX_FILE, GRAPH_FILE):  # a hand edit leaves the generation as it was: the caches look current
        (reg.home / cache).unlink()
        drop_cached(reg.home / cache)
    with pytest.raises(IntegrityError, match=re.escape(named) if "'7'" not in sql else "its stored 'dim' \\(7\\) is not the dimension"):
        api.graph(settings) if "edges" in sql else api.search("task", settings=settings)
    rep = api.check(settings=settings)
    assert not rep.ok and any(named in p for p in rep.problems), rep.problems
    fixed = api.check(repair=True, settings=settings)
    assert fixed.ok == repairable, (fixed.problems, fixed.repaired)
    if repairable:
        assert [h["name"] for h in api.search("task number 1", k=1, settings=settings)] == ["a1"]
    else:
        api.remove("a0", settings=settings)
        assert api.check(settings=settings).ok


@pytest.mark.parametrize("sql", ["INSERT INTO edges VALUES (1, 'adapter:nosuch', 'eats')",
                                 "INSERT INTO snapshots(adapter_id, step, blob) VALUES (1, 'x', 'nosuchblob')"])
def test_a_damaged_edge_or_snapshot_row_names_its_adapter(settings, tiny_bert, tmp_path, sql):
    """One edge of an unknown kind or a snapshot whose step is not a number was an internal error (exit 70) in
    check, --repair, every listing and every removal (sweep 32): it damages its adapter's record, named."""
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    _edit(reg, sql)
    with pytest.raises(IntegrityError, match="adapter 'a0': its stored record is damaged"):
        reg.get_adapter("a0")
    damaged: list[str] = []
    assert [r.name for r in reg.list_adapters(damaged=damaged)] == ["a1"] and "'a0'" in damaged[0]
    rep = api.check(settings=settings)
    assert not rep.ok and any("adapter 'a0': its stored record is damaged" in p for p in rep.problems), rep.problems
    assert not api.check(repair=True, settings=settings).ok
    api.remove("a0", settings=settings)
    assert api.check(settings=settings).ok


def test_a_damaged_base_fingerprint_is_named_and_repaired(settings, tiny_bert, tmp_path):
    """A `bases` row whose fingerprint is not one ended check, --repair and export in exit 70 (sweep 32): check
    names the base once, --repair writes it again from the base (which reads as it was registered)."""
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    _edit(reg, "UPDATE bases SET fingerprint = '{}'")
    rep = api.check(settings=settings)
    named = [p for p in rep.problems if "its stored fingerprint is damaged" in p]
    assert len(named) == 1 and named[0].startswith(f"base {str(tiny_bert)!r}") and len(rep.problems) == 1, rep.problems
    with pytest.raises(IntegrityError, match="its stored fingerprint is damaged"):
        api.export("a0", tmp_path / "out", settings=settings)
    fixed = api.check(repair=True, settings=settings)
    assert fixed.ok and any("wrote the damaged fingerprint" in r for r in fixed.repaired), fixed.problems
    api.export("a0", tmp_path / "out", settings=settings)


def test_a_record_pointing_at_another_adapters_blob_does_not_load(settings, tiny_bert, tmp_path):
    """check said the shapes disagree, while eval, query and export used the other adapter's weights with exit 0
    (sweep 32): loading compares them too."""
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    make_peft_adapter(tiny_bert, tmp_path / "wide", r=4, targets=("query", "key", "value"))
    api.register(tmp_path / "wide", name="wide", description="a wider adapter", base=str(tiny_bert), settings=settings)
    _edit(reg, "UPDATE adapters SET blob = (SELECT blob FROM adapters WHERE name = 'wide') WHERE name = 'a0'")
    with pytest.raises(IntegrityError, match="adapter 'a0': its blob's shapes disagree with its record"):
        reg.load_adapter("a0")
    with pytest.raises(IntegrityError, match="shapes disagree"):
        api.export("a0", tmp_path / "out", settings=settings)
    reg.load_adapter("wide")


def test_a_home_that_is_a_dangling_link_or_a_loop_is_named(settings, tmp_path):
    """A home on an unmounted disk (a link to nothing) read as an empty, consistent registry, and a write said
    "File exists" (sweep 32)."""
    from loraplex.errors import UserInputError
    from loraplex.settings import Settings

    (tmp_path / "gone").symlink_to(tmp_path / "no-such-mount" / "home")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for link, why in (("gone", "which does not exist"), ("loop", "which is a loop of symbolic links")):
        s = Settings.load(home=tmp_path / link, embedder="hash", device="cpu", dtype="float32")
        with pytest.raises(UserInputError, match=f"is a symbolic link to .*, {why}"):
            api.list_adapters(s)
        with pytest.raises(UserInputError, match="is a symbolic link"):
            api.check(settings=s)


@pytest.mark.parametrize("members", [["a1", "a0"], ["a0", "a0"], [], "tasks", "config"])
def test_a_routers_members_that_are_not_those_it_was_fitted_on_are_damage(settings, tiny_bert, tmp_path, members):
    """Reordered, a router's members passed check and routed each gate slot through another adapter, silently;
    repeated, it blamed the input (sweep 32): check names it, and loading refuses it. So with a stored
    configuration that no longer validates (sweep 35: "invalid configuration ... top_k", exit 2, a 400)."""
    from loraplex.errors import IntegrityError
    from loraplex.router.load import load_router

    reg = _setup(settings, tiny_bert, tmp_path)
    reg.put_component("router", "r", method="token-gate", base=str(tiny_bert), config={}, tensors={},
                      members=["a0", "a1"], extra={"expert_names": ["a0", "a1"]})
    assert api.check(settings=settings).ok
    if members == "tasks":  # its task list as one string was read letter by letter too (sweep 32)
        _edit(reg, "UPDATE components SET extra = json_set(extra, '$.tasks', 'airline') WHERE name = 'r'")
    elif members == "config":
        _edit(reg, "UPDATE components SET config = json_set(config, '$.top_k', 0) WHERE name = 'r'")
    else:
        _edit(reg, "UPDATE components SET members = ? WHERE name = 'r'", json.dumps(members))
    rep = api.check(settings=settings)
    assert any(p.startswith("router 'r': its stored") for p in rep.problems), rep.problems
    with pytest.raises(IntegrityError, match="router 'r': its stored"):
        load_router(api.open_registry(settings), "r", settings)
    # another record that cannot be read at all hid this one's problem (sweep 38): both are named
    reg.put_component("router", "other", method="token-gate", base=str(tiny_bert), config={}, tensors={},
                      members=["a0", "a1"], extra={"expert_names": ["a0", "a1"]})
    _edit(reg, "UPDATE components SET config = '{bad' WHERE name = 'other'")
    rep = api.check(settings=settings)
    assert any("'other'" in p for p in rep.problems) and any(p.startswith("router 'r': its stored") for p in rep.problems)


def test_repair_leaves_the_blob_a_damaged_record_names_in_place(settings, tiny_bert, tmp_path):
    """A record whose blob id was upper-cased is named as damaged, and --repair then moved its own weights to
    orphaned-blobs/ as unreferenced, inviting their deletion (sweep 32): they stay."""
    reg = _setup(settings, tiny_bert, tmp_path, n=1)
    blob = reg.get_adapter("a0").blob
    _edit(reg, "UPDATE adapters SET blob = upper(blob) WHERE name = 'a0'")
    api.check(repair=True, settings=settings)
    assert reg.blob_path(blob).exists() and not (reg.home / "orphaned-blobs").exists()


def test_adapters_of_one_base_name_and_two_fingerprints_are_told_apart(settings, tiny_bert, tmp_path):
    """Refused together as "of different base models: a0 (base), a1 (base)", which reads as no difference
    (sweep 32): the fingerprints are named where the names agree."""
    from loraplex.errors import IncompatibleAdapter

    reg = _setup(settings, tiny_bert, tmp_path)
    _edit(reg, "UPDATE adapters SET base_sha = ? WHERE name = 'a1'", "d" * 64)
    with pytest.raises(IncompatibleAdapter, match="fingerprint dddddddddddd"):
        api.query(["x"], router="retrieval", adapters=["a0", "a1"], settings=settings)


def test_a_router_and_an_adapter_of_one_name_are_a_problem(settings, tiny_bert, tmp_path):
    """A router named like an adapter (refused at fit and register, made by a hand edit or a merged copy) was
    reported consistent, though a request naming it is ambiguous (sweep 32)."""
    reg = _setup(settings, tiny_bert, tmp_path)
    reg.put_component("router", "r", method="token-gate", base=str(tiny_bert), config={}, tensors={},
                      members=["a0", "a1"])
    assert api.check(settings=settings).ok
    _edit(reg, "UPDATE components SET name = 'a1' WHERE name = 'r'")
    rep = api.check(settings=settings)
    assert any("router 'a1' and adapter 'a1' share one model name" in p for p in rep.problems), rep.problems


@pytest.mark.parametrize("cache", [INDEX_FILE, GRAPH_FILE])
def test_a_directory_in_place_of_a_cache_is_reported_and_moved_aside(settings, tiny_bert, tmp_path, cache):
    """check said "consistent" and --repair failed with "Is a directory"; the directory is now a problem, and
    --repair moves it aside (what is in it is not the registry's to delete) and rebuilds the cache."""
    reg = _setup(settings, tiny_bert, tmp_path)
    (reg.home / cache).mkdir()
    (reg.home / cache / "keep.txt").write_text("mine")
    rep = api.check(settings=settings)
    assert not rep.ok and any("is not a file" in p for p in rep.problems), rep.problems
    assert api.check(repair=True, settings=settings).ok
    assert (reg.home / cache).is_file()
    aside = [p for p in reg.home.iterdir() if p.name.startswith(cache + ".not-a-cache-")]
    assert len(aside) == 1 and (aside[0] / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("side", ["-wal", "-shm"])
def test_a_directory_in_place_of_sqlites_own_files_is_named(settings, tiny_bert, tmp_path, side):
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    reg.close()
    path = reg.db_path.with_name(reg.db_path.name + side)
    path.unlink(missing_ok=True)
    path.mkdir()
    with pytest.raises(IntegrityError, match=f"registry.db{side} .* is not a file"):
        api.list_adapters(settings)


def test_a_full_disk_still_reads_and_refuses_writes_as_full(settings, tiny_bert, tmp_path, monkeypatch):
    """With no byte free, SQLite cannot open read-write (its -wal/-shm files), and every command, listing
    included, said the database was unreadable; now reading works from a read-only open and a write says the
    disk is full."""
    import sqlite3

    from loraplex.errors import DiskFull
    from loraplex.registry import database

    _setup(settings, tiny_bert, tmp_path).close()
    real = sqlite3.connect

    class Full:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *a):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError("disk I/O error")
            return self.conn.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    def connect(path, *a, uri=False, **kw):
        conn = real(path, *a, uri=uri, **kw)
        return conn if uri else Full(conn)  # the read-only open goes through

    monkeypatch.setattr(database.sqlite3, "connect", connect)
    monkeypatch.setattr(database.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    assert [r.name for r in api.list_adapters(settings)] == ["a0", "a1"]
    assert api.check(settings=settings).ok
    with pytest.raises(DiskFull, match="can be read but not written"):
        api.remove("a0", settings=settings)
    monkeypatch.undo()
    assert [r.name for r in api.list_adapters(settings)] == ["a0", "a1"]


@pytest.mark.parametrize("sql, named", [
    # a lost alpha read as its default, 16: the adapter ran at 16x its scaling and exported so (sweep 14)
    ("UPDATE adapters SET spec = json_remove(spec, '$.alpha') WHERE id = 1", "its stored LoRA settings lack alpha"),
    ("UPDATE adapters SET spec = '{}' WHERE id = 1", "its stored LoRA settings lack r, alpha, target_modules"),
    ("UPDATE adapters SET base = 'gpt9' WHERE id = 1", "its stored base name 'gpt9' is not the name of the base"),
    ("UPDATE adapters SET name = '../evil' WHERE id = 1", "its stored name breaks the naming rules"),
    ("UPDATE adapters SET origin = 'bogus' WHERE id = 1", "its stored record is damaged (ValidationError: origin:"),
    ("UPDATE adapters SET blob = '../../../../etc/passwd' WHERE id = 1",
     "a stored blob id '../../../../etc/passwd' is not a sha256"),
])
def test_hand_edited_records_are_named_by_check(settings, tiny_bert, tmp_path, sql, named):
    """Each was `consistent` to `registry check` (sweep 14): a spec missing a field used its default, a base
    name that is no model broke retrieval over every adapter, a blob id read as a path."""
    reg = _setup(settings, tiny_bert, tmp_path)
    _edit(reg, sql)
    rep = api.check(settings=settings)
    assert not rep.ok and any(named in p for p in rep.problems), rep.problems


def test_a_registry_of_a_newer_schema_is_refused(settings, tiny_bert, tmp_path):
    from loraplex.errors import IntegrityError

    reg = _setup(settings, tiny_bert, tmp_path)
    _edit(reg, "UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(IntegrityError, match="was written by a newer loraplex \\(schema 99; this one reads schema 1\\)"):
        api.list_adapters(settings)
    rep = api.check(settings=settings)
    assert not rep.ok and any("newer loraplex" in p for p in rep.problems), rep.problems


def test_one_damaged_record_does_not_hide_the_others_from_a_listing(settings, tiny_bert, tmp_path, cli):
    """`adapters list` failed for the whole registry on one damaged record, its message pydantic's raw text
    cut mid-word (sweep 14): the rest are listed and the damaged one is named, in one line."""
    reg = _setup(settings, tiny_bert, tmp_path)
    names = [r.name for r in reg.list_adapters()]
    _edit(reg, "UPDATE adapters SET rank = 'abc' WHERE name = ?", names[0])
    damaged: list[str] = []
    assert [r.name for r in api.list_adapters(settings, damaged=damaged)] == names[1:]
    assert damaged == [f"adapter {names[0]!r}: its stored record is damaged (ValidationError: rank: Input should be a "
                       "valid integer, unable to parse string as an integer (got 'abc')); remove it, or register it "
                       "again (`loraplex registry check` lists every such record)"]
    r = cli("adapters", "list", "--home", str(settings.home))
    assert r.exit_code == 0 and names[1] in r.stdout and names[0] not in r.stdout, r.output
    assert r.stderr.count("warning: ") == 1 and f"adapter {names[0]!r}: its stored record is damaged" in r.stderr


def test_a_listing_of_one_base_names_only_that_bases_damage(settings, tiny_bert, tmp_path, cli):
    """`adapters list --base B` warned about damaged records of every base, then hid their adapters."""
    reg = _setup(settings, tiny_bert, tmp_path)
    names = [r.name for r in reg.list_adapters()]
    _edit(reg, "UPDATE adapters SET rank = 'abc', base = 'minilm' WHERE name = ?", names[0])
    r = cli("adapters", "list", "--base", str(tiny_bert), "--home", str(settings.home))
    assert r.exit_code == 0 and names[1] in r.stdout and "warning" not in r.stderr, r.output
    r = cli("adapters", "list", "--base", "minilm", "--home", str(settings.home))
    assert r.exit_code == 0 and r.stderr.count("warning: ") == 1, r.output


def test_two_model_directories_of_one_architecture_are_consistent(settings, tiny_bert, tmp_path):
    """Two checkpoints of one architecture share a fingerprint; `bases` kept the first one's name, and check
    called the second one's adapters inconsistent (sweep 16)."""
    import shutil

    from loraplex import api
    from tests.conftest import make_peft_adapter

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    for i, base in enumerate((tiny_bert, copy)):
        d = make_peft_adapter(tiny_bert, tmp_path / f"p{i}", seed=i)
        api.register(d, name=f"a{i}", description=f"adapter {i}", base=str(base), settings=settings)
    rep = api.check(settings=settings)
    assert rep.ok, rep.problems


def test_repair_says_rebuilt_only_for_caches_it_wrote(settings, tiny_bert, tmp_path, monkeypatch):
    """On a read-only home the cache writes fail (dropped by design) and repair printed "rebuilt" over nothing
    (sweep 17)."""
    import loraplex.registry.check as check

    _setup(settings, tiny_bert, tmp_path)
    monkeypatch.setattr(check, "graph_json", lambda reg: {})  # a write that did not happen
    rep = api.check(repair=True, settings=settings)
    assert "rebuilt the lineage graph" not in rep.repaired and "rebuilt the signature index" in rep.repaired
    assert any("could not write the lineage graph cache" in n for n in rep.notes), rep.notes


def test_run_directories_no_record_uses_are_noted(settings, tiny_bert, tmp_path):
    """A command killed by SIGKILL leaves its run directory (checkpoints, logs) behind, and nothing said so
    (sweep 17): `registry check` now notes run directories of train/router/forget that no record names,
    and leaves a record's own run, a stream's (it resumes from it) and the directories themselves alone."""
    import sqlite3

    reg = _setup(settings, tiny_bert, tmp_path, n=1)
    runs = settings.home / "runs"
    for name in ("train-a0-20261206-000000", "train-killed-20261206-000001", "stream-s-20261206-000002"):
        (runs / name).mkdir(parents=True)
    with sqlite3.connect(settings.home / "registry.db") as c:
        c.execute("UPDATE adapters SET extra = json_set(extra, '$.run_dir', ?) WHERE name = 'a0'",
                  (str(runs / "train-a0-20261206-000000"),))
    rep = api.check(settings=settings)
    assert rep.ok, rep.problems
    idle = [n for n in rep.notes if "run director" in n]
    assert len(idle) == 1 and idle[0].startswith("1 run directory under") and "(train-killed-20261206-000001)" in idle[0]
    assert all((runs / n).is_dir() for n in ("train-a0-20261206-000000", "train-killed-20261206-000001"))
    assert reg.count() == 1
    # a home that was moved or copied: the record names the run under the old home, and it is still its run
    with sqlite3.connect(settings.home / "registry.db") as c:
        c.execute("UPDATE adapters SET extra = json_set(extra, '$.run_dir', ?) WHERE name = 'a0'",
                  (str(tmp_path / "old-home" / "runs" / "train-a0-20261206-000000"),))
    idle = [n for n in api.check(settings=settings).notes if "run director" in n]
    assert len(idle) == 1 and "(train-killed-20261206-000001)" in idle[0]


def test_an_adapter_whose_composition_lost_a_member_is_a_problem(settings, tiny_bert, tmp_path):
    """A forgetting adapter whose composition names an adapter that is gone (deleted by hand, or before
    add_adapter checked members) cannot load; check called such a registry consistent (sweep 24)."""
    reg = _setup(settings, tiny_bert, tmp_path)
    _edit(reg, "UPDATE adapters SET origin = 'forgetting', extra = json_set(extra, '$.composition', "
               "json('[\"a1\", \"a0\"]')) WHERE name = 'a0'")
    assert api.check(settings=settings).ok
    _edit(reg, "DELETE FROM adapters WHERE name = 'a1'")
    rep = api.check(settings=settings)
    assert any("adapter 'a0' answers with a composition whose adapters a1 are gone" in p for p in rep.problems), rep.problems


def test_a_signature_that_is_not_finite_is_named_and_said_where_it_is_left_out(settings, tiny_bert, tmp_path):
    """A NaN stored embedding dropped the adapter from search and routing without a word, and check said
    three generic problems naming no adapter, which --repair 'rebuilt' and kept (sweep 24)."""
    import warnings

    from loraplex.errors import LoraplexWarning

    reg = _setup(settings, tiny_bert, tmp_path)
    dim = reg.signature_dim()
    _edit(reg, "UPDATE adapters SET embedding = ? WHERE name = 'a1'", np.full(dim, np.nan, np.float32).tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hits = api.search("task number 1", settings=settings)
    assert "a1" not in {h["name"] for h in hits}
    assert any(issubclass(w.category, LoraplexWarning) and "adapter 'a1': its stored description embedding is "
               "damaged (not finite): it is left out of search and routing" in str(w.message) for w in caught)
    for repair in (False, True):
        rep = api.check(repair=repair, settings=settings)
        assert rep.problems == ["adapter 'a1': its stored description embedding is damaged (not finite); remove it, "
                                "or register it again"], rep.problems


def test_reading_does_not_wait_for_the_write_lock_to_save_a_cache(settings, tiny_bert, tmp_path):
    """Search (and retrieval, auto) waited up to the lock's 120 s, e.g. for a whole `registry check`, only to
    save the index it had built (sweep 24): the save is best effort, the index kept in memory."""
    import time

    from loraplex.registry.store import Registry

    reg = _setup(settings, tiny_bert, tmp_path)
    other = Registry(reg.home, embedder="hash")  # another process's lock: its own descriptor
    with other.write_lock():
        t0 = time.monotonic()
        assert api.search("task number 1", settings=settings)
        api.graph(settings)
        assert time.monotonic() - t0 < 10
    assert not (reg.home / INDEX_FILE).exists()  # not saved while the lock was held: built again next time
    drop_cached(reg.home / INDEX_FILE)
    api.search("task number 1", settings=settings)
    assert (reg.home / INDEX_FILE).exists()


def test_the_registrys_own_storage_failing_is_named_as_such(settings, tiny_bert, tmp_path):
    """blobs/ replaced by a file: 'Not a directory (.../blobs/d2)', exit 2 as if the user's input were bad;
    orphaned-blobs a file: --repair died midway with 'File exists', no report (sweep 24)."""
    import shutil

    from loraplex.errors import LoraplexError, UserInputError

    reg = _setup(settings, tiny_bert, tmp_path)
    sha = reg.put_blob(b"an interrupted write left me here")
    (reg.home / "orphaned-blobs").write_text("not a folder")
    rep = api.check(repair=True, settings=settings)
    assert any(p.startswith(f"moving unreferenced blobs to {reg.orphan_dir} failed after 0 of 1") for p in rep.problems)
    assert any("rebuilt" in r for r in rep.repaired), rep.repaired  # what it did before is reported
    reg.blob_path(sha).unlink()
    shutil.rmtree(reg.blob_dir)
    reg.blob_dir.write_text("not a folder")
    with pytest.raises(LoraplexError, match="the registry's blob directory .* cannot be written") as got:
        reg.put_blob(b"new weights")
    assert not isinstance(got.value, UserInputError)


def _interrupted_at_each_line(fn, start: str, end: str, enter) -> list[int]:
    """Run `with enter(): pass` once per source line of the context manager `fn` from the line after the one
    holding `start` to the one that is `end`, a KeyboardInterrupt raised at that line (what a Ctrl-C there does);
    returns the lines, after each run."""
    import inspect
    import sys

    src, first = inspect.getsourcelines(fn)
    at = next(i for i, line in enumerate(src) if start in line)
    body = next(i for i, line in enumerate(src) if line.strip() == end and i > at)
    lines = [first + i for i in range(at + 1, body + 1) if src[i].strip() and not src[i].strip().startswith("#")]
    for lineno in lines:
        fired = []

        def trace(frame, event, arg, lineno=lineno, fired=fired):
            if event == "call":
                return trace if frame.f_code is fn.__code__ else None
            if event == "line" and frame.f_lineno == lineno and not fired:
                fired.append(lineno)
                raise KeyboardInterrupt
            return trace

        sys.settrace(trace)
        try:
            with enter():
                pass
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        yield lineno


def test_an_interrupt_right_after_the_lock_is_taken_releases_it(tmp_path):
    """A Ctrl-C between the flock and the body's try kept the lock on a leaked fd for the rest of the process's
    life: every later write, here and in the CLI, waited 120 s and failed "locked by another process" (sweep 55).
    The interrupt is raised at each line of write_lock from the flock to the body, one run each."""
    from loraplex.errors import RegistryBusy
    from loraplex.registry.database import Database
    from loraplex.registry.store import Registry

    reg = Registry(tmp_path / "h", lock_timeout=0.3)
    seen = 0
    for lineno in _interrupted_at_each_line(Database.write_lock.__wrapped__, "LOCK_EX", "yield", reg.write_lock):
        seen += 1
        try:
            with Registry(tmp_path / "h", lock_timeout=0.3).write_lock():
                pass
        except RegistryBusy:
            pytest.fail(f"the lock stayed taken after an interrupt at line {lineno}")
        with reg.write_lock():  # and this registry object can write again
            pass
    assert seen >= 2


def test_an_interrupt_right_after_a_write_transaction_begins_rolls_it_back(tmp_path):
    """A Ctrl-C between BEGIN IMMEDIATE and the try that rolls back left the connection in an open write
    transaction: other processes' writes hung, this one read the registry as "database is locked" (sweep 55)."""
    from loraplex.registry.database import Database
    from loraplex.registry.store import Registry

    reg = Registry(tmp_path / "h")
    reg.list_adapters()
    seen = 0
    for lineno in _interrupted_at_each_line(Database.transaction.__wrapped__, "BEGIN IMMEDIATE", "yield conn",
                                            reg.transaction):
        seen += 1
        assert not reg._db().in_transaction, f"a write transaction stayed open after an interrupt at line {lineno}"
        with reg.transaction():  # and it writes again
            pass
    assert seen >= 1


@pytest.mark.parametrize("what", ["dangling-link", "socket", "link-to-a-directory"])
def test_what_check_calls_a_broken_lock_every_writer_refuses_and_repair_removes(settings, tiny_bert, tmp_path, what):
    """A dangling link in the lock's place: check said every write fails, while writers followed it and created its
    target outside the home; a socket failed writes as "No such device or address"; a link to an empty directory
    was one check's --repair hint said it would remove, and did not (sweep 70). Writers refuse what check reports,
    in its words, and --repair removes the link or the file (never what a link points to)."""
    import socket

    from loraplex.errors import LockUnavailable

    reg = _setup(settings, tiny_bert, tmp_path, n=1)
    reg.lock_path.unlink()
    outside = tmp_path / "outside"
    if what == "dangling-link":
        reg.lock_path.symlink_to(outside)
    elif what == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(reg.lock_path))
        sock.close()
    else:
        outside.mkdir()
        reg.lock_path.symlink_to(outside)
    rep = api.check(settings=settings)
    [problem] = [p for p in rep.problems if "registry.lock" in p]
    said = problem.split("registry.lock: ", 1)[1].split("; every write fails")[0]
    with pytest.raises(LockUnavailable) as exc:
        with reg.write_lock():
            pass
    assert str(exc.value).endswith(said) and "--repair` does" in said, (str(exc.value), said)
    assert not (what == "dangling-link" and outside.exists())  # nothing created through the link
    rep = api.check(repair=True, settings=settings)
    assert rep.ok and any("removed what stood in the registry lock's place" in r for r in rep.repaired), rep
    assert reg.lock_path.is_file() and (what != "link-to-a-directory" or outside.is_dir())
