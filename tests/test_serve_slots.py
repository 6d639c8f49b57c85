"""The slot bank's identity rules (sweep 14): an adapter registered anew under its name while rows still
generate with it is answered with the new weights by later requests (the old slot stays, hidden, for the
running rows), and slots of running rows are never evicted by classification or new rows."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_peft_adapter
from tests.router.conftest import write_task

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def engine(settings, tiny_llama, tmp_path):
    from loraplex import api
    from loraplex.serve.engine import Engine

    for i, name in enumerate(("flights", "sports", "phones")):
        task = write_task(tmp_path, name)
        d = make_peft_adapter(tiny_llama, tmp_path / name, r=2, targets=("q_proj", "v_proj"), causal=True, seed=50 + i)
        api.register(d, name=f"{name}-lora", description=f"{name} messages", task=str(task), base=str(tiny_llama),
                     settings=settings)
    return Engine(settings, base=str(tiny_llama), max_loras=2)


def _route(*names):
    from loraplex.serve.targets import Route

    return Route([(n, 1.0) for n in names])


def _slot_A(engine, slot: int) -> torch.Tensor:
    bank = next(m for m in engine.lb.model.modules() if type(m).__name__ == "LoraBank")
    return bank.A.view(bank.n_experts, bank.rank, -1)[slot].clone()


def test_a_request_after_a_re_registration_gets_the_new_weights(engine, settings, tiny_llama, tmp_path):
    from loraplex import api

    running = {"flights-lora"}  # a row still generating with the first flights-lora
    engine.gates([_route("flights-lora")], keep=running)
    old_slot, old_blob = engine.slots.slots["flights-lora"]
    old_A = _slot_A(engine, old_slot)
    api.remove("flights-lora", settings=settings)
    d = make_peft_adapter(tiny_llama, tmp_path / "new", r=2, targets=("q_proj", "v_proj"), causal=True, seed=99)
    api.register(d, name="flights-lora", description="flights, again", task=str(tmp_path / "flights.jsonl"),
                 base=str(tiny_llama), settings=settings)
    engine.sync(running)
    g = engine.gates([_route("flights-lora")], keep=running)  # a request that came after the change
    new_slot, new_blob = engine.slots.slots["flights-lora"]
    assert new_blob != old_blob and new_slot != old_slot and g[0, 0, new_slot] == 1.0
    assert torch.equal(_slot_A(engine, old_slot), old_A)  # the running row's weights are untouched
    assert not torch.equal(_slot_A(engine, new_slot), old_A)
    assert engine.slots.hidden() == 1 and engine.fits({"flights-lora"}, running)
    assert not engine.fits({"flights-lora", "sports-lora"}, running)  # the hidden slot takes one of the two
    # a bank that grows (an adapter of a larger rank) keeps every slot's weights, the hidden one's too
    # (it re-read each slot by name: the hidden one's name reads nothing, and the bank was left zeroed)
    d = make_peft_adapter(tiny_llama, tmp_path / "wide", r=6, targets=("q_proj", "v_proj"), causal=True, seed=7)
    api.remove("sports-lora", settings=settings)
    api.register(d, name="sports-lora", description="sports, wider", task=str(tmp_path / "sports.jsonl"),
                 base=str(tiny_llama), settings=settings)
    engine.sync(running)
    engine.slots.slots.pop("flights-lora")  # make room: the new adapter must load beside the hidden slot
    engine.gates([_route("sports-lora")], keep=running)
    assert engine.slots.shape[1] == 6 and engine.slots.slots["sports-lora"][0] == new_slot
    assert torch.equal(_slot_A(engine, old_slot)[:2], old_A[:2]) and not _slot_A(engine, old_slot)[2:].any()
    engine.sync(set())  # the running row is done: its hidden slot is freed
    assert engine.slots.hidden() == 0 and engine.fits({"flights-lora", "phones-lora"})
    assert set(engine.slots.slots) == {"sports-lora"}


def test_running_rows_keep_their_slots(engine):
    from loraplex.serve.classify import chunks

    engine.gates([_route("flights-lora")], keep={"flights-lora"})
    kept = engine.slots.slots["flights-lora"][0]
    engine.gates([_route("sports-lora")], keep={"flights-lora"})
    engine.gates([_route("phones-lora")], keep={"flights-lora"})  # evicts sports-lora, not the running row's
    assert engine.slots.slots["flights-lora"][0] == kept and "sports-lora" not in engine.slots.slots
    with pytest.raises(Exception, match="adapters at once"):
        engine.gates([_route("sports-lora", "phones-lora")], keep={"flights-lora"})
    # classification cuts its rows so that each chunk fits beside the running rows' slots
    routes = [_route("sports-lora"), _route("phones-lora"), _route("flights-lora")]
    assert chunks(routes, lambda names: engine.fits(names, {"flights-lora"})) == [[0], [1, 2]]
    from loraplex.serve.targets import Target

    assert engine.fits_beside(Target("adapter", "sports-lora"), None, {"flights-lora"})
    assert not engine.fits_beside(Target("auto", "auto"), [_route("sports-lora", "phones-lora")], {"flights-lora"})


def test_a_dead_batching_thread_answers_instead_of_hanging(monkeypatch):
    """`--max-wait-ms inf` killed the batching thread: every request then hung and /health said ok (sweep 14).
    Whatever kills it, waiting and later requests are answered with why, and `failed` says so (/health: 503)."""
    import asyncio

    from loraplex.serve.scheduler import Job, Scheduler
    from loraplex.serve.targets import Target

    sch = Scheduler(None, max_batch=2, max_wait_ms=1)
    loop = asyncio.new_event_loop()
    waiting = Job(kind="classify", target=Target("base", "b"), texts=["x"], loop=loop)

    def broken():
        sch._held.append(waiting)  # a job the thread held when it died
        raise OverflowError("timestamp out of range for platform time_t")

    monkeypatch.setattr(sch, "_run", broken)
    sch.start()
    sch._thread.join(10)
    assert sch.failed == "OverflowError: timestamp out of range for platform time_t"
    try:
        later = Job(kind="classify", target=Target("base", "b"), texts=["x"], loop=loop)
        sch.submit(later)
        for job in (waiting, later):
            kind, err = loop.run_until_complete(asyncio.wait_for(job.events.get(), 5))
            assert kind == "error" and "batching thread has stopped" in str(err)
    finally:
        loop.close()


def test_one_damaged_record_fails_only_its_own_requests(engine, settings):
    """A record damaged in registry.db stopped `serve` from starting, made /v1/models a 503 on every call and
    failed requests for other adapters (sweep 14)."""
    import sqlite3

    from loraplex.serve.engine import Engine

    with sqlite3.connect(settings.home / "registry.db") as c:
        c.execute("UPDATE adapters SET rank = 'abc' WHERE name = 'phones-lora'")
    fresh = Engine(settings, max_loras=2)  # the default base, read past the damaged record
    assert {m["id"] for m in fresh.models() if m["kind"] == "adapter"} == {"flights-lora", "sports-lora"}
    fresh.sync(set())
    g = fresh.gates([_route("flights-lora")])
    assert g is not None and float(g.sum()) == 1.0


def test_a_held_classification_is_not_starved_by_new_rows(engine):
    """A classification held for the running rows' slots waited as long as new generation rows kept joining
    (review, last session; rows on already-loaded adapters kept those pinned too: review): while one is held,
    no new row joins the bank's batch."""
    import asyncio

    from loraplex.serve import decode
    from loraplex.serve.scheduler import Job, Scheduler
    from loraplex.serve.targets import Target

    sch = Scheduler(engine, max_batch=8, max_wait_ms=1)
    loop = asyncio.new_event_loop()

    def job(name):
        return Job(kind="generate", target=Target("adapter", name), texts=["x"], loop=loop, prompt_ids=[1, 2, 3],
                   sampling=decode.Sampling(max_tokens=8))

    try:
        first = job("flights-lora")
        sch._pending = [(first, _route("flights-lora"))]
        sch._admit()
        assert sch._pinned() == {"flights-lora"} and not sch._pending
        sch._held = [Job(kind="classify", target=Target("adapter", "sports-lora"), texts=["x"], loop=loop)]
        other, same = job("phones-lora"), job("flights-lora")
        sch._pending = [(other, _route("phones-lora")), (same, _route("flights-lora"))]
        sch._admit()
        assert [j for j, _ in sch._pending] == [other, same]  # both wait behind the held classification: `same`
        assert len(sch._lanes["bank"].rows) == 1              # too, or its adapter stays pinned for ever (review)
        sch._held = []
        sch._admit()
        loop.run_until_complete(asyncio.sleep(0))  # what the jobs were sent, should one have failed (once seen)
        sent = {id(j): [j.events.get_nowait() for _ in range(j.events.qsize())] for j in (first, other, same)}
        # every row joined; `first` may have finished on the way (it samples at temperature 1 and drew the end
        # of text once in CI: 2 rows left, and its 'done' among its events)
        ended = sum(any(kind == "done" for kind, _ in events) for events in sent.values())
        assert not sch._pending and len(sch._lanes["bank"].rows) + ended == 3, sent
    finally:
        loop.close()


