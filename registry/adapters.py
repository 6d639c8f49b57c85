"""The registry's jobs on adapters: register a PEFT directory, export one, search, describe, remove.

PEFT's directory format (`adapter_config.json` + `adapter_model.safetensors`, experts/peft_io.py) is
the exchange format in and out. Registering checks everything first (name, description, the base's
fingerprint, module names aligned onto the base's, shapes) and writes last, in one transaction.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraplex.errors import (AdapterNotFound, AlreadyExists, IncompatibleAdapter, InvalidAdapter, LoraplexError,
                             LoraplexWarning, UserInputError)
from loraplex.experts.peft_io import align_modules, peft_config, read_peft_dir, write_peft_dir
from loraplex.experts.spec import unread_module
from loraplex.fsio import user_path
from loraplex.heads import HEADS
from loraplex.models import fingerprint, load_tokenizer, resolve_base
from loraplex.registry.index import SignatureIndex
from loraplex.registry.record import AdapterDraft, AdapterRecord, Edge, validate_description, validate_name
from loraplex.registry.signatures import description_embedding, embed, prototype
from loraplex.registry.store import Registry
from loraplex.settings import Settings


@contextmanager
def _about(field: str) -> Iterator[None]:
    """Errors raised inside are marked as being about input `field` (a first mark stays): the server names
    that field in its error's `param`."""
    try:
        yield
    except LoraplexError as exc:
        raise exc.about(field) from None


def register_peft(reg: Registry, settings: Settings, path: str | Path, *, name: str, description: str | None,
                  task: str | None = None, base: str | None = None, declared_must_match: bool = False,
                  default_description: str | None = None) -> AdapterRecord:
    """Register the PEFT LoRA directory `path` under `name` (origin "imported"). Returns its record.
    `declared_must_match`: `base` is not the caller's choice (a server's own base), so a directory whose config
    names another base is refused, not applied to this one because its shapes fit (any MiniLM-L6 checkpoint
    fits another's: sweep 33); `--base` on the CLI is the user's word that it applies. `description`: None takes
    the task's, else `default_description` (the server's, made from the path); the one place a registered
    adapter's description is resolved (sweep 70: the server resolved it a second time, by other rules)."""
    with _about("name"):
        validate_name(name)
        if reg.has_adapter(name):
            raise AlreadyExists(f"an adapter named {name!r} already exists")
    if task is not None and not str(task).strip():
        raise UserInputError("the task is empty: name an embedded task or a task file, or leave it out").about("task")
    if description is not None and not description.strip():  # given, and blank: not read as not given
        raise UserInputError("the description is empty: say what the task is in words, or leave it out to take "
                             "the task's").about("description")
    if description is None and task is not None:
        with _about("task"):  # the task's own (an embedded task's; a task file's sidecar), as `train` takes it;
            # a task file without one takes `default_description` where the caller has one (the server's)
            description = reg.load_task(task, fallback_description=default_description).description
    description = description or default_description
    if not description:
        raise UserInputError("a description is required: it is how the adapter is found and routed to (give "
                             "a description, or a task that has one)").about("description")
    with _about("description"):
        description = validate_description(description)
    with _about("path"):
        adapter, cfg = read_peft_dir(path)
    with _about("base" if base else "path"):  # the base named by --base, else by the directory's config
        if base is not None and not base.strip():  # "" read as not given: the directory's own base was used
            raise UserInputError("the base is empty: name a base model, or leave it out to use the adapter's own")
        ref = resolve_base(base or cfg.get("base_model_name_or_path"))
        fp = fingerprint(ref, settings)
    declared = cfg.get("base_model_name_or_path")
    if declared_must_match and isinstance(declared, str) and declared.strip():
        try:
            same = resolve_base(declared).name == ref.name
        except UserInputError:  # a base unknown here is not this one
            same = False
        if not same:
            raise IncompatibleAdapter(f"adapter at {path} was made for base {declared!r} (its adapter_config.json), "
                                      f"not {ref.name!r}: load it where that base is served, or register it with "
                                      f"`loraplex adapters register --base {ref.name}` to apply it to this one "
                                      "anyway").about("path")
    with _about("path"):
        adapter = align_modules(adapter, fp.modules)
        adapter.check_fits(fp, name=f"adapter at {path}")
        unread = [m for m in adapter.modules if unread_module(m)]
        if unread and len(unread) == len(adapter.modules):
            raise InvalidAdapter(f"adapter at {path} adapts only {', '.join(unread[:3])}, which no loraplex head reads "
                                 "(the pooler): it would change no answer")
        if unread:  # kept in the blob and the export; not applied (experts/layers.inject)
            warnings.warn(f"adapter at {path}: {', '.join(unread[:3])} kept in the adapter and its export but not "
                          "applied: no loraplex head reads the pooler", LoraplexWarning, stacklevel=2)
    with _about("task"):
        # a task file without a description of its own takes the adapter's
        task_obj = reg.load_task(task, fallback_description=description) if task else None
        if task_obj is not None:  # labels the base reads as one: every query routed to the adapter would fail
            labels_read_apart(ref, settings, task_obj)
    edges = (Edge.to_task(task_obj.ref, "trained-on"),) if task_obj else ()
    draft = AdapterDraft(
        name=name, base=ref.name, base_sha=fp.sha, family=ref.family, description=description.strip(),
        task=task_obj.ref if task_obj else None, origin="imported", spec=adapter.spec, edges=edges,
        extra={"source": str(Path(path).absolute()),
               **({"task_cards": {task_obj.ref: task_obj.card()}} if task_obj else {})},
    )
    proto = prototype(reg, [e.text for e in task_obj.train]) if task_obj else None
    return reg.add_adapter(draft, adapter, embedding=description_embedding(reg, draft.description), prototype=proto,
                           embedder=reg.embedder_name, fingerprint_json=fp.model_dump_json())


