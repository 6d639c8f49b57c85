"""The registry's database: one SQLite file (WAL, synchronous=FULL), its schema, the writers' lock.

`Database` opens the connection on first use (creating the schema), serialises writers on an advisory
lock (`registry.lock`, fcntl; re-entrant within one object), and runs every change in one transaction
that also bumps the `generation` counter the caches (faiss index, lineage graph) compare against.
`registry/store.py`'s `Registry` builds on it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import sqlite3
import stat
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from loraplex.errors import (DiskFull, IntegrityError, LockUnavailable, LoraplexError, LoraplexWarning, RegistryBusy,
                             UserInputError, check_termination, file_size_note, os_error)
from loraplex.fsio import user_path

SCHEMA_VERSION = 1
EPOCHS_KEPT = 4096
"""Writes whose random marks (table `epochs`) the database keeps: a cache that many writes behind is rebuilt."""
LOCK_NOTE_S = 1.0
"""A writer that has waited this long for the lock says so, once per wait (then waits on, up to its timeout)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS epochs(generation INTEGER PRIMARY KEY, epoch TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bases(sha TEXT PRIMARY KEY, name TEXT NOT NULL, fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    base TEXT NOT NULL,
    base_sha TEXT NOT NULL,
    family TEXT NOT NULL,
    description TEXT NOT NULL,
    task TEXT,
    origin TEXT NOT NULL,
    spec TEXT NOT NULL,
    blob TEXT NOT NULL,
    n_params INTEGER NOT NULL,
    modules INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    extra TEXT NOT NULL,
    embedding BLOB NOT NULL,
    prototype BLOB,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edges(
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY(adapter_id, target, kind)
);
CREATE TABLE IF NOT EXISTS snapshots(
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    blob TEXT NOT NULL,
    PRIMARY KEY(adapter_id, step)
);
CREATE TABLE IF NOT EXISTS components(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    base TEXT NOT NULL,
    config TEXT NOT NULL,
    blob TEXT NOT NULL,
    members TEXT NOT NULL,
    metrics TEXT NOT NULL,
    extra TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE(kind, name)
);
"""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now() -> str:
    """The time now, UTC, ISO 8601 to the second (records' created_at)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def stored_record(what: str) -> Iterator[None]:
    """Around reading one record's stored fields (JSON columns, pydantic models): a value damaged inside the
    database (edited by hand, a bad page) is an IntegrityError naming the record, not a traceback."""
    from pydantic import ValidationError

    try:
        yield
    except (ValueError, TypeError, ValidationError) as exc:  # json's JSONDecodeError is a ValueError
        raise IntegrityError(f"{what}: its stored record is damaged ({damage_detail(exc)}); remove it, or "
                             "register it again (`loraplex registry check` lists every such record)") from None


def damage_detail(exc: BaseException) -> str:
    """What a stored value's parse failed on, in a line: pydantic's first error (not its whole text cut
    mid-word), else the error's own words."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        detail = f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']} (got {str(e.get('input'))[:40]!r})"
    else:
        detail = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {detail}"


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """ENOSPC from a file write, SQLite's SQLITE_FULL, or SQLite's 'disk I/O error' on a disk with no space left."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        if getattr(exc, "sqlite_errorcode", None) == 13 or "database or disk is full" in text:
            return True
        if "disk i/o error" in text and where is not None:
            try:
                return shutil.disk_usage(where).free < (1 << 20)
            except OSError:
                return False
    return False


def lock_problem(lock: Path) -> str | None:
    """What is wrong with what stands in the registry lock's place, or None (no file yet, or a regular file, a
    link to one included): every writer refuses the same things `registry check` reports, and says how to mend
    them. A dangling link was followed and its target created outside the home; a FIFO took flock; a socket
    failed as "No such device or address" (sweeps 67, 70)."""
    if lock.is_symlink():
        if not lock.exists():
            return "it is a symbolic link to nothing; remove it (`loraplex registry check --repair` does)"
        if not lock.is_file():
            return ("it is a symbolic link to something that is not a regular file; remove it (`loraplex registry "
                    "check --repair` does)")
        return None
    if not lock.exists() or lock.is_file():
        return None
    if lock.is_dir():
        return ("it is a directory; remove it" + (" (`loraplex registry check --repair` removes an empty one)"
                                                  if not any(lock.iterdir()) else ""))
    return "it is not a regular file (a special file); remove it (`loraplex registry check --repair` does)"


class Database:
    """A registry home's SQLite database and lock (see the module docstring)."""

    def __init__(self, home: str | os.PathLike, *, lock_timeout: float = 120.0):
        self.home = user_path(home).absolute()
        if self.home.exists() and not self.home.is_dir():
            raise UserInputError(f"registry home {self.home} is not a directory")
        if self.home.is_symlink() and not self.home.exists():  # an unmounted disk read as an empty registry, and a
            try:                                                # write said "File exists" (sweep 32)
                self.home.resolve(strict=True)
                why = "does not exist"
            except RuntimeError:
                why = "is a loop of symbolic links"
            except OSError as exc:
                why = "is a loop of symbolic links" if exc.errno == errno.ELOOP else "does not exist"
            raise UserInputError(f"registry home {self.home} is a symbolic link to {os.readlink(self.home)}, which {why}")
        if not self.home.exists():  # one that can never be made (a file on its path) read as an empty registry
            above = next((p for p in self.home.parents if p.exists() or p.is_symlink()), None)
            if above is not None and not above.is_dir():
                raise UserInputError(f"registry home {self.home} cannot be made: {above} is not a directory")
        self.db_path = self.home / "registry.db"
        self.lock_path = self.home / "registry.lock"
        self.lock_timeout = lock_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock_depth = 0
        self._commits = 0
        self._lock_fd: int | None = None
        self._full = False  # opened read-only because the disk had no room left (`_db`)
        self._ro_why: str | None = None  # opened read-only because this process cannot write it: what it cannot write

    # ------------------------------------------------------------------------------------------
    # connection, schema, locking

    @property
    def exists(self) -> bool:
        if self.db_path.exists() and not self.db_path.is_file():  # a directory there is a damaged home, not an empty one
            raise IntegrityError(f"registry database {self.db_path} is not a file")
        for side in ("-wal", "-shm"):  # SQLite's own files beside it: its messages would blame registry.db
            p = self.db_path.with_name(self.db_path.name + side)
            if p.exists() and not p.is_file():
                raise IntegrityError(f"{p} (SQLite's {'write-ahead log' if side == '-wal' else 'shared-memory file'} "
                                     f"of the registry database) is not a file: move it away")
        wal = self.db_path.with_name(self.db_path.name + "-wal")  # a WAL with frames still holds the database
        missing = not self.db_path.exists()
        if missing or (self.db_path.stat().st_size == 0 and not (wal.is_file() and wal.stat().st_size)):
            blobs = self.home / "blobs"
            if blobs.is_dir() and next(blobs.rglob("*.safetensors"), None) is not None:
                # SQLite reads 0 bytes (or no file) as a new database: every record would be gone without a
                # word, and the next write would start a registry in which every stored blob is an orphan
                state = "missing" if missing else "empty (0 bytes)"
                raise IntegrityError(f"registry database {self.db_path} is {state} but adapters are stored in "
                                     f"{blobs}: restore it from a backup, or move {blobs} away to start an "
                                     "empty registry")
        return self.db_path.is_file()

    def _db(self, create: bool = True) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.exists and not create:
                return None
            unwritable = self._unwritable() if self.exists else None
            if unwritable is not None:
                self._conn, self._ro_why = self._read_only(), unwritable
                return self._conn
            self.home.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
            except sqlite3.Error as exc:
                raise LoraplexError(f"cannot open registry database {self.db_path}: {exc}") from None
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=60000")
                self._check_schema(conn)  # before the schema script: a newer registry is not written to
                conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")  # all tables or none (a full disk)
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', '0')")
            except sqlite3.DatabaseError as exc:
                failure = self._open_failure(exc)  # before close: its open files may be why it failed
                conn.close()
                if is_disk_full(exc, self.home) and self.db_path.is_file():
                    # opening read-write needs room for SQLite's -wal/-shm files: with none left, read what is
                    # there (listing, searching, checking, querying work) and refuse writes as a full disk
                    try:
                        self._conn, self._full = self._read_only(), True
                    except LoraplexError:  # nothing to read yet (a registry being created): the disk, said so
                        raise DiskFull(f"the disk is full: cannot create the registry in {self.home} (nothing was "
                                       "changed; free some space and try again)") from None
                    return self._conn
                raise failure from None
            self._conn = conn
        return self._conn

    def _open_failure(self, exc: sqlite3.DatabaseError) -> LoraplexError:
        """What SQLite's failure to read registry.db means. "unable to open database file" hides the OS
        error: a process out of file descriptors (EMFILE) is not a damaged registry, so the file is opened
        once more here to learn the errno."""
        if "unable to open database file" in str(exc):
            try:
                os.close(os.open(self.db_path, os.O_RDONLY))
            except OSError as os_exc:
                if os_exc.errno in (errno.EMFILE, errno.ENFILE):
                    return LoraplexError(f"cannot open registry database {self.db_path}: too many open files "
                                         "(the process's limit is reached: raise `ulimit -n`)")
                return os_error(os_exc)
        note = file_size_note(exc)
        if note:  # SQLite cannot size its 32 KiB -shm file under `ulimit -f 16`: the database is fine (sweep 67)
            return LoraplexError(f"cannot open registry database {self.db_path}: {exc}{note}")
        return IntegrityError(f"registry database {self.db_path} is unreadable: {exc}")

    def _unwritable(self) -> str | None:
        """What of the registry this process cannot write (its home directory, registry.db, SQLite's -wal or
        -shm file), or None. Opened read-write anyway, SQLite failed with "attempt to write a readonly
        database", and a registry.db of mode 0444 left -wal/-shm files of that mode behind, which kept the
        registry broken after the mode was restored."""
        if not os.access(self.home, os.W_OK):
            return f"its directory {self.home} is not writable"
        for p in (self.db_path, self.db_path.with_name(self.db_path.name + "-wal"),
                  self.db_path.with_name(self.db_path.name + "-shm")):
            if p.exists() and not os.access(p, os.W_OK):
                return f"{p} is not writable"
        return None

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """A registry written by a newer loraplex (its meta 'schema' above ours) is refused, not misread;
        a damaged value is named. A database with no meta table or no schema row yet is new: nothing to check."""
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:  # being created (another process made the table a moment ago): ours is written next
            return
        v = row[0]
        if not isinstance(v, str) or not v.isdigit():
            self._conn = None
            conn.close()
            raise IntegrityError(f"registry database {self.db_path}: its stored 'schema' ({v!r}) is damaged")
        if int(v) > SCHEMA_VERSION:
            self._conn = None
            conn.close()
            raise IntegrityError(f"registry database {self.db_path} was written by a newer loraplex (schema {v}; "
                                 f"this one reads schema {SCHEMA_VERSION}): upgrade loraplex to use it")

    def _read_only(self) -> sqlite3.Connection:
        """The database of a home this process cannot write (a read-only mount, another user's registry):
        opened read-only, so listing, showing, searching, evaluating and querying still work; a write takes
        the lock first and is refused there ("cannot take the registry lock ...: Read-only file system").
        SQLite's WAL mode needs its -shm file: when it cannot make one, the file is read as immutable, which
        is exact when no -wal file holds frames the database does not have yet."""
        from urllib.parse import quote

        wal = self.db_path.with_name(self.db_path.name + "-wal")
        for opts in ("mode=ro", "mode=ro&immutable=1"):
            if "immutable" in opts and wal.exists() and wal.stat().st_size > 0:
                break
            try:
                conn = sqlite3.connect(f"file:{quote(str(self.db_path))}?{opts}", uri=True, timeout=60.0,
                                       isolation_level=None)
                conn.execute("SELECT count(*) FROM adapters").fetchone()
                self._check_schema(conn)
                return conn
            except sqlite3.Error:
                continue
        raise LoraplexError(f"registry home {self.home} is not writable, and its database cannot be read without "
                            "writing (its WAL has changes not yet in registry.db): open it once where it is writable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    CACHE_LOCK_S = 0.2
    """How long saving a derived cache (the signature and routing indexes, the lineage graph) waits for the
    write lock: best effort, kept in memory when another process holds it (a read waited up to the lock's
    120 s, for a whole `registry check`, only to save a file: sweep 24)."""

    @contextmanager
    def write_lock(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive, re-entrant (within this object) advisory lock on the registry, waited for at most
        `timeout` seconds (default `lock_timeout`) before RegistryBusy."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.home.mkdir(parents=True, exist_ok=True)
        odd = lock_problem(self.lock_path)  # what `registry check` reports is what every writer refuses (sweep 67, 70)
        if odd is not None:
            raise LockUnavailable(f"cannot take the registry lock {self.lock_path}: {odd}")
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only home, a lock of another user's: the registry cannot be written
            raise LockUnavailable(f"cannot take the registry lock {self.lock_path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # put there since the check above
            os.close(fd)
            raise LockUnavailable(f"cannot take the registry lock {self.lock_path}: {lock_problem(self.lock_path)}")
        limit = self.lock_timeout if timeout is None else timeout
        start = time.monotonic()
        said = False
        try:  # from here the fd is closed (and with it the lock released) whatever is raised, a Ctrl-C between the
            # flock and the body's try included: it kept the lock on a leaked fd for the process's life (sweep 55)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    waited = time.monotonic() - start
                    if waited > limit:
                        raise RegistryBusy(f"the registry at {self.home} is locked by another process") from None
                    if not said and waited > LOCK_NOTE_S:  # a writer waited up to 120 s without a word (sweep 67)
                        said = True
                        warnings.warn(f"waiting for the registry lock at {self.home}: another process holds it "
                                      f"(for up to {limit:.0f} s)", LoraplexWarning, stacklevel=3)
                    time.sleep(0.01)
            self._lock_fd, self._lock_depth = fd, 1
            yield
        finally:
            self._lock_depth = 0
            self._lock_fd = None
            try:  # unlocked explicitly: a child forked meanwhile shares the open file, and would keep it locked
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def check_writable(self) -> None:
        """DiskFull or LockUnavailable when the registry can be read but not written (a full disk, a home this
        process cannot write: known once it is open): every write says so, and a command about to do long work
        before its write asks first (`generate fit` fitted a whole generator, then could not store it: sweep 67)."""
        if self._db(create=False) is None:  # no registry yet: nothing made here (the first write makes it)
            return
        if self._full:
            raise DiskFull(f"the disk is full: the registry at {self.home} can be read but not written (nothing was "
                           "changed; free some space and try again)")
        if self._ro_why is not None:
            raise LockUnavailable(f"cannot write the registry at {self.home}: {self._ro_why} (nothing was changed)")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        check_termination()  # a SIGTERM whose raise a library swallowed: no write begins after it
        conn = self._db()
        self.check_writable()
        try:  # BEGIN inside: a Ctrl-C right after it left the connection in an open write transaction (sweep 55)
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            # a random mark of this write: a database restored from a backup reaches the same generation
            # numbers again with other records, and a cache must not take one state for the other
            gen = conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'generation'").fetchone()[0]
            conn.execute("INSERT OR REPLACE INTO epochs(generation, epoch) VALUES (?, ?)", (gen, os.urandom(8).hex()))
            conn.execute("DELETE FROM epochs WHERE generation <= ?", (gen - EPOCHS_KEPT,))
            conn.execute("COMMIT")
            self._commits += 1  # `_writing` reads it: was its write saved before a stop landed?
        except BaseException:
            # a Ctrl-C can land after COMMIT went through (or before BEGIN took): roll back only an open
            # transaction, so the interrupt, not "no transaction is active", is what the caller sees
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def stamp(self, generation: int | None = None) -> str:
        """`generation:epoch`, what a cache records of the database state it reflects (the current one, or
        the state at `generation` when the database still knows it; its epoch empty otherwise). Equal stamps
        mean the same writes, not merely as many."""
        gen = self.generation() if generation is None else generation
        conn = self._db(create=False)
        row = None if conn is None else conn.execute("SELECT epoch FROM epochs WHERE generation = ?", (gen,)).fetchone()
        return f"{gen}:{row[0] if row else ''}"

    def generation(self) -> int:
        return self.meta_count("generation")

    def meta_count(self, key: str) -> int:
        """A count the database keeps in its meta table (`generation`, `dim`): 0 when absent, IntegrityError
        naming it when the stored value is not a count (edited by hand, a bad page)."""
        value = self.meta(key)
        if value is None:
            return 0
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            shown = value if isinstance(value, str) else type(value).__name__
            raise IntegrityError(f"registry database {self.db_path}: its stored {key!r} is damaged ({shown[:40]!r} is "
                                 "not a count); run `loraplex registry check --repair`")
        return n

    def reset_generation(self) -> int:
        """Set a damaged generation counter past every generation the database remembers (its epochs), with a
        fresh epoch: every cache then rebuilds. Returns the new generation."""
        conn = self._db()
        top = conn.execute("SELECT max(generation) FROM epochs").fetchone()[0]
        with self.transaction() as c:  # the transaction adds one to the value set here
            c.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(int(top or 0)),))
        return self.generation()

    def signature_dim(self) -> int:
        """The dimension of this registry's signatures (0 before its first adapter); IntegrityError when the
        database holds adapters but no dimension."""
        dim = self.meta_count("dim")
        if dim == 0:
            conn = self._db(create=False)
            if conn is not None and conn.execute("SELECT 1 FROM adapters LIMIT 1").fetchone() is not None:
                raise IntegrityError(f"registry database {self.db_path}: it holds adapters but no signature dimension "
                                     "(its meta 'dim' is gone); run `loraplex registry check --repair`")
        return dim

    def meta(self, key: str) -> str | None:
        conn = self._db(create=False)
        if conn is None:
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None
