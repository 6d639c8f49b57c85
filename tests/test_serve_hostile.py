"""The server against requests a hostile or careless client sends: each is a 4xx in OpenAI's error body
naming the field (`param`), never a 500, and one request cannot hold the server for the others."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

from tests.conftest import registry_state
from tests.router.conftest import bert_registry, peft_dirs, task_files  # noqa: F401 (fixtures)
from tests.serve_util import llama_home, metric, serving  # noqa: F401 (a fixture)

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def http(bert_registry, tiny_bert):
    with serving(bert_registry, base=str(tiny_bert), max_batch=8, max_wait_ms=20) as url, \
            httpx.Client(base_url=url, timeout=120) as h:
        yield h


def _error(r, status, param, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), err
    if code:
        assert err["code"] == code, err
    return err


def _raw(h, path, obj):
    """POST `obj` as JSON with non-ASCII written as \\u escapes (how a lone surrogate reaches a server)."""
    return h.post(path, content=json.dumps(obj, ensure_ascii=True).encode(), headers={"content-type": "application/json"})


def test_lone_surrogates_are_a_400_naming_where(bert_registry, http):
    before = registry_state(bert_registry.home)
    _error(_raw(http, "/v1/classify", {"model": "sports-lora", "input": ["fine", "bad \ud800 text"]}), 400, "input.1")
    _error(_raw(http, "/v1/classify", {"model": "sports-lora", "input": "\udfff"}), 400, "input")
    _error(_raw(http, "/v1/completions", {"model": "sports-lora", "prompt": "x\ud83d"}), 400, "prompt")
    _error(_raw(http, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "\ud800"}]}),
           400, "messages.0.content")
    _error(_raw(http, "/v1/classify", {"model": "sports-lora", "input": "x", "\ud800": 1}), 400, None)
    # a real astral character, escaped as a surrogate pair, is text
    ok = _raw(http, "/v1/classify", {"model": "sports-lora", "input": "goal \U0001F600 match"})
    assert ok.status_code == 200, ok.text
    assert registry_state(bert_registry.home) == before


def test_too_many_inputs_and_wrong_methods(http):
    from loraplex.serve.protocol import MAX_INPUTS

    err = _error(http.post("/v1/classify", json={"model": "sports-lora", "input": ["goal"] * (MAX_INPUTS + 1)}),
                 400, "input", "too_many_inputs")
    assert f"{MAX_INPUTS:,}" in err["message"]
    _error(http.get("/v1/classify"), 405, None)
    _error(http.delete("/v1/models"), 405, None)
    # a text longer than the context, in words (one long "word" is a single unknown token)
    _error(http.post("/v1/classify", json={"model": "sports-lora", "input": ["goal", "match goal " * 5000]}),
           400, "input", "context_length_exceeded")


def test_adapter_loading_errors_name_their_field(bert_registry, http, peft_dirs):
    before = registry_state(bert_registry.home)
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/dir"}), 400, "lora_path")
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": str(peft_dirs["sports"])}),
           400, "lora_name")
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "sports-lora", "lora_path": str(peft_dirs["sports"])}),
           400, "lora_name")
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(peft_dirs["sports"]),
                                                    "task": "no-such-task"}), 400, "task")
    _error(http.post("/v1/unload_lora_adapter", json={"lora_name": "no-such"}), 404, "lora_name")
    assert registry_state(bert_registry.home) == before


def test_a_large_request_shares_the_server_and_stops_when_its_client_leaves(http):
    """2,000 texts are answered in order, in pieces: a one-text request sent meanwhile is answered long
    before, and once the client of another large request has gone its pieces stop."""
    texts = [f"{w} {i}" for i in range(250) for w in ("goal match team", "phone screen apple", "flight late",
                                                         "great game", "bad battery", "lost bag", "win", "delay")]
    big: dict[str, object] = {}

    def ask_big():
        big["r"] = http.post("/v1/classify", json={"model": "sports-lora", "input": texts})
        big["t"] = time.monotonic()

    th = threading.Thread(target=ask_big)
    th.start()
    time.sleep(0.3)
    small = http.post("/v1/classify", json={"model": "phones-lora", "input": "apple screen"})
    t_small = time.monotonic()
    assert small.status_code == 200, small.text
    th.join(120)
    assert big["r"].status_code == 200, big["r"].text
    assert t_small < big["t"]
    data = big["r"].json()["data"]
    assert [d["input"] for d in data] == texts and [d["index"] for d in data] == list(range(len(texts)))
    alone = http.post("/v1/classify", json={"model": "sports-lora", "input": texts[1234]}).json()["data"][0]
    assert data[1234]["scores"] == pytest.approx(alone["scores"], abs=1e-4)

    with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-request
        http.post("/v1/classify", json={"model": "sports-lora", "input": texts}, timeout=0.5)
    time.sleep(1.5)  # the server sees the disconnect within its 0.5 s poll and submits no more pieces
    n1 = metric(http.get("/metrics").text, "loraplex_batch_size_count")
    time.sleep(1.0)
    n2 = metric(http.get("/metrics").text, "loraplex_batch_size_count")
    assert n1 == n2


@pytest.fixture(scope="module")
def llama_http(llama_home, tiny_llama):
    s, _ = llama_home
    with serving(s, base=str(tiny_llama), max_loras=2, max_batch=8) as url, httpx.Client(base_url=url, timeout=60) as h:
        yield h


def test_odd_generation_bodies(llama_http):
    h = llama_http
    ask = {"model": "flights-lora", "max_tokens": 3, "temperature": 0}
    _error(h.post("/v1/completions", content=b'{"model": "auto", "prompt": "x", "temperature": NaN}',
                  headers={"content-type": "application/json"}), 400, "temperature")
    _error(h.post("/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                  headers={"content-type": "application/json"}), 400, None, "invalid_json")
    _error(h.post("/v1/completions", json={**ask, "prompt": "late", "seed": 2 ** 70}), 400, "seed")  # was a 500
    # a field given twice was read as its last value (a refused `n` given first dropped silently; sweep 27)
    twice = _error(h.post("/v1/chat/completions", content=b'{"model": "flights-lora", "n": 2, "n": 1, "max_tokens": 2, '
                          b'"messages": [{"role": "user", "content": "hi"}]}',
                          headers={"content-type": "application/json"}), 400, "n", "invalid_json")
    assert "names 'n' twice" in twice["message"]
    # loraplex has no adapter ids: vLLM's lora_int_id was accepted and ignored by unload
    _error(h.post("/v1/unload_lora_adapter", json={"lora_name": "flights-lora", "lora_int_id": 99}), 400, "lora_int_id")
    assert h.post("/v1/completions", json={**ask, "prompt": "late", "seed": -(2 ** 63)}).status_code == 200
    # OpenAI's content parts: text parts are joined, any other part is refused by name
    parts = h.post("/v1/chat/completions", json={**ask, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "the flight"}, {"type": "text", "text": "was late"}]}]})
    plain = h.post("/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": "the flight\nwas late"}]})
    assert parts.status_code == 200, parts.text
    assert parts.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    _error(h.post("/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
        400, "messages.0.content.1.type", "unsupported")
    big = b'{"model": "auto", "prompt": "' + b"x" * (33 << 20) + b'"}'
    _error(h.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413, None,
           "request_too_large")
    assert h.get("/health").status_code == 200


def test_generation_edge_values(llama_http):
    """A temperature of 1e-300 divided the logits into nan (a 500 for the whole batch); an empty prompt had
    no token to start from (a 500)."""
    h = llama_http
    greedy = h.post("/v1/completions", json={"model": "flights-lora", "prompt": "late", "max_tokens": 3,
                                             "temperature": 0}).json()["choices"][0]["text"]
    for t in (1e-300, 5e-324, 1e-6):
        r = h.post("/v1/completions", json={"model": "flights-lora", "prompt": "late", "max_tokens": 3, "temperature": t})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy
    for prompt in ("", [""]):
        _error(h.post("/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 2}), 400, "prompt")
    _error(h.post("/v1/completions", json={"model": "auto", "prompt": "x", "n": True}), 400, "n", "unsupported")
    _error(h.post("/v1/completions", json={"model": "auto", "prompt": "x", "echo": 0}), 400, "echo", "unsupported")
    ok = h.post("/v1/completions", json={"model": "flights-lora", "prompt": "x", "max_tokens": 1, "logprobs": False,
                                         "top_logprobs": 0, "n": 1, "presence_penalty": 0.0})
    assert ok.status_code == 200, ok.text
    _error(h.post("/v1/completions", json={"model": "auto", "prompt": "x", "stream_options": {"include_usage": True}}),
           400, "stream_options")
    _error(h.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text"}]}]}), 400, "messages.0.content.0.text")
    _error(h.post("/v1/completions", content=b'{"model": "auto", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}",
                  headers={"content-type": "application/json"}), 400, None, "invalid_value")
    # null is OpenAI's default for these (the openai client sends it for a None argument): it was a 400 (sweep 14)
    nulls = h.post("/v1/completions", json={"model": "flights-lora", "prompt": "late", "max_tokens": 3,
                                            "temperature": None, "top_p": None, "stream": None})
    assert nulls.status_code == 200, nulls.text
    # a prompt of token ids is refused by name (it was "prompt.0: Input should be a valid string")
    for ids in ([1, 2, 3], [[1, 2], [3]]):
        err = _error(h.post("/v1/completions", json={"model": "auto", "prompt": ids}), 400, "prompt", "unsupported")
        assert "a prompt of token ids is not supported" in err["message"], err


def test_http_edges(llama_http):
    h = llama_http
    assert h.head("/health").status_code == 200
    assert h.get("/openapi.json").status_code == 404
    r = h.post("/v1/completions/", json={"model": "auto", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = h.post("/v1/embeddings", json={"model": "auto", "input": "x"})  # an OpenAI endpoint loraplex lacks: named
    msg = r.json()["error"]["message"]
    assert r.status_code == 404 and msg.startswith("loraplex does not serve POST /v1/embeddings; it serves "), msg
    assert "POST /v1/chat/completions" in msg and "GET /v1/models/{model}" in msg and "HEAD" not in msg, msg
    # a path ending in a newline (%0A) was served as the path without it (Starlette's `$`; sweep 49)
    for path in ("/v1/models/flights-lora%0A", "/v1/completions%0A", "/health%0A", "/v1/models/a%0D"):
        r = h.get(path) if "completions" not in path else h.post(path, json={"model": "auto", "prompt": "x"})
        assert r.status_code == 404 and "control character" in r.json()["error"]["message"], (path, r.text)
    # a served path asked with another method (the client's `models.delete`) is named, not "Method Not Allowed"
    r = h.delete("/v1/models/flights-lora")
    msg = r.json()["error"]["message"]
    assert r.status_code == 405 and r.headers["allow"], r.text
    assert msg == f"loraplex does not serve DELETE /v1/models/flights-lora; that path takes {r.headers['allow']}", msg
    import gzip

    body = gzip.compress(json.dumps({"model": "flights-lora", "prompt": "x", "max_tokens": 1}).encode())
    _error(h.post("/v1/completions", content=body, headers={"content-type": "application/json",
                                                            "content-encoding": "gzip"}), 415, None)


def test_error_bodies_do_not_echo_a_huge_name_whole(llama_http):
    """Sweep 45: an unknown field's 1 MB name came back twice (a 2 MB 400), a 1 MB model or lora_name whole
    in the 404: what an error quotes is cut."""
    h = llama_http
    for path, body, status in (("/v1/completions", {"model": "flights-lora", "prompt": "a", "k" * 200_000: 1}, 400),
                               ("/v1/completions", {"model": "a" * 200_000, "prompt": "a"}, 404),
                               ("/v1/unload_lora_adapter", {"lora_name": "n" * 200_000}, 404)):
        r = h.post(path, json=body)
        assert r.status_code == status and len(r.content) < 6000, (path, r.status_code, len(r.content))
        err = r.json()["error"]
        assert err["param"] is None or len(err["param"]) < 300, err["param"][:100]


def test_registration_fields_are_named(bert_registry, http, peft_dirs, tmp_path):
    before = registry_state(bert_registry.home)
    d = str(peft_dirs["sports"])
    for body, param in [
        ({"lora_name": "z", "lora_path": d, "description": "   "}, "description"),
        ({"lora_name": "z", "lora_path": d, "description": ""}, "description"),
        ({"lora_name": "z", "lora_path": d, "description": "x" * 10_001}, "description"),
        ({"lora_name": "z", "lora_path": d, "description": "a\x00b"}, "description"),
        ({"lora_name": "z", "lora_path": d, "description": "\u200b\u200d"}, "description"),  # was registered
        ({"lora_name": "z", "lora_path": d[:5] + "\x00" + d[5:]}, "lora_path"),  # was blamed on the description
        ({"lora_name": "z", "lora_path": d, "task": ""}, "task"),
        ({"lora_name": "z", "lora_path": d, "task": str(tmp_path)}, "task"),
        ({"lora_name": "z", "lora_path": "/tmp/" + "x" * 300}, "lora_path"),  # was a 500 (ENAMETOOLONG)
        ({"lora_name": "z", "lora_path": "/" + "x/" * 3000}, "lora_path"),
        ({"lora_name": "auto", "lora_path": d}, "lora_name"),
        ({"lora_name": "minilm", "lora_path": d}, "lora_name"),
    ]:
        _error(http.post("/v1/load_lora_adapter", json=body), 400, param)
    _error(http.post("/v1/classify", json={"model": "sports-lora", "input": "goal", "labels": ["\x00", "\u200b"]}),
           400, "labels")
    _error(http.post("/v1/classify", json={"model": "sports-lora", "input": ["goal", "\x00\u200b "]}), 400, "input")
    base = http.get("/health").json()["base"]
    _error(http.post("/v1/classify", json={"model": base, "input": "goal"}), 400, "labels")
    assert registry_state(bert_registry.home) == before


def test_a_task_file_over_http_lies_inside_lora_path(bert_registry, http, peft_dirs, task_files, tmp_path):
    """`task` read any task-shaped file the server's user could read and showed its labels through
    /v1/classify (and a CSV's column names through the error) (sweep 14): over HTTP a task file must lie
    inside lora_path; an embedded task's name is fine."""
    import shutil

    before = registry_state(bert_registry.home)
    secret = tmp_path / "secret.csv"
    secret.write_text("text,label\nhello,SECRET_ONE\nworld,SECRET_TWO\n")
    for task in (str(secret), "../../" + secret.name, str(task_files["sports"])):
        err = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "tt", "lora_path": str(peft_dirs["sports"]),
                                                             "description": "t", "task": task}), 400, "task")
        assert "inside lora_path" in err["message"] and "SECRET" not in err["message"], err
    assert registry_state(bert_registry.home) == before
    own = tmp_path / "own"
    shutil.copytree(peft_dirs["sports"], own)
    shutil.copy(task_files["sports"], own / "sports.jsonl")
    for sidecar in task_files["sports"].parent.glob("sports.task.json"):
        shutil.copy(sidecar, own / sidecar.name)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "own-lora", "lora_path": str(own), "description": "t",
                                                 "task": "sports.jsonl"})
    assert r.status_code == 200, r.text
    assert http.post("/v1/classify", json={"model": "own-lora", "input": "goal"}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "own-lora"}).status_code == 200


