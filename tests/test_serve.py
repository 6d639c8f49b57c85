"""`loraplex serve` on a tiny random Llama registry, in this process on 127.0.0.1: the real `openai`
client for models, completions, chat and streaming; httpx for the extensions and every bad input."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import make_peft_adapter, registry_state
from tests.serve_util import llama_home, metric, serving  # noqa: F401 (a fixture)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def home(llama_home):
    return llama_home


@pytest.fixture(scope="module")
def server(home, tiny_llama):
    s, _ = home
    with serving(s, base=str(tiny_llama), max_loras=2, max_batch=16, max_wait_ms=50) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def complete(client, model, prompt="the flight was late", **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt, **kw)


def test_models_lists_base_adapters_routers_and_auto(client, tiny_llama):
    ids = {m.id: m for m in client.models.list().data}
    assert {str(tiny_llama), "auto", "flights-lora", "sports-lora", "phones-lora", "ctg"} <= set(ids)
    assert ids["ctg"].model_extra["loraplex"]["kind"] == "router"
    assert ids["flights-lora"].model_extra["loraplex"]["kind"] == "adapter"
    # OpenAI's models.retrieve: one entry (the base's id holds slashes), or a 404 naming the model
    assert client.models.retrieve("ctg").model_extra["loraplex"]["kind"] == "router"
    assert client.models.retrieve(str(tiny_llama)).id == str(tiny_llama)
    base = client.models.retrieve("base")  # the alias requests may name was a 404 here (sweep 14)
    assert base.id == "base" and base.model_extra["loraplex"]["alias_of"] == str(tiny_llama)
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.models.retrieve("nope")


def test_a_models_created_is_when_it_was_registered(client, home, tiny_llama):
    """OpenAI's Model.created was the time of the request for every model (sweep 56 F5): an adapter's and a
    router's is when it was registered, the base's and auto's when the server started."""
    import datetime

    from loraplex import api

    s, _ = home
    first = {m.id: m.created for m in client.models.list().data}
    time.sleep(1.1)
    assert {m.id: m.created for m in client.models.list().data} == first, "the same models, the same times"
    for name in ("flights-lora", "ctg"):
        rec = api.show(name, settings=s) if name != "ctg" else api.show_router(name, settings=s)
        assert first[name] == int(datetime.datetime.fromisoformat(rec["created_at"]).timestamp()), name
    assert first["auto"] == first[str(tiny_llama)] <= time.time()