def test_a_bank_that_cannot_grow_leaves_the_old_one_serving(engine, settings, tiny_llama, tmp_path, monkeypatch):
    """A growth whose allocation fails (an adapter of a huge rank, a full GPU) left the model with no
    routed layer while the slots still named adapters: every adapter then answered as the bare base, with
    200s, until a restart (sweep 19). The old bank is put back and the request is told why (OutOfMemory)."""
    from loraplex import api
    from loraplex.errors import OutOfMemory
    from loraplex.experts.layers import routed_layers
    import loraplex.serve.slots as slots_mod

    engine.gates([_route("flights-lora")])
    slot = engine.slots.slots["flights-lora"][0]
    before_A, shape, layers = _slot_A(engine, slot), engine.slots.shape, set(routed_layers(engine.lb.model))
    d = make_peft_adapter(tiny_llama, tmp_path / "wide", r=6, targets=("q_proj", "v_proj"), causal=True, seed=7)
    api.register(d, name="wide-lora", description="wide", task=str(tmp_path / "sports.jsonl"),
                 base=str(tiny_llama), settings=settings)
    engine.sync(set())
    real = slots_mod.inject_new

    def fails(*a, **k):
        real(*a, **k)  # part of the new bank is made, then the memory runs out
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(slots_mod, "inject_new", fails)
    with pytest.raises(OutOfMemory, match=r"cannot load adapter 'wide-lora' \(rank 6\).*out of memory.*--max-loras") as err:
        engine.gates([_route("wide-lora")])
    assert "(2 slots, 12.0 KiB)" in str(err.value)  # 2 slots x rank 6 x (32 + 32) x 4 projections, float32
    assert engine.slots.shape == shape and set(routed_layers(engine.lb.model)) == layers
    assert torch.equal(_slot_A(engine, slot), before_A)  # flights-lora answers with its own weights still
    g = engine.gates([_route("flights-lora")])
    assert g[0, 0, slot] == 1.0
    monkeypatch.setattr(slots_mod, "inject_new", real)  # memory again: the growth happens
    engine.gates([_route("wide-lora")])
    assert engine.slots.shape[1] == 6 and torch.equal(_slot_A(engine, slot)[:2], before_A[:2])


