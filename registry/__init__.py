"""The adapter registry: AdapterRecord (pydantic), store (SQLite + safetensors blobs), index (faiss), lineage (networkx)."""

from loraplex.registry.record import AdapterDraft, AdapterRecord, ComponentRecord, Edge, Snapshot, validate_name
from loraplex.registry.store import Registry

__all__ = ["Registry", "AdapterDraft", "AdapterRecord", "ComponentRecord", "Edge", "Snapshot", "validate_name"]