def test_a_conversation_sent_back_as_the_client_returned_it(client):
    """The client's own assistant message, dumped and appended (`refusal: null`, `tool_calls: []`...), and
    fields that ask for nothing (`store: false`, `metadata: {}`, `response_format: text`) are accepted."""
    msgs = [{"role": "user", "content": "the flight was late"}]
    first = client.chat.completions.create(model="flights-lora", messages=msgs, max_tokens=3, temperature=0)
    msgs.append(first.choices[0].message.model_dump())
    msgs.append({"role": "user", "content": "and then?"})
    again = client.chat.completions.create(model="flights-lora", messages=msgs, max_tokens=3, temperature=0,
                                           store=False, metadata={}, response_format={"type": "text"})
    assert again.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="'refusal' is not supported"):
        client.chat.completions.create(model="flights-lora", max_tokens=3, messages=[
            {"role": "assistant", "content": "no", "refusal": "I cannot"}, {"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="'response_format' is not supported"):
        client.chat.completions.create(model="flights-lora", messages=msgs, max_tokens=3,
                                       response_format={"type": "json_object"})


def test_an_adapter_generates_what_it_generates_alone(home, client):
    """The server's greedy text for an adapter equals transformers' generate on that adapter alone."""
    import torch

    from loraplex import api

    s, _ = home
    lb, _ = api.load_adapted(["phones-lora"], s)
    ids = lb.tokenizer("the flight was late", return_tensors="pt")
    with torch.no_grad():
        out = lb.model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = lb.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    r = complete(client, "phones-lora")
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == ids["input_ids"].shape[1]
    assert r.model_extra["routing"]["adapters"] == [{"name": "phones-lora", "weight": 1.0}]


def test_concurrent_requests_for_different_adapters_equal_each_alone(client, http, tiny_llama):
    """Six models at once (three adapters over a two-slot bank, the base, auto, a router): each answer is
    the one it gets alone, and the server batched them (a batch of more than one request)."""
    models = ["flights-lora", "sports-lora", "phones-lora", str(tiny_llama), "auto", "ctg"]
    prompts = ["the flight was late", "match goal team", "new phone apple", "the", "flight delayed bag", "goal"]
    alone = [complete(client, m, p).choices[0].text for m, p in zip(models, prompts)]
    before = metric(http.get("/metrics").text, "loraplex_batch_size_count")
    got: dict[int, str] = {}
    start = threading.Barrier(len(models))

    def ask(i):
        start.wait()
        got[i] = complete(client, models[i], prompts[i]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(models))] == alone
    m = http.get("/metrics").text
    batches = metric(m, "loraplex_batch_size_count") - before
    assert batches < len(models)  # at least two requests shared a batch
    assert metric(m, "loraplex_adapter_cache_evictions_total") >= 1  # three adapters through two slots
    assert metric(m, "loraplex_adapters_resident") == 2


def test_requests_join_a_running_batch_and_answer_as_alone(client, http):
    """Continuous batching: requests sent while a long one generates join its batch (their prompts
    shorter and longer than its cache), finish first, and every answer is the one it gets alone."""
    long = ("flights-lora", "late", 240)  # long enough that the joiners finish inside it on a loaded machine
    joiners = [("sports-lora", "match goal team sport game " * 4, 8), ("flights-lora", "bag", 5),
               ("auto", "phone apple iphone tech", 6)]
    alone = [complete(client, m, p, max_tokens=n).choices[0].text for m, p, n in [long, *joiners]]
    got: dict[int, str] = {}
    ended: dict[int, float] = {}
    generating = threading.Event()

    def ask(i, m, p, n):
        got[i] = complete(client, m, p, max_tokens=n).choices[0].text
        ended[i] = time.monotonic()

    def ask_long(m, p, n):  # streamed: the joiners are sent once its first tokens are out (a fixed sleep raced
        parts = []          # a fast machine's 240 tokens, and a loaded one's start)
        for chunk in complete(client, m, p, max_tokens=n, stream=True):
            parts.append(chunk.choices[0].text if chunk.choices else "")
            if len(parts) >= 2:
                generating.set()
        got[0], ended[0] = "".join(parts), time.monotonic()
        generating.set()

    first = threading.Thread(target=ask_long, args=long)
    first.start()
    assert generating.wait(60)
    others = [threading.Thread(target=ask, args=(i + 1, *j)) for i, j in enumerate(joiners)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(120)
    assert [got[i] for i in range(4)] == alone
    assert all(ended[i] < ended[0] for i in (1, 2, 3)), {i: round(t - ended[0], 3) for i, t in ended.items()}  # they did not wait for the long one to end


def test_chat_streaming_gives_the_same_text_with_routing_at_the_end(client):
    msgs = [{"role": "system", "content": "be short"}, {"role": "user", "content": "match goal team"}]
    full = client.chat.completions.create(model="sports-lora", messages=msgs, max_tokens=5, temperature=0)
    text = full.choices[0].message.content
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="sports-lora", messages=msgs, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # OpenAI's shape: the finish reason and routing, then a chunk with no choices and the usage
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-2].model_extra["routing"]["adapters"][0]["name"] == "sports-lora"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    stream = list(complete(client, "auto", stream=True))
    assert stream[-1].model_extra["routing"]["kind"] == "auto"


def test_stop_seed_and_sampling(client):
    base = complete(client, "flights-lora", max_tokens=8).choices[0].text
    words = base.split()
    assert len(words) > 1
    cut = complete(client, "flights-lora", max_tokens=8, stop=[" " + words[1]]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == base[: base.index(" " + words[1])]
    a = complete(client, "flights-lora", max_tokens=8, temperature=1.0, top_p=0.9, seed=7).choices[0].text
    b = complete(client, "flights-lora", max_tokens=8, temperature=1.0, top_p=0.9, seed=7).choices[0].text
    assert a == b
    texts = {complete(client, "flights-lora", max_tokens=8, temperature=1.5, seed=k).choices[0].text for k in range(4)}
    assert len(texts) > 1


def test_a_token_level_router_routes_every_generated_token(client):
    r = complete(client, "ctg", max_tokens=5, extra_body={"trace": True})
    routing = r.model_extra["routing"]
    assert routing["kind"] == "router" and routing["level"] == "token"
    assert len(routing["tokens"]) == 5
    for tok in routing["tokens"]:
        assert {a["name"] for a in tok["adapters"]} <= {"flights-lora", "sports-lora"}
        assert abs(sum(a["weight"] for a in tok["adapters"]) - 1) < 0.01


def test_classify_labels_with_adapters_auto_and_a_router(http):
    for model in ("flights-lora", "auto", "ctg"):
        r = http.post("/v1/classify", json={"model": model, "input": ["flight plane late", "match goal team"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["routing"]["kind"] in ("adapter", "auto", "router") and len(body["routing"]["inputs"]) == 2
        for item in body["data"]:
            assert item["label"] in ("good", "bad") and abs(sum(item["scores"].values()) - 1) < 1e-4
    auto = http.post("/v1/classify", json={"model": "auto", "input": "match goal team sport"}).json()
    assert auto["data"][0]["task"] == "sports" and auto["data"][0]["truncated"] is False
    # a text within the context but past what the head reads (192 tokens less its prompt): answered from
    # its start, and the answer says so (sweep 19: it was cut without a word)
    for model in ("flights-lora", "ctg"):
        r = http.post("/v1/classify", json={"model": model, "input": ["flight late", "flight late " * 100]})
        assert [d["truncated"] for d in r.json()["data"]] == [False, True], r.text
    # a label set named by the request answers on every kind of model, the bare base's included
    for model in ("flights-lora", "auto", "ctg", http.get("/health").json()["base"]):
        r = http.post("/v1/classify", json={"model": model, "input": ["flight late", "goal"], "labels": ["always", "never"]})
        assert r.status_code == 200, (model, r.text)
        assert all(d["label"] in ("always", "never") and set(d["scores"]) == {"always", "never"} for d in r.json()["data"])
    # an adapter's own labels in another case are its own task (sweep 20: they were a new "labels" task, with
    # other, here opposite, answers), answered in the request's spelling
    for model in ("flights-lora", "ctg"):
        texts = ["flight plane late", "flight great crew", "flight late awful"]
        own = http.post("/v1/classify", json={"model": model, "input": texts, "labels": ["good", "bad"]}).json()["data"]
        cased = http.post("/v1/classify", json={"model": model, "input": texts, "labels": ["GOOD", "Bad"]}).json()["data"]
        assert [d["task"] for d in cased] == [d["task"] for d in own] and own[0]["task"] != "labels", (own, cased)
        assert [d["label"] for d in cased] == [{"good": "GOOD", "bad": "Bad"}[d["label"]] for d in own]
        assert [d["scores"] for d in cased] == [{"GOOD": d["scores"]["good"], "Bad": d["scores"]["bad"]} for d in own]


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "auto", "prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "auto", "prompt": "x", "temperature": 5}).encode(), 400, "temperature"),
    (json.dumps({"model": "auto", "prompt": 3}).encode(), 400, "prompt"),
    (json.dumps({"model": "auto"}).encode(), 400, "prompt"),
    (json.dumps({"model": "auto", "prompt": "x", "bogus": 1}).encode(), 400, "bogus"),
    (json.dumps({"model": "auto", "prompt": "x", "n": 2}).encode(), 400, "n"),
    (json.dumps({"model": "auto", "prompt": "x", "logprobs": 2}).encode(), 400, "logprobs"),
    (json.dumps({"model": "auto", "prompt": ["a", "b"]}).encode(), 400, "prompt"),
    (json.dumps({"model": "auto", "prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "auto", "prompt": "flight " * 300}).encode(), 400, "prompt"),
    (json.dumps({"model": "auto", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
]


def test_bad_input_is_a_4xx_in_openais_body_and_changes_nothing(home, http):
    s, _ = home
    before = registry_state(s.home)
    for body, status, param in BAD:
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (body, err)
        assert isinstance(err["code"], str) and err["code"], (body, err)  # a client branches on it: never null
    limit = http.post("/v1/completions", json={"model": "auto", "prompt": "x", "max_tokens": 100000}).json()
    assert "limit of 253" in limit["error"]["message"]
    ctx = http.post("/v1/completions", json={"model": "auto", "prompt": "flight " * 300}).json()
    assert "context is 256" in ctx["error"]["message"]
    for path, body in [("/v1/completions", {"model": "auto", "prompt": "flight " * 2_000_000}),  # 14 MB: was tokenized
                       ("/v1/chat/completions", {"model": "auto", "messages": [  # whole first (sweep 27: 0.7 KB a
                           {"role": "user", "content": "flight " * 2_000_000}]})]:  # token, a server killed)
        big = http.post(path, json=body)
        assert big.status_code == 400 and "the prompt is at least" in big.json()["error"]["message"], big.text
        assert big.json()["error"]["code"] == "context_length_exceeded"
    chat = http.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "robot", "content": "x"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages.0.role"
    for path, body, param in [("/v1/classify", {"model": "auto", "input": []}, "input"),
                              ("/v1/classify", {"model": "no-such", "input": "x"}, "model"),
                              ("/v1/load_lora_adapter", {"lora_name": "x"}, "lora_path"),
                              ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/dir"}, "lora_path"),
                              ("/v1/unload_lora_adapter", {"lora_name": "no-such"}, "lora_name")]:
        r = http.post(path, json=body)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, (path, r.text)
        assert str(s.home) not in r.text, r.text  # the server's own folders are not the client's business
    assert http.get("/v1/nothing-here").status_code == 404
    assert http.post("/v1/classify", json={"model": "x"}).json()["error"]["param"] == "input"
    assert registry_state(s.home) == before
    assert http.get("/health").json()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_its_row(client, http):
    with http.stream("POST", "/v1/completions", json={"model": "flights-lora", "prompt": "late", "max_tokens": 240,
                                                       "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    time.sleep(1.0)
    n1 = metric(http.get("/metrics").text, "loraplex_generated_tokens_total")
    time.sleep(0.5)
    n2 = metric(http.get("/metrics").text, "loraplex_generated_tokens_total")
    assert n1 == n2  # nothing is generated for the client that left
    assert complete(client, "sports-lora").choices[0].finish_reason == "length"


def test_load_and_unload_an_adapter_through_the_api(home, http, client, tiny_llama):
    s, root = home
    d = make_peft_adapter(tiny_llama, root / "extra", r=2, targets=("q_proj", "k_proj"), causal=True, seed=41)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "extra-lora", "lora_path": str(d),
                                                "description": "weather reports"})
    assert r.status_code == 200, r.text
    assert "extra-lora" in {m.id for m in client.models.list().data}
    assert complete(client, "extra-lora").choices[0].finish_reason == "length"  # a new module (k_proj): the bank grows
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "extra-lora", "lora_path": str(d)})
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra-lora"}).status_code == 200
    assert "extra-lora" not in {m.id for m in client.models.list().data}
    assert http.post("/v1/completions", json={"model": "extra-lora", "prompt": "x"}).status_code == 404
    # a directory made for another base is refused, though its shapes fit this one (sweep 33: registered)
    cfg = json.loads((d / "adapter_config.json").read_text())
    for other in ("HuggingFaceTB/SmolLM2-360M-Instruct", "sentence-transformers/all-MiniLM-L6-v2"):
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": other}))
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "other-lora", "lora_path": str(d)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
        assert f"was made for base {other!r}" in r.json()["error"]["message"]
    assert "other-lora" not in {m.id for m in client.models.list().data}