def test_a_failed_allocation_is_a_503_not_an_internal_error():
    """The server's memory running out is its state, not a bug in the request or in loraplex (sweep 19)."""
    from loraplex.errors import OutOfMemory
    from loraplex.serve.app import api_error

    for exc in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
                RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
                OutOfMemory("cannot load adapter 'x' (rank 6): out of memory")):
        err = api_error(exc)
        assert err.status == 503 and "internal error" not in err.message, (exc, err.message)
    assert api_error(RuntimeError("shape mismatch")).status == 500


def test_one_damaged_router_record_fails_only_its_own_requests(engine, settings, cli):
    """A router record damaged in registry.db made /v1/models, every router, unloads and the server's
    start fail, and `router remove` could not remove it (sweep 19): it is left out and named, the rest
    served, and removing it works as its message says."""
    import sqlite3

    from loraplex.errors import IntegrityError
    from loraplex.registry.store import Registry
    from loraplex.serve.engine import Engine

    reg = Registry(settings.home)
    base = engine.base_name
    for name in ("r-good", "r-bad"):
        reg.put_component("router", name, method="token-gate", base=base, config={},
                          tensors={"w": torch.zeros(2)}, members=["flights-lora"])
    with sqlite3.connect(settings.home / "registry.db") as c:
        c.execute("UPDATE components SET config = '{bad' WHERE name = 'r-bad'")
    fresh = Engine(settings, max_loras=2)  # a server starting over the damaged record
    assert {m["id"] for m in fresh.models() if m["kind"] == "router"} == {"r-good"}
    assert fresh.resolve("r-good").kind == "router"
    with pytest.raises(IntegrityError, match="router 'r-bad': its stored record is damaged"):
        fresh.resolve("r-bad")
    engine._generation = ""  # a running server reading the registry anew (as after any write)
    engine.sync(set())  # its adapters still answer
    assert engine._generation and engine.gates([_route("sports-lora")]) is not None
    # the damaged record still names flights-lora: its removal is refused until that record goes (sweep 34)
    with pytest.raises(IntegrityError, match="adapter 'flights-lora' is named by router 'r-bad'"):
        reg.components_using("flights-lora")
    assert reg.components_using("sports-lora") == []
    r = cli("router", "list", "--home", str(settings.home))
    assert r.exit_code == 0 and "r-good" in r.stdout and r.stderr.count("warning: ") == 1, r.output
    rep = cli("registry", "check", "--home", str(settings.home))
    assert rep.exit_code != 0 and "router 'r-bad': its stored record is damaged" in rep.output
    r = cli("router", "remove", "r-bad", "--home", str(settings.home))
    assert r.exit_code == 0 and "removed router r-bad (its record was damaged)" in r.stdout, r.output
    assert [c.name for c in reg.list_components("router")] == ["r-good"]
    assert reg.components_using("flights-lora")[0].name == "r-good"