def labels_read_apart(ref, settings: Settings, task) -> None:
    """Refuse a task whose label texts base `ref`'s tokenizer reads as one (an uncased encoder's "Pos" and
    "pos"), as `train` refuses it: its family's head (with its default config) checks them."""
    HEADS.build(ref.family, {}).check_labels(load_tokenizer(ref, settings), task)


def export_peft(reg: Registry, name: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a registered adapter as a PEFT directory that PeftModel.from_pretrained loads."""
    home, out = os.path.realpath(reg.home), os.path.realpath(user_path(out_dir))  # "" and a NUL byte refused
    if os.path.commonpath([home, out]) == home:  # its blobs, runs or the home itself: the registry's own storage
        raise UserInputError(f"{out_dir}: inside the registry home {reg.home}, which is the registry's own storage; "
                             "export somewhere else").about("path")
    rec, adapter = reg.load_adapter(name)
    fps = reg.base_fingerprints()
    if rec.base_sha not in fps:
        raise IncompatibleAdapter(f"adapter {name!r}: the fingerprint of its base is missing (run `loraplex registry check`)")
    fp = reg.stored_fingerprint(rec.base_sha, *fps[rec.base_sha])
    try:
        peft_name = resolve_base(rec.base).peft_name
    except UserInputError:
        peft_name = rec.base
    cfg = peft_config(adapter, base_model_name_or_path=peft_name, all_linear=fp.linear_names(),
                      fan_in_fan_out=any(m in fp.conv1d for m in adapter.modules), family=rec.family)
    return write_peft_dir(adapter, out_dir, cfg, overwrite=overwrite)


def search(reg: Registry, text: str, k: int = 5) -> list[dict[str, Any]]:
    """The k adapters whose descriptions are nearest to `text` (cosine similarity), best first."""
    if not text or not text.strip():
        raise UserInputError("the search text is empty")
    if k < 1:
        raise UserInputError("-k must be at least 1")
    if reg.count() == 0:
        return []
    idx = SignatureIndex.sync(reg)
    scores, ids = idx.search(embed(reg, [text]), k)
    names = reg.names_by_id([int(i) for i in ids[0] if i >= 0])
    out = []
    for sc, i in zip(scores[0], ids[0]):
        if i < 0 or int(i) not in names:
            continue
        rec = reg.get_adapter(names[int(i)])
        out.append({"name": rec.name, "score": round(float(sc), 4), "task": rec.task, "base": rec.base,
                    "description": rec.description})
    return out


def describe(reg: Registry, name: str) -> dict[str, Any]:
    """An adapter's record as JSON, with its parents and the components (routers, generators) using it."""
    rec = reg.get_adapter(name)
    out = rec.model_dump(mode="json")
    out["parents"] = rec.parents
    out["used_by"] = [f"{c.kind}:{c.name}" for c in reg.components_using(name)]
    return out


def remove(reg: Registry, name: str) -> AdapterRecord | None:
    """Remove an adapter no component uses. None: a damaged record (see `registry check`), removed all the same."""
    if not reg.has_adapter(name):
        raise AdapterNotFound(f"no adapter named {name!r} in the registry at {reg.home}")

    def unused() -> None:  # under the write lock: a router or generator stored meanwhile is seen
        users = reg.components_using(name)
        if users:
            who = ", ".join(f"{c.kind} {c.name!r}" for c in users)
            raise UserInputError(f"adapter {name!r} is used by {who}; remove that first")
        # an adapter that answers with a composition (a forgetting adapter, a summed stream's) needs all of it
        bound = [r for r in reg.list_adapters(damaged=[]) if r.name != name and name in r.composition]
        if bound:
            what = ("forgetting adapter {!r} erases from" if bound[0].origin == "forgetting"
                    else "adapter {!r} answers with").format(bound[0].name)
            raise UserInputError(f"adapter {name!r} is part of the composition that {what}; remove "
                                 f"{', '.join(repr(r.name) for r in bound)} first")

    unused()  # early, before waiting for the lock
    return reg.remove_adapter(name, check=unused)
