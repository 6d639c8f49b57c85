"""Registering the adapters a continual run trains, from what the run directory holds.

Each finished unit writes, inside its (atomically committed) state directory, everything its registry
record needs: the adapter and its snapshots as safetensors, and `record.json` (name, description,
task, origin, lineage edges, metrics, extra). `register_from_dir` then adds it to the registry. It
is idempotent: a record of the same name made by the same run and unit (a run killed after its commit
and before this call, then resumed) is accepted as already done; any other record of that name is an
error. So the registry never holds an adapter whose run state was not saved, and a resumed run
registers what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from loraplex.errors import AlreadyExists
from loraplex.fsio import atomic_write
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.registry.record import AdapterDraft, Edge
from loraplex.registry.signatures import description_embedding, prototype

ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "record.json"
SNAP_DIR = "snapshots"


def safe_part(text: str, limit: int = 40) -> str:
    """A piece of a registry name: letters, digits, '.', '_' and '-' only."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"
    return re.sub(r"\.{2,}", ".", out)[:limit]


def write_unit_adapter(state_dir: Path, adapter: Adapter, snapshots: Sequence[tuple[int, Adapter]],
                       record: dict[str, Any]) -> None:
    """Write the adapter, its snapshots and its record fields into a (not yet committed) state dir."""
    state_dir = Path(state_dir)
    atomic_write(state_dir / ADAPTER_FILE, adapter.to_bytes())  # an OSError (a full disk) names the file
    if snapshots:
        (state_dir / SNAP_DIR).mkdir(exist_ok=True)
        for step, snap in snapshots:
            atomic_write(state_dir / SNAP_DIR / f"{int(step):07d}.safetensors", snap.to_bytes())
    rec = dict(record)
    rec["spec"] = adapter.spec.model_dump(mode="json")
    atomic_write(state_dir / RECORD_FILE, json.dumps(rec, indent=1, sort_keys=True))


def register_from_dir(reg: Any, state_dir: Path, *, fingerprint: Any, prototype_texts: Sequence[str] = (),
                      member_blobs: dict[str, str] | None = None):
    """Add the unit's adapter to the registry (idempotent for the same run and unit). Returns the record.
    `member_blobs`: the weights of the adapters it was made over (`Registry.add_adapter` checks them)."""
    state_dir = Path(state_dir)
    rec = json.loads((state_dir / RECORD_FILE).read_text())
    name = rec["name"]
    if reg.has_adapter(name):
        have = reg.get_adapter(name)
        same = (have.extra.get("run_id") == rec["extra"].get("run_id") and have.extra.get("unit") == rec["extra"].get("unit")
                and have.blob == hashlib.sha256((state_dir / ADAPTER_FILE).read_bytes()).hexdigest())
        if same:  # a resumed run registering what it registered before it stopped
            return have
        raise AlreadyExists(f"an adapter named {name!r} already exists (not this run's: another run or command "
                            "registered it)")
    spec = LoraSpec(**rec["spec"])
    adapter = Adapter.from_bytes(spec, (state_dir / ADAPTER_FILE).read_bytes(), where=str(state_dir))
    snaps = []
    if (state_dir / SNAP_DIR).is_dir():
        for p in sorted((state_dir / SNAP_DIR).glob("*.safetensors")):
            snaps.append((int(p.stem), Adapter.from_bytes(spec, p.read_bytes(), where=str(p))))
    draft = AdapterDraft(
        name=name, base=rec["base"], base_sha=fingerprint.sha, family=rec["family"], description=rec["description"],
        task=rec.get("task"), origin=rec["origin"], spec=spec, metrics=rec.get("metrics", {}), extra=rec.get("extra", {}),
        edges=tuple(Edge(**e) for e in rec.get("edges", [])),
    )
    proto = prototype(reg, list(prototype_texts)) if prototype_texts else None
    return reg.add_adapter(draft, adapter, embedding=description_embedding(reg, draft.description), prototype=proto, snapshots=snaps,
                           embedder=reg.embedder_name, fingerprint_json=fingerprint.model_dump_json(),
                           member_blobs=member_blobs)
