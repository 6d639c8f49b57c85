"""The server's `auto` decision: scored once (the gates come from the search that made the decision, so
the routing's first adapter is the `nearest` it names, siblings tied or not), weighted as retrieval
weights, made in the request's own worker (a slow decision holds up no other request), and with
`--backend` a generate decision routes to registered adapters (the backend has no adapter written here)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from loraplex.generators import workflow
from loraplex.registry.index import SignatureIndex
from loraplex.registry.store import Registry
from loraplex.router import auto as auto_router
from loraplex.router.retrieval import RetrievalConfig, RetrievalRouter, Signatures
from loraplex.serve import engine as engine_module
from loraplex.serve.engine import Engine
from loraplex.serve.gathered import Gathered
from tests.conftest import registry_state
from tests.generators.conftest import FAST, TOY_TASKS, add_toy, toy_registry, toy_tasks  # noqa: F401 (fixtures)
from tests.serve_util import llama_home, serving  # noqa: F401 (a fixture)

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)

ROUTE_ALL = {"route_threshold": -1.0, "generate_threshold": -1.0}
BETWEEN = {"route_threshold": 0.999, "generate_threshold": -1.0}  # every request is generated for
TEXTS = ["flight plane delayed late gate", "music festival song ticket", "apple iphone phone tech"]


@pytest.fixture
def twins(toy_registry, tiny_bert, toy_tasks):
    """The toy registry plus `aa-flights`: flights-lora's signature exactly (same description and task),
    registered after it, and first by name."""
    s, reg = toy_registry
    add_toy(reg, s, tiny_bert, "aa-flights", toy_tasks["flights"], TOY_TASKS["flights"][0], seed=10)
    return s, reg


def test_auto_searches_once_and_routes_first_to_the_nearest_it_names(twins, tiny_bert, monkeypatch):
    s, reg = twins
    engine = Engine(s, base=str(tiny_bert), auto={**ROUTE_ALL, "top_k": 2})
    ref_sig = Signatures.of(reg, [r.name for r in reg.list_adapters()])
    searches: list[int] = []
    search = SignatureIndex.search
    monkeypatch.setattr(SignatureIndex, "search", lambda self, q, k: searches.append(len(q)) or search(self, q, k))
    monkeypatch.setattr(Registry, "signatures", lambda *a, **k: pytest.fail("the signatures were scanned again"))
    routes = engine.auto(TEXTS)
    assert searches == [len(TEXTS)]  # one search for the three requests, nothing else
    ref = RetrievalRouter(RetrievalConfig(top_k=2))  # the retrieval router's weighting, by an exact scan
    want = ref.gates(ref.scores(engine.embedder.encode(TEXTS), ref_sig))
    for r, g in zip(routes, want):
        assert r.decision == "route" and r.nearest == r.adapters[0][0]
        assert r.adapters[0][1] >= r.adapters[1][1]
        np.testing.assert_allclose(sorted(w for _, w in r.adapters), sorted(g[g > 0]), rtol=1e-5)
    # the flights request ties the twins: both, weighted equally, the named nearest first
    assert {a for a, _ in routes[0].adapters} == {"flights-lora", "aa-flights"}
    assert routes[0].adapters[0][1] == pytest.approx(0.5)


def test_with_a_backend_a_generate_decision_routes_and_writes_nothing(toy_registry, tiny_bert):
    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto=BETWEEN)
    n = reg.count()
    [fwd] = engine.auto([TEXTS[0]], forwarded=True)
    assert fwd.decision == "route" and "backend" in fwd.reason and "generator 'gen'" in fwd.reason
    assert fwd.adapters and fwd.adapters[0][0] == fwd.nearest == "flights-lora"
    assert reg.count() == n  # nothing was written for a backend that could not serve it
    [here] = engine.auto([TEXTS[0]])
    assert here.decision == "generate" and here.adapters == [(auto_router.generated_name(TEXTS[0], "gen"), 1.0)]
    assert reg.count() == n + 1


def test_alike_inputs_of_one_request_share_the_adapter_written_for_the_first(toy_registry, tiny_bert):
    """Sweep 41: every input of one request was decided before any adapter was written, so 40 near-identical
    inputs registered 40 adapters, where sent one by one the 2nd..40th route to the first. An input as alike
    to an earlier one as routing asks shares its adapter; an unlike one gets its own (server and CLI alike)."""
    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    cfg = {**BETWEEN, "route_threshold": 0.9}
    engine = Engine(s, base=str(tiny_bert), auto=cfg)
    engine._decide = lambda items: [auto_router.Decision(t, "generate", "in the generate band", 0.5, 0.1,
                                                         "flights-lora", "gen") for t, _ in items]
    n = reg.count()
    texts = [TEXTS[0], TEXTS[0] + " again", TEXTS[0] + "  ", TEXTS[1]]  # the hash embedder: word overlap
    routes = engine.auto(texts)
    first = auto_router.generated_name(TEXTS[0], "gen")
    assert [r.adapters[0][0] for r in routes[:3]] == [first] * 3
    assert "shares adapter" in routes[1].reason and "route threshold 0.900" in routes[1].reason
    assert routes[3].adapters[0][0] == auto_router.generated_name(TEXTS[1], "gen")
    assert reg.count() == n + 2
    writer = auto_router.Writer(reg, s, auto_router.parse_config({**cfg, "route_threshold": 0.85}))  # the CLI's
    d = auto_router.Decision(TEXTS[2], "generate", "why", 0.5, 0.1, "phones-lora", "gen")
    a, b = writer(d), writer(auto_router.Decision(TEXTS[2] + " again", "generate", "why", 0.5, 0.1, "phones-lora", "gen"))
    assert a.written == b.written and a.created and not b.created and writer.created() == [a.written]


def test_alike_requests_decided_together_share_one_written_adapter(toy_registry, tiny_bert, toy_tasks):
    """Sweep 45: requests decided in the same gathered round never saw each other's writes (each request had
    its own Writer, and the round's search ran before any write): 10 alike requests at once wrote 10
    adapters, where one by one (or as one request's inputs) they share one. The server's Writers remember the
    adapters written a moment ago; one removed since is not shared; another request's share keeps an adapter
    from the writer's undo."""
    from loraplex.registry.adapters import remove as remove_adapter

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto={**BETWEEN, "route_threshold": 0.75})
    engine._decide = lambda items: [auto_router.Decision(t, "generate", "in the generate band", 0.5, 0.1,
                                                         "flights-lora", "gen") for t, _ in items]
    n = reg.count()
    texts = [f"{TEXTS[0]} visit{i}" for i in range(6)]  # alike to the hash embedder (5 words of 6 shared)
    got: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, engine.auto([texts[i]]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    names = {got[i][0].adapters[0][0] for i in range(6)}
    assert len(names) == 1 and reg.count() == n + 1, names
    assert sum("written for another request a moment ago" in got[i][0].reason for i in range(6)) == 5
    [first] = names
    remove_adapter(reg, first)
    [again] = engine.auto([texts[1]])  # removed since: written anew, not shared
    assert "a moment ago" not in again.reason and reg.has_adapter(again.adapters[0][0])
    # a name taken since by another adapter (a user's own, registered under it) is not shared (sweep 46)
    remove_adapter(reg, again.adapters[0][0])
    add_toy(reg, s, tiny_bert, again.adapters[0][0], toy_tasks["music"], TOY_TASKS["music"][0], seed=40)
    [third] = engine.auto([texts[2]])
    assert "a moment ago" not in third.reason and third.adapters[0][0] != again.adapters[0][0], third.reason
    mine = auto_router.Writer(reg, s, engine.auto_config, engine._recent)
    other = auto_router.Writer(reg, s, engine.auto_config, engine._recent)
    d = auto_router.Decision(TEXTS[1], "generate", "why", 0.5, 0.1, "flights-lora", "gen")
    a = mine(d)
    b = other(auto_router.Decision(TEXTS[1] + " ", "generate", "why", 0.5, 0.1, "flights-lora", "gen"))
    assert a.created and b.written == a.written and not b.created
    assert mine.created() == [] and other.created() == []  # shared: neither call's undo removes it


def test_a_refused_classification_writes_and_logs_nothing(toy_registry, tiny_bert, monkeypatch):
    """/v1/classify to auto without labels, one input decided for the bare base: the request was a 400, yet
    an adapter was generated and registered for its other input and the refused one logged (sweep 25)."""
    from loraplex.errors import UserInputError

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto=BETWEEN)
    real = engine._decide

    def one_to_the_base(items):
        ds = real(items)
        return [ds[0], auto_router.Decision(ds[1].text, "base", "far from everything", 0.01, 0.0, None)]

    monkeypatch.setattr(engine, "_decide", one_to_the_base)
    before = registry_state(s.home)
    with pytest.raises(UserInputError, match="input 1: auto passed it to the bare base"):
        engine.auto(TEXTS[:2], for_classify=True)
    assert registry_state(s.home) == before and not (s.home / auto_router.CANDIDATES_FILE).exists()
    [gen, base] = engine.auto(TEXTS[:2], for_classify=True, labels=["bad", "good"])  # with labels: answered
    assert gen.decision == "generate" and base.decision == "base"


