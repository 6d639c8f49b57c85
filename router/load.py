"""Building a RoutedModel from the registry: a stored router, retrieval over adapters, or a plain bank.

A stored router record (kind "router") holds:
- `members`: the registered adapters it routes over, in bank order (empty for experts trained from scratch);
- tensors `gate.<projection>.<param>`: the per-layer gate modules' state;
- for joint routers, tensors `expert.<e>.<projection>.lora_{A,B}.weight`: the experts as trained, with
  their specs in `extra["expert_specs"]`;
- `task_sig` (n_tasks, D): signatures of the tasks it was fitted on (for experts without a task);
- `extra`: `tasks` (task refs, one per expert or None), `task_pool`, `base_sha`, `joint`.

Every load checks what a stored router depends on: its adapters still exist, share its base, and that
base's fingerprint is the one it was fitted against.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from loraplex.errors import ComponentNotFound, IncompatibleAdapter, IntegrityError, UserInputError
from loraplex.experts.layers import inject, routed_layers
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.models import load_base, resolve_base
from loraplex.registry.record import named_apart, one_base, router_members_problem
from loraplex.registry.signatures import embedder as _embedder
from loraplex.router.base import ROUTERS, LearnedRouter
from loraplex.router.model import RoutedModel
from loraplex.router.retrieval import RetrievalConfig, RetrievalRouter, Signatures, adapter_labels


def _load_task(reg, ref: str | None, cards: dict | None = None):
    """The task `ref` as answering needs it (`Registry.answering_task`), from the card the router recorded
    of it when it has one (routers fitted before cards were kept: the newest adapter's card)."""
    card = (cards or {}).get(ref) if ref else None
    return reg.answering_task(ref, card=card if isinstance(card, dict) else None) if ref else None


def one_name_each(loaded, owners: Sequence[str] | None, listed: str | None) -> None:
    """Refuse tasks that share a name (a router tells tasks apart by name): one file listed twice, or two
    files of one stem (v1/reviews.jsonl, v2/reviews.jsonl), named with the adapters they belong to; at fit,
    and when a stored router is loaded (a sidecar added since may give a file another member's name)."""
    names = [t.name for t in loaded]
    if len(set(names)) == len(names):
        return
    twice = next(n for n in names if names.count(n) > 1)
    which = [(owner, t.ref) for owner, t in zip(owners or [None] * len(loaded), loaded) if t.name == twice]
    if len({os.path.realpath(ref) if os.path.exists(ref) else ref for _, ref in which}) > 1:  # not one file twice
        files = ", ".join(f"{a} ({ref})" if a else ref for a, ref in which)
        whose = "two adapters' tasks are" if owners else f"two tasks in {listed} are"
        raise UserInputError(f"{whose} both named {twice!r}: {files}; a router tells tasks apart by name: give one "
                             "of the files a sidecar 'name'")
    if listed:
        raise UserInputError(f"task {twice!r} is listed twice in {listed}; a router needs one task per "
                             f"{'adapter' if owners else 'expert'}")
    raise UserInputError(f"two adapters share task {twice!r}; a router needs one task per adapter")


def load_members(reg, names: Sequence[str], settings, *, together: str = "routed together",
                 share_base: bool = False):
    """Records and adapters of `names` on their common base: (LoadedBase, records, adapters). Every
    adapter is checked against the base's fingerprint before any tensor is used. `share_base`: the base's
    weights are shared, not copied (`load_base(share_weights=True)`)."""
    if not names:
        raise UserInputError("no adapters to route over")
    if len(set(names)) != len(names):
        dup = next(n for n in names if list(names).count(n) > 1)
        raise UserInputError(f"adapter {dup!r} is listed twice")
    loaded = [reg.load_adapter(n) for n in names]
    apart = named_apart([rec for rec, _ in loaded], names)  # one that answers with a composition: all of it
    if apart:
        raise UserInputError(apart)
    one_base([rec for rec, _ in loaded], f"adapters of different base models cannot be {together}")
    lb = load_base(loaded[0][0].base, settings, share_weights=share_base)
    for rec, ad in loaded:
        if lb.fingerprint.sha != rec.base_sha:
            raise IncompatibleAdapter(
                f"adapter {rec.name!r}: base {rec.base!r} has changed since it was registered (its fingerprint differs)")
        ad.check_fits(lb.fingerprint, name=f"adapter {rec.name!r}")
    return lb, [rec for rec, _ in loaded], [ad for _, ad in loaded]


def load_adapted(reg, names: Sequence[str], settings):
    """The adapters' common base with them injected (a bank of E = len(names), no router): the summed
    composition. Returns (LoadedBase, records)."""
    lb, recs, ads = load_members(reg, names, settings, together="combined")
    inject(lb.model, ads)
    return lb, recs


def _check_base(rec_base: str, base: str | None, what: str) -> None:
    if base is not None and resolve_base(base).name != rec_base:
        raise IncompatibleAdapter(f"{what} routes adapters of base {rec_base!r}, not {base!r}")


def joint_copy_names(router: str, adapters: Sequence[str]) -> list[str]:
    """The experts of a joint router fitted over registered adapters are its own retrained copies of them: named
    `router/adapter`, so that no trace, eval table or server response credits the registered adapter with
    weights it does not have (sweep 30; records stored before were named as the adapters)."""
    return [a if a.startswith(f"{router}/") else f"{router}/{a}" for a in adapters]


def _member_shortlists(reg, members: Sequence[str], texts: Sequence[str], labels: Sequence[str] | None,
                       size: int) -> list[tuple[int, ...]]:
    """Each query's shortlist of a router's `members`: the `size` retrieval ranks nearest it (with its label term
    when the queries name their `labels`), and the members of a composition one of those answers with (all
    members: the fit checked); sorted member indices, one tuple a query."""
    ret = RetrievalRouter(RetrievalConfig())
    scores = ret.scores(_embedder(reg).encode(list(texts)), Signatures.of(reg, members))
    if labels:
        scores = scores + ret.label_bonus(labels, [adapter_labels(reg, m) for m in members])[None, :]
    out = []
    for row in scores:
        keep = ret.shortlist(row[None, :], size)
        for i in list(keep):
            keep += [members.index(n) for n in reg.get_adapter(members[i]).composition
                     if n in members and members.index(n) not in keep]
        out.append(tuple(sorted(keep)))
    return out


def shortlist_groups(reg, router: str, texts: Sequence[str], size: int,
                     labels: Sequence[str] | None = None) -> list[tuple[tuple[int, ...] | None, list[int]]]:
    """`texts`' indices grouped by equal shortlist of stored router `router`'s members, in order of first
    appearance: `[(member indices, [text indices])]`. One group `(None, all)` where no shortlist is drawn (the
    shortlist holds every member, or the router is not one that takes it: its load says why)."""
    everyone = [(None, list(range(len(texts))))]
    try:
        rec = reg.get_component("router", router)
    except ComponentNotFound:
        return everyone
    members = list(rec.members)
    if rec.extra.get("joint") or size >= len(members) or not texts or not all(map(reg.has_adapter, members)):
        return everyone
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, keep in enumerate(_member_shortlists(reg, members, texts, labels, size)):
        groups.setdefault(keep, []).append(i)
    return list(groups.items())


def load_router(reg, name: str, settings, *, base: str | None = None, shortlist: int | None = None,
                texts: Sequence[str] | None = None, labels: Sequence[str] | None = None, share_base: bool = False,
                keep: Sequence[int] | None = None):
    """The RoutedModel of stored router `name` (restricted to a retrieved shortlist of its adapters if asked:
    the union of the `shortlist` nearest each of `texts`, with its label term when the queries name their
    `labels`; or `keep`, member indices `shortlist_groups` drew). `share_base`: its base's weights are the
    loaded base's own tensors, not a copy (a server holding many routers)."""
    rec, tensors = reg.load_component("router", name)
    _check_base(rec.base, base, f"router {name!r}")
    entry, cfg = ROUTERS.stored_config(rec.method, rec.config, f"router {name!r}")
    router = entry.factory(cfg)
    extra = rec.extra
    expert_refs: list[str | None] = list(extra.get("tasks", []))
    gate_t = {k[len("gate."):]: v for k, v in tensors.items() if k.startswith("gate.")}
    if extra.get("joint"):
        if shortlist is not None:  # drawn by retrieval over registered adapters' signatures: its experts have none
            raise UserInputError(f"--shortlist draws from registered adapters; router {name!r} routes its own jointly "
                                 "trained experts, which retrieval cannot rank")
        lb = load_base(rec.base, settings, share_weights=share_base)
        if lb.fingerprint.sha != extra.get("base_sha"):
            raise IncompatibleAdapter(f"router {name!r}: base {rec.base!r} has changed since it was fitted")
        specs = [LoraSpec(**s) for s in extra["expert_specs"]]
        experts: list = []
        for e, spec in enumerate(specs):
            p = f"expert.{e}."
            experts.append(Adapter.from_state_dict(spec, {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)},
                                                   where=f"router {name!r} expert {e}"))
        inject(lb.model, experts, rank=router.bank_ranks(_gate_weights(gate_t), len(experts)))
        expert_names = list(extra.get("expert_names") or [f"{name}/expert-{e}" for e in range(len(experts))])
        if rec.members:  # copies of registered adapters
            expert_names = joint_copy_names(name, expert_names)
        keep = list(range(len(experts)))
    else:
        members = list(rec.members)
        if (problem := router_members_problem(rec)) is not None:
            raise IntegrityError(problem)
        missing = [m for m in members if not reg.has_adapter(m)]
        if missing:
            raise IntegrityError(f"router {name!r} routes over adapters that are gone: {', '.join(missing)}")
        if keep is not None:  # indices of the router's members: -1 read as the last one, 99 an IndexError (sweep 42)
            bad = [i for i in keep if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(members)]
            if bad:
                raise UserInputError(f"keep: {bad[0]!r} is not the index of one of router {name!r}'s "
                                     f"{len(members)} adapters (0 to {len(members) - 1})")
            keep = sorted(set(keep))
        elif shortlist is not None and shortlist < len(members):
            if not texts:
                raise UserInputError("a shortlist needs the queries it is drawn for")
            keep = sorted(set().union(*_member_shortlists(reg, members, texts, labels, shortlist)))
        else:
            keep = list(range(len(members)))
        ranks = router.bank_ranks(_gate_weights(gate_t), len(members))
        lb, recs, ads = load_members(reg, [members[i] for i in keep], settings, share_base=share_base)
        if any(r.base != rec.base for r in recs) or (extra.get("base_sha") and lb.fingerprint.sha != extra["base_sha"]):
            raise IncompatibleAdapter(f"router {name!r} was fitted on base {rec.base!r}; its adapters are now of another base")
        inject(lb.model, ads, rank=ranks, modules=sorted(_gate_weights(gate_t)))
        expert_names = [members[i] for i in keep]
        expert_refs = [expert_refs[i] if i < len(expert_refs) else None for i in keep]
    n_full = len(experts) if extra.get("joint") else len(rec.members)
    _build_gates(router, lb.model, gate_t, n_full)
    router.load_tensors(gate_t)
    if len(keep) != n_full:
        router.keep_experts(keep)
    router.attach(lb.model)
    cards = extra.get("task_cards") if isinstance(extra.get("task_cards"), dict) else {}
    if extra.get("joint"):
        tasks = [_load_task(reg, r, cards) for r in expert_refs]
    else:  # each adapter answers with the task it was fitted on (`router fit --tasks` may pair it with another)
        tasks = [_load_task(reg, ref, cards) if ref and ref != r.task else reg.adapter_task(r, rows=True)
                 for r, ref in zip(recs, expert_refs)]
    try:  # as the fit checked: a sidecar added since may give a file another expert's task name
        one_name_each([t for t in tasks if t is not None], [e for e, t in zip(expert_names, tasks) if t is not None], None)
    except UserInputError as exc:
        raise UserInputError(f"router {name!r}: {exc} (the files were renamed since it was fitted)") from None
    pool = [_load_task(reg, r, cards) for r in extra.get("task_pool", [])]
    sig = tensors.get("task_sig")
    return RoutedModel(lb, expert_names, tasks, router=router, embedder=_embedder(reg), record=rec, task_pool=pool,
                       task_signatures=sig.numpy() if sig is not None else None)