def test_an_adapter_that_answers_with_a_composition_is_served_with_it(engine, settings):
    """A GS-LoRA forgetting adapter was listed in /v1/models as an adapter of its task and answered it alone,
    with confident wrong labels (sweep 19), and so did an O-LoRA stream's adapter, whose recorded accuracy is
    that of the stream's adapters summed: each is now served with its composition (summed, itself first),
    refused when the server has too few slots for it, and left out when part of it is missing."""
    from loraplex.errors import IntegrityError, UserInputError
    from loraplex.registry.record import AdapterDraft
    from loraplex.registry.signatures import description_embedding
    from loraplex.registry.store import Registry
    from loraplex.serve.engine import Engine
    from loraplex.serve.targets import Target

    reg = Registry(settings.home)
    src = reg.get_adapter("flights-lora")
    _, weights = reg.load_adapter(src)

    def add(name, origin, composition, **extra):
        reg.add_adapter(AdapterDraft(name=name, base=src.base, base_sha=src.base_sha, family=src.family,
                                     description=f"{name} of flights", task=src.task, origin=origin, spec=src.spec,
                                     extra={"composition": composition, **extra}),
                        weights, embedding=description_embedding(reg, f"{name} of flights"), embedder=reg.embedder_name)

    add("fg1", "forgetting", ["flights-lora", "sports-lora", "fg1"])
    add("ol1", "continual", ["flights-lora", "ol1"], summed=True, method={"name": "o-lora"})
    add("rt1", "continual", ["flights-lora", "rt1"], summed=False, method={"name": "routed"})  # answers alone
    add("nope-lora", "trained", [])  # a member deleted since (by hand: registration refuses a missing one)
    add("gone1", "continual", ["nope-lora", "gone1"], summed=True)
    import sqlite3

    reg.close()
    with sqlite3.connect(settings.home / "registry.db") as c:
        c.execute("DELETE FROM adapters WHERE name = 'nope-lora'")
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    listed = {m["id"]: m for m in engine.models()}
    assert listed["ol1"]["composition"] == ["flights-lora", "ol1"] and "composition" not in listed["rt1"]
    assert listed["fg1"]["composition"] == ["flights-lora", "sports-lora", "fg1"] and "gone1" not in listed
    assert engine.route_of(engine.resolve("ol1")).adapters == [("ol1", 1.0), ("flights-lora", 1.0)]
    assert engine.route_of(engine.resolve("rt1")).adapters == [("rt1", 1.0)]
    with pytest.raises(UserInputError, match="'fg1' is a forgetting adapter: it erases .* flights-lora, sports-lora: "
                                             "3 adapters at once, more than this server's 2 slots"):
        engine.resolve("fg1")
    assert Engine(settings, base=engine.base_name, max_loras=3).route_of(Target("adapter", "fg1")).adapters[0] == ("fg1", 1.0)
    with pytest.raises(IntegrityError, match="'gone1' was trained by a continual stream .* 'nope-lora' is no longer"):
        engine.resolve("gone1")
    # retrieval never takes one alone; removing part of a composition is refused
    assert set(reg.adapter_ids(routable=True).tolist()) == {reg.get_adapter(n).id for n in
                                                           ("flights-lora", "sports-lora", "phones-lora", "rt1")}
    from loraplex.registry.adapters import remove

    with pytest.raises(UserInputError, match="'flights-lora' is part of the composition that forgetting adapter 'fg1' "
                                             "erases from; remove 'fg1', 'ol1' first"):
        remove(reg, "flights-lora")
    # `query --adapters fg1` (and any bank of named adapters) answered with it alone too: named with its
    # composition it loads, alone or with part of it it is refused by name
    from loraplex.router.load import load_members

    for names in (["fg1"], ["flights-lora", "fg1"]):
        with pytest.raises(UserInputError, match="name it with them \\(flights-lora,sports-lora,fg1\\), not alone"):
            load_members(reg, names, settings)
    assert len(load_members(reg, ["flights-lora", "sports-lora", "fg1"], settings)[1]) == 3
    with pytest.raises(UserInputError, match="'ol1' was trained by a continual stream \\(o-lora\\) with flights-lora"):
        load_members(reg, ["ol1"], settings)