def test_a_server_without_lora_updates_registers_no_generated_adapter(toy_registry, tiny_bert):
    """`serve --no-lora-updates` kept the load/unload endpoints off, while `auto` still registered an adapter
    for every request it generated for (sweep 19): it routes them, and says why."""
    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto=BETWEEN, writes_adapters=False)
    before = registry_state(s.home)
    [r] = engine.auto([TEXTS[0]])
    assert r.decision == "route" and "--no-lora-updates" in r.reason and r.adapters[0][0] == "flights-lora"
    assert registry_state(s.home) == before


def test_the_candidate_log_is_bounded(toy_registry, monkeypatch):
    """Every request the base answered was appended whole to candidates.jsonl, without bound (sweep 19):
    a request's text is cut, and past the log's size no more are taken, each answer saying so."""
    import json

    s, reg = toy_registry
    d = auto_router.Decision(text="x" * 5000, action="base", reason="far", similarity=0.1, margin=0.0, nearest=None)
    assert auto_router.log_candidates(reg, [d]) == [None]
    [logged] = [json.loads(x) for x in (reg.home / auto_router.CANDIDATES_FILE).read_text().splitlines()]
    assert len(logged["query"]) == auto_router.LOGGED_CHARS and logged["chars"] == 5000
    monkeypatch.setattr(auto_router, "CANDIDATES_MAX_BYTES", 100)
    size = (reg.home / auto_router.CANDIDATES_FILE).stat().st_size
    assert "has reached its" in auto_router.log_candidates(reg, [d])[0]
    assert (reg.home / auto_router.CANDIDATES_FILE).stat().st_size == size
    # checked before each entry, not once per batch (one request of 1,000 inputs wrote 24 MB past it: sweep 25)
    (reg.home / auto_router.CANDIDATES_FILE).unlink()
    monkeypatch.setattr(auto_router, "CANDIDATES_MAX_BYTES", 3000)
    notes = auto_router.log_candidates(reg, [d] * 50)
    assert (reg.home / auto_router.CANDIDATES_FILE).stat().st_size < 3000 + 2500
    # each answer says what happened to its own input: the entries written before the bound was reached were
    # logged (every one of them was told it was not: sweep 41)
    entries = len((reg.home / auto_router.CANDIDATES_FILE).read_text().splitlines())
    assert 0 < entries < 50 and notes[:entries] == [None] * entries
    assert all("has reached its" in n for n in notes[entries:])
    blank = auto_router.Decision(text="  ", action="base", reason="far", similarity=0.1, margin=0.0, nearest=None)
    assert auto_router.log_candidates(reg, [blank, d]) == [None, notes[-1]]  # nothing to learn from: no note


