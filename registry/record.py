"""The registry's records (pydantic): adapters, their lineage edges and snapshots, and components
(routers, generators) that are stored beside the adapters they were fitted on.

Names are keys in the database and parts of file names in exports, so they are validated: 1 to 100
characters from letters, digits, '.', '_' and '-', starting with a letter or digit, never containing
'..' (so no path separators and no way out of a directory).
"""

from __future__ import annotations

import json

import re
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from loraplex.errors import IncompatibleAdapter, InvalidName
from loraplex.experts.spec import LoraSpec
from loraplex.tasks import MAX_DESCRIPTION, validate_description  # noqa: F401 (the registry's check too)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_NAME = 100
RESERVED = ("auto", "retrieval", "base", "minilm", "smollm2")
"""Names that mean something else where models are named (the server's `model`, `query --router`): `auto`,
the retrieval router, the embedded bases. Registered under one of them, a thing could never be reached."""

Origin = Literal["imported", "trained", "generated", "merged", "forgetting", "continual"]
EdgeKind = Literal["trained-from", "generated-from", "merged-from", "forgets", "trained-on"]


def validate_name(name: str, what: str = "adapter", *, stored: bool = False) -> str:
    """Return `name` if it is a safe registry name, else raise InvalidName with the reason. `stored`: a name
    read back from the registry (`registry check`), held to the rules a name always had: one that only reads
    as JSON (`null`, `5`) is refused for new names alone, as registries may already hold such names."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} name must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"{what} name is {len(name)} characters long; at most {MAX_NAME} are allowed")
    if "/" in name or "\\" in name:
        raise InvalidName(f"{what} name {name!r} contains a path separator")
    if ".." in name:
        raise InvalidName(f"{what} name {name!r} contains '..'")
    if name.lower() in RESERVED:
        raise InvalidName(f"{what} name {name!r} is reserved (it names {'auto' if name.lower() == 'auto' else 'a built-in model or router'} "
                          f"where models are chosen): choose another")
    if not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    if stored:
        return name
    try:  # `--set generator=NAME` reads its value as JSON: `null` named the default generator instead (sweep 35)
        as_json = json.loads(name)
    except ValueError:
        as_json = name
    if not isinstance(as_json, str):
        raise InvalidName(f"{what} name {name!r} reads as {'null' if as_json is None else type(as_json).__name__} "
                          "where `--set KEY=VALUE` names it: choose another")
    return name


class Edge(BaseModel):
    """A lineage edge from an adapter to a parent adapter (`adapter:NAME`) or a task (`task:REF`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    kind: EdgeKind

    @classmethod
    def to_adapter(cls, name: str, kind: EdgeKind) -> "Edge":
        return cls(target=f"adapter:{name}", kind=kind)

    @classmethod
    def to_task(cls, ref: str, kind: EdgeKind) -> "Edge":
        return cls(target=f"task:{ref}", kind=kind)


class Snapshot(BaseModel):
    """An intermediate adapter state kept from training (the generators learn from these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int
    blob: str


class AdapterDraft(BaseModel):
    """Everything needed to add an adapter, before the store gives it an id and a blob."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    base: str
    base_sha: str
    family: str
    description: str
    task: str | None = None
    origin: Origin = "imported"
    spec: LoraSpec
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    edges: tuple[Edge, ...] = ()


class AdapterRecord(BaseModel):
    """One registered adapter, as stored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    name: str
    base: str
    base_sha: str
    family: str
    description: str
    task: str | None
    origin: Origin  # what a draft may say: a hand-edited value is damage, named when the record is read
    spec: LoraSpec
    blob: str
    n_params: int
    modules: int
    rank: int
    metrics: dict[str, Any]
    extra: dict[str, Any]
    edges: tuple[Edge, ...]
    snapshots: tuple[Snapshot, ...]
    created_at: str

    @property
    def parents(self) -> list[str]:
        return [e.target.split(":", 1)[1] for e in self.edges if e.target.startswith("adapter:")]

    @property
    def composition(self) -> tuple[str, ...]:
        """The adapters this one answers with, itself included, in order (`composition_of`)."""
        return composition_of(self.name, self.origin, self.extra)

    def bound_to(self) -> str | None:
        """What ties it to the rest of its composition, said of it ("'f1' is a forgetting adapter: it erases
        airline from the composition a1, b1"), or None for an adapter that answers alone."""
        others = [n for n in self.composition if n != self.name]
        if not others:
            return None
        if self.origin == "forgetting":
            return f"{self.name!r} is a forgetting adapter: it erases {self.task} from the composition {', '.join(others)}"
        method = (self.extra.get("method") or {}).get("name", "a summing method") if isinstance(
            self.extra.get("method"), dict) else "a summing method"
        return (f"{self.name!r} was trained by a continual stream ({method}) with {', '.join(others)} summed in, "
                "and answers (and was scored) with them")

    def through_router(self) -> str | None:
        """Why it cannot be loaded at all, or None: a forgetting adapter of a stream whose method routes its
        adapters (`routed`, recorded as `summed: false`) was trained to erase a task from what the stream's
        router answered with; that router lives in the stream's run directory, not in the registry, so the
        adapter has nothing to be loaded on top of (summed, its composition is another model). Its figures
        are the stream's (its matrix and metrics)."""
        if self.origin != "forgetting" or self.extra.get("summed") is not False:
            return None
        run = self.extra.get("run_dir")
        return (f"{self.name!r} is a forgetting adapter of a stream whose adapters answer through the stream's "
                "router, which is not registered, so it cannot be loaded, evaluated or served"
                + (f" (its results are in {run})" if isinstance(run, str) else ""))

    def summary(self) -> dict[str, Any]:
        """The short form used by `adapters list`. A forgetting adapter's recorded accuracy is that of the rows
        it erased (low is success), so it is listed as `forgotten_accuracy`, not under `accuracy`. A routed
        stream's adapter's accuracy is the stream's router's on its task (`accuracy_through: router`)."""
        erased = self.origin == "forgetting"
        return {
            "name": self.name,
            "base": self.base,
            "task": self.task,
            "origin": self.origin,
            "rank": self.rank,
            "modules": self.modules,
            "params": self.n_params,
            "accuracy": None if erased else self.metrics.get("accuracy"),
            # scored by a routed stream's router over its adapters, not by this adapter alone (`eval` scores that)
            **({"accuracy_through": "router"} if self.metrics.get("scored_through") == "router" and not erased else {}),
            **({"forgotten_accuracy": self.metrics.get("accuracy")} if erased else {}),
            "description": self.description,
            **({"composition": list(self.composition)} if len(self.composition) > 1 else {}),  # answers with it
        }


def named_apart(recs: Sequence["AdapterRecord"], names: Sequence[str]) -> str | None:
    """Why adapters `names` (their records `recs`) cannot be used together, or None: one of them loads on
    nothing registered (`through_router`), or answers with a composition not all named. Names that are
    exactly one adapter's recorded composition stand as recorded (a seq-lora stream's adapter learned after
    a forget answers with the forgetting adapter on its own reused slot, not with what that forget erased
    from). The one rule for `load_members` and `forget --adapters`."""
    for rec in recs:
        if rec.through_router():
            return rec.through_router()
    if any(set(rec.composition) == set(names) for rec in recs):
        return None
    for rec in recs:
        if any(n not in names for n in rec.composition):
            return f"{rec.bound_to()}; name it with them ({','.join(rec.composition)}), not alone"
    return None


def composition_of(name: str, origin: str, extra: Any) -> tuple[str, ...]:
    """The adapters adapter `name` answers with, itself included, in order: the composition recorded by a
    forgetting adapter (it erases a task from it, and alone is only a perturbation of the base) or by an
    adapter of a continual stream whose method sums its adapters (O-LoRA: task t's adapter was trained with
    the earlier ones summed in, and its recorded accuracy is theirs together). Any other adapter answers
    alone. Whatever loads, serves, evaluates or removes an adapter reads this, so it answers as recorded."""
    comp = extra.get("composition") if isinstance(extra, dict) else None
    if not isinstance(comp, list) or not (origin == "forgetting" or extra.get("summed") is True):
        return (name,)
    names = tuple(dict.fromkeys(str(n) for n in comp))
    return names if name in names else (*names, name)


class ComponentRecord(BaseModel):
    """A router or generator stored in the registry with the adapters it was fitted on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    kind: Literal["router", "generator"]
    name: str
    method: str
    base: str
    config: dict[str, Any]
    blob: str
    members: tuple[str, ...]
    metrics: dict[str, Any]
    extra: dict[str, Any]
    created_at: str


def router_members_problem(rec: ComponentRecord) -> str | None:
    """What is wrong with a stored router's `members` against the adapters it was fitted on (`extra.expert_names`,
    stored with it), or None: a member listed twice, or members reordered (each gate slot then reads another
    adapter, silently: sweep 32). A joint router names its own copies: not compared."""
    if len(set(rec.members)) != len(rec.members):
        twice = next(m for m in rec.members if rec.members.count(m) > 1)
        return f"router {rec.name!r}: its stored record lists adapter {twice!r} twice (its record is damaged; fit it again)"
    tasks = rec.extra.get("tasks", [])
    if not isinstance(tasks, list) or not all(t is None or isinstance(t, str) for t in tasks):
        return f"router {rec.name!r}: its stored task list is not a list of task names (its record is damaged; fit it again)"
    fitted = rec.extra.get("expert_names")
    if rec.kind == "router" and not rec.extra.get("joint") and isinstance(fitted, list) \
            and list(fitted) != list(rec.members):  # emptied too: a router not joint routes registered adapters
        return (f"router {rec.name!r}: its stored members ({', '.join(rec.members)}) are not the adapters it was "
                f"fitted on, in order ({', '.join(map(str, fitted))}): its record is damaged; fit it again")
    return None


def one_base(recs: "list[AdapterRecord]", refusal: str) -> None:
    """Adapters used together must share one base model: its name and its fingerprint (two bases of the
    same shape, `minilm` and a local BERT of its size, share a fingerprint but not their weights).
    `refusal` starts the error, which lists each adapter with its base (and its fingerprint where the names
    agree: "air (minilm), bbc (minilm)" read as no difference at all; sweep 32)."""
    if len({(r.base, r.base_sha) for r in recs}) > 1:
        same_names = len({r.base for r in recs}) == 1
        raise IncompatibleAdapter(f"{refusal}: " + ", ".join(
            f"{r.name} ({r.base}{f', fingerprint {r.base_sha[:12]}' if same_names else ''})" for r in recs)
            + (" (one base, changed between registrations: register the odd ones again)" if same_names else ""))