def test_message_names_and_two_limits_are_refused(llama_http):
    """A message's `name` was dropped from the prompt without a word; max_tokens and max_completion_tokens
    with different values were answered with one of them."""
    h = llama_http
    _error(h.post("/v1/chat/completions", json={"model": "flights-lora", "max_tokens": 2, "messages": [
        {"role": "user", "content": "late"}, {"role": "user", "content": "again", "name": "bob"}]}),
        400, "messages.1.name", "unsupported")
    chat = {"model": "flights-lora", "messages": [{"role": "user", "content": "late"}], "max_tokens": 2}
    _error(h.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 3}), 400, "max_completion_tokens")
    # past the context, the field the request sent is named (it was max_tokens, which it did not send: sweep 49)
    for field in ("max_completion_tokens", "max_tokens"):
        err = _error(h.post("/v1/chat/completions", json={**chat, "max_tokens": None, field: 10 ** 6}), 400, field)
        assert err["message"].startswith(f"{field} is 1000000, over the limit of "), err
    same = h.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 2, "temperature": 0})
    assert same.status_code == 200 and same.json()["usage"]["completion_tokens"] <= 2, same.text
    # the legacy completions API has no max_completion_tokens (OpenAI's neither): refused, not read
    _error(h.post("/v1/completions", json={"model": "flights-lora", "prompt": "late", "max_completion_tokens": 2}),
           400, "max_completion_tokens")