def test_the_candidate_log_does_not_wait_for_another_writer(toy_registry):
    """An answer that fell to the base waited up to the registry's 120 s lock timeout to log itself while
    another process wrote (sweep 19): the log is best effort, given up after a moment, and the answer says so."""
    s, reg = toy_registry
    other = Registry(s.home)  # another writer: its own lock file descriptor
    d = auto_router.Decision(text="zzz", action="base", reason="far", similarity=0.1, margin=0.0, nearest=None)
    with other.write_lock():
        t0 = time.monotonic()
        [note] = auto_router.log_candidates(reg, [d])
        assert time.monotonic() - t0 < auto_router.CANDIDATES_LOCK_S + 2
    assert note == "not logged as a candidate new task: the registry is busy (another process is writing to it)"
    assert auto_router.log_candidates(reg, [d]) == [None]  # free again: logged


def test_a_candidate_log_that_is_not_a_regular_file_is_not_opened(toy_registry, monkeypatch):
    """A FIFO at candidates.jsonl: open() waited for a reader for ever, holding the registry's write lock
    (every writer queued behind it; the server could not be stopped: sweep 24)."""
    import os
    from pathlib import Path

    s, reg = toy_registry
    path = reg.home / auto_router.CANDIDATES_FILE
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    d = auto_router.Decision(text="zzz", action="base", reason="far", similarity=0.1, margin=0.0, nearest=None)
    t0 = time.monotonic()
    try:
        assert auto_router.log_candidates(reg, [d]) == [f"not logged as a candidate new task: {path} is not a regular file"]
        real = Path.is_file  # a FIFO made between the check and the open: opened without waiting, then refused
        monkeypatch.setattr(Path, "is_file", lambda self: True if self == path else real(self))
        [note] = auto_router.log_candidates(reg, [d])
        assert note is not None and note.startswith("not logged as a candidate new task"), note
    finally:
        monkeypatch.undo()
        path.unlink(missing_ok=True)
    assert time.monotonic() - t0 < 5
    with reg.write_lock(timeout=1):  # and the lock is free
        pass