def test_an_adapter_of_the_base_as_it_was_is_neither_listed_nor_routed_to(engine, settings):
    """An adapter registered against another fingerprint of the served base (its config changed since) was
    listed in /v1/models and chosen by `auto` and retrieval, and then failed the request that loading it
    (sweep 19, F18): it is now left out of the list, of auto's and retrieval's candidates, and a request
    naming it (or a router over it) is told why."""
    import sqlite3

    import numpy as np

    from loraplex.errors import IntegrityError
    from loraplex.registry.check import check
    from loraplex.registry.index import nearest_adapters
    from loraplex.registry.store import Registry
    from loraplex.router import auto as auto_router
    from loraplex.router.retrieval import RetrievalConfig, RetrievalRouter

    reg = Registry(settings.home)
    reg.put_component("router", "r-sports", method="token-gate", base=engine.base_name, config={},
                      tensors={"w": torch.zeros(2)}, members=["flights-lora", "sports-lora"])
    with sqlite3.connect(settings.home / "registry.db") as c:
        c.execute("UPDATE adapters SET base_sha = 'f' || substr(base_sha, 2) WHERE name = 'sports-lora'")
    engine._generation = ""
    listed = {m["id"] for m in engine.models()}
    assert {"flights-lora", "phones-lora"} <= listed and not {"sports-lora", "r-sports"} & listed
    with pytest.raises(IntegrityError, match="adapter 'sports-lora': base .* has changed since it was registered"):
        engine.resolve("sports-lora")
    with pytest.raises(IntegrityError, match="router 'r-sports': adapter 'sports-lora'"):
        engine.resolve("r-sports")
    # a query that sits on sports-lora's signature: the search finds it first, the choices never take it
    q = np.stack([engine.embedder.encode(["sports messages"])[0]])
    assert nearest_adapters(reg, q, 3, weight=0.8)[0][0].name == "sports-lora"
    cfg = auto_router.parse_config({"route_threshold": -1.0, "generate_threshold": -1.0, "no_generator_threshold": -1.0})
    served = auto_router.decide(reg, ["sports messages"], cfg, base=engine.base_name,
                                base_sha=engine.lb.fingerprint.sha, queries=q)[0]
    derived = auto_router.decide(reg, ["sports messages"], cfg, base=engine.base_name, queries=q)[0]
    for d in (served, derived):
        assert d.action == "route" and d.nearest != "sports-lora" and "sports-lora" not in [h.name for h in d.hits]
    names = RetrievalRouter(RetrievalConfig(candidates=3)).candidates(reg, q)
    assert names and "sports-lora" not in names
    rep = check(reg)
    assert not rep.ok and any("adapter 'sports-lora': base" in p and "has changed" in p for p in rep.problems)
    assert not any("flights-lora" in p for p in rep.problems)