def test_stream_options_and_empty_defaults(llama_http):
    """stream_options takes include_usage only (another key was read as nothing); an empty logit_bias and
    modalities ["text"] ask for nothing and are accepted, a real bias is refused by name."""
    h = llama_http
    body = {"model": "flights-lora", "prompt": "late", "max_tokens": 2, "stream": True}
    _error(h.post("/v1/completions", json={**body, "stream_options": {"continuous_usage_stats": True}}),
           400, "stream_options.continuous_usage_stats")
    _error(h.post("/v1/completions", json={**body, "stream_options": {"include_usage": "yes"}}),
           400, "stream_options.include_usage")
    ok = h.post("/v1/completions", json={**body, "stream": False, "logit_bias": {}, "temperature": 0})
    assert ok.status_code == 200, ok.text
    ok = h.post("/v1/chat/completions", json={"model": "flights-lora", "max_tokens": 2, "modalities": ["text"],
                                              "messages": [{"role": "user", "content": "late"}]})
    assert ok.status_code == 200, ok.text
    _error(h.post("/v1/completions", json={**body, "stream": False, "logit_bias": {"5": 10}}), 400, "logit_bias",
           "unsupported")
    # what client libraries fill in by default asks for nothing loraplex lacks (sweep 19: each was a 400)
    chat = {"model": "flights-lora", "max_tokens": 2, "messages": [{"role": "user", "content": "late"}]}
    for extra in ({"tools": []}, {"tool_choice": "none"}, {"functions": [], "function_call": "none"},
                  {"service_tier": "auto"}, {"service_tier": "default"}, {"trace": None}):
        ok = h.post("/v1/chat/completions", json={**chat, **extra})
        assert ok.status_code == 200, (extra, ok.text)
    for extra, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice"), ({"service_tier": "flex"}, "service_tier")):
        _error(h.post("/v1/chat/completions", json={**chat, **extra}), 400, param, "unsupported")