def test_a_slow_decision_holds_up_no_other_request(toy_registry, tiny_bert, monkeypatch):
    """auto's generator is held mid-write; a request naming an adapter is answered meanwhile (the
    decision runs in its request's worker, not on the batching thread), then the held one finishes."""
    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    entered, release = threading.Event(), threading.Event()
    generate = auto_router.generate

    def held(*a, **k):
        entered.set()
        release.wait(60)
        return generate(*a, **k)

    monkeypatch.setattr(auto_router, "generate", held)
    out: dict[str, httpx.Response] = {}
    with serving(s, base=str(tiny_bert), auto=BETWEEN) as url, httpx.Client(base_url=url, timeout=60) as h:
        def ask_auto():
            out["auto"] = h.post("/v1/classify", json={"model": "auto", "input": TEXTS[0]})

        t = threading.Thread(target=ask_auto)
        t.start()
        try:
            assert entered.wait(30), "the generate decision never started"
            t0 = time.monotonic()
            named = h.post("/v1/classify", json={"model": "phones-lora", "input": "apple iphone bad"}, timeout=20)
            assert named.status_code == 200 and not release.is_set()
            assert time.monotonic() - t0 < 20
        finally:
            release.set()
            t.join(60)
    assert out["auto"].status_code == 200, out["auto"].text
    routing = out["auto"].json()["routing"]["inputs"][0]
    assert routing["decision"] == "generate"
    assert routing["adapters"] == [{"name": auto_router.generated_name(TEXTS[0], "gen"), "weight": 1.0}]


