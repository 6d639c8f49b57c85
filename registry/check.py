"""`registry check`: do the database, the blobs, the faiss index and the lineage graph agree?

Problems (the registry is inconsistent; exit code 1):
- the SQLite file fails `PRAGMA integrity_check` or its foreign keys;
- a record's blob (adapter, snapshot, router, generator) is missing, does not hash to its name, or
  does not parse as the record says (spec ranks, parameter count, module count);
- a record's LoRA settings or weights break the rules `register` applies (the same functions:
  LoraSpec's validation, `Adapter.check_weights`): NaN/Inf or absurd weights, an infinite alpha,
  a pattern key that is not a regex...;
- an adapter no longer fits the base fingerprint it was registered against, or that fingerprint is gone or
  damaged (`--repair` writes a damaged one again from the base, where it still reads as it was registered);
- a router and an adapter share one name (a request naming it would be ambiguous);
- a router or generator lists an adapter that is not in the registry; a router lists an adapter of
  another base than its own;
- a cache that claims the current generation disagrees with the database (ids, vectors, nodes or
  edges), or a cache file is unreadable.

Notes (consistent; reported, cleaned up by `--repair`): blobs no record points at (left by a writer
killed between its blob write and its commit), temp files, caches that lag the database (they are
caught up on next use).

`--repair` rebuilds the derived state (index, graph) from the database, moves unreferenced blobs to
`orphaned-blobs/` (never deletes them: they may be the weights of records that went missing), deletes
temp files, then checks again. Damaged blobs cannot be repaired (the data is gone): the report
names the records to remove or register again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from loraplex.errors import (IntegrityError, InvalidTaskFile, LockUnavailable, LoraplexError, TaskNotFound, Unreadable,
                             UserInputError)
from loraplex.experts.spec import Adapter
from loraplex.models import fingerprint, resolve_base
from loraplex.registry.database import lock_problem
from loraplex.registry.index import INDEX_FILE, ROUTE_INDEX_FILE, SignatureIndex, drop_cached, routing_vectors
from loraplex.registry.lineage import GRAPH_FILE, build_graph, canonical, graph_json, load_cached, to_json
from loraplex.registry.record import router_members_problem, validate_name
from loraplex.registry.store import Registry, is_task_path, stored_spec

@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "repaired": self.repaired,
                "counts": self.counts}


def _same_base(name: str, sha: str, settings=None) -> bool:
    """Whether base `name` is one of the bases of fingerprint `sha`: two model directories of one
    architecture (two checkpoints) share a fingerprint, and `bases` keeps the first one's name. A base that
    no longer resolves (its directory is gone) cannot be told apart: not called a problem here."""
    if os.path.isabs(name) and not os.path.exists(name):
        return True
    try:
        return fingerprint(resolve_base(name), settings).sha == sha
    except LoraplexError:
        return False


def check(reg: "Registry", *, repair: bool = False,
          component_problem: "Callable[[Any], str | None] | None" = None) -> CheckReport:
    """The registry's consistency, read under its write lock: records, signatures, blobs and index are read
    as one state (a check beside a running `adapters register` used to see a record without its signature
    and report damage that was not there). A home where the lock cannot be taken (read-only) is checked
    without it, and the report says so. `component_problem(record)`: what is wrong with a stored router's or
    generator's own fields (its configuration), which the parts that read them know (the API passes it: the
    registry does not import them)."""
    report = CheckReport()
    if not reg.exists:
        if repair:
            _repair(reg, report)
        report.notes.append(f"no registry at {reg.home} yet (nothing to check)")
        return report
    lock = reg.lock_path
    odd = lock_problem(lock)
    if odd is not None:  # what stands in the lock's place: every write fails on it (sweeps 62, 67, 70)
        if repair and (lock.is_symlink() or not lock.is_dir()):  # a link (not what it points to) or a special file:
            lock.unlink()                                         # neither holds anything
            report.repaired.append(f"removed what stood in the registry lock's place ({lock.name}: "
                                   f"{odd.split(';')[0]})")
        elif repair and not any(lock.iterdir()):
            lock.rmdir()
            report.repaired.append(f"removed the empty directory {lock.name} where the registry's lock file goes")
        else:
            report.problems.append(f"the registry lock {lock}: {odd}; every write fails")
            return _check(reg, report, False, component_problem)
    try:
        with reg.write_lock():
            return _check(reg, report, repair, component_problem)
    except LockUnavailable as exc:
        if repair:
            raise
        report.notes.append(f"{exc}: checked without it, so a writer running now could show as damage")
        return _check(reg, report, False, component_problem)


def _check(reg: "Registry", report: CheckReport, repair: bool,
           component_problem: "Callable[[Any], str | None] | None" = None) -> CheckReport:
    if repair:
        _repair(reg, report)
    _check_database(reg, report)
    if report.problems:
        return report
    records = lambda reg, report: _check_records(reg, report, component_problem)  # noqa: E731
    for part in (records, _check_blob_dir, _check_index, _check_graph):
        try:
            part(reg, report)
        except IntegrityError as exc:  # a damaged record met while checking a cache: named once, not a traceback
            if str(exc) not in report.problems:
                report.problems.append(str(exc))
    return report


def _check_database(reg: "Registry", report: CheckReport) -> None:
    try:
        conn = reg._db()
        res = conn.execute("PRAGMA integrity_check").fetchall()
        if [r[0] for r in res] != ["ok"]:
            report.problems.append(f"database integrity check failed: {res[0][0]}")
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        if fk:
            report.problems.append(f"database has {len(fk)} rows that point at missing records")
    except (LoraplexError, Exception) as exc:  # sqlite3.DatabaseError for a file that is not a database
        report.problems.append(f"database unreadable: {exc}")
        return
    # the meta values every cache and signature read uses
    try:
        reg.generation()
    except IntegrityError as exc:
        report.problems.append(str(exc))
    sizes = _stored_dims(reg)
    have = reg.meta("dim")
    if len(sizes) == 1 and have != str(next(iter(sizes))):
        what = "no signature dimension (its meta 'dim' is gone)" if have is None else f"its stored 'dim' ({have})"
        report.problems.append(f"registry database {reg.db_path}: it holds adapters of {next(iter(sizes))} dimensions "
                               f"but {what}; `--repair` sets it")
    else:
        try:
            reg.signature_dim()
        except IntegrityError as exc:
            report.problems.append(str(exc))


def _stored_dims(reg: "Registry") -> set[int]:
    """The dimensions (float32 values) of the stored description embeddings: one for a sound registry."""
    rows = reg._db().execute("SELECT DISTINCT length(embedding) FROM adapters").fetchall()
    return {int(r[0]) // 4 for r in rows if isinstance(r[0], int)}


def _check_records(reg: "Registry", report: CheckReport,
                   component_problem: "Callable[[Any], str | None] | None" = None) -> None:
    # the records' LoraSpecs, by the rules `register` applies (a broken one cannot even be listed)
    bad_specs = []
    for name, text in reg._db().execute("SELECT name, spec FROM adapters ORDER BY id"):
        try:
            stored_spec(name, text)
        except IntegrityError as exc:
            bad_specs.append(f"{exc} (remove it, or register it again)")
            continue
        try:
            reg.get_adapter(name)  # its JSON fields (metrics, extra) read back too
        except IntegrityError as exc:
            bad_specs.append(str(exc))  # stored_record's message says what to do
    try:
        reg.edges()
    except IntegrityError as exc:
        bad_specs.append(str(exc))
    readable = []
    for kind, name in reg._db().execute("SELECT kind, name FROM components ORDER BY id"):
        try:
            readable.append(reg.get_component(kind, name))
        except IntegrityError as exc:
            bad_specs.append(str(exc))
    # a router and an adapter of one name (refused at fit and register; a hand edit or a merged copy can make it)
    for (name,) in reg._db().execute("SELECT c.name FROM components c JOIN adapters a ON a.name = c.name "
                                     "WHERE c.kind = 'router' ORDER BY c.id"):
        report.problems.append(f"router {name!r} and adapter {name!r} share one model name (a request naming it "
                               "is ambiguous): remove one of them, or fit or register it again under another name")
    if bad_specs:
        report.problems.extend(bad_specs)
        # the readable components' own fields are still checked: one unreadable record hid them (sweep 38)
        report.problems.extend(p for c in readable for p in (router_members_problem(c),
                                                            component_problem(c) if component_problem else None) if p)
        return
    stored = reg.base_fingerprints()
    bases, damaged_bases = {}, set()
    for sha, (base, text) in stored.items():
        try:
            bases[sha] = reg.stored_fingerprint(sha, base, text)
        except IntegrityError as exc:
            report.problems.append(str(exc))
            damaged_bases.add(sha)
    records = reg.list_adapters()
    for rec in records:  # what registration guarantees of a record, read back (a hand edit can break it)
        try:
            validate_name(rec.name, stored=True)
        except UserInputError as exc:
            report.problems.append(f"adapter {rec.name!r}: its stored name breaks the naming rules ({exc}); "
                                   "remove it, or register it again")
        renamed = rec.base_sha in stored and stored[rec.base_sha][0] != rec.base
        if renamed and not _same_base(rec.base, rec.base_sha, reg.settings):
            report.problems.append(f"adapter {rec.name!r}: its stored base name {rec.base!r} is not the name of the "
                                   f"base it was registered on ({stored[rec.base_sha][0]!r}); remove it, or register "
                                   "it again")
    from loraplex.models import current_sha

    now = {name: current_sha(name, reg.settings)  # None: cannot be read here
           for name in sorted({r.base for r in records})}
    for rec in records:
        if now[rec.base] is not None and now[rec.base] != rec.base_sha:
            report.problems.append(f"adapter {rec.name!r}: base {rec.base!r} has changed since it was registered (its "
                                   "fingerprint differs), so it cannot load on it: register the adapter again")
    report.counts["adapters"] = len(records)
    report.counts["snapshots"] = sum(len(r.snapshots) for r in records)
    names = {r.name for r in records}
    for ref in dict.fromkeys(r.task for r in records if r.task and is_task_path(r.task)):
        card = reg.task_card(ref) or {}
        try:  # the description on record stands in for a file without one: its labels are what is compared
            task = reg.load_task(ref, fallback_description=card.get("description"))
        except TaskNotFound:
            continue  # gone: answered from the recorded card, as `query` says when it matters
        except InvalidTaskFile as exc:
            report.notes.append(f"the task file of {', '.join(r.name for r in records if r.task == ref)} no longer "
                                f"loads ({exc}): queries are answered from the labels on record; evaluating on it fails")
            continue
        for r in records:
            own = (r.extra.get("task_cards") or {}).get(ref) if r.task == ref else None
            learned = set(map(str, own.get("labels") or ())) if isinstance(own, dict) else set()
            if len(learned) >= 2 and learned != set(task.labels):
                report.notes.append(
                    f"adapter {r.name!r} learned the labels {', '.join(sorted(learned))} of {ref}, whose labels are now "
                    f"{', '.join(task.labels)}: it answers with the ones it learned; train it again to use the new ones")
    for rec in records:
        try:
            adapter = Adapter.from_bytes(rec.spec, reg.read_blob(rec.blob, owner=f"adapter {rec.name!r}"),
                                         where=f"adapter {rec.name!r}")
        except Unreadable as exc:  # permissions, not damage: nothing to remove
            report.problems.append(str(exc))
            continue
        except LoraplexError as exc:
            report.problems.append(f"{exc} (remove it, or register it again)")
            continue
        if not reg.shapes_match(rec, adapter):
            report.problems.append(f"adapter {rec.name!r}: its blob's shapes disagree with its record")
        fp = bases.get(rec.base_sha)
        if fp is None and rec.base_sha in damaged_bases:  # said once, for the base
            pass
        elif fp is None:
            report.problems.append(f"adapter {rec.name!r}: the fingerprint of its base {rec.base!r} is missing")
        else:
            try:
                adapter.check_fits(fp, name=f"adapter {rec.name!r}")
            except LoraplexError as exc:
                report.problems.append(str(exc))
        for snap in rec.snapshots:
            try:
                reg.load_snapshot(rec, snap)
            except LoraplexError as exc:  # "snapshot N of 'x': ...": its weights may be whole (eval works)
                report.problems.append(f"{exc} (the adapter's own weights are checked apart)")
    for rec in records:  # an adapter that answers with others cannot load without them (removed by hand, by SQL)
        gone = [n for n in rec.composition if n != rec.name and n not in names]
        if gone:
            report.problems.append(f"adapter {rec.name!r} answers with a composition whose adapters "
                                   f"{', '.join(gone)} are gone: it cannot be loaded (remove it)")
    try:
        if reg.signature_dim():
            bad = reg.damaged_signature_records()  # each named: the fix is that adapter's, not a rebuild
            report.problems.extend(f"{b}; remove it, or register it again" for b in bad)
            if not bad and reg.signatures()[2].shape[0] != len(records):
                report.problems.append("stored signatures are damaged (wrong size)")
    except IntegrityError as exc:  # a damaged dimension or signature: named, and the caches are not rebuilt
        report.problems.append(str(exc))
    damaged: list[str] = []
    comps = reg.list_components("router", damaged=damaged) + reg.list_components("generator", damaged=damaged)
    report.problems.extend(damaged)  # named, and the other components still checked
    report.counts["components"] = len(comps) + len(damaged)
    for c in comps:
        try:
            reg.read_blob(c.blob, owner=f"{c.kind} {c.name!r}")
        except IntegrityError as exc:
            report.problems.append(str(exc))
        for problem in (router_members_problem(c), component_problem(c) if component_problem else None):
            if problem:
                report.problems.append(problem)
        missing = [m for m in c.members if m not in names]
        if missing:
            report.problems.append(f"{c.kind} {c.name!r} routes over adapters that are gone: {', '.join(missing)}")
        if c.kind == "router":
            by_name = {r.name: r for r in records}
            other = [m for m in c.members if m in by_name and by_name[m].base != c.base]
            if other:
                report.problems.append(f"router {c.name!r} was fitted on base {c.base!r} but its adapters "
                                       f"{', '.join(other)} are now of another base")
    idle = _unused_runs(reg, [*records, *comps])
    if idle:
        shown = ", ".join(p.name for p in idle[:3]) + (f" and {len(idle) - 3} more" if len(idle) > 3 else "")
        report.notes.append(f"{len(idle)} run director{'y' if len(idle) == 1 else 'ies'} under {reg.home / 'runs'} "
                            f"that no record uses ({shown}): a command still running, one killed before it "
                            "registered anything, or the run of an adapter removed since; delete them when no "
                            "command is running (check never removes them)")


RECORDED_RUNS = ("train", "router", "forget")
"""Kinds of run directory (`Registry.new_run`) whose command records what it made with `extra["run_dir"]`
(a stream resumes from its own directory, which may hold no record yet)."""


def _unused_runs(reg: "Registry", records: list) -> list:
    """Run directories of `RECORDED_RUNS` that no adapter or component record names. A record names its run
    by its absolute path when it was made; a run under a `runs/` directory also counts by its name, so a
    registry home that was moved or copied (its records still naming the old path) knows its own runs."""
    runs = reg.home / "runs"
    if not runs.is_dir():
        return []
    recorded = [str(r.extra["run_dir"]) for r in records if isinstance(r.extra.get("run_dir"), str)]
    used = {os.path.realpath(p) for p in recorded}
    named = {Path(p).name for p in recorded if Path(p).parent.name == "runs"}
    return [p for p in sorted(runs.iterdir()) if p.is_dir() and p.name.split("-", 1)[0] in RECORDED_RUNS
            and os.path.realpath(p) not in used and p.name not in named]


def _check_blob_dir(reg: "Registry", report: CheckReport) -> None:
    stored = reg.stored_blobs()
    refs = reg.referenced_blobs()
    report.counts["blobs"] = len(stored)
    orphans = sorted(set(stored) - refs)
    if orphans:
        report.notes.append(f"{len(orphans)} blob(s) no record points at (left by an interrupted write, or records that went missing; --repair moves them to orphaned-blobs/)")
    temps = reg.temp_files()
    if temps:
        report.notes.append(f"{len(temps)} temp file(s) from interrupted writes (--repair deletes them)")


def _check_index(reg: "Registry", report: CheckReport) -> None:
    for file, what in ((INDEX_FILE, "signature index"), (ROUTE_INDEX_FILE, "routing index")):
        try:
            idx = SignatureIndex.load(reg.home / file)
        except IntegrityError as exc:
            report.problems.append(str(exc))
            continue
        gen = reg.generation()
        if idx is None:
            report.notes.append(f"{what} not built yet (built on first {'search' if file == INDEX_FILE else 'routing'})")
            continue
        if idx.stamp != reg.stamp():
            if idx.generation < gen and reg.stamp(idx.generation) == idx.stamp:
                report.notes.append(f"{what} lags the database (generation {idx.generation} < {gen}); caught up on next use")
            else:
                report.notes.append(f"{what} was built from another state of the database (generation {idx.generation}; "
                                    f"the database is at {gen}: restored from a backup, or replaced); rebuilt on next use")
            continue
        db_ids = reg.adapter_ids(routable=idx.weight is not None)  # routing: only adapters that answer alone
        if sorted(idx.ids.tolist()) != db_ids.tolist():
            report.problems.append(f"{what} does not hold exactly the registry's adapters")
            continue
        vecs = idx.vectors()
        if vecs is not None and len(db_ids):
            order = np.argsort(idx.ids)
            _, _, desc, proto = reg.signatures_by_id(db_ids)
            want = desc if idx.weight is None else routing_vectors(desc, proto, idx.weight)
            if not np.allclose(vecs[order], want, atol=1e-5, equal_nan=True):  # a NaN row: named by _check_records
                report.problems.append(f"{what} vectors differ from the stored signatures")


def _check_graph(reg: "Registry", report: CheckReport) -> None:
    try:
        cached = load_cached(reg)
    except IntegrityError as exc:
        report.problems.append(str(exc))
        return
    if cached is None:
        report.notes.append("lineage graph cache not built yet (built on first use)")
        return
    stamp, data = cached
    if stamp != reg.stamp():
        report.notes.append("lineage graph cache does not reflect the database's last write; rebuilt on next use")
        return
    if canonical(data) != canonical(to_json(build_graph(reg))):
        report.problems.append("lineage graph cache disagrees with the database")


def _rebuilt(reg: "Registry", report: CheckReport, file: str, what: str) -> None:
    """Say a cache was rebuilt only if its file is there now: a cache write that fails (a read-only home) is
    dropped by design, and "rebuilt" was printed over nothing."""
    if (reg.home / file).is_file():
        report.repaired.append(f"rebuilt the {what}")
    else:
        report.notes.append(f"could not write the {what} cache in {reg.home} (a read-only home?): it is built in "
                            "memory when needed")


def _repair(reg: "Registry", report: CheckReport) -> None:
    if not reg.exists:
        return
    with reg.write_lock():
        try:
            reg.generation()
        except IntegrityError:  # a counter, not data: set past every state the database remembers
            report.repaired.append(f"reset the damaged generation counter to {reg.reset_generation()}")
        for sha, (base, text) in reg.base_fingerprints().items():
            try:
                reg.stored_fingerprint(sha, base, text)
            except IntegrityError:  # written again from the base itself, where it still reads as registered
                try:
                    fp = fingerprint(resolve_base(base), reg.settings)
                except LoraplexError:
                    continue
                if fp.sha == sha:
                    reg.rewrite_fingerprint(sha, fp)
                    report.repaired.append(f"wrote the damaged fingerprint of base {base!r} ({sha[:12]}) again")
        sizes = _stored_dims(reg)
        if len(sizes) == 1 and reg.meta("dim") != str(next(iter(sizes))):  # every adapter agrees: the meta is wrong
            dim = next(iter(sizes))
            with reg.transaction() as c:
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
            report.repaired.append(f"set the damaged signature dimension to {dim}, its adapters' own")
        route_weight = None
        try:
            old_route = SignatureIndex.load(reg.home / ROUTE_INDEX_FILE)
            route_weight = old_route.weight if old_route is not None else None
        except IntegrityError:
            pass
        for name in (INDEX_FILE, ROUTE_INDEX_FILE, GRAPH_FILE):
            p: Path = reg.home / name
            drop_cached(p)
            if p.is_file() or p.is_symlink():
                p.unlink()
            elif p.exists():  # a directory where a cache goes: moved aside (what is in it is not ours to delete)
                aside = p.with_name(f"{p.name}.not-a-cache-{os.getpid()}-{int(time.time())}")
                p.rename(aside)
                report.repaired.append(f"moved {p}, which is not a file, aside to {aside}")
        try:
            rebuild = reg.signature_dim() > 0
        except IntegrityError:
            rebuild = False  # the check that follows names it
        try:
            if rebuild:
                SignatureIndex.sync(reg)
                _rebuilt(reg, report, INDEX_FILE, "signature index")
                if route_weight is not None:
                    SignatureIndex.sync(reg, weight=route_weight)
                    _rebuilt(reg, report, ROUTE_INDEX_FILE, "routing index")
        except IntegrityError:
            pass  # a damaged signature: the check that follows names it
        try:
            graph_json(reg)
            _rebuilt(reg, report, GRAPH_FILE, "lineage graph")
        except IntegrityError:
            pass  # a record damaged inside the database: the check that follows names it
        try:
            moved = reg.quarantine_unreferenced_blobs()
        except LoraplexError as exc:  # reported with what was repaired before it, not a bare error mid-repair
            report.problems.append(str(exc))
            moved = []
        if moved:
            report.repaired.append(f"moved {len(moved)} unreferenced blob(s) to {reg.orphan_dir} (delete the folder "
                                   "once nothing in it is missed)")
        temps = reg.temp_files() + list(reg.home.glob(".index-*")) + list(reg.home.glob(".graph-*"))
        for t in temps:
            t.unlink(missing_ok=True)
        if temps:
            report.repaired.append(f"deleted {len(temps)} temp file(s)")
