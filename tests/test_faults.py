"""Registry faults (a blob's place taken by a directory, the blob directory a file): every command that
reads the blob says so in one line with exit 1 (damage, not a bad input), and `registry check` reports the
fault instead of stopping at it."""

import json
import shutil

import pytest

from tests.conftest import registry_state
from tests.test_cli_bad_input import seeded  # noqa: F401  (fixture)


def _blob(home):
    from loraplex.registry.store import Registry

    reg = Registry(home)
    return reg.blob_path(reg.get_adapter("good").blob)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["blob-is-a-directory", "blobs-is-a-file", "blob-is-a-fifo", "blob-is-dev-zero"])
def test_a_blob_that_cannot_be_read_is_damage(cli, seeded, tmp_path, damage):
    import os

    path = _blob(cli.home)
    if damage == "blob-is-a-directory":  # was exit 2 "Is a directory", and `registry check` stopped there
        path.unlink()
        path.mkdir()
    elif damage == "blob-is-a-fifo":  # every reader blocked for ever (sweep 53)
        path.unlink()
        os.mkfifo(path)
    elif damage == "blob-is-dev-zero":  # read until the memory ran out (sweep 53)
        path.unlink()
        path.symlink_to("/dev/zero")
    else:
        shutil.rmtree(cli.home / "blobs")
        (cli.home / "blobs").write_text("not a directory")
    before = registry_state(cli.home)
    for args in (("query", "late flight", "--adapters", "good"), ("adapters", "export", "good", tmp_path / "out")):
        r = cli(*args)
        err = r.stderr.strip()
        assert r.exit_code == 1, (r.exit_code, err)
        assert err.startswith("error: adapter 'good': blob ") and "cannot be read" in err and len(err.splitlines()) == 1, err
    r = cli("registry", "check", "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.stdout)
    assert any("adapter 'good': blob" in p and "cannot be read" in p for p in rep["problems"]), rep
    assert registry_state(cli.home) == before


def test_registering_again_repairs_a_blob_whose_place_a_directory_took(cli, seeded, tiny_bert, tmp_path):
    """The store's promise (registering the same content again repairs a damaged blob) failed for a directory:
    exit 2 naming a temporary file that did not exist (sweep 54). An empty one is replaced; one holding files is
    named as damage, in one line, exit 1, and left to the user."""
    path = _blob(cli.home)
    path.unlink()
    path.mkdir()
    (path / "kept.txt").write_text("someone's file")
    r = cli("adapters", "register", seeded, "--name", "again", "--description", "airline tweets", "--base", tiny_bert)
    err = r.stderr.strip()
    assert r.exit_code == 1 and len(err.splitlines()) == 1 and "taken by a directory that is not empty" in err, r.output
    assert (path / "kept.txt").exists()
    (path / "kept.txt").unlink()
    r = cli("adapters", "register", seeded, "--name", "again", "--description", "airline tweets", "--base", tiny_bert)
    assert r.exit_code == 0, r.output
    assert path.is_file()
    r = cli("adapters", "export", "good", tmp_path / "out")  # the first adapter reads again
    assert r.exit_code == 0, r.output


def _full_disk(*a, **k):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_under_a_write_names_the_file(tmp_path, monkeypatch):
    """write() and fsync() name no file: a full disk was `the disk is full (No space left on device)`
    (sweep 17); safetensors' save_file raised its own SafetensorError, an internal error."""
    import os

    import torch

    from loraplex.errors import DiskFull, os_error
    from loraplex.fsio import atomic_write, write_tensors

    monkeypatch.setattr(os, "fsync", _full_disk)
    for write in (lambda p: atomic_write(p, b"x"), lambda p: write_tensors(p, {"a": torch.zeros(2)})):
        with pytest.raises(OSError) as exc:
            write(tmp_path / "out.bin")
        err = os_error(exc.value)
        assert isinstance(err, DiskFull) and str(err) == f"the disk is full ({tmp_path / 'out.bin'})"
        assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_an_export_to_a_full_disk_is_one_line_and_leaves_no_directory(cli, seeded, tmp_path, monkeypatch):
    import loraplex.experts.peft_io as peft_io

    monkeypatch.setattr(peft_io, "write_tensors", _full_disk)
    out = tmp_path / "new" / "out"
    r = cli("adapters", "export", "good", str(out))
    assert r.exit_code == 1 and r.stderr.startswith("error: the disk is full"), r.output
    assert not (tmp_path / "new").exists()  # was left behind, empty


def test_a_removal_whose_blob_cannot_be_deleted_succeeds_and_says_so(cli, seeded, monkeypatch):
    """The record was removed (committed), then unlinking its blob failed (EACCES): the command said only
    `error: Permission denied` with exit 2, and a re-run found no such adapter (sweep 17)."""
    import errno
    from pathlib import Path

    blob = _blob(cli.home)
    unlink = Path.unlink

    def refused(self, *a, **k):
        if self == blob:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", refused)
    r = cli("adapters", "remove", "good")
    assert r.exit_code == 0 and "removed good" in r.stdout, r.output
    assert f"warning: could not delete the unused blob {blob} (Permission denied)" in r.stderr, r.stderr
    assert blob.exists() and cli("adapters", "list", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("what", ["home", "registry.db"])
def test_a_registry_this_process_cannot_write_is_read_and_writes_are_refused(cli, seeded, monkeypatch, what):
    """A home (or a registry.db) this process cannot write: writes said "the registry database failed: attempt
    to write a readonly database" and sent the user to `registry check`; a registry.db of mode 0444 failed
    every command, listing included, as "unreadable" (sweep 17)."""
    import os

    target = cli.home if what == "home" else cli.home / "registry.db"
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if (str(p) == str(target) and mode == os.W_OK)
                        else access(p, mode, **k))
    before = registry_state(cli.home)
    listed = cli("adapters", "list", "--json")
    assert listed.exit_code == 0 and '"good"' in listed.stdout, listed.output
    r = cli("adapters", "remove", "good")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == (f"error: cannot write the registry at {cli.home}: "
                                + (f"its directory {cli.home}" if what == "home" else f"{target}")
                                + " is not writable (nothing was changed)"), r.stderr
    assert registry_state(cli.home) == before


def test_a_component_over_a_member_replaced_while_it_was_made_is_not_stored(cli, seeded):
    """An adapter removed and registered anew (other weights) while `router fit` ran: the router was stored
    over the new adapter with what it learned of the old one, and `registry check` said consistent (sweep 17)."""
    import torch

    from loraplex.errors import LoraplexError
    from loraplex.registry.store import Registry

    reg = Registry(cli.home)
    before = registry_state(cli.home)
    kw = dict(method="token-gate", base="b", config={}, tensors={"w": torch.zeros(2)}, members=["good"])
    with pytest.raises(LoraplexError, match="adapter 'good' was registered anew \\(other weights\\) while this router"):
        reg.put_component("router", "r", member_blobs={"good": "0" * 64}, **kw)
    assert registry_state(cli.home) == before
    rec = reg.put_component("router", "r", member_blobs={"good": reg.get_adapter("good").blob}, **kw)
    assert list(rec.members) == ["good"]


def test_a_new_registry_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    """The first write into a new home on a full disk said the home was not writable ("its WAL has changes"), or
    "the database failed: no such table" over a half-made schema (sweep 17)."""
    import sqlite3

    import loraplex.registry.database as database
    from loraplex.errors import DiskFull
    from loraplex.registry.store import Registry

    connect = sqlite3.connect

    class Full:
        def __init__(self, conn):
            self.conn = conn

        def executescript(self, script):
            raise sqlite3.OperationalError("database or disk is full")

        def __getattr__(self, name):
            return getattr(self.conn, name)

    monkeypatch.setattr(database.sqlite3, "connect", lambda *a, **k: Full(connect(*a, **k)))
    with pytest.raises(DiskFull, match="the disk is full: cannot create the registry in"):
        Registry(tmp_path / "new")._db()  # the first write opens it read-write, creating the schema


def test_a_process_out_of_file_descriptors_is_not_a_damaged_registry(cli, seeded, monkeypatch):
    """SQLite says "unable to open database file" whatever the reason; under `ulimit -n` at its limit the
    registry was called "unreadable", as if damaged. The OS error behind it is named."""
    import errno
    import os
    import sqlite3

    import loraplex.registry.database as database
    from loraplex.errors import IntegrityError, LoraplexError
    from loraplex.registry.store import Registry

    connect, real_open = sqlite3.connect, os.open

    class NoFiles:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, *a):
            raise sqlite3.OperationalError("unable to open database file")

        def __getattr__(self, name):
            return getattr(self.conn, name)

    def no_descriptor(path, *a, **k):
        if str(path).endswith("registry.db"):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(database.sqlite3, "connect", lambda *a, **k: NoFiles(connect(*a, **k)))
    monkeypatch.setattr(database.os, "open", no_descriptor)
    with pytest.raises(LoraplexError, match="too many open files .*ulimit -n") as got:
        Registry(cli.home)._db()
    assert not isinstance(got.value, IntegrityError)
    monkeypatch.setattr(database.os, "open", real_open)  # the file opens: SQLite's reason stands, as damage
    with pytest.raises(IntegrityError, match="is unreadable: unable to open database file"):
        Registry(cli.home)._db()


