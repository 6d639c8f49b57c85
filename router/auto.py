"""auto: per request, route to the registered adapters, generate an adapter, or answer with the bare base.

Serving engines make the caller name the adapter; retrieval routing always picks one, however far the
request is from every task the registry knows. `auto` decides first, per request, from the request's
best routing score s1 = max_i <q, c_i> over the registry (the score retrieval ranks by: the query's
cosine to the adapter's description d_i and training-input prototype p_i, c_i = (1 - w) d_i + w p_i):

    s1 >= route_threshold              route: retrieval routing over the registry answers it
    generate_threshold <= s1 < route   generate: the request looks like the inputs of a family the
                                       registry knows but of no task in it; a stored generator writes
                                       an adapter from the request (its text is the description and its
                                       one example), registers it with `generated-from` lineage to the
                                       parents it drew on and the label set of the nearest parent's
                                       task, and that adapter answers. The next similar request routes
                                       to it (its signature is the request's embedding).
    otherwise                          base: the bare base answers (a causal LM generates; an encoder,
                                       which answers only with a task's label set, gives no answer), and
                                       the request is logged to `candidates.jsonl` in the registry home
                                       as a candidate new task.

With no generator stored for the base, the middle band cannot generate, and the decision is two-way:
route when s1 reaches `no_generator_threshold` (fitted for that choice: registered against new-world
requests), else base.

When the request names the labels it wants answered (`labels`), the base's nearest adapters are
re-ranked as retrieval re-ranks them (`RetrievalRouter.label_bonus`: `label_weight` times the Jaccard
overlap of that label set with each adapter's task's labels), so `nearest` and a routed request's
weights prefer an adapter trained on those labels; the thresholds still read the text score s1 (what
they were fitted on). Every answer is then one of those labels, the bare base's included (an encoder
scores the request against the labels' texts, a causal LM ranks them).

The generator checks its own distance too, and that the task its adapter would answer with is one of an
adapter near the request (`near_enough`): a refusal (`OutOfRange`) decides the request as with no
generator (route at `no_generator_threshold`, else base), with the generator's reason. Every answer carries `decision` and `reason` (the scores and thresholds
that made it), and `similarity`, `margin` (s1 - s2) and `nearest`.

The default thresholds are fitted on the embedded task library by `bench/auto.py` (leave-tasks-out over
the library's signatures; the fit and its curve are in `bench/results/auto.txt`): see `AutoConfig`.
The decision is one faiss search over the registry's routing index per batch of requests (`decide`);
each decision keeps what that search found for its base (`Decision.hits`), and a routed request's
adapters and weights are the retrieval router's gates over those same scores (`route_weights`), so
the search is not done again and `nearest` is always the routing's first adapter.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationError

from loraplex.catalog import MAX_COUNT, Options, options
from loraplex.embedders import get_embedder
from loraplex.errors import (AdapterNotFound, AlreadyExists, ComponentNotFound, DiskFull, IntegrityError,
                             LockUnavailable, LoraplexError, RegistryBusy, UserInputError)
from loraplex.generators.base import OutOfRange
from loraplex.generators.workflow import KIND as GENERATOR, answers_among, generate
from loraplex.heads import best_labels, head_for
from loraplex.models import current_sha, load_base, resolve_base
from loraplex.ranks import is_worker
from loraplex.registry.index import Hit, nearest_adapters, of_base
from loraplex.router.load import load_bank, load_retrieval
from loraplex.router.model import labels_task
from loraplex.router.retrieval import RetrievalRouter, label_overlap, record_labels, task_labels
from loraplex.tasks import validate_description, visible

Action = Literal["route", "generate", "base"]
CANDIDATES_FILE = "candidates.jsonl"
CANDIDATES_MAX_BYTES = 64 * 2**20
"""Past this size candidates.jsonl takes no more requests (each answer's reason says so): the log is for a
person to read and turn into tasks, and requests must not grow a server's disk without bound."""
CANDIDATES_LOCK_S = 1.0
"""How long logging a candidate waits for the registry's lock (held by another writer) before giving up."""
LOGGED_CHARS = 2000
"""A logged request's text is cut to this many characters (its full length is kept beside it)."""


NO_GENERATOR_THRESHOLD = 0.27
"""With no generator, route or base at this score: bench/auto.py's two-way fit on whole texts and their first
sentences (75.4% decision accuracy against 74.0% at the route threshold; bench/results/auto-forms.txt)."""


class AutoConfig(Options):
    """Route / generate / fall back, per request."""

    model_config = options()

    route_threshold: float = Field(0.35, ge=-1, le=1)
    """Route when the request's best routing score reaches this (fitted on the library: bench/auto.py)."""
    generate_threshold: float = Field(0.22, ge=-1, le=1)
    """Below the route threshold, generate when the best score reaches this and a generator exists."""
    no_generator_threshold: float = Field(NO_GENERATOR_THRESHOLD, ge=-1, le=1)
    """With no generator stored for the base, the decision is route or base: route when the best score
    reaches this (at most route_threshold). Fitted on registered against new-world requests, whole texts
    and their first sentences, as people type them (bench/auto.py). A config that sets route_threshold
    and not this one routes at its route_threshold either way (the bar the caller set)."""
    generator: str | None = None
    """The stored generator that writes adapters (default: the newest one of the base)."""
    generator_max_distance: float | None = Field(2.0, gt=0, le=2)
    """The generator's refusal bound for a request: cosine distance from the request's text to the nearest
    known task's representation. A request sits farther from task descriptions than a description does,
    so the generator's own bound (set for descriptions) is replaced; None keeps it. Fitted on the library
    (bench/auto.py), the distance adds nothing to the decision s1 already makes, so the default, 2, the
    largest cosine distance, refuses nothing."""
    top_k: int = Field(1, ge=1, le=MAX_COUNT)
    """Adapters retrieval mixes for a routed request, at most: where the request's base has fewer routable
    adapters (a server's registry grows and shrinks while it runs), all of them are mixed and the answer's
    `routing` lists which (a fixed set of adapters, `query --router retrieval --top-k`, refuses a top_k above it)."""
    prototype_weight: float = Field(0.8, ge=0, le=1)
    """Weight of the training-input prototype in the routing score (as retrieval's)."""
    label_weight: float = Field(0.25, ge=0, le=1)
    """Weight of the label-set match when a request names its labels (as retrieval's `label_weight`)."""
    log_candidates: bool = True
    """Append requests answered by the bare base to candidates.jsonl in the registry home."""


@dataclass
class Decision:
    text: str
    action: Action
    reason: str
    similarity: float | None  # s1, the best routing score (None: empty registry)
    margin: float | None  # s1 - s2
    nearest: str | None  # the adapter with the best score
    generator: str | None = None
    hits: list[Hit] = field(default_factory=list)  # the base's nearest adapters, best first
    near: tuple[str, ...] | None = None  # "generate": the adapters at a text score >= the generate threshold
    written: str | None = None  # a carried-out "generate": the adapter written (or reused) for the request
    created: bool = False  # that adapter was written by this decision (not found registered already)


def parse_config(config: dict[str, Any] | None) -> AutoConfig:
    try:
        cfg = AutoConfig(**(config or {}))
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserInputError(f"auto: {'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}") from None
    given = config or {}
    if cfg.generate_threshold > cfg.route_threshold and "generate_threshold" not in given:
        # a route_threshold set alone below the default generate threshold: that one follows it down
        cfg = cfg.model_copy(update={"generate_threshold": cfg.route_threshold})
    if cfg.generate_threshold > cfg.route_threshold:
        raise UserInputError(f"auto: generate_threshold {cfg.generate_threshold} is above route_threshold "
                             f"{cfg.route_threshold}; it must not be")
    if cfg.no_generator_threshold > cfg.route_threshold and "no_generator_threshold" in (config or {}):
        raise UserInputError(f"auto: no_generator_threshold {cfg.no_generator_threshold} is above route_threshold "
                             f"{cfg.route_threshold}; it must not be")
    if "route_threshold" in (config or {}) and "no_generator_threshold" not in (config or {}):
        cfg = cfg.model_copy(update={"no_generator_threshold": cfg.route_threshold})  # the bar the caller set holds
    return cfg


def _generator_of(reg, base: str | None, name: str | None, *, gone_ok: bool = False):
    """The generator to use for requests of `base`: the named one when it writes for that base, or the
    newest of `base` (None when there is none: a named generator of another base writes nothing for these
    requests, which are decided as having no generator; it wrote adapters of its own base for them).
    `gone_ok`: a named generator removed since (a server checked it at start) is no generator, not a fault
    of the request (every auto request that did not route was a 400 blaming the client)."""
    if name is not None:
        if not reg.has_component(GENERATOR, name):
            if gone_ok:  # removed since a server named it at start: its requests are decided without one
                return None
            raise UserInputError(f"auto: no generator named {name!r} in the registry")
        g = reg.get_component(GENERATOR, name)  # a damaged record: IntegrityError naming it
        return g if base is None or g.base == base else None
    gens = reg.list_components(GENERATOR, damaged=[])  # a damaged one is passed over: `registry check` names it
    gens = [g for g in gens if base is None or g.base == base]
    return max(gens, key=lambda g: g.created_at) if gens else None


def check_generator(reg, base: str | None, name: str | None) -> None:
    """The generator `auto` is told to use (`--set generator=NAME`) exists, for `base` when one is given:
    refused before anything runs (a server would otherwise start and fail requests at random)."""
    if name is None:
        return
    g = _generator_of(reg, None, name)
    if base is not None and g.base != base:
        raise UserInputError(f"auto: generator {name!r} writes adapters for base {g.base!r}, not {base!r}")


SEARCHED = 32
"""Adapters one search returns per request (at least top_k): the base's among them are its hits."""


def nearest_hits(reg, q: np.ndarray, cfg: AutoConfig, base: str | None, base_sha: str | None = None,
                 accept: Callable[[Hit], bool] | None = None) -> list[list[Hit]]:
    """Per query row, its nearest adapters of `base` (default: the base of the query's nearest adapter),
    best first: one faiss search for all rows. Adapters registered against another fingerprint of the base
    (`base_sha`, default: the base's fingerprint now) are left out: they cannot be loaded on it; so are those
    `accept` refuses. When what is left out fills the search, it goes deeper."""
    out, shas = [], {}
    if base is not None and base_sha is not None:
        shas[base] = base_sha
    k = max(SEARCHED, cfg.top_k)
    total = None
    for i, hits in enumerate(nearest_adapters(reg, q, k, weight=cfg.prototype_weight)):
        want = base or (hits[0].base if hits else None)
        if want is not None and want not in shas:
            shas[want] = current_sha(want, reg.settings)
        kept, deep = [h for h in of_base(hits, want, shas.get(want)) if accept is None or accept(h)], k
        # adapters of other bases (or fingerprints) filled the search: deeper, until the base's own are found or
        # the registry is read out (sweep 41: 32 of another base near a request hid every one of the served base's)
        while want is not None and len(kept) < k and len(hits) >= deep:
            total = reg.count() if total is None else total
            if deep >= total:
                break
            deep = min(total, deep * 8)
            hits = nearest_adapters(reg, q[i:i + 1], deep, weight=cfg.prototype_weight)[0]
            kept = [h for h in of_base(hits, want, shas.get(want)) if accept is None or accept(h)][:k]
        out.append(kept)
    return out


def route_weights(d: Decision, router: RetrievalRouter) -> list[tuple[str, float]]:
    """A routed request's (adapter, weight) pairs: the retrieval router's gates (its top_k and temperature,
    `RetrievalRouter.gates`) over the scores the decision read, best first, so `d.nearest` comes first."""
    if not d.hits:
        return []
    g = router.gates(np.array([[h.score for h in d.hits]], dtype=np.float32))[0]
    return [(d.hits[j].name, float(g[j])) for j in np.flatnonzero(g)]


def with_labels(hits: list[Hit], labels: Sequence[str] | None, weight: float,
                labels_of: dict[str, tuple[str, ...] | None]) -> list[Hit]:
    """`hits` re-ranked with the label-set match added to each score (retrieval's label term), best first
    (`labels_of`: each hit's adapter's label set)."""
    if not labels or weight == 0 or not hits:
        return hits
    bonus = weight * label_overlap(labels, [labels_of[h.name] for h in hits])
    return sorted((h._replace(score=h.score + float(b)) for h, b in zip(hits, bonus)), key=lambda h: -h.score)


UNREAD = ("the embedder reads nothing of the text (each character is one it does not know, as emoji are): "
          "nothing to route by")
"""The reason of a decision for a text that embeds as the embedder's unknown token only (`Embedder.reads`)."""


def decide(reg, texts: Sequence[str], cfg: AutoConfig, *, base: str | None = None, base_sha: str | None = None,
           queries: np.ndarray | None = None, labels: Sequence[Sequence[str] | None] | None = None,
           encoders_want_labels: bool = False) -> list[Decision]:
    """The decision for each request, from one embedding pass (or the given unit query vectors) and one
    faiss search. `labels`: per request, the label set it names (or None); `()` for a request that names none
    but must be answered with one (a classification without labels): only adapters whose task has labels are
    candidates (one registered without a task was chosen, and the request refused for want of labels, while
    an adapter trained on its task was there; sweep 27); `encoders_want_labels`: a request that names none is
    read as `()` where its nearest adapters are an encoder's (an encoder answers only with a label set; `query
    --router auto` on a registry of several bases: sweep 29). `base_sha`: the fingerprint of the loaded base (a
    server's), saving `nearest_hits` from reading the base's config."""
    texts = list(texts)
    per = list(labels) if labels is not None else [None] * len(texts)
    if len(per) != len(texts):
        raise ValueError(f"{len(texts)} requests but {len(per)} label sets")
    if reg.count() == 0:
        return [Decision(t, "base", "the registry holds no adapters", None, None, None) for t in texts]
    emb = get_embedder(reg.embedder_name)
    q = emb.encode(texts) if queries is None else np.asarray(queries, np.float32)
    # an embedder plugged in without `reads` (its protocol before sweep 57) is taken to read every text
    readable = emb.reads(texts) if hasattr(emb, "reads") else [True] * len(texts)
    gens: dict[str, Any] = {}
    read: dict[str, Any] = {}  # the records (and label sets) this round has read, each once
    labels_read: dict[str, Any] = {}
    out = []
    searched = max(SEARCHED, cfg.top_k)

    def has_labels(h: Hit) -> bool:  # read once a round, as `_records` reads
        rec = _records(reg, [h], read).get(h.name)
        if rec is not None and h.name not in labels_read:
            labels_read[h.name] = record_labels(reg, rec)
        return rec is not None and bool(labels_read[h.name])

    for row, (t, hits, want) in enumerate(zip(texts, nearest_hits(reg, q, cfg, base, base_sha), per)):
        if not visible(t):  # a prompt of spaces or zero-width characters: its embedding says nothing (sweep 27:
            # it was decided on, and logged as a candidate new task); the bare base continues it
            out.append(Decision(t, "base", "the text has no visible character: nothing to route by", None, None, None))
            continue
        if not readable[row]:  # emoji only, or a script the embedder does not know: every such text is one point
            out.append(Decision(t, "base", UNREAD, None, None, None))
            continue
        # each hit's record read once: an adapter removed since the search (the server's unload) is left out,
        # where a second read of it failed every request decided in the same round (sweep 39)
        recs = _records(reg, hits, read)
        if hits and not recs:  # every adapter the search found was removed before this decision (sweep 42)
            out.append(Decision(t, "base", "the adapters found near it were removed before the decision", None, None,
                                None))
            continue
        hits = [h for h in hits if h.name in recs]
        for n, r in recs.items():
            if n not in labels_read:
                labels_read[n] = record_labels(reg, r)
        labels_of = {n: labels_read[n] for n in recs}
        if want is None and encoders_want_labels and hits and recs[hits[0].name].family != "causal":
            want = ()
        if want == () and hits:  # answered with a label set: adapters that record none cannot answer it
            near, full = hits[0], len(hits) >= searched
            hits = [h for h in hits if labels_of[h.name]]
            if full and len(hits) < searched:  # adapters without one filled the search: deeper (sweep 43)
                hits = nearest_hits(reg, q[row:row + 1], cfg, base or near.base, base_sha if base else None,
                                    accept=has_labels)[0]
                labels_of.update({h.name: labels_read[h.name] for h in hits})
            if not hits:  # answered by the base of its nearest adapter (`answer` finds the base by it)
                out.append(Decision(t, "base", f"no adapter of base {near.base!r} near it records a task with labels",
                                    near.score, None, near.name))
                continue
        if not hits:
            out.append(Decision(t, "base", f"no adapter of base {base!r} (as its fingerprint is now) in the registry",
                                None, None, None))
            continue
        s1 = hits[0].score
        margin = s1 - (hits[1].score if len(hits) > 1 else -1.0)
        ranked = with_labels(hits, want, cfg.label_weight, labels_of)
        text_hits = hits  # their text scores (`ranked` adds the label term, which the thresholds do not read)
        nearest = hits[0].name
        said = f"nearest adapter {nearest!r} scores {s1:.3f}"  # the thresholds read the text's score
        if ranked[0].name != nearest:  # the labels re-rank the adapters, not the decision (the curves' scores)
            said = f"nearest adapter {nearest!r} scores {s1:.3f} by text"
            also = f" ({ranked[0].name!r} ranks first with the labels asked for, {ranked[0].score:.3f})"
        else:
            also = ""
        used = f"{also[:-1]}: the one used)" if also else ""  # a routed request's
        nearest, hits = ranked[0].name, ranked
        if s1 >= cfg.route_threshold:
            out.append(Decision(t, "route", f"{said} >= route threshold {cfg.route_threshold:.3f}{used}", s1, margin,
                                nearest, hits=hits))
            continue
        of = base or recs[nearest].base  # the generator of the request's base (a registry may hold several)
        if of not in gens:
            gens[of] = _generator_of(reg, of, cfg.generator, gone_ok=True) or False
        gen = gens[of]
        if s1 >= cfg.generate_threshold and gen:
            out.append(Decision(t, "generate", f"{said}, below the route threshold {cfg.route_threshold:.3f} but >= "
                                f"the generate threshold {cfg.generate_threshold:.3f}: for generator "
                                f"{gen.name!r} to write{also}", s1, margin, nearest, gen.name, hits=hits,
                                near=tuple(h.name for h in text_hits if h.score >= cfg.generate_threshold)))
        elif not gen and s1 >= cfg.no_generator_threshold:
            out.append(Decision(t, "route", f"{said} >= no-generator threshold {cfg.no_generator_threshold:.3f} (no "
                                f"generator is stored, so the choice is route or base){used}", s1, margin, nearest, hits=hits))
        elif not gen:
            out.append(Decision(t, "base", f"{said} < no-generator threshold {cfg.no_generator_threshold:.3f} (no "
                                f"generator is stored, so the choice is route or base): no registered task fits by text{also}", s1,
                                margin, nearest, hits=hits))
        else:
            out.append(Decision(t, "base", f"{said} < generate threshold {cfg.generate_threshold:.3f}: no registered "
                                f"task or known family fits by text{also}", s1, margin, nearest, hits=hits))
    return out


def _records(reg, hits: list[Hit], cache: dict[str, Any]) -> dict[str, Any]:
    """name -> record of each hit whose adapter is still registered. `cache`: the records this decision
    round has read (name -> record, or None when gone): requests of one round share most of their hits, and
    a read per hit per request made a round of 256 requests 80x slower (sweep 42)."""
    out = {}
    for h in hits:
        if h.name not in cache:
            try:
                cache[h.name] = reg.get_adapter(h.name)
            except AdapterNotFound:
                cache[h.name] = None
        if cache[h.name] is not None:
            out[h.name] = cache[h.name]
    return out


def generated_name(text: str, generator: str) -> str:
    """The name of the adapter `auto` writes for a request (the same request reuses it)."""
    return "auto-" + hashlib.sha256(f"{generator}\0{text}".encode()).hexdigest()[:12]


NAME_TRIES = 8
"""Names `written_for` tries for one request's adapter (`auto-<hash>`, then `-2`, ...) past adapters it did
not write that hold them."""


def _written_by(reg, name: str, text: str, generator: str, generator_blob: str) -> bool:
    """Whether adapter `name` is what this generator (these very weights: `generator_blob`) wrote for this
    request's text: only then is it reused. A name is predictable, so an adapter registered under it by
    anyone else (`load_lora_adapter`, an earlier generator of the same name) must not answer as written."""
    try:
        rec = reg.get_adapter(name)
    except IntegrityError:  # a damaged record holds the name: not this request's adapter
        return False
    return (rec.origin == "generated" and rec.description == text and rec.extra.get("generator") == generator
            and rec.extra.get("generator_blob") == generator_blob)


def undescribable(d: Decision) -> Decision:
    """A "generate" decision whose text cannot describe an adapter (a control character, too long) as the
    "base" decision `written_for` would make of it, without writing anything; any other decision as it is."""
    try:
        validate_description(d.text, "request text")
    except UserInputError as exc:
        return _as_base(d, f"but it cannot describe a new adapter: {exc}")
    return d


def unwritable(reg, settings, d: Decision, cfg: AutoConfig, *, labelled: bool) -> Decision:
    """A "generate" decision as the decision carrying it out would end in (`_refused`), found without writing
    anything (the generator's dry run: its distance bound, the task its adapter would answer with); any other
    decision, or one the dry run cannot judge (the generator removed or damaged since: `written_for` routes
    those), as it is. `labelled`: the answer needs a label set, so an adapter whose parents record none would
    be refused too. A request that one refused input refuses whole asks this of every input before the
    first is written (sweep 43: a late refusal removed an adapter another request had just reused)."""
    refused = undescribable(d)
    if refused is not d or d.action != "generate":
        return refused
    text = validate_description(d.text, "request text")
    try:
        plan = generate(reg, settings, text, generator=d.generator, name=generated_name(text, d.generator),
                        examples=[(text, None)], label_task=True, max_distance=cfg.generator_max_distance,
                        dry_run=True, answer_among=near_enough(reg, d, cfg))
    except OutOfRange as exc:
        return _refused(d, cfg, exc)
    except LoraplexError:  # removed, damaged, a registry it cannot read now: `written_for` decides those
        return d
    if labelled and not task_labels(reg, plan["task"], plan["task_cards"]):
        return _as_base(d, "but an adapter written for it records no task with labels (its parents have none)")
    return d


def _loads(base: str) -> bool:
    """Whether `base` (a record's base name) names a model this machine has (`resolve_base` finds it)."""
    try:
        resolve_base(base)
        return True
    except LoraplexError:
        return False


def near_enough(reg, d: Decision, cfg: AutoConfig) -> dict[str, tuple[str, ...] | None] | None:
    """The adapters whose labels a generated adapter may answer a "generate" decision's request with, each with
    its label set (None: it records none): those the decision found near it, at a score that reaches the
    generate threshold (the generator ranks its parents by description, which an instance text sits far from:
    sweep 59), by the text score the thresholds read (with labels named, the hits' scores hold the label term:
    every adapter sharing them was near; sweep 60). The generator may answer with the task of one of them or
    with any task of the same label set (`generators.workflow.answers_among`: adapters written earlier sat
    nearest to a region, and their parent's name, not among them, refused every write there; sweep 68). An
    adapter removed since the decision is left out. None: a decision made without a search (no hits)."""
    if d.near is not None:
        names = list(d.near)
    elif d.hits:
        names = [h.name for h in d.hits if h.score >= cfg.generate_threshold]
    else:
        return None
    out = {}
    for n in names:
        try:
            out[n] = record_labels(reg, reg.get_adapter(n))
        except AdapterNotFound:
            continue
    return out


def _names(near: dict[str, Any]) -> str:
    return ", ".join(list(near)[:3]) or "none"


def _refused(d: Decision, cfg: AutoConfig, exc: Exception) -> Decision:
    """A "generate" decision the generator refused, decided as with no generator: route when the score
    reaches the no-generator threshold, else base (a request whose nearest adapter was airline-lora, refused
    because the generator would answer with another family's labels, went to the base: sweep 59)."""
    s1 = d.similarity if d.similarity is not None else -1.0
    said = (f"but the generator refused: {exc}; decided as with no generator, the score is "
            f"{'>=' if s1 >= cfg.no_generator_threshold else '<'} the no-generator threshold {cfg.no_generator_threshold:.3f}")
    if s1 >= cfg.no_generator_threshold and d.hits:
        return Decision(d.text, "route", f"{d.reason}; {said}", d.similarity, d.margin, d.nearest, hits=d.hits)
    return _as_base(d, said)


def _as_base(d: Decision, why: str) -> Decision:
    return Decision(d.text, "base", f"{d.reason}; {why}", d.similarity, d.margin, d.nearest, hits=d.hits)


def written_for(reg, settings, d: Decision, cfg: AutoConfig) -> Decision:
    """Carry out a "generate" decision: the adapter written for the request (registered, with lineage;
    reused when the same request comes again and the same generator wrote it, if it answers with the labels
    of an adapter near the request), or, when the generator refuses, the decision made as with no generator
    (`_refused`: route at the no-generator threshold, else base), saying why."""
    refused = undescribable(d)
    if refused is not d:
        return refused
    text = validate_description(d.text, "request text")  # as the adapter is stored and found by (stripped): the
    # same request with other spacing is the same request, its adapter reused
    first = generated_name(text, d.generator)
    try:
        blob = reg.get_component(GENERATOR, d.generator).blob
        made = False
        for i in range(1, NAME_TRIES + 1):
            name = first if i == 1 else f"{first}-{i}"
            if not reg.has_adapter(name):
                try:
                    generate(reg, settings, text, generator=d.generator, name=name, examples=[(text, None)],
                             label_task=True, max_distance=cfg.generator_max_distance,
                             answer_among=near_enough(reg, d, cfg))
                    made = True
                    break
                except AlreadyExists:  # another process (a server, a CLI) wrote it meanwhile: reused if it is
                    pass               # this request's, as when it was there before
            if _written_by(reg, name, text, d.generator, blob):
                break
        else:
            return Decision(d.text, "base", f"{d.reason}; but the names {first!r} to '-{NAME_TRIES}' that auto "
                            "writes this request's adapter under are held by adapters it did not write",
                            d.similarity, d.margin, d.nearest, hits=d.hits)
    except OutOfRange as exc:
        return _refused(d, cfg, exc)
    except ComponentNotFound:  # removed since the decision (`generate remove`): decided as with no generator, as
        # a named generator removed before it is (sweep 39: a 404 about the `auto` the client named)
        s1 = d.similarity if d.similarity is not None else -1.0
        said = (f"{d.reason}; but generator {d.generator!r} was removed before it wrote, and the score is "
                f"{'>=' if s1 >= cfg.no_generator_threshold else '<'} the no-generator threshold "
                f"{cfg.no_generator_threshold:.3f}")
        return Decision(d.text, "route" if s1 >= cfg.no_generator_threshold else "base", said, d.similarity,
                        d.margin, d.nearest, hits=d.hits)
    except IntegrityError as exc:  # a damaged generator: the registered adapters still answer (check names it)
        return Decision(d.text, "route", f"{d.reason}; but generator {d.generator!r} cannot be read ({exc}), so it "
                        "is routed to the registered ones", d.similarity, d.margin, d.nearest, hits=d.hits)
    except (LockUnavailable, RegistryBusy, DiskFull) as exc:  # a registry it may read but not write now (another
        # user's, read-only, full, busy): the registered adapters answer, as a base decision still answers
        return Decision(d.text, "route", f"{d.reason}; but its adapter cannot be registered ({exc}), so it is "
                        "routed to the registered ones", d.similarity, d.margin, d.nearest, hits=d.hits)
    rec = reg.get_adapter(name)
    near = near_enough(reg, d, cfg)
    if not made and near is not None and not answers_among(rec.extra.get("labels_from"), record_labels(reg, rec), near):
        # one found written before (by a generator that did not check, or for a request decided otherwise then):
        # not used (sweep 60)
        return _refused(d, cfg, OutOfRange(f"adapter {name!r}, written for this text before, answers with the labels "
                                           f"of {rec.extra.get('labels_from')!r}, which no adapter near the request "
                                           f"({_names(near)}) answers with"))
    parents = ", ".join(f"{p['name']} {p['weight']:.2f}" for p in rec.extra.get("parents", []))
    return Decision(d.text, "generate", f"{d.reason} (adapter {name!r}; parents: {parents}; labels of {rec.task!r})",
                    d.similarity, d.margin, d.nearest, d.generator, hits=d.hits, written=name, created=made)


class Writer:
    """The "generate" decisions of one call (a request's inputs, a query's texts) carried out in order. An
    input as close to the text an adapter was written for earlier in the same call as a request routed to
    that adapter would be (cosine >= the route threshold: sent alone after it, it would route there) shares
    that adapter instead of writing its own (sweep 41: one request of 40 near-identical inputs wrote 40).
    `recent`: the adapters written a moment ago by other calls (a server's requests decided in the same round
    never see each other's writes in the index: sweep 45, 10 alike requests at once wrote 10), shared the same
    way while they are registered; this call's writes are added to it. Calls on one `recent` run one at a time
    (the server's write lock)."""

    def __init__(self, reg, settings, cfg: AutoConfig, recent: "collections.deque | None" = None):
        self.reg, self.settings, self.cfg = reg, settings, cfg
        self.done: list[_Written] = []  # this call's writes, and what it shared
        self.recent = recent

    def _vec(self, text: str) -> np.ndarray:
        return np.asarray(get_embedder(self.reg.embedder_name).encode([text]), np.float32)[0]

    def _alike(self, d: Decision, v: np.ndarray, done: list["_Written"]) -> tuple["_Written", bool, float] | None:
        """The write `d` would share (this call's first, then other calls' recent ones still registered as
        written: a name removed and taken by another adapter is not shared; sweep 46), whether it is this
        call's, and the similarity; None when it would write its own."""
        for w, mine in [*((w, True) for w in done), *((w, False) for w in reversed(self.recent or ()))]:
            sim = float(v @ w.vec)
            if sim < self.cfg.route_threshold or w.decision.generator != d.generator:
                continue
            if not mine and (w.owner is self or not w.holds(self.reg)):
                continue
            return w, mine, sim
        return None

    def plan(self, decisions: Sequence[Decision], *, labelled: bool) -> list[Decision]:
        """The decisions as carrying them out would end, found before anything is written: a "generate" one
        that would share an earlier input's adapter (or a recent one) as it is; one that would write, as the
        generator's dry run (`unwritable`) judges it (sweep 46: an input the Writer would have shared was
        judged alone, and its refusal refused the whole request)."""
        out, accepted = [], []
        for d in decisions:
            if d.action != "generate":
                out.append(d)
                continue
            v = self._vec(d.text)
            if self._alike(d, v, accepted) is None:
                d = unwritable(self.reg, self.settings, d, self.cfg, labelled=labelled)
                if d.action == "generate":
                    accepted.append(_Written(v, dataclasses.replace(d, written=""), self))
            out.append(d)
        return out

    def __call__(self, d: Decision) -> Decision:
        v = self._vec(d.text)
        found = self._alike(d, v, self.done)
        if found is not None:
            w, mine, sim = found
            if not mine:
                w.shared = True  # another call's undo leaves it (sweep 43 F7)
            whose = "an earlier input of this request" if mine else "another request a moment ago"
            return Decision(d.text, "generate", f"{d.reason}; shares adapter {w.decision.written!r}, written for "
                            f"{whose} as alike as routing asks (similarity {sim:.3f} >= the route threshold "
                            f"{self.cfg.route_threshold:.3f})", d.similarity, d.margin, d.nearest, d.generator,
                            hits=d.hits, written=w.decision.written)
        out = written_for(self.reg, self.settings, d, self.cfg)
        if out.action == "generate":
            w = _Written(v, out, self, blob=_blob(self.reg, out.written))
            self.done.append(w)
            if self.recent is not None:
                self.recent.append(w)
        return out

    def created(self) -> list[str]:
        """The adapters this call wrote (not those it found registered) that no other call has shared."""
        return [w.decision.written for w in self.done if w.decision.created and w.decision.written and not w.shared]


@dataclass
class _Written:
    vec: np.ndarray  # the request text's unit embedding
    decision: Decision  # its carried-out "generate" decision
    owner: Any  # the Writer that wrote it
    shared: bool = False  # another call's request answers with it too
    blob: str | None = None  # the written adapter's weights (its name may be taken by another adapter later)

    def holds(self, reg) -> bool:
        """Whether the name still holds the adapter written then."""
        return self.blob is not None and _blob(reg, self.decision.written) == self.blob


def _blob(reg, name: str) -> str | None:
    try:
        rec = reg.get_adapter(name)
    except (AdapterNotFound, IntegrityError):
        return None
    return rec.blob if rec.origin == "generated" else None


RECENT_WRITES = 256
"""Adapters a server's Writers remember across requests (`Writer.recent`)."""


def _item(d: Decision, answer: Any, task: str | None, adapters: list[dict]) -> dict[str, Any]:
    return {"query": d.text, "task": task, "answer": answer, "adapters": adapters, "decision": d.action,
            "reason": d.reason, "similarity": None if d.similarity is None else round(d.similarity, 4),
            "margin": None if d.margin is None else round(d.margin, 4), "nearest": d.nearest}


def log_candidates(reg, decisions: list[Decision]) -> list[str | None]:
    """Append the requests the bare base answered to candidates.jsonl. A registry that cannot be written
    (read-only, full, its lock held) does not cost the requests their answers: returns, for each decision
    in order, why it was not logged (None when it was, or when its text has nothing to learn a task from),
    which its answer's reason then says (each its own: the size bound can stop a batch part way; sweep 41)."""
    notes: list[str | None] = [None] * len(decisions)
    # nothing to learn a task from (the reason may have grown since the decision: the base that answered)
    todo = [i for i, d in enumerate(decisions) if visible(d.text) and not d.reason.startswith(UNREAD)]
    if not todo or is_worker():
        return notes

    def unlogged(why: str, rest: list[int]) -> list[str | None]:
        for i in rest:
            notes[i] = f"not logged as a candidate new task: {why}"
        return notes

    path = reg.home / CANDIDATES_FILE
    if (path.exists() or path.is_symlink()) and not path.is_file():  # a FIFO there blocked open() for ever,
        return unlogged(f"{path} is not a regular file", todo)  # lock held (sweep 24)
    done = 0
    try:  # best effort: an answer does not wait long for another process's write to end
        fd = None
        with reg.write_lock(timeout=CANDIDATES_LOCK_S):
            # O_NONBLOCK: a FIFO put there since the check above fails (ENXIO) instead of waiting for a reader
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return unlogged(f"{path} is not a regular file", todo)
            f = os.fdopen(fd, "a", encoding="utf-8")
            fd = None
            with f:
                size = f.seek(0, os.SEEK_END)
                for i in todo:  # the bound checked before each entry (one request holds up to 2,048)
                    if size >= CANDIDATES_MAX_BYTES:
                        return unlogged(f"{CANDIDATES_FILE} has reached its {CANDIDATES_MAX_BYTES // 2**20} MiB "
                                        "(move it away to log more)", todo[done:])
                    d = decisions[i]
                    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "query": d.text[:LOGGED_CHARS], "chars": len(d.text),
                                       "similarity": d.similarity, "nearest": d.nearest, "reason": d.reason}) + "\n"
                    f.write(line)
                    f.flush()  # written now: a later entry's failure leaves this one logged, as its answer says
                    size += len(line.encode("utf-8"))
                    done += 1
    except RegistryBusy:
        return unlogged("the registry is busy (another process is writing to it)", todo[done:])
    except (LockUnavailable, DiskFull, OSError) as exc:
        return unlogged(str(getattr(exc, "strerror", None) or exc), todo[done:])
    finally:
        if fd is not None:
            os.close(fd)
    return notes