class _HeldEmbedder:
    """The registry's embedder, held on texts that start with HOLD until `release` is set."""

    def __init__(self, inner, entered: threading.Event, release: threading.Event):
        self.inner, self.entered, self.release = inner, entered, release

    def encode(self, texts):
        if any(t.startswith("HOLD") for t in texts):
            self.entered.set()
            self.release.wait(60)
        return self.inner.encode(texts)

    def reads(self, texts):
        return self.inner.reads(texts)


def test_a_slow_embedding_holds_up_no_other_generation(llama_home, tiny_llama, monkeypatch):
    """auto's query embedding is held; a completion naming an adapter finishes meanwhile (the batching
    thread is not the one embedding), then the held one is routed and answered."""
    s, _ = llama_home
    entered, release = threading.Event(), threading.Event()
    get = engine_module.get_embedder
    monkeypatch.setattr(engine_module, "get_embedder", lambda name: _HeldEmbedder(get(name), entered, release))
    out: dict[str, httpx.Response] = {}
    with serving(s, base=str(tiny_llama)) as url, httpx.Client(base_url=url, timeout=60) as h:
        def ask_auto():
            out["auto"] = h.post("/v1/completions", json={"model": "auto", "prompt": "HOLD match goal team",
                                                          "max_tokens": 3, "temperature": 0})

        t = threading.Thread(target=ask_auto)
        t.start()
        try:
            assert entered.wait(30), "the auto request never started deciding"
            named = h.post("/v1/completions", json={"model": "flights-lora", "prompt": "late", "max_tokens": 3,
                                                    "temperature": 0}, timeout=20)
            assert named.status_code == 200 and "auto" not in out
        finally:
            release.set()
            t.join(60)
    assert out["auto"].status_code == 200, out["auto"].text
    routing = out["auto"].json()["routing"]
    assert routing["decision"] == "route" and routing["adapters"][0]["name"] == routing["nearest"]


