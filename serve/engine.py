"""The server's main seam into the rest of loraplex: the registry, the models, the routers and the
heads are reached through this module, with three direct imports besides: serve/classify.py
(classification on the Engine's models, which it reaches through the Engine) also calls
`router.model.labels_task` and `experts.layers.use_gates`; serve/slots.py uses `experts.layers` and
`experts.spec`'s `LoraSpec`; serve/protocol.py uses `loraplex.tasks`' label checks. A change of those
parts is an edit here, and in those modules where it touches what they import.

One Engine serves one base model:
- the *slot bank*: the base with a bank of `max_loras` LoRA slots in every adapted projection. Named
  adapters, `auto` (retrieval over every registered adapter of the base) and the bare base share it:
  each row of a batch carries its own gates over the slots ((B, 1, S), constant over the sequence),
  so one forward serves rows of different adapters (the bank's gather-BMM dispatch). Adapters are
  loaded from the registry's blobs into slots on demand, least recently used evicted;
- one RoutedModel per stored router (loaded on first use): its gates run inside every forward, so a
  token-level router routes each prompt token and each generated token.
All model work happens on the scheduler's thread; `auto`'s decision (the query's embedding, the
search, an adapter a generator writes) runs on the request's own worker before its job is submitted
(`Engine.auto`), so the batching thread only runs forwards. The registry is opened once per thread.
The slot bank's bookkeeping is serve/slots.py (it touches only experts.layers and experts.spec);
adapters reach it through `Engine._read`. The data passed between engine, scheduler and routes (Target, Route, Events)
is serve/targets.py; the gathering of concurrent `auto` decisions is serve/gathered.py.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import inspect
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Sequence

import torch

from loraplex.catalog import bounded_ids
from loraplex.data import EMBEDDED_TASKS
from loraplex.embedders import get_embedder
from loraplex.errors import IntegrityError, LoraplexError, NotFound, UserInputError
from loraplex.experts.layers import routed_layers, use_gates
from loraplex.heads import chat_ids_within, cuts, head_for, token_text
from loraplex.models import load_base, resolve_base
from loraplex.registry.adapters import register_peft, remove as remove_adapter
from loraplex.registry.store import Registry
from loraplex.router import auto as auto_router
from loraplex.router.base import ROUTERS
from loraplex.router.load import joint_copy_names, load_router
from loraplex.settings import Settings
from loraplex.tasks import validate_description
from loraplex.serve import classify, decode
from loraplex.serve.gathered import Gathered
from loraplex.serve.slots import SlotBank
from loraplex.serve.targets import Events, ModelUnknown, Route, Target, route_summary, top_adapters

__all__ = ["Engine", "LoraplexError", "NotFound", "UserInputError"]


MAX_LORAS = 4096
"""Slots of the bank at most (`--max-loras`): each slot costs rank x (d_in + d_out) in every adapted projection."""
MAX_HOST_LORAS = 1_000_000
"""Adapters kept in host memory at most (`--host-loras`)."""


def _unix(stamp: str) -> int | None:
    """A record's ISO-8601 `created_at` as Unix seconds (None where it cannot be read)."""
    import datetime

    try:
        return int(datetime.datetime.fromisoformat(stamp).timestamp())
    except (TypeError, ValueError):
        return None


LOCK_S = 30.0
"""How long a request's registry write (a load, an unload, an adapter `auto` writes) waits for the registry's
lock, held by another process, before its 503: well within the stop's grace period (server.GRACE_S), where the
CLI's 120 s kept a stopped server alive twice that long (sweep 67)."""