def _gate_weights(gate_t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """projection name -> its gate's weight tensor."""
    return {k[: -len(".weight")]: v for k, v in gate_t.items() if k.endswith(".weight")}


class _Shape:
    """Stands in for a RoutedLinear when a gate is rebuilt from stored tensors (full expert count)."""

    def __init__(self, name: str, d_in: int, n_experts: int, rank: int, valid: torch.Tensor | None):
        from types import SimpleNamespace

        self.name = name  # the projection's name (a shared gate is keyed by its parent module)
        mask = valid.float() if valid is not None else torch.ones(n_experts * rank)
        self.bank = SimpleNamespace(d_in=d_in, n_experts=n_experts, rank=rank, rank_mask=mask)


def _build_gates(router, model, gate_t: dict[str, torch.Tensor], n_full: int) -> None:
    """Create the router's gates with the shapes they were stored with (before any shortlist)."""
    weights = _gate_weights(gate_t)
    layers = routed_layers(model)
    if set(weights) != set(layers):
        odd = sorted(set(weights) ^ set(layers))[0]
        raise IntegrityError(f"router weights and adapters disagree on projection {odd!r}")
    for name, w in weights.items():
        E, R = router.stored_shape(int(w.shape[0]), n_full)
        d_in = int(gate_t.get(f"{name}.down", w).shape[1])  # a factorised gate's input width is its down factor's
        g = router.make_gate(_Shape(name, d_in, E, R, gate_t.get(f"{name}.valid")))
        router.gates[name] = g.to(layers[name].bank.A.device)


def load_retrieval(reg, settings, *, adapters: Sequence[str] | None, texts: Sequence[str], base: str | None = None,
                   config: dict[str, Any] | None = None, method: str = "retrieval", share_base: bool = False):
    """A RoutedModel routing by signature retrieval over `adapters` (default: the registry, via faiss)."""
    ret = ROUTERS.build(method, config or {})
    emb = _embedder(reg)
    if adapters:
        names = list(adapters)
        for n in names:
            rec = reg.get_adapter(n)  # AdapterNotFound with a clear message
            if rec.bound_to():  # retrieval mixes single adapters (its index holds only those: adapter_ids)
                raise UserInputError(f"{rec.bound_to()}; retrieval routes to adapters that answer alone, so it "
                                     f"cannot route to it: evaluate it with `loraplex eval {n}`, or serve it")
        if base is not None:
            for n in names:
                _check_base(reg.get_adapter(n).base, base, f"adapter {n!r} is of another base: retrieval")
        if ret.config.top_k > len(names):  # mixed all of them without a word (a fitted router refuses it too)
            raise UserInputError(f"top_k={ret.config.top_k} is more than the {len(names)} adapter(s) named to route "
                                 f"over: give at most {len(names)}, or name more adapters")
    else:
        if reg.count() == 0:
            raise UserInputError(f"no adapters registered in {reg.home}; register or train some first")
        if not texts:  # the registry's candidates are those nearest to the queries: with none, nothing is near
            raise UserInputError("retrieval over the whole registry finds the adapters nearest to the queries: give "
                                 "the query texts, or the adapters to route over")
        names = ret.candidates(reg, emb.encode(list(texts)), base=resolve_base(base).name if base else None)
        if not names:
            raise UserInputError(f"no adapters of base {base!r} in the registry")
        if ret.config.top_k > len(names):  # as with --adapters: it mixed what there was without a word (sweep 35)
            raise UserInputError(f"top_k={ret.config.top_k} is more than the {len(names)} adapter(s) retrieval can route "
                                 f"over here (of base {reg.get_adapter(names[0]).base!r}): give at most {len(names)}")
    sig = Signatures.of(reg, names)
    lb, recs, ads = load_members(reg, names, settings, share_base=share_base)
    inject(lb.model, ads)
    tasks = [reg.adapter_task(r) for r in recs]
    return RoutedModel(lb, names, tasks, retrieval=ret, signatures=sig, embedder=emb)


def nearest_bases(reg, texts: Sequence[str], config: dict[str, Any] | None = None) -> list[str | None]:
    """The base of each text's own nearest adapter by retrieval's routing score (None where the registry has
    none): retrieval over a registry of several bases answers each query on its own nearest adapter's base
    (sweep 35: a batch took the base of its single best hit, so a query's model depended on its neighbours
    and on --batch-size)."""
    from loraplex.registry.index import nearest_adapters

    ret = ROUTERS.build("retrieval", config or {})
    hits = nearest_adapters(reg, _embedder(reg).encode(list(texts)), 1, weight=ret.config.prototype_weight)
    return [h[0].base if h else None for h in hits]


def load_bank(reg, names: Sequence[str], settings, share_base: bool = False):
    """A RoutedModel with the adapters in a bank and no router (for heterogeneous batches)."""
    lb, recs, ads = load_members(reg, names, settings, share_base=share_base)
    inject(lb.model, ads)
    return RoutedModel(lb, list(names), [reg.adapter_task(r) for r in recs], embedder=_embedder(reg))


def is_untrained(router: str | None) -> bool:
    """Whether `router` names a catalog method that needs no training (retrieval), not a stored router."""
    return router in ROUTERS.names() and not issubclass(ROUTERS.get(router).factory, LearnedRouter)


def load_routed_model(reg, settings, router: str | None = None, adapters: Sequence[str] | None = None, *,
                      texts: Sequence[str] | None = None, base: str | None = None, shortlist: int | None = None,
                      config: dict[str, Any] | None = None, labels: Sequence[str] | None = None,
                      share_base: bool = False, keep: Sequence[int] | None = None):
    """A `RoutedModel` (router/model.py) ready to answer and trace queries:

    - `router=NAME`: a router stored by `fit_router` (restricted to the `shortlist` adapters retrieval
      finds nearest to `texts`, if given, preferring adapters trained on `labels` when the queries name
      them; or to `keep`, one of `shortlist_groups`' member sets);
    - `router="retrieval"` (a method that needs no training): signature retrieval over `adapters` (or,
      without, the registry's adapters nearest to `texts`), `config` being RetrievalConfig's options;
    - no router: the adapters in one bank with no router, for heterogeneous batches
      (`RoutedModel.answer_each(texts, adapter_per_row)`).
    `share_base`: the base's weights and tokenizer are shared, not copied (`load_base(share_weights=True)`),
    for a model only loraplex reads and drops (a query's, made again per batch; a server's routers)."""
    if router == "auto":  # reserved: no router may be named so (sweep 26: "no router named 'auto'")
        raise UserInputError("auto decides per query (route, generate an adapter, or the bare base) and is not a "
                             "model to load: use query(texts, router='auto')")
    if shortlist is not None and shortlist < 1:
        raise UserInputError("--shortlist must be at least 1")
    if shortlist is not None and (not router or is_untrained(router)):
        raise UserInputError(f"--shortlist limits a stored router to the adapters retrieval finds nearest; "
                             f"{'retrieval ranks the adapters itself (--set top_k=N)' if router else 'name a router'}")
    if is_untrained(router):
        return load_retrieval(reg, settings, adapters=adapters, texts=texts or [], base=base, config=config,
                              method=router, share_base=share_base)
    if config:  # a stored router's options are those it was fitted with; none at all: nothing to set
        raise UserInputError("--top-k and --set apply to --router retrieval or auto; a stored router keeps the "
                             "options it was fitted with")
    if router:
        if adapters:
            raise UserInputError(f"router {router!r} routes over the adapters it was fitted on; --adapters goes with --router retrieval")
        try:
            return load_router(reg, router, settings, base=base, shortlist=shortlist, texts=texts, labels=labels,
                               share_base=share_base, keep=keep if shortlist is not None else None)
        except ComponentNotFound:
            known = ", ".join(c.name for c in reg.list_components("router", damaged=[])) or "none"
            raise ComponentNotFound(f"no router named {router!r} in the registry at {reg.home} "
                                    f"(stored routers: {known}; or --router retrieval)") from None
    if not adapters:
        raise UserInputError("name a router (--router NAME or --router retrieval) or the adapters to load")
    return load_bank(reg, adapters, settings, share_base=share_base)