def test_running_out_of_memory_is_said_not_an_internal_error(cli, tiny_bert, tmp_path, monkeypatch):
    """A task file far below the 1 GiB bound took ~20x its size in memory, and under a memory limit the
    command ended in 'internal error, MemoryError' (exit 70, a bug by the README: sweep 23)."""
    import json

    import loraplex.data as data

    f = tmp_path / "big.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(20)))
    (tmp_path / "big.task.json").write_text(json.dumps({"description": "a or b"}))

    def no_room(path, lines=None):
        raise MemoryError()

    monkeypatch.setattr(data, "read_rows", no_room)
    r = cli("eval", "--task", f, "--base", tiny_bert, "--limit", "2")
    assert r.exit_code == 2 and f"{f}: its " in r.stderr and "do not fit in this process's memory" in r.stderr, r.output
    monkeypatch.undo()
    import loraplex.api as api

    def no_room_either(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(api, "search", no_room_either)
    r = cli("adapters", "search", "flights")
    assert r.exit_code == 1 and r.stderr.startswith("error: out of memory (MemoryError: cannot allocate)"), r.output
    assert "internal error" not in r.stderr


def test_an_adapter_removed_after_its_record_was_read_is_not_damage(cli, seeded, tiny_bert):
    """A generator's members were read record first, blob after; a removal between the two was reported as
    "blob ... is missing", a damaged registry, on a sound one (sweep 55). A missing blob of a record that is
    still there stays damage."""
    from loraplex.errors import AdapterNotFound, IntegrityError
    from loraplex.registry.store import Registry

    reg = Registry(cli.home)
    rec = reg.get_adapter("good")
    assert cli("adapters", "remove", "good").exit_code == 0
    with pytest.raises(AdapterNotFound, match="'good' was removed or registered anew while it was being read"):
        reg.load_adapter(rec)
    r = cli("adapters", "register", seeded, "--name", "good", "--description", "airline tweets", "--base", tiny_bert)
    assert r.exit_code == 0, r.output
    now = reg.get_adapter("good")
    reg.blob_path(now.blob).unlink()
    with pytest.raises(IntegrityError, match="is missing"):
        reg.load_adapter(now)


def test_a_stop_after_the_commit_says_what_was_saved(cli, seeded, tiny_bert, monkeypatch):
    """A Ctrl-C or SIGTERM landing after `adapters register` committed (in the lock's release, before the command
    read its record back) said "interrupted", exit 130, as if nothing was done; the adapter was registered, and the
    rerun was refused as a duplicate (sweep 67). The line says what was saved before the stop."""
    from loraplex.errors import Terminated
    from loraplex.registry.store import Registry

    fetched = Registry.get_adapter

    def stopped(self, name, *a, **k):
        if name == "late":
            raise stop
        return fetched(self, name, *a, **k)

    monkeypatch.setattr(Registry, "get_adapter", stopped)
    for stop, code, head in ((KeyboardInterrupt(), 130, "interrupted"),
                             (Terminated("SIGTERM"), 143, "error: terminated (SIGTERM) before the command finished")):
        r = cli("adapters", "register", seeded, "--name", "late", "--description", "airline tweets", "--base", tiny_bert)
        err = r.stderr.strip()
        assert r.exit_code == code, (r.exit_code, err)
        assert err.startswith(head) and err.endswith("; saved before it: register adapter 'late'"), err
        assert len(err.splitlines()) == 1, err
        monkeypatch.setattr(Registry, "get_adapter", fetched)
        assert cli("adapters", "remove", "late").exit_code == 0  # it was registered
        monkeypatch.setattr(Registry, "get_adapter", stopped)
    r = cli("adapters", "show", "good")  # a later command in the same process is not told of those writes
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(Registry, "get_adapter", fetched)

    def before_commit(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Registry, "_insert_adapter", before_commit)
    before = registry_state(cli.home)
    r = cli("adapters", "register", seeded, "--name", "late", "--description", "airline tweets", "--base", tiny_bert)
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted", r.stderr  # nothing saved: nothing said
    assert registry_state(cli.home) == before


def test_a_ctrl_c_while_the_interpreter_exits_prints_no_traceback(tmp_path):
    """A Ctrl-C after the command had answered (during the interpreter's exit, in torch's atexit finalizers) raised
    the CLI's KeyboardInterrupt there: Python's "Exception ignored in atexit callback" and a traceback under the
    answer (sweep 67). The command has reported; its exit ignores Ctrl-C."""
    import os
    import subprocess
    import sys

    code = ("import atexit, os, signal, time\n"
            "def late():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.2)\n"
            "atexit.register(late)\n"
            "from loraplex.cli import main\n"
            "main()\n")
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, "adapters", "list"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr


def test_an_export_removes_what_a_killed_export_left_in_its_directory(cli, seeded, tmp_path):
    """An export killed mid-write (SIGKILL) left its hidden staging directory, a half-written weights file in it,
    inside the exported adapter's directory, and no later export removed it (sweep 67). The next export into that
    directory removes a staging directory whose process is gone, and leaves one of a process still running."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    assert cli("adapters", "export", "good", out).exit_code == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = out / f".loraplex-export-{int(gone.stdout)}-abcd1234"
    dead.mkdir()
    (dead / ".adapter_model.safetensors.x1").write_bytes(b"\0" * 1024)
    alive = out / f".loraplex-export-{os.getpid()}-efgh5678"  # this process runs: an export under way
    alive.mkdir()
    old = out / ".loraplex-export-k3j_x9q2"  # an older loraplex's name (no process id), an hour and more ago
    old.mkdir()
    os.utime(old, (os.path.getmtime(old) - 7200,) * 2)
    recent = out / ".loraplex-export-ab_cd123"  # one of those made a moment ago: perhaps still being written
    recent.mkdir()
    r = cli("adapters", "export", "good", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not dead.exists() and alive.is_dir() and not old.exists() and recent.is_dir()
    recent.rmdir()
    assert sorted(p.name for p in out.iterdir()) == sorted([alive.name, "adapter_config.json", "adapter_model.safetensors"])


def test_a_generator_fit_on_a_registry_it_cannot_write_is_refused_before_fitting(cli, seeded, tiny_bert, monkeypatch):
    """`generate fit` on a read-only home (or a full disk) fitted the whole generator, then could not store it
    (sweep 67); `train` and `router fit` refuse at once. It is refused before the fit, as they are."""
    import os

    from loraplex.generators import workflow

    assert cli("adapters", "register", seeded, "--name", "good2", "--description", "airline tweets again",
               "--base", tiny_bert).exit_code == 0
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if (str(p) == str(cli.home) and mode == os.W_OK)
                        else access(p, mode, **k))
    fitted = []
    monkeypatch.setattr(workflow, "training_set", lambda *a, **k: fitted.append(1))
    before = registry_state(cli.home)
    r = cli("generate", "fit", "g", "--method", "sg-lora", "--adapters", "good,good2")
    said = f"error: cannot write the registry at {cli.home}: its directory {cli.home} is not writable (nothing was changed)"
    assert r.exit_code == 1 and r.stderr.strip() == said, r.stderr
    assert not fitted and registry_state(cli.home) == before
    # train too (it trained, evaluated, then could not register: sweep 70), before the base is even loaded
    from loraplex.continual import fit as fit_module

    monkeypatch.setattr(fit_module, "load_base", lambda *a, **k: fitted.append(1))
    r = cli("train", "airline", "--name", "t1", "--base", tiny_bert, "--steps", "1")
    assert r.exit_code == 1 and r.stderr.strip() == said, r.stderr
    assert not fitted and registry_state(cli.home) == before


def test_a_file_size_limit_too_small_for_sqlite_is_named_not_called_damage(tmp_path):
    """Under `ulimit -f 16` every command, listing included, said the database was "unreadable: disk I/O error"
    (sweep 67): SQLite could not size its -shm file, and the database was fine. The limit is named."""
    import os
    import resource
    import subprocess
    import sys

    from loraplex.registry.store import Registry

    home = tmp_path / "home"
    reg = Registry(home)
    reg._db()
    reg.close()
    for side in ("registry.db-wal", "registry.db-shm"):
        (home / side).unlink(missing_ok=True)
    env = {**os.environ, "LORAPLEX_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    p = subprocess.run([sys.executable, "-c", "from loraplex.cli import main; main()", "adapters", "list"],
                       capture_output=True, text=True, env=env, timeout=120, preexec_fn=small_files)
    assert p.returncode == 1 and p.stderr.strip() == (f"error: cannot open registry database {home / 'registry.db'}: "
                                                      "disk I/O error; this process may write files of at most 16,384 "
                                                      "bytes (ulimit -f): raise the limit"), p.stderr


def test_a_write_past_the_file_size_limit_names_it(monkeypatch, capsys):
    """Under `ulimit -f` a write to the database (or a blob) failed as "the registry database failed: disk I/O
    error (run `loraplex registry check`)", and check then found nothing (sweep 70): the limit is named wherever
    such a failure is reported (the CLI, the server, an OS error's line)."""
    import errno
    import sqlite3

    from loraplex import errors
    from loraplex.cli._errors import report
    from loraplex.serve.app import api_error

    monkeypatch.setattr(errors, "file_size_limit", lambda: 73728)
    assert report(sqlite3.OperationalError("disk I/O error")) == 1
    assert capsys.readouterr().err.strip() == ("error: the registry database failed: disk I/O error; this process may "
                                               "write files of at most 73,728 bytes (ulimit -f): raise the limit")
    assert "73,728 bytes (ulimit -f)" in api_error(sqlite3.OperationalError("disk I/O error")).message
    err = errors.os_error(OSError(errno.EFBIG, "File too large", "/r/blobs/ab/ab.safetensors"))
    assert str(err) == ("File too large (/r/blobs/ab/ab.safetensors); this process may write files of at most 73,728 "
                        "bytes (ulimit -f): raise the limit")
    monkeypatch.setattr(errors, "file_size_limit", lambda: None)  # no limit: as before
    assert report(sqlite3.OperationalError("disk I/O error")) == 1
    assert capsys.readouterr().err.strip().endswith("disk I/O error (run `loraplex registry check`)")