def answer(reg, settings, texts: Sequence[str], config: dict[str, Any] | None = None, *, base: str | None = None,
           trace: bool = False, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Decide and answer each request; one dict per request, in order (see the module docstring).
    `labels` (checked by `loraplex.tasks.checked_labels`): every request is answered with one of them."""
    cfg = parse_config(config)
    texts = list(texts)
    base_name = resolve_base(base).name if base else None
    if base_name is None and reg.count() == 0:
        raise UserInputError(f"no adapters registered in {reg.home}: register or train some first, or pass "
                             "--base to answer with a bare base")
    check_generator(reg, base_name, cfg.generator)  # an unknown generator is refused before anything runs
    # an encoder answers only with a label set: without labels, only adapters that record one are candidates
    # where a request's nearest adapters are an encoder's, as on the server's /v1/classify (sweep 29: query
    # routed to a task-less adapter and failed)
    decisions = decide(reg, texts, cfg, base=base_name, labels=[labels] * len(texts) if labels else None,
                       encoders_want_labels=not labels)
    out: list[dict[str, Any] | None] = [None] * len(texts)
    # generate first: a refusal becomes a fall-back to the base
    writer = Writer(reg, settings, cfg)
    for i, d in enumerate(decisions):
        if d.action != "generate":
            continue
        d = decisions[i] = writer(d)
        if d.action != "generate":
            continue
        name = d.written
        rm = load_bank(reg, [name], settings, share_base=True)
        task = rm.expert_tasks[0]  # its name, as every other answer gives (its ref may be a file's path)
        out[i] = _item(d, rm.answer_each([d.text], [name], labels=labels)[0],
                       "labels" if labels else (task.name if task is not None else None),
                       [{"name": name, "weight": 1.0}])

    bases: dict[str, str] = {}

    def base_of(d: Decision) -> str | None:  # the base a decision was made on: its nearest adapter's
        if base_name:
            return base_name
        if not d.nearest:  # nothing to route by (no visible character, nothing the embedder reads): the base
            if "" not in bases:  # most of the registry's adapters are of (it was None: "no base model given ...
                # pass --base", and the whole call failed for one emoji-only line; sweep 59)
                held = collections.Counter(r.base for r in reg.list_adapters(damaged=[]))
                bases[""] = next((b for b in sorted(held, key=lambda b: (-held[b], b)) if _loads(b)), None)
            return bases[""]
        if d.nearest not in bases:
            bases[d.nearest] = reg.get_adapter(d.nearest).base
        return bases[d.nearest]

    def by_base(action: str) -> dict[str | None, list[int]]:  # a batch over a registry of several bases: each
        groups: dict[str | None, list[int]] = {}                # request answered on its own (it answered all on
        for i, d in enumerate(decisions):                       # the first one's base)
            if d.action == action:
                groups.setdefault(base_of(d), []).append(i)
        return groups

    for on, route in by_base("route").items():
        # an encoder without labels: over the candidates the decisions kept (those that record a label set)
        encoder = not labels and on is not None and resolve_base(on).family != "causal"
        # in the decisions' own order (best first): retrieval breaks a tie of scores by the order it is given, so
        # sorted by name the answer came from another adapter than `nearest` names, and than the server's (sweep 35)
        kept = list(dict.fromkeys(h.name for i in route for h in decisions[i].hits)) if encoder else None
        rm = load_retrieval(reg, settings, adapters=kept or None, texts=[texts[i] for i in route], base=on,
                            config={"top_k": min(cfg.top_k, len(kept)) if kept else cfg.top_k,
                                    "prototype_weight": cfg.prototype_weight,
                                    "label_weight": cfg.label_weight}, share_base=True)
        for i, r in zip(route, rm.answer([texts[i] for i in route], trace=trace, labels=labels)):
            item = _item(decisions[i], r["answer"], r["task"], r["adapters"])
            for key in ("tokens", "layers"):
                if key in r:
                    item[key] = r[key]
            out[i] = item
    for on, fall in by_base("base").items():
        ref = resolve_base(on)
        answers: list[Any] = [None] * len(fall)
        if ref.family == "causal" or labels:  # an encoder without labels is not even loaded: nothing to answer with
            lb = load_base(ref, settings)
            head, sub = head_for(lb), [texts[i] for i in fall]
            if labels:  # the bare base answers with the labels asked for (anchors / rank classification)
                task = labels_task(labels)
                with torch.no_grad():
                    picked = best_labels(head.scores(lb.model, lb.tokenizer, sub, task))
                answers = [task.labels[j] for j in picked]
            else:
                answers = head.generate(lb.model, lb.tokenizer, sub, None)
        for i, a in zip(fall, answers):
            d = decisions[i]
            if not d.nearest and not base_name:  # which base answered, and why that one (sweep 60)
                d.reason += f"; answered by base {ref.name!r}, the one most of the registry's adapters are of"
            if ref.family != "causal" and not labels:
                d.reason += "; an encoder answers only with a task's label set, so there is no answer"
            out[i] = _item(d, a, "labels" if labels else None, [])
        notes = log_candidates(reg, [decisions[i] for i in fall]) if cfg.log_candidates else []
        for i, note in zip(fall, notes):
            if note:
                out[i]["reason"] += f"; {note}"
    return out  # type: ignore[return-value]
