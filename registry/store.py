"""The registry store: SQLite records plus content-addressed safetensors blobs, in `$LORAPLEX_HOME`.

Layout of a home directory:

    registry.db       SQLite (WAL, synchronous=FULL): meta, bases, adapters, edges, snapshots, components
    blobs/ab/<sha256>.safetensors   tensors, named by the sha256 of their bytes, verified on every read
    registry.lock     an advisory lock (fcntl) that serialises writers
    index.npz         cache: faiss index over description embeddings (registry/index.py)
    route-index.npz   cache: faiss index over routing vectors, description and prototype (registry/index.py)
    graph.json        cache: lineage graph in node-link JSON (registry/lineage.py)
    runs/             run directories, runs/<kind>-<name>-<YYYYmmdd-HHMMSS> (kind: train, router, stream,
                      forget; `run_dir`): checkpoints and reports of the commands that train
    candidates.jsonl  requests the `auto` router left to the bare base, logged as candidate new tasks
                      (router/auto.py `log_candidates`)
    orphaned-blobs/   blobs no record points at, moved here by `registry check --repair` (never deleted;
                      `quarantine_unreferenced_blobs`)

The database is the source of truth; the caches carry the database `generation` they reflect (a
counter bumped in the same transaction as every change) and are brought up to date, or rebuilt, when
they lag. Writes are ordered so that a kill -9 at any instant leaves a consistent registry:

    1. every blob is written to a temp file, fsynced and renamed into place (content-addressed, so a
       blob that already exists is simply reused);
    2. one SQLite transaction inserts the records (all-or-nothing) and bumps the generation.

A crash after 1 and before 2 leaves an unreferenced blob: harmless, reported by `registry check` and
moved to `orphaned-blobs/` by `--repair`. Concurrent writers serialise on `registry.lock` (and SQLite's
own locking), so concurrent `register` calls from several processes all land. Only safetensors are
ever loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sqlite3
import stat
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from pydantic import ValidationError

from loraplex.data import TASK_SUFFIXES, card_task, load_task
from loraplex.embedders import EMBEDDERS
from loraplex.errors import (AdapterNotFound, AlreadyExists, DiskFull, IntegrityError, InvalidAdapter, InvalidSpec,
                             InvalidTaskFile, LoraplexError, LoraplexWarning, Unreadable, UserInputError, os_error,
                             saved)
from loraplex.experts.spec import Adapter, LoraSpec, format_validation_error
from loraplex.fsio import atomic_file, missing_dirs, remove_if_empty
from loraplex.ranks import is_worker, shared_run_dir
from loraplex.registry.components import Components
from loraplex.registry.database import Database, damage_detail, is_disk_full, now, sha256_bytes, stored_record
from loraplex.registry.record import AdapterDraft, AdapterRecord, Edge, Snapshot, composition_of, validate_name
from loraplex.settings import Settings
from loraplex.tasks import changed_from_card

_ADAPTER_COLS = (
    "id, name, base, base_sha, family, description, task, origin, spec, blob, n_params, modules, rank, "
    "metrics, extra, created_at"
)


def _vec_bytes(v: np.ndarray | None) -> bytes | None:
    return None if v is None else np.asarray(v, dtype=np.float32).reshape(-1).tobytes()


STORED_SPEC_KEYS = ("r", "alpha", "target_modules")
"""What every stored spec holds (registration writes every field): one missing is damage, not its default
(a lost `alpha` read as 16 scales the adapter 16x over an alpha of 1)."""


def stored_spec(name: str, text: str) -> LoraSpec:
    """A record's LoraSpec, validated by the same rules as at registration (IntegrityError if it breaks them)."""
    try:
        spec = LoraSpec.model_validate_json(text)
    except ValidationError as exc:
        raise IntegrityError(f"adapter {name!r}: its stored LoRA settings are invalid: {format_validation_error(exc)}") from None
    missing = [k for k in STORED_SPEC_KEYS if k not in json.loads(text)]  # a JSON object: it validated
    if missing:
        raise IntegrityError(f"adapter {name!r}: its stored LoRA settings lack {', '.join(missing)} (the record is "
                             "damaged; remove it, or register it again)")
    return spec


def is_task_path(ref: str) -> bool:
    """Whether a task ref names a file (not an embedded task, not a card-only task)."""
    return os.sep in ref or ref.lower().endswith(TASK_SUFFIXES)  # `examples:NAME` is neither


def same_task_file(a: str, b: str) -> bool:
    """Whether two task file refs name one file (relative, with `..`, through a link, or absolute)."""
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def damaged_signatures(names: Sequence[str], emb: np.ndarray, proto: np.ndarray, has_proto: Sequence[bool]) -> list[str]:
    """The adapters whose stored signature holds a NaN or an infinity (registration stores finite vectors
    only; a prototype is NaN where there is none), each as `adapter 'x': its stored ... is damaged`."""
    out = []
    for i, n in enumerate(names):
        what = ("description embedding" if not np.all(np.isfinite(emb[i])) else
                "prototype" if has_proto[i] and not np.all(np.isfinite(proto[i])) else None)
        if what:
            out.append(f"adapter {n!r}: its stored {what} is damaged (not finite)")
    return out


