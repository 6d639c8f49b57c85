"""The registry side of the generators: gather a training set, store and load a fitted generator,
register a generated adapter. The API's `fit_generator` / `generate_adapter` call these
(`read_examples`: labelled examples from a .jsonl/.csv file).

A fitted generator is a registry component (kind "generator"): its config, its own tensors (the CVAE,
the parameter space's mixing matrix and scales, the known tasks' representations), its members (the
adapters it learned from, which the registry then refuses to remove) and, in `extra`, the layout and
the list of training vectors `(adapter, snapshot step)`. Loading reads those vectors back from the
registry (hash-verified blobs) and rebuilds the parameter space from them.

A generated adapter is registered like any other: origin "generated", lineage edges
`generated-from` to its parents (the top-k known tasks it drew on), their similarities and weights in
`extra["parents"]`, the description's embedding as its signature (so `adapters search` and retrieval
routing find it) and, when examples were given, their mean embedding as its prototype.

Every check runs before anything is written; a refusal leaves the registry as it was.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from loraplex.data import CARD_ONLY, check_columns, read_rows, row_value, sidecar_path
from loraplex.errors import (AlreadyExists, IncompatibleAdapter, InvalidTaskFile, LoraplexError, LoraplexWarning, TaskNotFound,
                             UserInputError)
from loraplex.fsio import user_path
from loraplex.generators.base import GENERATORS, CVAEGenerator, GenContext, OutOfRange, Query, TrainingSet
from loraplex.generators.layout import ParamLayout
from loraplex.generators.refine import examples_task, refine_config, top_blocks
from loraplex.registry.record import AdapterDraft, Edge, one_base, validate_name
from loraplex.registry.signatures import description_embedding, prototype
from loraplex.seeding import one_at_a_time
from loraplex.tasks import (MAX_LABELS, checked_labels, checked_seed, folded_labels, lone_surrogate,
                            validate_description, visible)

KIND = "generator"


def default_members(reg) -> list[str]:
    """Every registered adapter that was trained for a task and answers it alone: not generated (generators
    learn from real training), not a forgetting adapter (it erases a task; its layout is the feed-forward
    one) and not a summed stream's adapter trained on top of earlier ones (`record.composition_of`: its
    weights alone are not its task's adapter)."""
    recs = [r for r in reg.list_adapters() if r.origin != "generated" and len(r.composition) == 1
            and r.task]  # trained for a task: an import without one hands its children no label set (sweep 41)
    bases = sorted({r.base for r in recs})
    if len(bases) > 1:
        raise UserInputError(
            f"the registry holds adapters of {len(bases)} base models ({', '.join(bases)}); "
            "name the ones to learn from with --adapters")
    return [r.name for r in recs]


def _final_step(rec) -> int:
    """The step the adapter itself stands at (its training run's length)."""
    steps = rec.metrics.get("steps")
    if isinstance(steps, (int, float)) and steps > 0:
        return int(steps)
    if rec.snapshots:  # evenly spaced snapshots: first + last = the run's length
        return rec.snapshots[0].step + rec.snapshots[-1].step
    return 1