class Engine:
    def __init__(self, settings: Settings | None = None, *, base: str | None = None, router: str | None = None,
                 max_loras: int = 16, host_loras: int = 256, events: Events | None = None,
                 auto: dict[str, Any] | None = None, writes_adapters: bool = True):
        self.started = int(time.time())  # the base's and auto's `created` in /v1/models
        if not 1 <= max_loras <= MAX_LORAS:
            raise UserInputError(f"--max-loras must be from 1 to {MAX_LORAS:,} (got {max_loras})")
        if not 1 <= host_loras <= MAX_HOST_LORAS:
            raise UserInputError(f"--host-loras must be from 1 to {MAX_HOST_LORAS:,} (got {host_loras})")
        if router is not None and (not isinstance(router, str) or not router.strip()):  # "" read as no router (sweep 35)
            raise UserInputError(f"--router must name a stored router, got {router!r} (leave it out to serve without one)")
        if router in ("auto", "retrieval"):  # catalog methods, not stored routers: every request may name them
            raise UserInputError(f"--router {router!r} is not a stored router: a request names 'auto' (or an adapter) "
                                 "to be routed without one")
        top_k = auto_router.parse_config(auto).top_k  # a bad auto option is refused before the base loads
        if top_k > max_loras:  # every routed auto request would need more slots than the bank has
            raise UserInputError(f"auto's top_k ({top_k}) is over --max-loras ({max_loras}): a routed request "
                                 "mixes top_k adapters in the slot bank at once; lower top_k or raise --max-loras")
        self.settings = settings or Settings.load()
        self.events = events or Events()
        self.max_loras = max_loras
        self.writes_adapters = writes_adapters  # serve --no-lora-updates: auto does not register adapters either
        self._local = threading.local()
        ref = resolve_base(base or self._default_base(router))
        auto_router.check_generator(self.reg(), ref.name, auto_router.parse_config(auto).generator)  # before loading
        self.lb = load_base(ref, self.settings)
        self.base_name = ref.name
        self.family = ref.family
        self.head = head_for(self.lb)
        self.embedder = get_embedder(self.reg().embedder_name)
        self.auto_config = auto_router.parse_config(auto)
        # auto's routed requests are weighted as retrieval weights them, with auto's top_k and prototype weight
        self.retrieval = ROUTERS.build("retrieval", {"top_k": self.auto_config.top_k,
                                                     "prototype_weight": self.auto_config.prototype_weight})
        self._decide = Gathered(self._decide_now)
        self._writing = threading.Lock()  # one adapter written at a time (the same request twice: written once)
        self._recent = collections.deque(maxlen=auto_router.RECENT_WRITES)  # auto's writes, shared across requests
        cfg = self.lb.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2048)
        self.slots = SlotBank(self.lb.model, max_loras, read=self._read, host_size=host_loras, events=self.events)
        self._routers: dict[str, Any] = {}
        self._forwardable: set[str] = set()  # routers whose experts the backend can take one by one (this registry state)
        self._tasks: dict[str, Any] = {}
        self._generation = ""
        self._stale = False  # slots of changed adapters still used by running rows
        if router:
            self.router_model(router)

    # ---- registry -----------------------------------------------------------------------------
    def reg(self) -> Registry:
        """This thread's registry handle (SQLite connections stay in their thread)."""
        r = getattr(self._local, "reg", None)
        if r is None:
            r = self._local.reg = Registry.open(self.settings)
            r.lock_timeout = LOCK_S
        return r

    def _default_base(self, router: str | None) -> str:
        reg = self.reg()
        if router:
            return reg.get_component("router", router).base
        bases = sorted({r.base for r in reg.list_adapters(damaged=[])})  # a damaged record does not stop the server
        if len(bases) > 1:
            raise UserInputError(f"the registry holds adapters of several bases ({', '.join(bases)}): choose one with --base")
        return bases[0] if bases else "smollm2"

    def models(self) -> list[dict[str, Any]]:
        """Everything a request may name, read from the registry now (other processes' changes included);
        `created`: when it was registered (Unix seconds, OpenAI's Model.created), the base and auto when the
        server started (sweep 56: every model was "created" at the time of the request)."""
        reg = self.reg()
        out = [{"id": self.base_name, "kind": "base", "family": self.family, "created": self.started},
               {"id": "auto", "kind": "auto", "description": "per request: route to the registered adapters, "
                "generate one with a stored generator, or answer with the base (router/auto.py)",
                "created": self.started}]
        damaged: list[str] = []  # a record damaged in the registry cannot be served: it is left out, the rest listed
        adapters = reg.list_adapters(base=self.base_name, damaged=damaged)
        sha = self.lb.fingerprint.sha  # one registered against the base as it was (its config changed) cannot load
        stale = {r.name for r in adapters if r.base_sha != sha}
        names = {r.name for r in adapters}
        out += [{"id": r.name, "kind": "adapter", "created": _unix(r.created_at), "task": r.task, "description": r.description,
                 **({"composition": list(r.composition)} if len(r.composition) > 1 else {})}
                for r in adapters  # left out (resolve says why): stale ones, over a stale or missing adapter, or
                if not stale.intersection(r.composition) and set(r.composition) <= names  # with nothing to load on
                and not r.through_router()]
        # a joint router's experts are its own copies, named in its routing as ROUTER/ADAPTER (router show's words)
        out += [{"id": c.name, "kind": "router", "created": _unix(c.created_at), "method": c.method,
                 **({"members": joint_copy_names(c.name, c.members), "copies_of": list(c.members)}
                    if c.extra.get("joint") else {"members": list(c.members)})}
                for c in reg.list_components("router", damaged=damaged)
                if c.base == self.base_name and not stale.intersection(c.members)]
        return out

    def resolve(self, model: str) -> Target:
        """The Target a request's `model` names; ModelUnknown if this server does not serve it."""
        reg = self.reg()
        if model in (self.base_name, "base"):
            return Target("base", self.base_name)
        if model == "auto":
            return Target("auto", "auto")
        if reg.has_adapter(model):
            rec = reg.get_adapter(model)
            if rec.base != self.base_name:
                raise ModelUnknown(f"adapter {model!r} is of base {rec.base!r}; this server serves {self.base_name!r}")
            self._check_current(rec)
            if rec.through_router():
                raise UserInputError(rec.through_router()).about("model")
            # one that answers with a composition (a forgetting adapter, a summed stream's) is served with it
            for member in rec.composition:
                if member == model:
                    continue
                if not reg.has_adapter(member):
                    raise IntegrityError(f"{rec.bound_to()}, but {member!r} is no longer registered")
                self._check_current(reg.get_adapter(member))
            if len(rec.composition) > self.max_loras:
                raise UserInputError(f"{rec.bound_to()}: {len(rec.composition)} adapters at once, more than this "
                                     f"server's {self.max_loras} slots (serve --max-loras)").about("model")
            return Target("adapter", model)
        if reg.has_component("router", model):  # a damaged record fails here, naming itself (a 503)
            rec = reg.get_component("router", model)
            if rec.base != self.base_name:
                raise ModelUnknown(f"router {model!r} routes another base; this server serves {self.base_name!r}")
            for member in rec.members:  # one gone is named when the router loads
                if reg.has_adapter(member):
                    try:
                        self._check_current(reg.get_adapter(member))
                    except IntegrityError as exc:
                        raise IntegrityError(f"router {model!r}: {exc}") from None
            return Target("router", model)
        raise ModelUnknown(f"the model {model!r} does not exist (GET /v1/models lists the base, adapters, routers and auto)")

    def sync(self, keep: set[str] = frozenset()) -> None:
        """Drop what the registry no longer holds as it was (removed or re-registered adapters, routers).
        Slots of `keep` (adapters of rows still generating) are dropped once those rows are done."""
        gen = self.reg().stamp()  # the state, not only the count of writes (a registry.db restored from a backup)
        if gen == self._generation and not self._stale:
            return
        reg = self.reg()
        sound = reg.list_adapters(base=self.base_name, damaged=[])  # a damaged record fails its own requests only
        self._stale = self.slots.forget({r.name: r.blob for r in sound}, keep)
        routers = {c.name: c.id for c in reg.list_components("router", damaged=[])}  # a damaged one: dropped
        for name in list(self._routers):
            if routers.get(name) != self._routers[name][0]:
                del self._routers[name]
        self._tasks.clear()
        self._forwardable.clear()
        self._generation = gen  # last: a sync that failed midway is done again by the next request

    def versions(self, target: Target, routes: Sequence[Route] | None = None) -> dict[str, Any]:
        """What identifies the version of every model a request uses (adapters' blobs, a router's record
        id; None: gone), so a request answered in pieces can tell that one changed between them."""
        reg = self.reg()
        names = {a for r in routes or () for a, _ in r.adapters}
        if target.kind == "adapter":
            names.add(target.name)
        # the record's id with its blob: registered anew with the same weights but another task or description
        # is another version (one answer mixed two tasks' labels; sweep 33)
        out: dict[str, Any] = {n: ((r := reg.get_adapter(n)).id, r.blob) if reg.has_adapter(n) else None
                               for n in sorted(names)}
        if target.kind == "router":
            out[f"router:{target.name}"] = (reg.get_component("router", target.name).id
                                            if reg.has_component("router", target.name) else None)
        return out

    def task_of(self, adapter: str):
        if adapter not in self._tasks:
            rec = self.reg().get_adapter(adapter)
            self._tasks[adapter] = self.reg().adapter_task(rec)
        return self._tasks[adapter]

    # ---- the slot bank ------------------------------------------------------------------------
    def _read(self, name: str):
        """An adapter's record and tensors from the registry (hash checked), checked against the base."""
        rec, ad = self.reg().load_adapter(name)
        self._check_current(rec)
        ad.check_fits(self.lb.fingerprint, name=f"adapter {name!r}")
        return rec, ad

    def _check_current(self, rec) -> None:
        """An adapter registered against another fingerprint of the served base (its config changed since)
        cannot be loaded on it: the registry's state, not the request's fault, so a 503."""
        if rec.base_sha != self.lb.fingerprint.sha:
            raise IntegrityError(f"adapter {rec.name!r}: base {rec.base!r} has changed since it was registered (its "
                                 "fingerprint differs: register the adapter again)")

    def fits(self, names: set[str], pinned: set[str] = frozenset()) -> bool:
        """Whether adapters `names` can be in the slot bank at once beside the running rows' (`pinned`)."""
        return self.slots.fits(names, pinned)

    def gates(self, routes: Sequence[Route], keep: set[str] = frozenset()) -> torch.Tensor | None:
        """(B, 1, S) gates over the slot bank for rows of the bank lane (None: no adapter loaded yet)."""
        try:
            return self.slots.gates([r.adapters for r in routes], keep, device=self.lb.device)
        except ValueError as exc:  # more adapters than slots (callers cut batches to fit: see classify.chunks)
            raise UserInputError(f"{exc} (--max-loras {self.max_loras})") from None

    def auto(self, texts: Sequence[str], *, forwarded: bool = False, labels: Sequence[str] | None = None,
             for_classify: bool = False) -> list[Route]:
        """The `auto` choice per text (router/auto.py), made on the calling thread (a request's worker):
        retrieval over every registered adapter of the base when one fits, an adapter a stored generator
        writes for the request (registered with lineage) when the request lies in a family the registry
        knows, or the bare base (the request is logged as a candidate new task). Each route carries the
        decision and why. Requests deciding at the same time share one embedding pass and one search
        (`Gathered`); an adapter is written in its own request's thread. `forwarded`: a backend generates
        (--backend), which cannot serve an adapter written here, so a generate decision routes instead, as
        it does on a server that registers no adapters (`writes_adapters` False: serve --no-lora-updates).
        `labels`: the label set the texts are to be answered with; adapters trained on it rank higher.
        `for_classify` without `labels` (/v1/classify): an input decided for the bare base cannot be answered
        (no label set), and the request is refused before anything is written or logged for its other inputs."""
        if not texts:
            return []
        out, fell = [], []
        # a classification without labels is answered with its adapter's label set: `()` asks for such adapters
        want = tuple(labels) if labels else (() if for_classify else None)
        decisions = list(self._decide([(t, want) for t in texts]))
        refusing = for_classify and not labels  # an input left to the base refuses the whole request
        writer = auto_router.Writer(self.reg(), self.settings, self.auto_config, self._recent)
        if refusing:  # before anything is written: the base decisions, and the generate ones the generator's dry
            # run refuses (sweep 41: refused after the others' were written; sweep 43: the undo of those removed an
            # adapter a concurrent request had reused meanwhile), read as the writer will carry them out
            writes = not forwarded and self.writes_adapters
            with self._writing:  # the recent writes it may share, as they are
                late = writer.plan(decisions, labelled=True) if writes else decisions
            classify.refuse_base_answers([d.action == "base" for d in late], [d.reason for d in late])
        deadline = time.monotonic() + LOCK_S  # one wait for the registry's lock per request, not one per input
        for d in decisions:
            if d.action == "generate" and forwarded:
                d = dataclasses.replace(d, action="route", reason=f"{d.reason}; but the backend generates and does "
                                        "not have adapters written here, so it is routed to the registered ones")
            elif d.action == "generate" and not self.writes_adapters:
                d = dataclasses.replace(d, action="route", reason=f"{d.reason}; but this server registers no adapters "
                                        "(--no-lora-updates), so it is routed to the registered ones")
            elif d.action == "generate":
                reg = self.reg()
                reg.lock_timeout = max(0.0, deadline - time.monotonic())  # (sweep 70: 30 s per input, past a stop's
                try:                                                      # grace period with two of them)
                    with self._writing:
                        d = writer(d)
                finally:
                    reg.lock_timeout = LOCK_S
                if refusing and d.action == "generate" and not auto_router.record_labels(
                        self.reg(), self.reg().get_adapter(d.written)):  # its generator's parents record no labels:
                    d = dataclasses.replace(d, action="base", reason=f"{d.reason}; but the adapter written for it "
                                            "records no task with labels (its parents have none)")  # (sweep 41)
            if d.action == "route":
                adapters = auto_router.route_weights(d, self.retrieval)
            elif d.action == "generate":
                adapters = [(d.written, 1.0)]
            else:
                adapters = []
            out.append(Route(adapters, decision=d.action, reason=d.reason, nearest=d.nearest))
            fell += [d] if d.action == "base" else []
        if refusing and fell:  # the generator refused one after others were written: the request changes nothing
            with self._writing:
                for name in writer.created():
                    with contextlib.suppress(LoraplexError):
                        remove_adapter(self.reg(), name)
            classify.refuse_base_answers([r.decision == "base" for r in out], [r.reason for r in out])
        notes = auto_router.log_candidates(self.reg(), fell) if self.auto_config.log_candidates else []
        base_routes = [r for r in out if r.decision == "base"]  # in the order of `fell`
        for r, note in zip(base_routes, notes):
            if note:
                r.reason += f"; {note}"
        return out

    def _decide_now(self, items: list[tuple[str, tuple[str, ...] | None]]) -> list[auto_router.Decision]:
        """The decisions of (text, label set asked for) items: one embedding pass and one faiss search (the
        gates reuse its scores)."""
        texts = [t for t, _ in items]
        q = self.embedder.encode(texts)  # (N, D)
        return auto_router.decide(self.reg(), texts, self.auto_config, base=self.base_name,
                                  base_sha=self.lb.fingerprint.sha, queries=q,
                                  labels=[lab for _, lab in items])

    def route_of(self, target: Target) -> Route:
        """A named adapter, or nothing (the bare base); `auto` and routers are routed elsewhere. An adapter
        that answers with a composition (`record.composition_of`) comes with the rest of it summed in, each
        at weight 1, itself first (it is the route's top: its task answers)."""
        if target.kind == "adapter":
            rest = [n for n in self.reg().get_adapter(target.name).composition if n != target.name]
            return Route([(target.name, 1.0), *((n, 1.0) for n in rest)])
        return Route()

    # ---- routers -------------------------------------------------------------------------------
    def router_model(self, name: str):
        if name not in self._routers:
            rec = self.reg().get_component("router", name)
            self._routers[name] = (rec.id, load_router(self.reg(), name, self.settings, base=self.base_name,
                                                       share_base=True))  # frozen weights: one copy for all
        return self._routers[name][1]

    # ---- tokens --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.lb.tokenizer

    @property
    def front(self):
        """A copy of the tokenizer for the request handlers: a fast tokenizer used from two threads at
        once can fail ("Already borrowed"), and the batching thread uses the original."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.lb.tokenizer)
        return tok

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.front(prompt, add_special_tokens=True)["input_ids"])

    def prompt_ids(self, prompt: str) -> tuple[list[int] | None, int]:
        """(token ids, count) of a prompt that fits the context, else (None, a count over it that the prompt
        has at least): a long prompt is never tokenized whole (`catalog.bounded_ids`)."""
        return bounded_ids(self.encode_prompt, prompt, self.context)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> tuple[list[int] | None, int, str]:
        """Token ids of a chat (the tokenizer's chat template, else `role: content` lines) and their count
        where they fit the context (else None and a count over it, as `prompt_ids`), and the last user
        message (what routing reads)."""
        tok = self.front
        if getattr(tok, "chat_template", None):  # message texts as text: no control token typed into a message
            ids, n = chat_ids_within(tok, messages, limit=self.context)
        else:
            # as text too: a typed `[SEP]` / `<|endoftext|>` was the model's control token there (sweep 45)
            ids, n = bounded_ids(lambda t: list(tok(t, add_special_tokens=True, split_special_tokens=True)["input_ids"]),
                                 "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", self.context)
        users = [m["content"] for m in messages if m["role"] == "user"] or [messages[-1]["content"]]
        return ids, n, users[-1]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, tok: int) -> str:
        """One token as a stream's `token` event shows it (`heads.token_text`)."""
        return token_text(self.tokenizer, tok)

    def cut(self, text: str, task) -> bool:
        """Whether classifying `text` on `task` reads only its start (`heads.cuts`; called on the batching
        thread, whose tokenizer this is)."""
        return cuts(self.head, self.tokenizer, text, task)

    # ---- generation ------------------------------------------------------------------------------
    def _eos(self) -> list[int]:
        e = getattr(getattr(self.lb.model, "generation_config", None), "eos_token_id", None)
        e = e if isinstance(e, (list, tuple)) else [e]
        return [x for x in [*e, self.tokenizer.eos_token_id] if x is not None]

    def batch(self, lane: str) -> decode.Batch:
        """A running batch of a lane: its step runs the lane's model with each row's gates and, for a
        learned router, sums the routing of every token into the row (per token when it traces)."""
        if lane == "bank":
            model, names = self.lb.model, None
        else:
            rm = self.router_model(lane.split(":", 1)[1])
            model, names = rm.model, rm.experts
        cache_kw = _cache_name(model)

        def step(ids, mask, pos, cache, rows):
            g = None
            if self.slots.shape is not None and names is None:  # rows that came before the bank existed: the base
                zero = torch.zeros(1, 1, self.max_loras, device=self.lb.device)
                g = torch.cat([r.gates if r.gates is not None else zero for r in rows])
            layers = list(routed_layers(model).values()) if names else []
            for layer in layers:
                layer.record, layer.last_routing = True, None
            try:
                with use_gates(model, g):
                    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
                infos: list[dict] = [{} for _ in rows]
                if layers:
                    per = [l.last_routing.per_adapter() for l in layers if l.last_routing is not None]
                    w = torch.stack(per).mean(0).float().cpu()  # (b, t, E), mean over layers
                    m = mask[:, -w.shape[1]:].float().cpu()[..., None]
                    for j, r in enumerate(rows):
                        r.sums = (r.sums if r.sums is not None else 0) + (w[j] * m[j]).sum(0).numpy()
                        r.count += int(m[j].sum())
                        if r.trace:
                            infos[j] = {"weights": w[j, -1].numpy()}
            finally:
                for layer in layers:
                    layer.record, layer.last_routing = False, None
            return out.logits[:, -1].float(), getattr(out, cache_kw), infos

        b = decode.Batch(step, pad_id=self.tokenizer.pad_token_id or 0, eos_ids=self._eos(), decode=self.decode,
                         device=self.lb.device)
        b.source = model  # the model it runs: a router stored anew since gets a batch of its own (`current`)
        return b

    def current(self, lane: str, batch: decode.Batch) -> bool:
        """Whether new rows may join `batch`: it runs the lane's model as the registry now has it. A router
        removed and stored again under its name while rows generate keeps its old batch for those rows;
        later requests wait for it to end and run on the new router."""
        return lane == "bank" or getattr(batch, "source", None) is self.router_model(lane.split(":", 1)[1]).model

    def bind(self, rows: Sequence[decode.GenRow], routes: Sequence[Route], pinned: set[str]) -> bool:
        """Give bank rows their gates, loading their adapters into slots that `pinned` (the adapters of
        rows still running) does not hold; False when they do not fit beside those now."""
        need = {a for r in routes for a, _ in r.adapters}
        if not self.fits(need, pinned):
            return False
        g = self.gates(routes, keep=pinned)
        for i, (row, route) in enumerate(zip(rows, routes)):
            row.route = route
            row.gates = g[i:i + 1] if g is not None else None
        return True

    def summary(self, lane: str, row: decode.GenRow) -> dict[str, Any]:
        """A finished row's routing: its adapters and weights (for a router, the mean over its tokens)."""
        if lane == "bank":
            return route_summary(row.route)
        if not row.count:
            return {"adapters": []}
        names = row.experts if row.experts is not None else self.router_names(lane)  # the model's that ran it
        return {"adapters": top_adapters(names, row.sums / max(row.count, 1))}

    def router_names(self, lane: str) -> list[str]:
        return self.router_model(lane.split(":", 1)[1]).experts

    @staticmethod
    def top(route: Route) -> Route:
        """A route's best adapter alone (what a backend is asked for)."""
        return dataclasses.replace(route, adapters=sorted(route.adapters, key=lambda x: -x[1])[:1])

    def choose(self, target: Target, texts: Sequence[str]) -> list[Route]:
        """One adapter per text for forwarding to a backend: the router's top, or the adapter (auto's is
        `top` of `auto`, decided in the request's worker)."""
        if target.kind == "auto":
            raise ValueError("auto is decided in the request's worker (Engine.auto), not on the batching thread")
        reg = self.reg()
        if target.kind == "router":
            if target.name not in self._forwardable and reg.get_component("router", target.name).extra.get("joint"):
                raise UserInputError(f"router {target.name!r} routes its own jointly trained experts, which are not "
                                     "registered adapters a backend could be asked for (serve it without "
                                     "--backend)").about("model")  # it sent the registered adapters' names
            rm = self.router_model(target.name)
            if target.name not in self._forwardable:  # checked once per registry state, not per request
                for name in rm.experts:  # whichever it picks, the backend gets that one adapter alone
                    bound = reg.get_adapter(name).bound_to() if reg.has_adapter(name) else None
                    if bound:
                        raise UserInputError(f"router {target.name!r} routes over {name!r}: {bound}; the backend "
                                             "serves one adapter per request, so it cannot be forwarded (serve it "
                                             "without --backend)").about("model")
                self._forwardable.add(target.name)
            return [Route([(rm.experts[r.top], float(r.weights[r.top]))]) for r in rm.route(list(texts))]
        rec = reg.get_adapter(target.name) if target.kind == "adapter" else None
        if rec is not None and rec.bound_to():  # a backend is asked for one adapter by name
            raise UserInputError(f"{rec.bound_to()}; the backend serves one adapter per request, so it cannot be "
                                 "forwarded (serve it without --backend)").about("model")
        return [self.route_of(target) for _ in texts]

    # ---- classification (serve/classify.py) ---------------------------------------------------------
    def classify(self, items: Sequence[tuple[list[str], Target, list[Route] | None, Sequence[str] | None]],
                 keep: set[str] = frozenset()) -> list[list[dict[str, Any]] | Exception]:
        """Each item's texts labelled (label, label scores as softmax, routing), with the item's label set when it
        names one: `classify.classify`; `keep`: adapters of rows still generating (their slots stay)."""
        return classify.classify(self, items, keep)

    def fits_beside(self, target: Target, routes: list[Route] | None, pinned: set[str]) -> bool:
        """Whether each text of a classification on the slot bank can load its adapters beside the slots
        `pinned` (adapters of rows still generating) holds, without evicting them."""
        if target.kind == "adapter":
            need = [{target.name}]
        elif target.kind == "auto":
            need = [{a for a, _ in r.adapters} for r in routes or []]
        else:
            return True
        return all(self.fits(n, pinned) for n in need)

    # ---- registering (the registry's own functions: their checks, their one transaction) ------------
    def register(self, name: str, path: str, description: str | None, task: str | None) -> None:
        """Register a PEFT directory as `loraplex adapters register` does (registry/adapters.py)."""
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):  # else the default description is blamed
            raise UserInputError(f"the path {path!r} holds a control character").about("path")
        if task and task.strip() and task not in EMBEDDED_TASKS:  # a client may not have the server read any file it names:
            inside = os.path.realpath(os.path.join(path, task))  # a task file is lora_path's (an absolute one too)
            root = os.path.realpath(path)
            if os.path.commonpath([root, inside]) != root:
                raise UserInputError(f"task {task!r}: over HTTP a task is an embedded task's name or a task file inside "
                                     "lora_path (the server reads no other file for a client)").about("task")
            task = inside
        default = None
        if description is None:  # the task's (register_peft), else this, which names the path where a description
            default = f"LoRA adapter {name}, loaded through the server from {path}"  # can hold it (else a fault of
            try:                                                                  # the path would be blamed on it)
                validate_description(default)
            except UserInputError:
                default = f"LoRA adapter {name}, loaded through the server"
        with _as_request_errors(names_model=False):
            register_peft(self.reg(), self.settings, path, name=name, base=self.base_name, task=task,
                          description=description, declared_must_match=True, default_description=default)

    def unregister(self, name: str) -> None:
        if not self.reg().has_adapter(name):
            raise ModelUnknown(f"no adapter named {name!r} in the registry")
        self.resolve(name)  # an adapter of another base is not this server's to remove
        with _as_request_errors():
            remove_adapter(self.reg(), name)


@contextmanager
def _as_request_errors(names_model: bool = True):
    """A refused registration is the request's fault (400), an unknown name a 404 (`names_model`: the
    name is the request's model) or what it is (a task the request names); anything else (a registry that
    cannot be written now: read-only, full, its lock held; or damaged: its database gone) is the server's
    state, a 503 about no field (a damaged database was a 400 blaming `lora_name`)."""
    try:
        yield
    except NotFound as exc:
        if not names_model:
            raise
        raise ModelUnknown(str(exc)) from None


def _cache_name(model) -> str:
    """The KV cache's keyword: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