def test_a_name_taken_meanwhile_is_about_lora_name(bert_registry, http, peft_dirs, monkeypatch):
    """Two loads of one name at once: the one that lost the race was a 400 about `lora_path`."""
    from loraplex.registry.store import Registry

    before = registry_state(bert_registry.home)
    monkeypatch.setattr(Registry, "has_adapter", lambda self, name: False)  # the early check passed, then a rival won
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "sports-lora", "lora_path": str(peft_dirs["sports"])}),
           400, "lora_name")
    assert registry_state(bert_registry.home) == before


def test_a_registry_that_cannot_be_written_is_the_servers_state(bert_registry, http, peft_dirs, monkeypatch):
    """On a read-only home /v1/load_lora_adapter was a 400 blaming the client's lora_path (sweep 14): it is a
    503 about no field (auto's fallback without its candidate log: tests/router/test_auto.py)."""
    from loraplex.errors import LockUnavailable
    from loraplex.registry.database import Database

    def refused(self, timeout=None):
        raise LockUnavailable(f"cannot take the registry lock {self.lock_path}: Read-only file system")

    before = registry_state(bert_registry.home)
    monkeypatch.setattr(Database, "write_lock", refused)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "new-lora", "lora_path": str(peft_dirs["sports"])})
    assert r.status_code == 503, r.text
    body = r.json()["error"]
    assert body["param"] is None and body["type"] == "unavailable_error" and "Read-only file system" in body["message"]
    assert registry_state(bert_registry.home) == before


