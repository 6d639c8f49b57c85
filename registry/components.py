"""Components stored in the registry: routers and generators, each a record plus one safetensors blob.

A component names the adapters it covers (`members`); an adapter a component uses cannot be removed.
`Components` is a part of `Registry` (registry/store.py), which gives it blobs, the lock and transactions.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from loraplex.errors import AdapterNotFound, AlreadyExists, ComponentNotFound, IntegrityError, LoraplexError
from loraplex.registry.database import now, stored_record
from loraplex.registry.record import ComponentRecord, validate_name


class Components:
    """The components half of `Registry`: put, get, list, load, remove routers and generators."""

    def put_component(
        self,
        kind: str,
        name: str,
        *,
        method: str,
        base: str,
        config: dict[str, Any],
        tensors: dict[str, Any],
        members: Sequence[str],
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        member_blobs: Mapping[str, str] | None = None,
    ) -> ComponentRecord:
        """Store a router or generator: its weights (a safetensors blob) and the adapters it covers.
        `member_blobs`: each member's weights as the component was made from them; a member removed and
        registered anew under its name since (other weights) is refused, under the lock: the component would
        bind the new adapter to what it learned of the old one."""
        from safetensors.torch import save

        validate_name(name, kind)
        data = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})
        with self.write_lock():
            conn = self._db()
            if conn.execute("SELECT 1 FROM components WHERE kind = ? AND name = ?", (kind, name)).fetchone():
                raise AlreadyExists(f"a {kind} named {name!r} already exists")
            if kind == "router" and conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"an adapter named {name!r} already exists: a router of that name would "
                                    "share its model name (choose another)")
            for m in members:
                if not self.has_adapter(m):
                    raise AdapterNotFound(f"no adapter named {m!r} in the registry at {self.home}")
                if member_blobs and m in member_blobs and self.get_adapter(m).blob != member_blobs[m]:
                    raise LoraplexError(f"adapter {m!r} was registered anew (other weights) while this {kind} was "
                                        f"being made from it; nothing was stored: make the {kind} again")
            with self._writing(f"store {kind} {name!r}") as created, self.transaction() as c:
                sha = self.put_blob(data, created=created)
                c.execute(
                    "INSERT INTO components(kind, name, method, base, config, blob, members, metrics, extra, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, name, method, base, json.dumps(config, sort_keys=True), sha, json.dumps(list(members)),
                     json.dumps(metrics or {}, sort_keys=True), json.dumps(extra or {}, sort_keys=True), now()),
                )
        return self.get_component(kind, name)

    def _components(self, where: str, params: Sequence[Any], damaged: list[str] | None = None) -> list[ComponentRecord]:
        """The records selected, in order; a damaged one raises IntegrityError naming it, or, with `damaged`
        given, is left out and its message appended there (a listing shows the rest), as adapters' are."""
        conn = self._db(create=False)
        if conn is None:
            return []
        rows = conn.execute(
            "SELECT id, kind, name, method, base, config, blob, members, metrics, extra, created_at "
            f"FROM components {where} ORDER BY id", params).fetchall()
        out = []
        for r in rows:
            try:
                with stored_record(f"{r[1]} {r[2]!r}"):
                    out.append(ComponentRecord(id=r[0], kind=r[1], name=r[2], method=r[3], base=r[4],
                                               config=json.loads(r[5]), blob=r[6], members=json.loads(r[7]),
                                               metrics=json.loads(r[8]), extra=json.loads(r[9]), created_at=r[10]))
            except IntegrityError as exc:
                if damaged is None:
                    raise
                damaged.append(str(exc))
        return out

    def get_component(self, kind: str, name: str) -> ComponentRecord:
        recs = self._components("WHERE kind = ? AND name = ?", (kind, name))
        if not recs:
            raise ComponentNotFound(f"no {kind} named {name!r} in the registry at {self.home}")
        return recs[0]

    def has_component(self, kind: str, name: str) -> bool:
        """Whether a record of that kind and name exists, damaged or not."""
        conn = self._db(create=False)
        return conn is not None and conn.execute(
            "SELECT 1 FROM components WHERE kind = ? AND name = ?", (kind, name)).fetchone() is not None

    def list_components(self, kind: str, damaged: list[str] | None = None) -> list[ComponentRecord]:
        """The records of `kind`; `damaged`: see `_components`."""
        return self._components("WHERE kind = ?", (kind,), damaged)

    def load_component(self, kind: str, name: str) -> tuple[ComponentRecord, dict[str, Any]]:
        """The record and its tensors (hash verified)."""
        from safetensors.torch import load

        rec = self.get_component(kind, name)
        try:
            tensors = load(self.read_blob(rec.blob, owner=f"{kind} {name!r}"))
        except IntegrityError:
            raise
        except Exception as exc:
            raise IntegrityError(f"{kind} {name!r}: its weights cannot be read ({exc})") from None
        return rec, tensors

    def remove_component(self, kind: str, name: str) -> ComponentRecord | None:
        """Delete a component's record, then its blob unless shared. None: a damaged record (see `registry
        check`), removed all the same (what its damage message tells the user to do)."""
        with self.write_lock(), self._writing(f"remove {kind} {name!r}"):
            try:
                rec = self.get_component(kind, name)
            except IntegrityError:
                row = self._db().execute("SELECT id, blob FROM components WHERE kind = ? AND name = ?",
                                         (kind, name)).fetchone()
                with self.transaction() as c:
                    c.execute("DELETE FROM components WHERE id = ?", (row[0],))
                if isinstance(row[1], str) and len(row[1]) == 64 and all(ch in "0123456789abcdef" for ch in row[1]):
                    self.delete_unreferenced_blobs([row[1]])  # a damaged blob id names no file to delete
                return None
            with self.transaction() as c:
                c.execute("DELETE FROM components WHERE id = ?", (rec.id,))
            self.delete_unreferenced_blobs([rec.blob])
        return rec

    def components_using(self, adapter: str) -> list[ComponentRecord]:
        """The routers and generators built over `adapter`. A damaged component record is passed over (its
        own removal is what its damage message asks for), so it blocks neither other adapters' removal nor
        the listing of the others; one whose stored members still name `adapter` is an IntegrityError saying
        so (the adapter went silently: sweep 34)."""
        damaged: list[str] = []
        comps = [c for kind in ("router", "generator") for c in self.list_components(kind, damaged=damaged)]
        if damaged:
            whole = {(c.kind, c.name) for c in comps}
            named = [f"{k} {n!r}" for k, n, m in self._db().execute("SELECT kind, name, members FROM components")
                     if (k, n) not in whole and isinstance(m, str) and json.dumps(adapter) in m]
            if named:
                raise IntegrityError(f"adapter {adapter!r} is named by {', '.join(named)}, whose stored record is "
                                     "damaged: remove that first (`loraplex registry check` names the damage)")
        return [c for c in comps if adapter in c.members]