def test_a_backend_is_sent_a_registered_adapter_for_a_generate_decision(llama_home, tiny_llama, monkeypatch):
    """With --backend, a request auto would write an adapter for goes to the registered adapters (the
    backend does not have one written here), and nothing is written."""
    s, _ = llama_home
    monkeypatch.setattr(auto_router, "_generator_of", lambda reg, base, name, **kw: SimpleNamespace(name="gen"))
    before = registry_state(s.home)
    with serving(s, base=str(tiny_llama)) as back, \
            serving(s, base=str(tiny_llama), backend=back + "/v1", auto=BETWEEN) as front:
        r = httpx.post(front + "/v1/completions", json={"model": "auto", "prompt": "match goal team sport",
                                                        "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["decision"] == "route" and "generator 'gen'" in routing["reason"] and "backend" in routing["reason"]
    assert routing["adapters"][0]["name"] == routing["nearest"] == "sports-lora"
    assert r.json()["model"] == routing["model"] == "auto"  # named as asked, as without a backend
    assert registry_state(s.home) == before


def test_gathered_calls_give_each_caller_its_own_results_in_fewer_calls():
    calls: list[list[int]] = []

    def slow_double(items):
        calls.append(list(items))
        time.sleep(0.05)
        if -1 in items:
            raise ValueError("bad item")
        return [2 * x for x in items]

    g = Gathered(slow_double)
    got: dict[int, object] = {}

    def call(i):
        try:
            got[i] = g([i, 100 + i])
        except ValueError as exc:
            got[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {i: [2 * i, 200 + 2 * i] for i in range(12)}
    assert len(calls) < 12 and sorted(x for c in calls for x in c) == sorted([*range(12), *range(100, 112)])
    with pytest.raises(ValueError, match="bad item"):
        g([-1])


def test_a_generator_the_server_cannot_use_is_refused_at_start(toy_registry, tiny_bert):
    """`serve --set generator=NAME` naming no stored generator started, then failed auto's requests in the
    generate band with a 400 blaming the client (sweep 19): it is refused before the base loads."""
    from loraplex.errors import UserInputError

    s, reg = toy_registry
    with pytest.raises(UserInputError, match="auto: no generator named 'nope'"):
        Engine(s, base=str(tiny_bert), auto={"generator": "nope"})
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    with pytest.raises(UserInputError, match="auto: generator 'gen' writes adapters for base .*, not 'minilm'"):
        Engine(s, base="minilm", auto={"generator": "gen"})
    assert Engine(s, base=str(tiny_bert), auto={"generator": "gen"}).auto_config.generator == "gen"


def test_a_named_generator_removed_while_serving_is_no_generator(toy_registry, tiny_bert):
    """`serve --set generator=gen`, then `generate remove gen`: every auto request that did not route, those
    falling to the base included, was a 400 'no generator named' blaming the client (sweep 25). The requests
    are decided without a generator (route or base), as with none stored."""
    from loraplex.generators.workflow import remove

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto={**BETWEEN, "generator": "gen"})
    remove(reg, "gen")
    routes = engine.auto(TEXTS[:2])
    assert all(r.decision in ("route", "base") and "no generator" in r.reason for r in routes), routes


def test_a_classification_refused_late_undoes_what_it_wrote(toy_registry, tiny_bert, monkeypatch):
    """Sweep 41: without labels, an input decided "generate" that then fell to the base (its text cannot
    describe an adapter; the generator refused it) was refused only after the other inputs' adapters were
    written, and logged as a candidate: a 400 that changed the registry."""
    from loraplex.errors import UserInputError

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto=BETWEEN)
    before = registry_state(s.home)
    with pytest.raises(UserInputError, match="input 1: .*control character"):  # refused before any write
        engine.auto([TEXTS[0], TEXTS[1] + "\x07"], for_classify=True)
    assert registry_state(s.home) == before
    real = auto_router.written_for

    def refuses_the_second(reg_, settings, d, cfg):
        if d.text == TEXTS[1]:
            return auto_router.Decision(d.text, "base", f"{d.reason}; but the generator refused: too far", d.similarity,
                                        d.margin, d.nearest)
        return real(reg_, settings, d, cfg)

    monkeypatch.setattr(auto_router, "written_for", refuses_the_second)
    with pytest.raises(UserInputError, match="input 1: .*the generator refused"):  # written, then undone
        engine.auto([TEXTS[0], TEXTS[1]], for_classify=True)
    assert registry_state(s.home) == before and not (s.home / auto_router.CANDIDATES_FILE).exists()


def test_a_classification_is_not_generated_for_by_parents_without_labels(toy_registry, tiny_bert, monkeypatch):
    """Sweep 41: a generator learned from adapters registered without a task wrote, for a classification
    without labels, an adapter with no label set, registered it, and the request was refused (every retry
    the same). It is refused with nothing left registered; `generate fit`'s default members are those
    trained for a task, as its help says."""
    from loraplex.errors import UserInputError

    s, reg = toy_registry
    for i, name in enumerate(("imp-a", "imp-b")):
        add_toy(reg, s, tiny_bert, name, None, f"reviews of {'restaurants' if i else 'hotels'} and their food", seed=30 + i)
    assert not {"imp-a", "imp-b"} & set(workflow.default_members(reg))
    workflow.fit(reg, s, "gnt", method="sg-lora", adapters=["imp-a", "imp-b"], config=FAST)
    engine = Engine(s, base=str(tiny_bert), auto={**BETWEEN, "generator": "gnt"})
    before = registry_state(s.home)
    with pytest.raises(UserInputError, match="no parent of this adapter records a task"):
        engine.auto([TEXTS[0]], for_classify=True)
    assert registry_state(s.home) == before
    # `generate adapter` itself: an encoder adapter with no label set was written and registered, and could answer
    # nothing (sweep 61 F4); refused, with what to do; labelled examples give it their label set
    with pytest.raises(UserInputError, match="no parent of this adapter records a task.*pass --examples with labels"):
        workflow.generate(reg, s, "reviews of hotels and their food", generator="gnt", name="ntc")
    assert registry_state(s.home) == before
    made = workflow.generate(reg, s, "reviews of hotels and their food", generator="gnt", name="ntc2",
                             examples=[("lovely room", "good"), ("dirty sheets", "bad")])
    assert reg.get_adapter(made["name"]).task == "examples:ntc2"


def test_a_classification_the_generator_refuses_writes_nothing_first(toy_registry, tiny_bert, monkeypatch):
    """Sweep 43: a classification without labels whose second input the generator refused wrote the first
    input's adapter, then removed it; a concurrent request that had reused it meanwhile met a removed adapter
    (a 409). The generator's dry run refuses the request before any adapter is written (nothing written and
    undone), with the generator's own reason; a request it accepts is still written."""
    from loraplex.errors import UserInputError

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    far = {t: workflow.generate(reg, s, t, generator="gen", name="probe", examples=[(t, None)], max_distance=2.0,
                                dry_run=True)["distance"]
           for t in TEXTS[:2]}
    assert not reg.has_adapter("probe")  # a dry run registers nothing
    near, farther = sorted(TEXTS[:2], key=far.get)
    assert far[near] < far[farther], far
    engine = Engine(s, base=str(tiny_bert), auto={**BETWEEN, "generator_max_distance": (far[near] + far[farther]) / 2})
    written: list[str] = []
    real = auto_router.written_for
    monkeypatch.setattr(auto_router, "written_for", lambda *a: written.append(a[2].text) or real(*a))
    before = registry_state(s.home)
    with pytest.raises(UserInputError, match="input 1: .*the generator refused: .*beyond max_distance"):
        engine.auto([near, farther], for_classify=True)
    assert written == [] and registry_state(s.home) == before
    routes = engine.auto([near], for_classify=True)
    assert written == [near] and routes[0].decision == "generate" and reg.has_adapter(routes[0].adapters[0][0])


def test_a_classification_whose_alike_input_would_share_is_not_refused_by_the_dry_run(toy_registry, tiny_bert):
    """Sweep 46: the dry run judged each input alone, so an input the Writer would have answered with an earlier
    alike input's adapter was refused by the generator's distance bound, and with it the whole classification
    (answered before the dry run existed). The inputs are judged as the Writer carries them out."""
    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    a, b = TEXTS[0], TEXTS[0] + " today"
    far = {t: workflow.generate(reg, s, t, generator="gen", name="probe", examples=[(t, None)], max_distance=2.0,
                                dry_run=True)["distance"] for t in (a, b)}
    if far[a] > far[b]:
        a, b = b, a
    assert far[a] < far[b], far
    engine = Engine(s, base=str(tiny_bert), auto={**BETWEEN, "route_threshold": 0.75,
                                                  "generator_max_distance": (far[a] + far[b]) / 2})
    engine._decide = lambda items: [auto_router.Decision(t, "generate", "in the generate band", 0.5, 0.1,
                                                         "flights-lora", "gen") for t, _ in items]
    routes = engine.auto([a, b], for_classify=True)
    assert [r.decision for r in routes] == ["generate", "generate"], [r.reason for r in routes]
    assert routes[0].adapters == routes[1].adapters and "shares adapter" in routes[1].reason


def test_a_written_adapter_answers_only_with_the_task_of_an_adapter_near_the_request(toy_registry, tiny_bert):
    """sg-lora ranks its parents by description, which an instance text sits far from: on the library an
    airline tweet was written an adapter answering with kaomoji-shy-vs-cool's labels, a football score with
    airline-polarity's, while auto's own search had found airline-lora and the bbc adapters (sweep 59 F4).
    The labels a written adapter answers with must be those of an adapter the decision found near the request:
    its own parent's, or any with the same label set (sweep 68: adapters written earlier sat nearest to a region,
    and the parent's name, not among them, refused every write there although they answer with its labels)."""
    import dataclasses

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    cfg = auto_router.parse_config(BETWEEN)
    [d] = auto_router.decide(reg, [TEXTS[0]], cfg)
    assert d.action == "generate" and d.hits
    plan = workflow.generate(reg, s, TEXTS[0], generator="gen", name="probe", examples=[(TEXTS[0], None)],
                             dry_run=True, max_distance=cfg.generator_max_distance)
    source = next(p["name"] for p in plan["parents"] if reg.get_adapter(p["name"]).task == plan["task"])
    # the toy tasks share one label set: without the source, its siblings near the request answer alike
    alike = dataclasses.replace(d, hits=[h for h in d.hits if h.name != source],
                                near=tuple(x for x in d.near if x != source))
    assert alike.near and auto_router.unwritable(reg, s, alike, cfg, labelled=False).action == "generate"
    elsewhere = dataclasses.replace(alike, near=())  # no adapter near it answers with those labels
    n = reg.count()
    refused = auto_router.written_for(reg, s, elsewhere, cfg)
    assert refused.action == "base" and f"labels of {source!r}, which no adapter near the request (none)" in refused.reason
    assert reg.count() == n  # nothing written
    assert auto_router.unwritable(reg, s, elsewhere, cfg, labelled=False).action == "base"
    # decided as with no generator: routed where the score reaches the no-generator threshold
    low = auto_router.parse_config({**BETWEEN, "no_generator_threshold": -1.0})
    routed = auto_router.written_for(reg, s, elsewhere, low)
    assert routed.action == "route" and "decided as with no generator" in routed.reason and routed.hits
    written = auto_router.written_for(reg, s, d, cfg)  # its labels' adapter is near: written as before
    assert written.action == "generate" and written.written and reg.count() == n + 1
    # the adapter found written for the text before is checked too (it was reused unchecked: sweep 60)
    again = auto_router.written_for(reg, s, elsewhere, cfg)
    assert again.action == "base" and "written for this text before" in again.reason and reg.count() == n + 1
    reused = auto_router.written_for(reg, s, alike, cfg)  # near adapters of its label set: reused
    assert reused.action == "generate" and reused.written == written.written and reg.count() == n + 1
    assert set(d.near) == {h.name for h in d.hits if h.score >= cfg.generate_threshold}  # by the text score


def test_a_request_waits_for_the_registry_lock_once_not_once_per_input(toy_registry, tiny_bert, monkeypatch):
    """An `auto` request with several inputs decided "generate" while another process held the registry's lock
    waited the server's lock time once per input (3 inputs: 90 s, past a stop's 60 s grace period; sweep 70). The
    request has one deadline: the inputs after it are routed to the registered adapters at once."""
    import fcntl
    import os

    s, reg = toy_registry
    workflow.fit(reg, s, "gen", method="sg-lora", config=FAST)
    monkeypatch.setattr(engine_module, "LOCK_S", 2.0)
    engine = Engine(s, base=str(tiny_bert), auto={**BETWEEN, "generator_max_distance": 2.0})
    engine._decide = lambda items: [auto_router.Decision(t, "generate", "in the generate band", 0.5, 0.1,
                                                         "flights-lora", "gen", hits=auto_router.decide(
                                                             reg, [t], auto_router.parse_config(BETWEEN))[0].hits)
                                    for t, _ in items]
    n = reg.count()
    fd = os.open(reg.lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t0 = time.monotonic()
        routes = engine.auto(TEXTS, for_classify=True)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
    assert [r.decision for r in routes] == ["route"] * 3, [r.reason for r in routes]
    assert all("cannot be registered" in r.reason and "locked by another process" in r.reason for r in routes)
    assert took < 5.0, took  # one wait of LOCK_S (2 s), not three (6 s)
    assert reg.count() == n