def test_a_damaged_registry_under_a_load_is_the_servers_state(bert_registry, http, peft_dirs, monkeypatch):
    """registry.db removed under a running server: /v1/load_lora_adapter was a 400 blaming `lora_name` (sweep
    17), while every other endpoint answered the same damage as a 503."""
    from loraplex.errors import IntegrityError
    from loraplex.registry.store import Registry

    def damaged(self, name):
        raise IntegrityError("registry database <registry>/registry.db is missing but adapters are stored")

    monkeypatch.setattr(Registry, "has_adapter", damaged)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "new-lora", "lora_path": str(peft_dirs["sports"])})
    assert r.status_code == 503, r.text
    body = r.json()["error"]
    assert body["param"] is None and body["type"] == "unavailable_error" and "is missing" in body["message"]


def test_a_database_failure_under_a_request_is_logged_in_one_line(bert_registry, http, peft_dirs, monkeypatch, caplog):
    """SQLite failing under a request (a database damaged under the server) was answered as the 503 it is, but
    logged as "internal error" with a 55-line traceback, as a bug is (sweep 67): the server's log says what the
    client was told, in one line."""
    import logging
    import sqlite3

    from loraplex.registry.store import Registry

    def malformed(self, name):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(Registry, "has_adapter", malformed)
    with caplog.at_level(logging.ERROR, logger="loraplex.serve"):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "new-lora", "lora_path": str(peft_dirs["sports"])})
    assert r.status_code == 503 and "the registry database failed: database disk image is malformed" in r.text, r.text
    logged = [rec for rec in caplog.records if rec.name.startswith("loraplex.serve")]
    assert logged and all(rec.exc_info is None and "internal error" not in rec.getMessage() for rec in logged), \
        [(rec.getMessage(), rec.exc_info) for rec in logged]
    assert any("/v1/load_lora_adapter: the registry database failed" in rec.getMessage() for rec in logged)