class Registry(Database, Components):
    """One registry home. Cheap to construct; the database opens on first use.

    registry/database.py: the connection, schema, lock and transactions; this module: blobs, bases,
    adapters and their signatures; registry/components.py: routers and generators."""

    def __init__(self, home: str | os.PathLike, *, embedder: str = "minilm", lock_timeout: float = 120.0,
                 embedder_named_by: str | None = None, settings: Settings | None = None):
        super().__init__(home, lock_timeout=lock_timeout)
        self.settings = settings  # what it was opened with: a base's files are found with them (its cache_dir),
        # not with the environment's (a query converted SmolLM2 into another cache than the caller named; sweep 26)
        self.blob_dir = self.home / "blobs"
        self.default_embedder = embedder
        self.embedder_named_by = embedder_named_by  # set: the user named `embedder` (how, for messages);
        # a registry whose signatures were made with another one refuses it

    @classmethod
    def open(cls, settings: Settings | None = None) -> "Registry":
        """The registry of `settings` (default: `Settings.load()`, the environment): its home and embedder."""
        s = settings or Settings.load()
        return cls(s.home, embedder=s.embedder, embedder_named_by=s.embedder_named_by, settings=s)

    def check_embedder(self) -> None:
        """Refuse now an embedder this registry cannot take (`embedder_name`): a command that trains and then
        registers checks it before training, not after (a stream trained a unit, then was refused)."""
        self.embedder_name  # noqa: B018 (the property refuses)

    def reserve_run_id(self, run_id: str) -> bool:
        """Claim `run_id` (a stream run's, or a default adapter name made from the time) for this process,
        exclusively: False when another run holds it. Two commands started in the same second read the same
        clock, and a run id checked only against registered adapters was taken by both (the second's
        adapters then went unregistered while it reported them registered). An empty file per id under
        `<home>/.run-ids` (not under runs/, which holds run directories only)."""
        ids = self.home / ".run-ids"
        try:
            ids.mkdir(parents=True, exist_ok=True)
            os.close(os.open(ids / run_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            if not ids.is_dir():
                raise LoraplexError(f"the registry's run ids {ids} cannot be written (a file is in the folder's "
                                    "place)") from None
            return False
        except OSError as exc:  # the registry's own storage (a read-only home): exit 1, named as such, where it
            if exc.errno == errno.ENOSPC:  # was a bare "Read-only file system (...)", exit 2, as bad input (sweep 62)
                raise os_error(exc) from None
            raise LoraplexError(f"the registry at {self.home} cannot be written ({exc.strerror or exc}: "
                                f"{exc.filename or ids})") from None
        return True

    def holds_run_id(self, run_id: str) -> bool:
        """Whether `run_id` was claimed in this registry (`reserve_run_id`): a stream run resumed against another
        registry is told apart (sweep 57: it reported a finished run's adapters there, or failed blaming a
        removal)."""
        return (self.home / ".run-ids" / run_id).is_file()

    def release_run_id(self, run_id: str) -> None:
        """Give back a `reserve_run_id` claim of a request refused before it ran (sweep 44: every refused
        `forget` left its claim in the registry home for good)."""
        with contextlib.suppress(FileNotFoundError):
            (self.home / ".run-ids" / run_id).unlink()

    def run_dir(self, kind: str, name: str) -> Path:
        """A new run directory `<home>/runs/<kind>-<name>-<time>` (kind: train, router, stream, forget),
        the same one in every DDP rank (loraplex.ranks: rank 0 names it, the workers read it). Rank 0
        creates it, exclusively: two commands of one name started in the same second get `...-2`, not one
        directory both write to (and one removes under the other when it fails)."""
        stem = self.home / "runs" / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if is_worker():
            return shared_run_dir(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = stem if i == 1 else stem.with_name(f"{stem.name}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return shared_run_dir(path)
        raise AlreadyExists(f"{stem}: 10,000 run directories of this name and second already exist")

    @contextmanager
    def new_run(self, kind: str, name: str) -> Iterator[Path]:
        """A new `run_dir` for a command that trains and registers (train, router fit, forget), removed again
        when the command fails or is stopped: it registered nothing, and a partial checkpoint is no use to a
        later command (those commands do not resume; a stream resumes from its own directory) while it holds
        the disk (a full disk is the commonest such failure). Rank 0 removes it; DDP workers share it."""
        made = missing_dirs(self.home / "runs")  # a fresh home's: gone again too
        path = self.run_dir(kind, name)
        try:
            yield path
        except BaseException:
            # a stop (Ctrl-C, SIGTERM) landing after the record was committed: the run is its record's now
            if not is_worker() and not self._run_recorded(path):
                shutil.rmtree(path, ignore_errors=True)
                remove_if_empty(made)
            raise

    def _run_recorded(self, path: Path) -> bool:
        """Whether a registered adapter or component names run directory `path` (`extra.run_dir`)."""
        try:
            conn = self._db(create=False)
            q = ("SELECT 1 FROM adapters WHERE json_extract(extra, '$.run_dir') = ?1 UNION ALL "
                 "SELECT 1 FROM components WHERE json_extract(extra, '$.run_dir') = ?1 LIMIT 1")
            return conn is not None and conn.execute(q, (str(path),)).fetchone() is not None
        except Exception:  # a damaged database: the run directory goes, as before
            return False

    @property
    def embedder_name(self) -> str:
        """The embedder this registry's signatures were made with (fixed at its first adapter). When the
        user named another one (LORAPLEX_EMBEDDER or a keyword), it is refused rather than silently not used."""
        stored = self.meta("embedder")
        named = self.embedder_named_by
        if named and self.default_embedder not in EMBEDDERS.names():
            raise InvalidSpec(f"{named}={self.default_embedder!r}: unknown embedder "
                              f"(known: {', '.join(EMBEDDERS.names())})")
        if stored and named and stored != self.default_embedder:
            fix = (f"unset it, set it to {stored!r}, or use another LORAPLEX_HOME" if named == "LORAPLEX_EMBEDDER"
                   else f"pass {stored!r}, or another registry home")
            raise InvalidSpec(f"{named}={self.default_embedder!r}, but the registry at {self.home} made its "
                              f"signatures with {stored!r}: {fix}")
        return stored or self.default_embedder

    # ------------------------------------------------------------------------------------------
    # blobs

    def blob_path(self, sha: str) -> Path:
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise IntegrityError(f"a stored blob id {str(sha)[:80]!r} is not a sha256: its record is damaged")
        return self.blob_dir / sha[:2] / f"{sha}.safetensors"

    def put_blob(self, data: bytes, *, created: list[str] | None = None) -> str:
        """Store bytes under their sha256, atomically. An existing blob is reused only when its content
        still hashes to its name; a damaged one is rewritten (so registering again repairs it). The
        shas of blobs this call wrote are appended to `created` (for cleaning up after a failed commit)."""
        sha = sha256_bytes(data)
        path = self.blob_path(sha)
        if path.is_dir() and not path.is_symlink():  # damage in the blob's place: an empty directory is replaced,
            try:  # one holding files is the user's to move (the rename onto it failed, naming the temp file)
                path.rmdir()
            except OSError:
                raise IntegrityError(f"blob {sha[:12]}'s place is taken by a directory that is not empty: {path}; "
                                     "move it away and register again") from None
        existed = path.is_file()
        if existed and path.stat().st_size == len(data) and sha256_bytes(path.read_bytes()) == sha:
            return sha
        try:
            with atomic_file(path, prefix=".tmp-", sync_dir=True) as f:
                f.write(data)
        except OSError as exc:  # the registry's own storage, not a path the user gave (exit 1, named as such)
            if exc.errno in (errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST):
                raise LoraplexError(f"the registry's blob directory {self.blob_dir} cannot be written "
                                    f"({exc.strerror or exc}: {exc.filename or path})") from None
            raise
        if created is not None and not existed:
            created.append(sha)
        return sha

    @contextmanager
    def _writing(self, what: str) -> Iterator[list[str]]:
        """Around a write (blobs, then one transaction): on failure the blobs it created are removed, so the
        registry is as it was; a full disk is reported as such. Yields the list put_blob records into."""
        created: list[str] = []
        commits = self._commits
        try:
            yield created
        except BaseException as exc:
            if self._commits > commits:  # a stop landing after the commit: the write is done, and is said so
                saved(what)
                raise
            if created:
                try:
                    refs = self.referenced_blobs()
                    for sha in created:
                        if sha not in refs:
                            self.blob_path(sha).unlink(missing_ok=True)
                except Exception:  # the registry stays consistent either way (orphans are only notes)
                    pass
            if is_disk_full(exc, self.home):
                raise DiskFull(f"the disk is full: cannot {what} in {self.home} (nothing was changed; free some space "
                               "and try again)") from None
            raise
        saved(what)

    def read_blob(self, sha: str, *, owner: str | None = None) -> bytes:
        """The blob's bytes, after checking they still hash to `sha`. `owner` ("adapter 'x'", "router 'r'"):
        what the blob holds, named first in an error (a hash alone told the user nothing to remove)."""
        if owner is not None:
            try:
                return self.read_blob(sha)
            except IntegrityError as exc:
                raise type(exc)(f"{owner}: {exc}") from None
        path = self.blob_path(sha)
        try:
            mode = path.stat().st_mode  # a FIFO blocked every reader; /dev/zero was read until memory ran out (sweep 53)
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise IntegrityError(f"blob {sha[:12]} cannot be read ({kind}): {path}")
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"blob {sha[:12]} is missing from {self.blob_dir}") from None
        except PermissionError:  # not damage: another user's registry, or a mode changed by hand
            raise Unreadable(f"blob {sha[:12]} cannot be read by this user (permission denied): {path}; the "
                             "registry's files must be readable to everyone who uses it") from None
        except OSError as exc:  # a directory in its place, blobs/ a file: damage to report, not a bad path given
            raise IntegrityError(f"blob {sha[:12]} cannot be read ({exc.strerror or exc}): {path}") from None
        if sha256_bytes(data) != sha:
            raise IntegrityError(f"blob {sha[:12]} does not match its sha256: the file {path} is damaged")
        return data

    def referenced_blobs(self) -> set[str]:
        conn = self._db(create=False)
        if conn is None:
            return set()
        out = {r[0] for r in conn.execute("SELECT blob FROM adapters")}
        out |= {r[0] for r in conn.execute("SELECT blob FROM snapshots")}
        out |= {r[0] for r in conn.execute("SELECT blob FROM components")}
        # a damaged record's id as it would read whole (upper-cased, padded): its file is not an orphan for
        # --repair to move away (sweep 32: a record's own weights moved out, and their deletion invited)
        return out | {v.strip().lower() for v in out if isinstance(v, str)}

    def stored_blobs(self) -> dict[str, Path]:
        if not self.blob_dir.is_dir():
            return {}
        return {p.name.removesuffix(".safetensors"): p for p in self.blob_dir.glob("*/*.safetensors")}

    def temp_files(self) -> list[Path]:
        if not self.blob_dir.is_dir():
            return []
        return list(self.blob_dir.glob("*/.tmp-*"))

    def delete_unreferenced_blobs(self, candidates: Sequence[str] | None = None) -> list[str]:
        """Remove blobs no record points at (under the write lock, so no writer is mid-way)."""
        with self.write_lock():
            refs = self.referenced_blobs()
            stored = self.stored_blobs()
            names = stored if candidates is None else {c: stored[c] for c in candidates if c in stored}
            gone = []
            for sha in (s for s in names if s not in refs):
                try:
                    names[sha].unlink(missing_ok=True)
                except OSError as exc:  # the records are already gone (committed): said, not a failure
                    warnings.warn(f"could not delete the unused blob {names[sha]} ({exc.strerror}); `loraplex registry "
                                  "check --repair` moves such blobs aside", LoraplexWarning, stacklevel=2)
                    continue
                gone.append(sha)
            return gone

    def quarantine_unreferenced_blobs(self) -> list[str]:
        """Move every blob no record points at into `<home>/orphaned-blobs/` (under the write lock). An
        interrupted write leaves one adapter's worth; many are the weights of records that went missing
        (a database restored from an older backup, a damaged table): moved, never deleted, so they can be
        registered again from there."""
        with self.write_lock():
            refs = self.referenced_blobs()
            gone = [(sha, p) for sha, p in self.stored_blobs().items() if sha not in refs]
            moved: list[str] = []
            try:
                if gone:
                    self.orphan_dir.mkdir(exist_ok=True)
                for sha, p in gone:
                    os.replace(p, self.orphan_dir / p.name)
                    moved.append(sha)
            except OSError as exc:  # said with what was moved before it, not a bare strerror mid-repair
                raise LoraplexError(f"moving unreferenced blobs to {self.orphan_dir} failed after {len(moved)} of "
                                    f"{len(gone)} ({exc.strerror or exc}: {exc.filename or self.orphan_dir})") from None
            return moved

    @property
    def orphan_dir(self) -> Path:
        return self.home / "orphaned-blobs"

    # ------------------------------------------------------------------------------------------
    # bases

    def base_fingerprints(self) -> dict[str, tuple[str, str]]:
        """sha -> (base name, fingerprint JSON) of every base an adapter was registered against."""
        conn = self._db(create=False)
        if conn is None:
            return {}
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT sha, name, fingerprint FROM bases")}

    @staticmethod
    def stored_fingerprint(sha: str, name: str, text: str):
        """A `bases` row's fingerprint; damaged (edited by hand, a bad page) it is an IntegrityError naming the
        base, not a traceback (sweep 32: `registry check` and export ended in exit 70)."""
        from loraplex.models import Fingerprint

        try:
            fp = Fingerprint.model_validate_json(text)
        except ValueError as exc:  # pydantic's ValidationError is one
            raise IntegrityError(f"base {name!r} ({sha[:12]}): its stored fingerprint is damaged ({damage_detail(exc)}); "
                                 "`loraplex registry check --repair` writes it again where the base reads as it was "
                                 "registered") from None
        return fp

    def rewrite_fingerprint(self, sha: str, fp: "Fingerprint") -> None:
        """Store a base's fingerprint again (check --repair, for a damaged row of a base that reads as before)."""
        with self.transaction() as c:
            c.execute("UPDATE bases SET fingerprint = ? WHERE sha = ?", (fp.model_dump_json(), sha))

    # ------------------------------------------------------------------------------------------
    # adapters

    def add_adapter(
        self,
        draft: AdapterDraft,
        adapter: Adapter,
        *,
        embedding: np.ndarray,
        prototype: np.ndarray | None = None,
        snapshots: Sequence[tuple[int, Adapter]] = (),
        embedder: str | None = None,
        fingerprint_json: str | None = None,
        member_blobs: dict[str, str] | None = None,
    ) -> AdapterRecord:
        """Store an adapter, its snapshots, its lineage edges (and its base's fingerprint) in one transaction.

        An adapter that answers with others (`record.composition_of`: a forgetting adapter, a summed stream's)
        or was made over `member_blobs` is refused, under the lock, when one of them was removed meanwhile
        or registered anew with other weights than `member_blobs` says: it would answer over a composition
        it was not trained against (listed, yet unloadable, or silently composed with other weights)."""
        validate_name(draft.name)
        adapter.check_weights(where=f"adapter {draft.name!r}")
        for step, snap in snapshots:
            snap.check_weights(where=f"snapshot {step} of {draft.name!r}")
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(emb)):
            raise InvalidAdapter(f"adapter {draft.name!r}: its description embedding is not finite")
        data = adapter.to_bytes()
        snap_data = [(int(step), s.to_bytes()) for step, s in snapshots]
        ranks = [adapter.rank(m) for m in adapter.modules]
        with self.write_lock():
            self.check_adapter_name_free(draft.name, self._db())
            self._check_members(draft, member_blobs or {})
            self._check_embedding(emb, embedder or self.default_embedder)
            with self._writing(f"register adapter {draft.name!r}") as created:
                self._insert_adapter(draft, adapter, data, snap_data, ranks, emb, prototype, embedder,
                                     fingerprint_json, created)
        return self.get_adapter(draft.name)

    def _check_members(self, draft: AdapterDraft, member_blobs: dict[str, str]) -> None:
        names = [n for n in composition_of(draft.name, draft.origin, draft.extra) if n != draft.name]
        for n in dict.fromkeys([*names, *member_blobs]):
            why = ("was removed" if not self.has_adapter(n) else
                   "was registered anew (other weights)" if n in member_blobs and self.get_adapter(n).blob != member_blobs[n]
                   else None)
            if why:
                raise LoraplexError(f"adapter {n!r} {why} while adapter {draft.name!r} was being made over it; "
                                    "nothing was registered: run it again")

    def _insert_adapter(self, draft, adapter, data, snap_data, ranks, emb, prototype, embedder, fingerprint_json,
                        created) -> None:
        sha = self.put_blob(data, created=created)
        snap_shas = [(step, self.put_blob(b, created=created)) for step, b in snap_data]
        try:
            with self.transaction() as c:
                if self.meta("embedder") is None:
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('embedder', ?)", (embedder or self.default_embedder,))
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('dim', ?)", (str(emb.size),))
                cur = c.execute(
                    "INSERT INTO adapters(name, base, base_sha, family, description, task, origin, spec, blob, "
                    "n_params, modules, rank, metrics, extra, embedding, prototype, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        draft.name, draft.base, draft.base_sha, draft.family, draft.description, draft.task,
                        draft.origin, adapter.spec_json(), sha, adapter.n_params, len(ranks), max(ranks),
                        json.dumps(draft.metrics, sort_keys=True), json.dumps(draft.extra, sort_keys=True),
                        _vec_bytes(emb), _vec_bytes(prototype), now(),
                    ),
                )
                aid = cur.lastrowid
                if fingerprint_json is not None:
                    c.execute("INSERT OR IGNORE INTO bases(sha, name, fingerprint) VALUES (?, ?, ?)",
                              (draft.base_sha, draft.base, fingerprint_json))
                c.executemany(
                    "INSERT OR IGNORE INTO edges(adapter_id, target, kind) VALUES (?, ?, ?)",
                    [(aid, e.target, e.kind) for e in draft.edges],
                )
                c.executemany(
                    "INSERT INTO snapshots(adapter_id, step, blob) VALUES (?, ?, ?)",
                    [(aid, step, s) for step, s in snap_shas],
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"an adapter named {draft.name!r} already exists").about("name") from None

    def _check_embedding(self, emb: np.ndarray, embedder: str) -> None:
        have = self.meta("embedder")
        if have is not None and have != embedder:
            raise InvalidAdapter(f"this registry's signatures use embedder {have!r}, not {embedder!r}")
        dim = self.signature_dim()
        if dim and dim != emb.size:
            raise InvalidAdapter(f"signature has {emb.size} dimensions; this registry's have {dim}")

    def update_metrics(self, name: str, metrics: dict[str, Any]) -> AdapterRecord:
        """Merge `metrics` into an adapter's stored metrics."""
        rec = self.get_adapter(name)
        merged = {**rec.metrics, **metrics}
        with self.write_lock(), self._writing(f"update the metrics of {name!r}"), self.transaction() as c:
            c.execute("UPDATE adapters SET metrics = ? WHERE id = ?", (json.dumps(merged, sort_keys=True), rec.id))
        return self.get_adapter(name)

    def _records(self, where: str = "", params: Sequence[Any] = (), damaged: list[str] | None = None
                 ) -> list[AdapterRecord]:
        """The records selected, in order; a damaged one raises IntegrityError naming it, or, with `damaged`
        given, is left out and its message appended there (a listing shows the rest)."""
        conn = self._db(create=False)
        if conn is None:
            return []
        rows = conn.execute(f"SELECT {_ADAPTER_COLS} FROM adapters {where} ORDER BY id", params).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        edges: dict[int, list[tuple]] = {}  # rows as stored: made Edge/Snapshot under their record's guard, so a
        snaps: dict[int, list[tuple]] = {}  # damaged one names its adapter (sweep 32: exit 70 for every listing)
        if len(ids) <= 500:
            marks = ",".join("?" * len(ids))
            e_rows = conn.execute(f"SELECT adapter_id, target, kind FROM edges WHERE adapter_id IN ({marks})", ids)
            s_rows = conn.execute(f"SELECT adapter_id, step, blob FROM snapshots WHERE adapter_id IN ({marks}) ORDER BY step", ids)
        else:
            e_rows = conn.execute("SELECT adapter_id, target, kind FROM edges")
            s_rows = conn.execute("SELECT adapter_id, step, blob FROM snapshots ORDER BY step")
        for aid, target, kind in e_rows:
            edges.setdefault(aid, []).append((target, kind))
        for aid, step, blob in s_rows:
            snaps.setdefault(aid, []).append((step, blob))
        out = []
        for r in rows:
            try:
                out.append(self._record_of(r, edges, snaps))
            except IntegrityError as exc:
                if damaged is None:
                    raise
                damaged.append(str(exc))
        return out

    def _record_of(self, r: Sequence[Any], edges: dict[int, list[tuple]], snaps: dict[int, list[tuple]]
                   ) -> AdapterRecord:
        spec = stored_spec(r[1], r[8])
        with stored_record(f"adapter {r[1]!r}"):
            return AdapterRecord(
                id=r[0], name=r[1], base=r[2], base_sha=r[3], family=r[4], description=r[5], task=r[6],
                origin=r[7], spec=spec, blob=r[9], n_params=r[10], modules=r[11],
                rank=r[12], metrics=json.loads(r[13]), extra=json.loads(r[14]),
                edges=tuple(sorted((Edge(target=t, kind=k) for t, k in edges.get(r[0], [])),
                                   key=lambda e: (e.kind, e.target))),
                snapshots=tuple(Snapshot(step=n, blob=b) for n, b in snaps.get(r[0], [])), created_at=r[15],
            )

    def get_adapter(self, name: str) -> AdapterRecord:
        recs = self._records("WHERE name = ?", (name,))
        if not recs:
            raise AdapterNotFound(f"no adapter named {name!r} in the registry at {self.home}")
        return recs[0]

    def check_adapter_name_free(self, name: str, conn=None) -> None:
        """AlreadyExists if an adapter, or a router (they share the served models' names), is called `name`:
        checked again under the write lock when registering; commands that train first ask up front too."""
        conn = conn or self._db(create=False)
        if conn is None:
            return
        if conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"an adapter named {name!r} already exists").about("name")
        if conn.execute("SELECT 1 FROM components WHERE kind = 'router' AND name = ?", (name,)).fetchone():
            raise AlreadyExists(f"a router named {name!r} already exists: an adapter of that name "
                                "would share its model name (choose another)").about("name")
        children = [r[0] for r in conn.execute(  # lineage names parents: a new adapter under a removed parent's name
            "SELECT DISTINCT a.name FROM edges e JOIN adapters a ON a.id = e.adapter_id WHERE e.target = ? "
            "ORDER BY a.name LIMIT 4", (f"adapter:{name}",))]  # read as their parent in show, graph, eval (sweep 32)
        if children:
            raise AlreadyExists(f"{name!r} is the name of a removed adapter that {', '.join(map(repr, children[:3]))}"
                                f"{' and more' if len(children) > 3 else ''} came from (their lineage names it): an "
                                "adapter registered under it would read as their parent (choose another name)"
                                ).about("name")

    def has_adapter(self, name: str) -> bool:
        conn = self._db(create=False)
        return bool(conn and conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone())

    def list_adapters(self, *, base: str | None = None, origin: str | None = None,
                      damaged: list[str] | None = None) -> list[AdapterRecord]:
        """The records (of `base`, of `origin`); `damaged`: see `_records`."""
        if base is not None and origin is not None:
            return self._records("WHERE base = ? AND origin = ?", (base, origin), damaged)
        if base is not None:
            return self._records("WHERE base = ?", (base,), damaged)
        if origin is not None:
            return self._records("WHERE origin = ?", (origin,), damaged)
        return self._records("", (), damaged)

    def count(self) -> int:
        conn = self._db(create=False)
        return 0 if conn is None else conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def task_labels(self, task: str | None, cards: dict[str, Any] | None = None) -> tuple[str, ...] | None:
        """The label set of task `task`, from `cards` (what a record holds of its tasks), else the registry's
        card or the task itself; None for no task, or one without labels. The one reading of an adapter's
        labels (routing's label term, auto's and the generators' checks of what a written adapter answers)."""
        if not task:
            return None
        card = (cards or {}).get(task) or self.task_card(task) or {}
        if card.get("labels"):
            return tuple(card["labels"])
        try:
            return tuple(self.load_task(task).labels) or None
        except LoraplexError:  # a task file gone without a card: no labels to match
            return None

    def task_card(self, ref: str) -> dict | None:
        """What the newest adapter trained or registered on task `ref` recorded of it
        (`extra["task_cards"][ref]`: name, description, labels, label texts), so a task file registered
        with `--description` and no sidecar can be used again. Records from before cards existed give
        their own description when their `task` is `ref`. A task file is found by any spelling of its
        path (relative, with `..`, through a link), not only the absolute one it was recorded under."""
        card = self._task_card(ref)
        if card is None and is_task_path(ref):
            for key in self._task_refs():
                if key != ref and is_task_path(key) and same_task_file(key, ref):
                    return self._task_card(key)
        return card

    def _task_refs(self) -> list[str]:
        """Every task ref the records name (their task, their cards' keys), newest first."""
        conn = self._db(create=False)
        if conn is None:
            return []
        rows = conn.execute("SELECT j.key FROM adapters a, json_each(a.extra, '$.task_cards') j UNION ALL "
                            "SELECT task FROM adapters WHERE task IS NOT NULL").fetchall()
        return list(dict.fromkeys(str(r[0]) for r in reversed(rows) if r[0]))

    def _task_card(self, ref: str) -> dict | None:
        conn = self._db(create=False)
        if conn is None:
            return None
        row = conn.execute(
            "SELECT json_extract(extra, '$.task_cards') FROM adapters WHERE EXISTS "
            "(SELECT 1 FROM json_each(adapters.extra, '$.task_cards') WHERE key = ?) ORDER BY id DESC LIMIT 1",
            (ref,)).fetchone()
        if row and row[0]:
            card = json.loads(row[0]).get(ref)
            if isinstance(card, dict):
                return card
        row = conn.execute("SELECT description FROM adapters WHERE task = ? ORDER BY id DESC LIMIT 1", (ref,)).fetchone()
        return {"description": row[0]} if row else None

    def load_task(self, ref: str, *, description: str | None = None, fallback_description: str | None = None):
        """`loraplex.data.load_task` with what the registry recorded of the task (`task_card`)."""
        return load_task(ref, description=description, card=self.task_card(ref),
                         fallback_description=fallback_description)

    def answering_task(self, ref: str, *, card: dict | None = None, rows: bool = True):
        """The task `ref` as routing and answering need it. `card`: what the answering adapter recorded of
        the task (its own `task_cards` entry, `adapter_task`; default: the newest adapter's, `task_card`).
        The adapter's own card's description is the one it answers with, whatever the file's sidecar says
        (two adapters trained on one file with different descriptions each keep their own: a causal LM is
        prompted with it); the newest adapter's stands in only for a sidecar that is absent. The card alone,
        without rows, answers when the file no longer loads (edited since, or read by stricter rules than
        it was trained under: one such file failed every query of the registry, those routed elsewhere
        included) and when the file's labels are no longer the card's (edited since training: the adapter
        answers with the labels it learned, not with labels it never saw); label texts edited since are
        answered with the card's (the anchors it learned). So where no rows are needed (`rows=False`:
        answering with an adapter, `adapter_task`) an adapter's own usable card is the task as it stands and
        its file is not read (every candidate's file, read whole on each query, made a query over one adapter
        of a 37 MB file 20 s slower); evaluating (a router's task pool) reads the file's rows."""
        own = card is not None
        card = card if own else self.task_card(ref)
        usable = bool(card) and len(card.get("labels") or ()) >= 2 and bool(card.get("description"))
        if not rows and own and usable and is_task_path(ref):  # all an adapter answers with is on its card
            return card_task(ref, card, why="taken from the adapter's record for answering, without its rows")
        try:
            task = load_task(ref, card=card)
        except InvalidTaskFile as exc:
            if not usable:
                raise
            return card_task(ref, card, why=f"the file no longer loads ({exc})")
        if own and card.get("description") and task.description != card["description"]:
            # trained with `--description` over the file's sidecar: it answers with the prompt it learned
            task = dataclasses.replace(task, description=card["description"])
        moved = changed_from_card(card, task) if usable else None
        if moved is not None and moved[0] == "labels":
            return card_task(ref, card, why=f"its labels changed since it was recorded ({moved[1]})")
        if moved is not None:  # the label texts: the anchors it learned, not the sidecar's new ones
            return dataclasses.replace(task, label_texts=dict(card["label_texts"]))
        return task

    @staticmethod
    def learned_ref(rec: AdapterRecord, ref: str) -> str | None:
        """The ref under which adapter `rec` recorded task `ref` (its task, or a multitask adapter's card's
        key), matched by any spelling of a file's path (`..`, a link); None if it did not learn it."""
        cards = rec.extra.get("task_cards") or {}
        return next((r for r in dict.fromkeys([*([rec.task] if rec.task else []), *cards])
                     if r == ref or (is_task_path(r) and is_task_path(ref) and same_task_file(r, ref))), None)

    @staticmethod
    def check_learned_labels(rec: AdapterRecord, task) -> None:
        """Refuse to score or route an adapter on its own task file when the file's labels, or their texts,
        are no longer those it learned (edited since training): its answers use the learned ones
        (`answering_task`), so a score on the new ones measures a classifier no query uses, unsaid."""
        learned = Registry.learned_ref(rec, task.ref)
        if learned is None:
            return
        moved = changed_from_card((rec.extra.get("task_cards") or {}).get(learned), task)
        if moved is not None:
            fix = "give a file of the labels it learned" if moved[0] == "labels" else "restore its sidecar's label_texts"
            raise UserInputError(f"the {moved[0]} of {task.ref} changed since adapter {rec.name!r} was trained "
                                 f"({moved[1]}): train it again, or {fix}")

    def adapter_task(self, rec: AdapterRecord, *, rows: bool = False):
        """The task adapter `rec` answers with (None: it records none), from its own card (`answering_task`;
        `rows=False`: without rows when the card says it all, answering needs none; a stored router's experts
        are read with their files, as its task pool is, so both name the tasks alike)."""
        if not rec.task:
            return None
        own = (rec.extra.get("task_cards") or {}).get(rec.task)
        return self.answering_task(rec.task, card=own if isinstance(own, dict) else None, rows=rows)

    def load_adapter(self, name_or_record: str | AdapterRecord) -> tuple[AdapterRecord, Adapter]:
        """The record and its tensors (hash verified)."""
        rec = self.get_adapter(name_or_record) if isinstance(name_or_record, str) else name_or_record
        where = f"adapter {rec.name!r}"
        adapter = Adapter.from_bytes(rec.spec, self._blob_of(rec, rec.blob, where), where=where)
        if not self.shapes_match(rec, adapter):  # a record pointing at another adapter's blob (its hash sound):
            # its weights were used, silently (sweep 32)
            raise IntegrityError(f"{where}: its blob's shapes disagree with its record (remove it, or register it again)")
        return rec, adapter

    @staticmethod
    def shapes_match(rec: AdapterRecord, adapter: Adapter) -> bool:
        """Whether `adapter`'s parameter count, module count and largest rank are those `rec` recorded."""
        ranks = [adapter.rank(m) for m in adapter.modules]
        return (adapter.n_params, len(ranks), max(ranks, default=0)) == (rec.n_params, rec.modules, rec.rank)

    def load_snapshot(self, rec: AdapterRecord, snap: Snapshot) -> Adapter:
        where = f"snapshot {snap.step} of {rec.name!r}"
        return Adapter.from_bytes(rec.spec, self._blob_of(rec, snap.blob, where), where=where)

    def _blob_of(self, rec: AdapterRecord, sha: str, where: str) -> bytes:
        """`read_blob(sha)` for an adapter read earlier as `rec`: a blob gone because the adapter was removed (or
        registered anew) since its record was read is that, said as such, not damage (sweep 55: a generator's
        members read while another thread removed one were "blob ... is missing", a false corruption report)."""
        try:
            return self.read_blob(sha, owner=where)
        except IntegrityError:
            try:
                same = self.get_adapter(rec.name).blob == rec.blob
            except AdapterNotFound:
                same = False
            if not same:
                raise AdapterNotFound(f"adapter {rec.name!r} was removed or registered anew while it was being read; "
                                      "run it again") from None
            raise

    def remove_adapter(self, name: str, check: Callable[[], None] | None = None) -> AdapterRecord | None:
        """Delete an adapter's record (its edges and snapshots go with it), then its unshared blobs.
        `check()` runs under the write lock first (what may refuse the removal: a component using it)."""
        with self.write_lock(), self._writing(f"remove adapter {name!r}"):
            if check is not None:
                check()
            try:
                rec = self.get_adapter(name)
            except IntegrityError:  # a record whose stored settings are broken can still be removed
                row = self._db().execute("SELECT id, blob FROM adapters WHERE name = ?", (name,)).fetchone()
                snaps = [r[0] for r in self._db().execute("SELECT blob FROM snapshots WHERE adapter_id = ?", (row[0],))]
                with self.transaction() as c:
                    c.execute("DELETE FROM adapters WHERE id = ?", (row[0],))
                self.delete_unreferenced_blobs([row[1], *snaps])
                return None
            with self.transaction() as c:
                c.execute("DELETE FROM adapters WHERE id = ?", (rec.id,))
            self.delete_unreferenced_blobs([rec.blob, *[s.blob for s in rec.snapshots]])
        return rec

    def _signature_rows(self, where: str, params: Sequence[Any]) -> list[tuple]:
        conn = self._db(create=False)
        return conn.execute(f"SELECT id, name, embedding, prototype FROM adapters {where}", params).fetchall()

    def _rows_in(self, column: str, values: Sequence[Any], select) -> list[tuple]:
        """select(where, params) over `column IN (...)`, in chunks under SQLite's parameter limit."""
        out: list[tuple] = []
        values = list(values)
        for i in range(0, len(values), 900):
            chunk = values[i: i + 900]
            out.extend(select(f"WHERE {column} IN ({','.join('?' * len(chunk))})", chunk))
        return out

    def _unpack_signatures(self, rows: list[tuple], dim: int) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
        ids = [r[0] for r in rows]
        nm = [r[1] for r in rows]
        for r in rows:
            for what, blob in (("description embedding", r[2]), ("prototype", r[3])):
                if blob is not None and (not isinstance(blob, bytes) or len(blob) != 4 * dim):
                    sizes = {n for (n,) in self._db().execute("SELECT DISTINCT length(embedding) FROM adapters")}
                    if sizes == {len(r[2])}:  # every adapter agrees with this one: the dimension on record is wrong
                        raise IntegrityError(f"registry database {self.db_path}: its stored 'dim' ({dim}) is not the "
                                             f"dimension of its adapters' signatures ({len(r[2]) // 4}); run "
                                             "`loraplex registry check --repair`")
                    size = f"{len(blob)} bytes" if isinstance(blob, bytes) else type(blob).__name__
                    raise IntegrityError(f"adapter {r[1]!r}: its stored {what} is damaged ({size}, while the "
                                         f"registry's signatures have {dim} float32 values); remove it, or register it again (`loraplex registry check` lists "
                                         "every such record)")
        emb = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim).copy()
        proto = np.full((len(rows), dim), np.nan, dtype=np.float32)
        for i, r in enumerate(rows):
            if r[3] is not None:
                proto[i] = np.frombuffer(r[3], dtype=np.float32)
        for what in damaged_signatures(nm, emb, proto, [r[3] is not None for r in rows]):
            # search and routing pass over it (faiss never returns a NaN row), as a damaged record fails only
            # its own requests; said, not silent
            warnings.warn(f"{what}: it is left out of search and routing", LoraplexWarning, stacklevel=3)
        return ids, nm, emb, proto

    def damaged_signature_records(self) -> list[str]:
        """`registry check`: each adapter whose stored signature is not finite, named (`damaged_signatures`)."""
        dim = self.signature_dim()
        if self._db(create=False) is None or dim == 0:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LoraplexWarning)  # said here as problems, not as warnings too
            rows = self._signature_rows("ORDER BY id", ())
            _, nm, emb, proto = self._unpack_signatures(rows, dim)
        return damaged_signatures(nm, emb, proto, [r[3] is not None for r in rows])

    def signatures(self, names: Sequence[str] | None = None) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
        """(ids, names, description embeddings (N, D), prototypes (N, D), NaN where none), in `names` order
        (default: every adapter, by id)."""
        conn = self._db(create=False)
        dim = self.signature_dim()
        if conn is None or dim == 0:
            return [], [], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        if names is None:
            rows = self._signature_rows("ORDER BY id", ())
        else:
            by_name = {r[1]: r for r in self._rows_in("name", list(dict.fromkeys(names)), self._signature_rows)}
            for n in names:
                if n not in by_name:
                    raise AdapterNotFound(f"no adapter named {n!r} in the registry at {self.home}")
            rows = [by_name[n] for n in names]
        return self._unpack_signatures(rows, dim)

    def signatures_by_id(self, ids: Sequence[int]) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
        """As `signatures`, for adapter ids (in `ids` order; ids that do not exist are left out)."""
        dim = self.signature_dim()
        if self._db(create=False) is None or dim == 0:
            return [], [], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        by_id = {r[0]: r for r in self._rows_in("id", [int(i) for i in ids], self._signature_rows)}
        return self._unpack_signatures([by_id[int(i)] for i in ids if int(i) in by_id], dim)

    def embeddings_by_id(self, ids: Sequence[int]) -> np.ndarray:
        _, _, emb, _ = self.signatures_by_id(ids)
        return emb

    def names_by_id(self, ids: Sequence[int]) -> dict[int, str]:
        return {i: row[0] for i, row in self.names_and_bases_by_id(ids).items()}

    def names_and_bases_by_id(self, ids: Sequence[int]) -> dict[int, tuple[str, str, str]]:
        """id -> (name, base, base fingerprint sha) for the ids that exist, in one query (retrieval's candidates)."""
        conn = self._db(create=False)
        if conn is None or not len(ids):
            return {}
        rows = self._rows_in("id", [int(i) for i in ids],
                             lambda where, p: conn.execute(f"SELECT id, name, base, base_sha FROM adapters {where}", p).fetchall())
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def adapter_ids(self, *, routable: bool = False) -> np.ndarray:
        """Every adapter's id; `routable`: only those that answer a task alone (not one that answers with a
        composition, `record.composition_of`: a forgetting adapter, or a summed stream's adapter after the
        first, which retrieval would mix alone)."""
        conn = self._db(create=False)
        if conn is None:
            return np.zeros(0, dtype=np.int64)
        if not routable:
            return np.array([r[0] for r in conn.execute("SELECT id FROM adapters ORDER BY id")], dtype=np.int64)
        ids = []
        for i, name, origin, extra in conn.execute("SELECT id, name, origin, extra FROM adapters ORDER BY id"):
            try:
                alone = len(composition_of(name, origin, json.loads(extra))) == 1
            except ValueError:  # a damaged record: named by `registry check`, never routed to
                alone = False
            if alone:
                ids.append(i)
        return np.array(ids, dtype=np.int64)

    def edges(self) -> list[tuple[str, str, str]]:
        """(adapter name, target, kind) for every lineage edge."""
        conn = self._db(create=False)
        if conn is None:
            return []
        rows = [tuple(r) for r in conn.execute(
            "SELECT a.name, e.target, e.kind FROM edges e JOIN adapters a ON a.id = e.adapter_id ORDER BY a.id, e.kind, e.target")]
        for name, target, kind in rows:
            if not (isinstance(target, str) and ":" in target and isinstance(kind, str)):
                raise IntegrityError(f"adapter {name!r}: a stored lineage edge is damaged ({str(target)[:60]!r} is not "
                                     "'kind:name'); remove it, or register it again (`loraplex registry check` lists "
                                     "every such record)")
        return rows