def test_an_adapter_removed_after_the_search_is_left_out_of_the_decision(engine, settings, monkeypatch):
    """The decision read each searched adapter's record again (its labels, its family): one removed in between (a
    server's unload) failed every request decided in that round with a 404 naming it, requests that never route
    to it included (sweep 39). It is left out, and the rest decide as before."""
    import numpy as np

    from loraplex.registry.store import Registry
    from loraplex.router import auto as auto_router

    reg = Registry(settings.home)
    q = np.stack([engine.embedder.encode(["sports messages"])[0]])
    cfg = auto_router.parse_config({"route_threshold": 0.0})
    hits = auto_router.nearest_hits(reg, q, cfg, engine.base_name)[0]
    assert len(hits) >= 2
    gone = hits[-1].name  # not the nearest: the request routes elsewhere
    real = reg.get_adapter

    def removed(name):
        if name == gone:
            from loraplex.errors import AdapterNotFound
            raise AdapterNotFound(f"no adapter named {name!r} in the registry")
        return real(name)

    monkeypatch.setattr(reg, "get_adapter", removed)
    for labels in (None, ("good", "bad"), ()):
        d = auto_router.decide(reg, ["sports messages"], cfg, base=engine.base_name, queries=q, labels=[labels])[0]
        assert d.action == "route" and d.nearest != gone and gone not in [h.name for h in d.hits], d
    # every adapter found removed before the decision: said so (it read "no adapter of base None": sweep 42)
    def all_removed(name):
        from loraplex.errors import AdapterNotFound
        raise AdapterNotFound(f"no adapter named {name!r} in the registry")

    monkeypatch.setattr(reg, "get_adapter", all_removed)
    d = auto_router.decide(reg, ["sports messages"], cfg, base=engine.base_name, queries=q)[0]
    assert d.action == "base" and d.reason == "the adapters found near it were removed before the decision", d
    # a round of many requests reads each adapter's record once, not once per request (sweep 42: 80x slower)
    reads: list[str] = []
    monkeypatch.setattr(reg, "get_adapter", lambda name: reads.append(name) or removed(name))
    texts = ["sports messages", "flight messages", "phone messages"] * 20
    qs = engine.embedder.encode(texts)
    ds = auto_router.decide(reg, texts, cfg, base=engine.base_name, queries=qs)
    assert len(ds) == 60 and len(reads) == len(set(reads)) <= reg.count()


def test_auto_says_the_score_its_thresholds_read_when_labels_re_rank(engine, settings, monkeypatch):
    """With labels, the reason printed the label-ranked score beside the threshold test of the text's score:
    "... (0.369) < no-generator threshold 0.270" (sweep 20). It now says which score each number is."""
    import re

    import numpy as np

    from loraplex.registry.store import Registry
    from loraplex.router import auto as auto_router

    reg = Registry(settings.home)
    q = np.stack([engine.embedder.encode(["sports messages"])[0]])
    s1 = auto_router.nearest_hits(reg, q, auto_router.parse_config({}), engine.base_name)[0][0].score
    monkeypatch.setattr(auto_router, "with_labels", lambda hits, labels, weight, labels_of: sorted(
        (h._replace(score=h.score + (1.0 if h.name == "phones-lora" else 0.0)) for h in hits), key=lambda h: -h.score))
    for threshold, action in ((s1 + 0.01, "base"), (s1 - 0.01, "route")):
        cfg = auto_router.parse_config({"route_threshold": 0.99, "generate_threshold": 0.9,
                                        "no_generator_threshold": threshold})
        d = auto_router.decide(reg, ["sports messages"], cfg, base=engine.base_name, queries=q,
                               labels=[("good", "bad")])[0]
        said = re.search(r"scores (-?[0-9.]+) by text ([<>]=?) no-generator threshold (-?[0-9.]+)", d.reason)
        assert d.action == action and said, d.reason
        x, op, y = float(said[1]), said[2], float(said[3])
        assert (x < y) if op == "<" else (x >= y)  # the inequality it states is true
        assert "'phones-lora' ranks first with the labels asked for" in d.reason and d.nearest == "phones-lora"
        assert ("the one used" in d.reason) == (action == "route")