def test_look_alike_labels_nan_numbers_and_request_ids(http):
    """Labels that read the same ("é" composed and decomposed, a zero-width joiner) were two answers; a
    label of 100,000 characters was embedded; NaN was reported as out of range; answers had no
    x-request-id (the openai client's `_request_id`)."""
    for labels, words in [(["\u00e9t\u00e9", "e\u0301te\u0301"], "read the same"),
                          (["ab", "a\u200db"], "read the same"), (["\u202eabc", "abc"], "bidirectional control character"),
                          (["yes", "no", "x" * 1_001], "at most 1,000")]:
        err = _error(http.post("/v1/classify", json={"model": "sports-lora", "input": "goal", "labels": labels}),
                     400, "labels")
        assert words in err["message"], err
    from loraplex.tasks import checked_labels

    # a zero-width joiner inside an emoji sequence is one label, not a look-alike (the tiny test vocabulary
    # reads both as its unknown token, so the server refuses them for that: heads._distinct_to)
    assert len(checked_labels(["\U0001F468\u200d\U0001F469", "\U0001F468"])) == 2
    err = _error(http.post("/v1/classify", json={"model": "sports-lora", "input": "goal",
                                                 "labels": ["\U0001F468\u200d\U0001F469", "\U0001F468"]}), 400, "labels")
    assert "unknown token" in err["message"], err
    raw = b'{"model": "sports-lora", "input": "goal", "labels": ["a", "b"], "temperature": NaN}'
    assert http.post("/v1/classify", content=raw, headers={"content-type": "application/json"}).status_code == 400
    r = http.post("/v1/completions", content=b'{"model": "sports-lora", "prompt": "x", "temperature": NaN}',
                  headers={"content-type": "application/json"})
    err = _error(r, 400, "temperature")
    assert "finite" in err["message"], err
    assert r.headers["x-request-id"].startswith("req-")
    assert http.get("/health", headers={"x-request-id": "mine-1"}).headers["x-request-id"] == "mine-1"
    assert http.get("/health", headers={"x-request-id": "bad id"}).headers["x-request-id"].startswith("req-")