def training_set(reg, names: Sequence[str], *, snapshots: bool = True,
                 sources: Sequence[Sequence] | None = None, layout: ParamLayout | None = None) -> TrainingSet:
    """The member adapters' vectors (and their snapshots'), checked against one layout.

    With `sources` (a stored generator's list of (adapter, step)), exactly those vectors, in that order."""
    names = list(names)
    if len(names) < 2:
        raise UserInputError(f"a generator learns from at least 2 adapters, got {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserInputError(f"adapter {dup[0]!r} is named twice")
    recs = [reg.get_adapter(n) for n in names]
    for r in recs:  # as default_members leaves out: its weights alone are not its task's adapter
        if r.bound_to():
            raise UserInputError(f"{r.bound_to()}; a generator learns from adapters that answer alone, so it "
                                 "cannot learn from it")
    one_base(recs, "a generator learns from adapters of one base model; these differ")
    loaded = {r.name: reg.load_adapter(r)[1] for r in recs}
    against = "the generator's layout"
    if layout is None:
        layout = ParamLayout.of(loaded[names[0]])
        against = f"the layout of {names[0]!r}"
    for r in recs:  # the adapters themselves first: a mismatch is named by the adapter, not by a snapshot
        layout.check(loaded[r.name], name=f"adapter {r.name!r}", against=against)
    by_name = {r.name: r for r in recs}
    if sources is None:
        sources = []
        for r in recs:
            if snapshots:
                sources.extend((r.name, s.step) for s in r.snapshots)
            sources.append((r.name, -1))
    vecs, owner, prog = [], [], []
    for adapter_name, step in sources:
        rec = by_name.get(adapter_name)
        if rec is None:
            raise IncompatibleAdapter(f"training vector from {adapter_name!r}, which is not a member")
        step = int(step)
        if step < 0:
            ad, label, t = loaded[adapter_name], f"adapter {adapter_name!r}", 1.0
        else:
            snap = next((s for s in rec.snapshots if s.step == step), None)
            if snap is None:
                raise IncompatibleAdapter(f"adapter {adapter_name!r} has no snapshot at step {step} any more")
            ad, label = reg.load_snapshot(rec, snap), f"snapshot {step} of {adapter_name!r}"
            t = min(1.0, step / _final_step(rec))
        vecs.append(layout.flatten(ad, name=label, against=against))
        owner.append(names.index(adapter_name))
        prog.append(t)
    stacked = torch.stack(vecs)
    if bool((stacked == stacked[0]).all()):  # nothing to learn a mapping from (the fit divided by zero spread)
        twins = " and ".join(repr(n) for n in names[:2]) + (f" (and {len(names) - 2} more)" if len(names) > 2 else "")
        raise UserInputError(f"adapters {twins} have identical weights: a generator learns from members that differ")
    _, _, emb, _ = reg.signatures(names)
    return TrainingSet(
        layout=layout, members=names, descriptions=[r.description for r in recs], tasks=[r.task for r in recs],
        base=recs[0].base, vectors=stacked, owner=owner, progress=torch.tensor(prog),
        sources=[(a, int(s)) for a, s in sources], desc_embeddings=torch.from_numpy(emb),
        # each member's own card (what it learned), not the newest adapter's of that file
        task_cards={r.task: _own_card(r) or reg.task_card(r.task) or {} for r in recs if r.task},
        blobs={r.name: r.blob for r in recs},
    )


def _own_card(rec) -> dict | None:
    card = (rec.extra.get("task_cards") or {}).get(rec.task)
    return card if isinstance(card, dict) else None


def _parse_config(method: str, config: dict[str, Any] | None):
    entry = GENERATORS.get(method)
    return entry, entry.make_config(config or {})


def answers_among(labels_from: str | None, labels: Sequence[str] | None,
                  among: "Mapping[str, Sequence[str] | None] | Sequence[str]") -> bool:
    """Whether an adapter whose labels come from adapter `labels_from`, label set `labels`, answers as one of
    `among` does (auto: the adapters near a request, each with its label set or None; a plain sequence of
    names is read as names alone): it is one of them, or its label set is one of theirs (read as labels are
    matched everywhere, `label_fold`: case, Unicode normalisation and format characters aside)."""
    if labels_from is not None and labels_from in among:
        return True
    if not labels or not isinstance(among, Mapping):
        return False
    want = folded_labels(labels)
    return any(v and folded_labels(v) == want for v in among.values())


@one_at_a_time
def fit(reg, settings, name: str, *, method: str, adapters: Sequence[str] | None = None,
        config: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Fit a generator on registered adapters and store it; returns its summary."""
    validate_name(name, KIND)
    entry, cfg = _parse_config(method, config)
    if reg.has_component(KIND, name):
        raise AlreadyExists(f"a generator named {name!r} already exists")
    if adapters is not None and not list(adapters):  # [] is not "all": leave it out for every trained adapter
        raise UserInputError("the adapter list is empty: name at least 2 adapters, or leave it out for every "
                             "trained adapter of the registry")
    names = list(adapters) if adapters else default_members(reg)
    if not adapters and len(names) < 2:
        left = reg.count() - len(names)
        raise UserInputError(f"a generator learns from at least 2 trained adapters that answer alone; the registry "
                             f"holds {len(names)}" + (f" ({left} more left out: generated, forgetting, trained "
                                                      "with earlier ones summed in, or registered without a task: "
                                                      "register those with --task, or name them with --adapters)"
                                                      if left else ""))
    blobs = {n: reg.get_adapter(n).blob for n in names}  # an unknown name is named ("at least 2 adapters, got 1")
    reg.check_writable()  # a full disk or a read-only home: said before the fit, not after it (sweep 67)
    data = training_set(reg, names, snapshots=cfg.snapshots)
    gen: CVAEGenerator = entry.factory(cfg, GenContext(settings, reg.embedder_name, data.base))
    metrics = gen.fit(data, progress=progress)
    tensors, extra = gen.state()
    rec = reg.put_component(KIND, name, method=method, base=data.base, config=cfg.model_dump(mode="json"),
                            tensors=tensors, members=names, metrics=metrics, extra=extra, member_blobs=blobs)
    return summary(rec)


def load(reg, settings, name: str) -> tuple[Any, CVAEGenerator]:
    """A stored generator, ready to generate (its training vectors read back from the registry)."""
    rec, tensors = reg.load_component(KIND, name)
    entry, cfg = GENERATORS.stored_config(rec.method, rec.config, f"generator {name!r}")
    layout = ParamLayout.from_json(rec.extra["layout"])
    data = training_set(reg, rec.members, sources=rec.extra["sources"], layout=layout)
    gen: CVAEGenerator = entry.factory(cfg, GenContext(settings, reg.embedder_name, data.base))
    gen.restore(data, tensors, where=f"generator {name!r}")
    return rec, gen


def _checked_examples(examples: Sequence[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Examples as a generator and the new adapter's label set read them: each text visible; a label
    stripped, blank meaning none; labelled examples naming at least 2 labels (one alone is no label set:
    the adapter would answer with a parent's unrelated labels), checked as a query's labels are."""
    out: list[tuple[str, str | None]] = []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and isinstance(ex[0], str)
                and (ex[1] is None or isinstance(ex[1], str))):
            raise UserInputError(f"example {i + 1}: expected (text, label or None), got {str(ex)[:60]!r}")
        text, label = ex
        if not visible(text):
            raise UserInputError(f"example {i + 1}: the text is empty (or has no visible character)")
        if lone_surrogate(text) is not None:  # a JSON \ud800 escape in a file: the tokenizer's TypeError (sweep 42)
            raise UserInputError(f"example {i + 1}: the text is not valid UTF-8 text (it holds a lone surrogate, "
                                 "such as a JSON \\ud800 escape)")
        out.append((text, label.strip() if label and label.strip() else None))
    labels = list(dict.fromkeys(lab for _, lab in out if lab))
    if len(labels) == 1:
        raise UserInputError(f"the examples name one label ({labels[0]!r}); a label set needs at least 2 (or give "
                             "the examples without labels)")
    if len(labels) > MAX_LABELS:  # said of the examples (the bound is the one a query's label set has)
        raise UserInputError(f"the examples name {len(labels):,} labels; an adapter generated from examples answers "
                             f"with at most {MAX_LABELS}")
    if labels:
        try:
            checked_labels(labels)
        except UserInputError as exc:
            raise UserInputError(f"the examples' {exc}") from None
    return out


def _labels_read_apart(settings, member, labels: Sequence[str]) -> None:
    """Refuse example labels the base's tokenizer reads as one (an uncased encoder's "Happy" and "happy"):
    every later query of the adapter would fail on them (`heads.label_names_read_apart`)."""
    from loraplex.heads import label_names_read_apart
    from loraplex.models import load_tokenizer, resolve_base

    label_names_read_apart(member.family, load_tokenizer(resolve_base(member.base), settings), labels)


def _answering_task(reg, name: str, description: str, parents: list[dict[str, Any]],
                    labelled: list[str]) -> tuple[str | None, dict[str, Any]]:
    """(task ref, record extra) of the task a generated adapter answers with: with labelled examples of at
    least 2 labels, its most similar parent's task whose labels include them all, else a task of the
    examples' own labels (ref `examples:NAME`, known by its card); otherwise its most similar parent's task."""
    for p in parents:
        parent = reg.get_adapter(p["name"])
        ref = parent.task
        if not ref:
            continue
        # the parent's own card (the labels it learned), not the newest adapter's of its task file: after the
        # file's labels were renamed, a child of the old adapter answered with the new labels (sweep 37)
        card = _own_card(parent) or reg.task_card(ref)
        if len(labelled) >= 2:  # the examples say which labels: a parent's task only if it has them all
            try:
                have = set(card["labels"]) if card and card.get("labels") else set(reg.load_task(ref).labels)
            except LoraplexError:
                continue
            if not set(labelled) <= have:
                continue
        return ref, {"labels_from": p["name"], **({"task_cards": {ref: card}} if card and "labels" in card else {})}
    if len(labelled) >= 2:
        task = CARD_ONLY + name
        return task, {"labels_from": "examples", "task_cards": {task: {
            "name": name, "description": description, "labels": labelled, "label_texts": {}}}}
    return None, {}


@one_at_a_time
def generate(reg, settings, description: str, *, generator: str, name: str,
             examples: Sequence[tuple[str, str | None]] = (), seed: int = 0, label_task: bool = True,
             max_distance: float | None = None, refine_steps: int = 0, refine_blocks: int = 0,
             dry_run: bool = False, answer_among: Mapping[str, Sequence[str] | None] | Sequence[str] | None = None
             ) -> dict[str, Any]:
    """Write an adapter for a new task with a stored generator and register it; returns what was done.
    `dry_run`: everything up to the registration (every refusal the generator or the examples make), nothing
    written or refined: returns the task the adapter would answer with and its parents (`auto` asks so before
    any input of a request is written when one refusal refuses the whole request).

    The adapter records the task whose label set it answers with (an adapter with none could not answer a
    routed query): with labelled examples of at least 2 labels, the task of its most similar parent whose
    labels include them all, else a task of the examples' own labels (ref `examples:NAME`, known by its card);
    otherwise (`label_task`, the default; `auto` too: a request carries no label set) the task of its most
    similar parent that has one. `label_task=False` records no task. `max_distance` replaces the generator's refusal bound for this call (`auto` sets
    the one fitted for request texts, which sit farther from task descriptions than descriptions do).
    `refine_steps` > 0 refines the sample on the labelled examples (refine.py; `refine_blocks` > 0 moves only
    the top blocks' modules); the labels are checked before the generator is loaded. `answer_among`: the
    adapters whose labels it may answer with (`auto`: those near the request by its own score, each with its
    label set: one of their tasks or a task of the same label set, `answers_among`), else OutOfRange:
    a request's text sits far from every description, and its most similar parent by description was of
    another family than the request's (sweep 59: an airline tweet answered "shy", a football score "positive")."""
    validate_name(name)
    checked_seed(seed, "--seed")
    if not description or not description.strip():
        raise UserInputError("a description of the task is required: it is what the adapter is generated from")
    description = validate_description(description)
    # a bad value is refused here, by field
    refine = refine_config(steps=refine_steps, blocks=refine_blocks) if refine_steps else None
    if refine is None and refine_blocks:
        refine_config(blocks=refine_blocks)  # a bad value is named as such first
        raise UserInputError("--refine-blocks picks the blocks a refinement moves: pass --refine-steps N too")
    examples = _checked_examples(examples)  # before refinement reads them: a blank label is no label there too
    if refine is not None:
        if not examples:
            raise UserInputError("--refine-steps refines the adapter on labelled examples of the task: pass --examples FILE")
        examples_task(description, examples)
    if max_distance is not None and (isinstance(max_distance, bool) or not isinstance(max_distance, (int, float))
                                     or not 0 < max_distance <= 2):  # nan compared false: the bound never tripped
        raise UserInputError(f"max_distance must be a cosine distance above 0 and at most 2, got {max_distance!r}")
    if not dry_run:
        reg.check_adapter_name_free(name)
        reg.check_writable()  # before a refinement's steps, not after them (sweep 70)
    rec, gen = load(reg, settings, generator)
    if refine is not None:
        top_blocks(gen.data.layout, refine.blocks)  # a layout with no one stack of blocks is refused before sampling
    member = reg.get_adapter(rec.members[0])
    labelled = list(dict.fromkeys(lab for _, lab in examples if lab))
    if len(labelled) >= 2:  # the label set it may answer with: names its base's tokenizer reads apart
        _labels_read_apart(settings, member, labelled)
    if max_distance is not None:
        gen.config = gen.config.model_copy(update={"max_distance": float(max_distance)})
    where = f"generator {generator!r}"
    out = gen.generate(Query(description, list(examples)), seed=seed, where=where)
    parents = out.parents
    task, extra = _answering_task(reg, name, description, parents, labelled) if label_task else (None, {})
    if label_task and task is None and member.family != "causal":
        # an encoder answers only with a task's labels: the adapter was written, registered and could answer
        # nothing ("register the adapter with --task", which a generated one cannot be; sweep 61)
        raise OutOfRange(f"{where}: no parent of this adapter records a task, and an encoder answers only with a "
                         "task's labels; pass --examples with labels (their label set is then the adapter's)")
    if answer_among is not None and task is not None and not answers_among(
            extra.get("labels_from"), reg.task_labels(task, extra.get("task_cards")), answer_among):
        near = ", ".join(list(answer_among)[:3]) or "none"
        raise OutOfRange(f"{where} would answer with the labels of {extra.get('labels_from')!r}, which no adapter "
                         f"near the request ({near}) answers with: its answer would be another task's")
    if dry_run:
        return {"name": name, "generator": generator, "parents": parents, "distance": round(out.distance, 4),
                "task": task, "task_cards": extra.get("task_cards") or {}}
    if refine is not None:  # refined against the labels (and label texts) it will answer with, as it is scored and
        # as the benchmark refines (sweep 42: refined on the bare label words, the adapter answered with its
        # parent's task and texts; 77% where refining on those reached 85%); the parents do not depend on refining
        like = None  # a task of the examples' own labels (no label texts) answers as refine makes it without one
        if task is not None and not task.startswith(CARD_ONLY):
            like = reg.answering_task(task, card=(extra.get("task_cards") or {}).get(task), rows=False)
        out = gen.generate(Query(description, list(examples), task=like), seed=seed, where=where, refine=refine)
    draft = AdapterDraft(
        name=name, base=member.base, base_sha=member.base_sha, family=member.family,
        description=description, task=task, origin="generated", spec=out.adapter.spec,
        metrics={"generate_seconds": round(out.seconds, 4), "distance": round(out.distance, 4),
                 **({"refine": out.extra["refine"]} if "refine" in out.extra else {})},
        extra={"generator": generator, "generator_blob": rec.blob, "method": rec.method, "parents": parents,
               "seed": int(seed),
               "examples": len(examples), **extra},
        edges=tuple(Edge.to_adapter(p["name"], "generated-from") for p in parents),
    )
    emb = description_embedding(reg, draft.description)
    proto = prototype(reg, [t for t, _ in examples]) if examples else None
    # the parents as read (sweep 48: a parent removed mid-run and another adapter registered under its name became
    # the child's parent and label source): refused under the lock if one of them is not the adapter read any more
    new = reg.add_adapter(draft, out.adapter, embedding=emb, prototype=proto, embedder=reg.embedder_name,
                          member_blobs={p["name"]: gen.data.blobs[p["name"]] for p in parents})
    return {"name": new.name, "generator": generator, "method": rec.method, "parents": parents,
            "distance": round(out.distance, 4), "seconds": round(out.seconds, 4), "params": new.n_params,
            "base": new.base, "seed": int(seed), **({"refine": out.extra["refine"]} if "refine" in out.extra else {})}


def read_examples(path: str | Path) -> list[tuple[str, str | None]]:
    """Examples from a task-shaped file (.jsonl, .json, .csv, .tsv) with a `text` column and an optional `label` column."""
    p = user_path(path).absolute()
    if not p.exists():
        raise TaskNotFound(f"{p}: no such examples file")
    if p.is_dir():  # said "unknown task file type (none)" for a folder without a suffix
        raise InvalidTaskFile(f"{p}: is a directory, expected an examples file (.jsonl, .json, .csv, .tsv)")
    lines: list[int] = []
    rows = read_rows(p, lines)
    out = []
    for n, row in enumerate(rows, 1):
        line = lines[n - 1] if len(lines) == len(rows) else None  # where a fault is, as parse errors say it
        out.append((row_value(p, n, row, "text", line=line), row_value(p, n, row, "label", required=False, line=line)))
    check_columns(p, rows, ("text", "label"))
    if not out:
        raise InvalidTaskFile(f"{p}: no examples")
    side = sidecar_path(p)
    if side.exists():  # not a task: its label texts and declared labels would be dropped without a word
        warnings.warn(f"{side} is not read: examples give their texts and labels only (the generated adapter answers "
                      "with the task of a parent whose labels hold them, else with the bare label names)",
                      LoraplexWarning, stacklevel=2)  # it said "the bare label names" always (sweep 61)
    return out


def summary(rec) -> dict[str, Any]:
    m = rec.metrics
    return {"name": rec.name, "method": rec.method, "base": rec.base, "members": list(rec.members),
            "vectors": m.get("vectors"), "space_dims": m.get("space_dims"), "stored_params": m.get("stored_params"),
            "member_params": m.get("member_params"), "trained_params": m.get("trained_params"),
            "recon_mse": m.get("recon_mse"), "fit_seconds": m.get("fit_seconds"), "created_at": rec.created_at}


def list_generators(reg, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    return [summary(r) for r in reg.list_components(KIND, damaged=damaged)]


def remove(reg, name: str):
    return reg.remove_component(KIND, name)