async def _ok_app(scope, receive, send):  # reads the whole body, then answers "ok"
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def _uvicorn(config):
    """uvicorn serving `config` on 127.0.0.1 in a thread; yields its port, stops it after."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_connections_past_the_limit_get_a_503_and_are_closed(caplog):
    """Sweep 45: 4,200 connections sending their bodies a byte now and then used every file descriptor: every
    other client timed out and asyncio's accept loop wrote the log full. The server serves at most
    `connection_limit(fds)` at once: past it, a 503 at once and the connection closed; one log note a minute."""
    import socket
    import time

    from loraplex.serve.server import connection_limit, server_config

    assert connection_limit(4096) == 3584 and connection_limit(80) == 16
    # with --backend each request holds a backend connection too (sweep 46), and its idle pool some more
    assert connection_limit(4096, backend=True) == (3584 - 100) // 2 and connection_limit(120, backend=True) == 16
    slow: list[socket.socket] = []
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"
    with _uvicorn(server_config(_ok_app, 80, lifespan="off")) as port:
        try:
            for _ in range(15):  # bodies that never end, one at a time (a request is refused when it finds as many
                c = socket.create_connection(("127.0.0.1", port), timeout=5)  # connections as the limit, its own included)
                c.sendall(head)
                slow.append(c)
                time.sleep(0.05)
            for c in slow:  # all taken in
                c.settimeout(0.05)
                with pytest.raises(socket.timeout):
                    c.recv(4096)
            answers = []
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    t0 = time.monotonic()
                    c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    got = b""
                    with contextlib.suppress(socket.timeout):
                        while piece := c.recv(4096):  # closed by the server after its 503
                            got += piece
                    answers.append((got.split(b"\r\n")[0], time.monotonic() - t0))
            assert all(a == b"HTTP/1.1 503 Service Unavailable" and t < 3 for a, t in answers), answers
            notes = [r for r in caplog.records if "concurrency limit" in r.getMessage()]
            assert len(notes) <= 1, [r.getMessage() for r in notes]
            for c in slow:
                c.close()
            slow.clear()
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                got = b""
                while piece := c.recv(4096):
                    got += piece
            assert got.startswith(b"HTTP/1.1 200"), got
        finally:
            for c in slow:
                c.close()


def test_a_request_whose_headers_stall_gets_408_and_its_connection_closes():
    """uvicorn has no deadline on a request's headers: a client that sent part of them and stalled held its
    connection for ever (slowloris). serve/server.py's HeaderDeadline closes it; whole requests, kept-alive
    connections and a slow but complete request are unaffected."""
    import socket
    import time

    import uvicorn

    from loraplex.serve.server import HeaderDeadline

    class Quick(HeaderDeadline):
        seconds = 1.0

    with _uvicorn(uvicorn.Config(_ok_app, http=Quick, log_level="error", lifespan="off", timeout_keep_alive=30)) as port:

        def read_all(c: socket.socket, limit: float) -> bytes:
            c.settimeout(limit)
            out = b""
            try:
                while chunk := c.recv(4096):
                    out += chunk
            except socket.timeout:
                pass
            return out

        req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # stalls halfway through its headers
            c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            t0 = time.monotonic()
            got = read_all(c, 10)
            assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5, got
            head, _, body = got.partition(b"\r\n\r\n")  # OpenAI's error body, as the app's refusals (sweep 45)
            assert b"x-request-id: req-" in head and json.loads(body)["error"]["code"] == "request_timeout", got
        for bad in (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                    b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # framing h11 cannot read
                c.sendall(bad)
                head, _, body = read_all(c, 5).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400") and b"x-request-id: req-" in head, head
                assert json.loads(body)["error"]["message"].startswith("the request is not valid HTTP: "), body
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # kept alive: two requests, slowly
            for _ in range(2):
                c.sendall(req[:10])
                time.sleep(0.5)
                c.sendall(req[10:])
                c.settimeout(5)
                got = b""
                while not got.endswith(b"ok"):
                    got += c.recv(4096)
                assert got.startswith(b"HTTP/1.1 200"), got
                time.sleep(1.5)  # idle past the deadline between requests: the keep-alive timer's business
            c.sendall(b"GET / HT")  # then the next request stalls
            assert read_all(c, 10).startswith(b"HTTP/1.1 408")


def test_a_registry_database_damaged_while_serving_is_a_503():
    """A registry.db damaged under a running server made every adapter request a 500 'internal error:
    DatabaseError' with tracebacks in the log, while auto and /v1/models gave a clean 503 (sweep 24)."""
    import sqlite3

    from loraplex.serve.app import api_error

    err = api_error(sqlite3.DatabaseError("database disk image is malformed"), home="/srv/reg")
    assert err.status == 503 and err.message == ("the registry database failed: database disk image is malformed "
                                                 "(run `loraplex registry check`)")


def test_running_out_of_file_descriptors_is_the_servers_state():
    """EMFILE inside a request was a 500 internal error with a traceback in the log (sweep 17): a 503 that
    says what ran out; and `serve` raises its soft limit toward the hard one at start."""
    import errno
    import resource

    from loraplex.serve.app import api_error
    from loraplex.serve.server import more_file_descriptors

    err = api_error(OSError(errno.EMFILE, "Too many open files"))
    assert err.status == 503 and "run out of file descriptors" in err.message
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
        assert more_file_descriptors(want=128) == min(128, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_load_without_description_names_the_paths_faults(bert_registry, http, peft_dirs, tmp_path):
    """The default description is made from lora_path: a 100,000-character path was refused as a description
    too long, and a valid adapter in a folder whose name holds U+202E as a description's bidi override,
    both with param "description", which the client never sent (sweep 19)."""
    import shutil

    before = registry_state(bert_registry.home)
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/" + "a" * 100000}),
           400, "lora_path")
    assert registry_state(bert_registry.home) == before
    odd = tmp_path / "rtl\u202edir"
    shutil.copytree(peft_dirs["sports"], odd)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "odd-lora", "lora_path": str(odd)})
    assert r.status_code == 200, r.text
    # with a task and no description, the task's own describes it (as `adapters register --task` takes it)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "task-lora", "lora_path": str(odd), "task": "airline"})
    assert r.status_code == 200, r.text
    from loraplex.data import load_task
    from loraplex.registry.store import Registry

    assert Registry(bert_registry.home).get_adapter("task-lora").description == load_task("airline").description
    # a task file without a description of its own: the path's default, resolved where the CLI's is (sweep 70)
    (odd / "bare.jsonl").write_text("".join(json.dumps({"text": f"row {i}", "label": "ab"[i % 2]}) + "\n"
                                            for i in range(8)))
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bare-lora", "lora_path": str(odd), "task": "bare.jsonl"})
    assert r.status_code == 200, r.text
    assert Registry(bert_registry.home).get_adapter("bare-lora").description.startswith(
        "LoRA adapter bare-lora, loaded through the server")


def test_a_chat_the_template_refuses_is_the_clients_400(settings, tiny_llama, tmp_path):
    """Sweep 49: a base whose chat template raises on messages it does not take (Gemma's "System role not
    supported") answered a 500 "internal error: TemplateError" with two tracebacks, and dropped the connection."""
    import shutil

    import httpx

    base = tmp_path / "templated"
    shutil.copytree(tiny_llama, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}")
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    with serving(settings, base=str(base)) as url, httpx.Client(base_url=url, timeout=60) as h:
        for stream in (False, True):
            err = _error(h.post("/v1/chat/completions", json={"model": "base", "stream": stream, "max_tokens": 2,
                                                              "messages": [{"role": "system", "content": "be nice"},
                                                                           {"role": "user", "content": "hi"}]}),
                         400, "messages")
            assert err["message"] == "the chat template of this base refuses these messages: System role not supported"
        ok = h.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200, ok.text


def test_a_bug_answered_in_full_is_not_raised_again():
    """Sweep 49: Starlette raises a bug again after its 500 is sent, and uvicorn then logged a second traceback
    and closed the kept-alive connection (the client's next request on it: connection reset). The Guard keeps
    the answer sent and ends there; a bug before the answer ends still reaches the server."""
    import asyncio

    from loraplex.serve.app import Guard
    from loraplex.serve.metrics import Metrics

    async def answered(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        raise RuntimeError("a bug, answered")

    async def cut(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise RuntimeError("a bug mid-answer")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/completions", "headers": [(b"host", b"127.0.0.1")], "method": "POST"}
    metrics = Metrics()
    asyncio.run(Guard(answered, metrics, None)(scope, receive, send))  # does not raise
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    with pytest.raises(RuntimeError, match="mid-answer"):
        asyncio.run(Guard(cut, metrics, None)(scope, receive, send))
    text = metrics.text().decode()
    assert metric(text, 'loraplex_requests_total{endpoint="/v1/completions",status="500"}') == 2, text


def test_a_load_waits_for_the_registry_lock_less_than_a_stop_allows(bert_registry, tiny_bert, peft_dirs, monkeypatch):
    """A load waiting on the registry's lock (held by another process) waited the CLI's 120 s, so a Ctrl-C'd
    server stayed alive that long, twice its 60 s grace period (sweep 67). A server's registry writes wait
    `engine.LOCK_S` (within the grace period), then answer 503 naming the lock."""
    import fcntl
    import os
    import time

    import httpx

    from loraplex.serve import engine as engine_mod
    from loraplex.serve.server import GRACE_S

    assert engine_mod.LOCK_S < GRACE_S - 5
    monkeypatch.setattr(engine_mod, "LOCK_S", 0.5)
    before = registry_state(bert_registry.home)
    fd = os.open(bert_registry.home / "registry.lock", os.O_RDWR | os.O_CREAT)
    try:
        with serving(bert_registry, base=str(tiny_bert)) as url, httpx.Client(base_url=url, timeout=60) as h:
            fcntl.flock(fd, fcntl.LOCK_EX)
            t0 = time.monotonic()
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "late-lora", "lora_path": str(peft_dirs["sports"])})
            assert r.status_code == 503 and "is locked by another process" in r.text, r.text
            assert time.monotonic() - t0 < 20
    finally:
        os.close(fd)
    assert registry_state(bert_registry.home) == before
