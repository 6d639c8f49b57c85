"""`loraplex serve` beyond the Llama basics: an encoder registry (/v1/classify), the API key,
`--backend` forwarding to a second server, and the CLI command itself (registration while serving,
Ctrl-C with a request in flight)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import make_peft_adapter, registry_state
from tests.router.conftest import bert_registry, peft_dirs, task_files  # noqa: F401 (fixtures)
from tests.serve_util import free_port, llama_home, metric, serving  # noqa: F401 (a fixture)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)


def test_an_encoder_classifies_each_row_with_its_own_adapter_in_one_batch(bert_registry, tiny_bert):
    from loraplex import api

    texts = ["flight plane late awful", "match goal team great", "phone apple iphone bad", "goal match love"]
    names = ["flights-lora", "sports-lora", "phones-lora", "sports-lora"]
    alone = api.answer_each(texts, names, settings=bert_registry)
    with serving(bert_registry, base=str(tiny_bert), max_wait_ms=100) as url, httpx.Client(base_url=url, timeout=60) as h:
        out: dict[int, dict] = {}

        def ask(i):
            out[i] = h.post("/v1/classify", json={"model": names[i], "input": texts[i]}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [out[i]["data"][0]["label"] for i in range(len(texts))] == alone
        auto = h.post("/v1/classify", json={"model": "auto", "input": texts}).json()
        assert [d["task"] for d in auto["data"]] == ["flights", "sports", "phones", "sports"]
        gen = h.post("/v1/completions", json={"model": "flights-lora", "prompt": "x"})
        assert gen.status_code == 400 and "encoder" in gen.json()["error"]["message"]
        base = h.post("/v1/classify", json={"model": str(tiny_bert), "input": "x"})
        assert base.status_code == 400 and "no label set" in base.json()["error"]["message"]


def test_classify_answers_with_the_labels_a_request_names(bert_registry, tiny_bert, peft_dirs, task_files, tmp_path):
    """`labels` in /v1/classify: the bare base can answer with them; an adapter answers with them in its own
    label texts (a permutation of its label set gives its own scores, permuted); auto prefers the adapter
    trained on them (two adapters of the same texts, told apart only by their labels); bad label sets are
    a 400 naming `labels`."""
    import json

    from loraplex import api
    from tests.conftest import registry_state

    src = Path(task_files["sports"])
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    p = tmp_path / "results.jsonl"
    p.write_text("\n".join(json.dumps({"text": r["text"], "label": "win" if r["label"] == "good" else "loss"})
                           for r in rows) + "\n")
    (tmp_path / "results.task.json").write_text(json.dumps({"name": "results", "description": "did the team win",
                                                              "labels": ["win", "loss"]}))
    api.register(peft_dirs["sports"], name="results-lora", description="adapter for sports messages", task=str(p),
                 base=str(tiny_bert), settings=bert_registry)
    try:
        with serving(bert_registry, base=str(tiny_bert)) as url, httpx.Client(base_url=url, timeout=60) as h:
            text = rows[0]["text"]
            base = h.post("/v1/classify", json={"model": str(tiny_bert), "input": text, "labels": ["always", "never"]})
            assert base.status_code == 200, base.text
            assert base.json()["data"][0]["label"] in ("always", "never") and set(base.json()["data"][0]["scores"]) == {"always", "never"}
            own = h.post("/v1/classify", json={"model": "sports-lora", "input": text}).json()["data"][0]
            swapped = h.post("/v1/classify", json={"model": "sports-lora", "input": text,
                                                   "labels": ["bad", "good"]}).json()["data"][0]
            assert list(swapped["scores"]) == ["bad", "good"] and swapped["label"] == own["label"]
            assert swapped["scores"] == pytest.approx(own["scores"], abs=1e-5)
            for labels, want in ((["win", "loss"], "results-lora"), (["good", "bad"], "sports-lora")):
                r = h.post("/v1/classify", json={"model": "auto", "input": text, "labels": labels})
                assert r.status_code == 200, r.text
                routing = r.json()["routing"]["inputs"][0]
                assert routing["adapters"][0]["name"] == want and routing["nearest"] == want, routing
                assert r.json()["data"][0]["label"] in labels
            before = registry_state(bert_registry.home)
            for labels in (["win"], ["win", "win"], ["win", " "], "win,loss", ["a", 3], [f"l{i}" for i in range(300)]):
                r = h.post("/v1/classify", json={"model": "auto", "input": text, "labels": labels})
                assert r.status_code == 400 and r.json()["error"]["param"].startswith("labels"), (labels, r.text)
            assert registry_state(bert_registry.home) == before
            # an adapter loaded the vLLM way (no task) nearest the text: a classification without labels was
            # routed to it and refused for want of labels (sweep 27); it goes to the nearest with a label set
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "taskless", "lora_path": str(peft_dirs["sports"]),
                                                      "description": text})
            assert r.status_code == 200, r.text
            near = h.post("/v1/classify", json={"model": "auto", "input": text, "labels": ["win", "loss"]})
            assert near.json()["routing"]["inputs"][0]["reason"].startswith("nearest adapter 'taskless'"), near.text
            r = h.post("/v1/classify", json={"model": "auto", "input": text})
            assert r.status_code == 200, r.text
            routing = r.json()["routing"]["inputs"][0]
            assert routing["nearest"] != "taskless" and "taskless" not in [a["name"] for a in routing["adapters"]]
    finally:
        api.remove("results-lora", settings=bert_registry)
        if "taskless" in [a.name for a in api.open_registry(bert_registry).list_adapters()]:
            api.remove("taskless", settings=bert_registry)


def test_the_api_key_guards_v1(llama_home, tiny_llama):
    s, _ = llama_home
    with serving(s, router="ctg", api_key="sekret") as url:  # --router alone: the router's base is served
        assert httpx.get(url + "/health").json()["base"] == str(tiny_llama)
        assert httpx.get(url + "/v1/models").status_code == 401
        bad = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        for auth, status in [("bearer sekret", 200), ("BEARER  sekret", 200), ("Basic sekret", 401),
                             ("Bearersekret", 401), ("Bearer sekret2", 401), ("sekret", 401)]:
            assert httpx.get(url + "/v1/models", headers={"Authorization": auth}).status_code == status, auth
        c = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert "auto" in {m.id for m in c.models.list().data}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_lora_updates_can_be_turned_off(llama_home, tmp_path):
    from loraplex.serve.app import loopback_host, loopback_name

    s, _ = llama_home
    before = registry_state(s.home)
    with serving(s, router="ctg", lora_updates=False) as url:
        for path, body in [("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}),
                           ("/v1/unload_lora_adapter", {"lora_name": "ctg"})]:
            r = httpx.post(url + path, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "lora_updates_disabled", r.text
            assert "--no-lora-updates" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 200
    assert registry_state(s.home) == before
    assert [loopback_name(h) for h in ("127.0.0.1", "127.3.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "::",
                                       "10.0.0.2", "example.org")] == [True] * 5 + [False] * 4
    assert [loopback_host(h) for h in (b"127.0.0.1:8000", b"localhost:1", b"[::1]:80", b"LOCALHOST", b"[::1]",
                                       b"attacker.example:8000", b"127.0.0.1.nip.io", b"", b"[::1")] == [True] * 5 + [False] * 4


def test_backend_forwarding_chooses_here_and_generates_there(llama_home, tiny_llama):
    s, _ = llama_home
    with serving(s, base=str(tiny_llama)) as back, serving(s, base=str(tiny_llama), backend=back + "/v1") as front:
        fc = openai.OpenAI(base_url=front + "/v1", api_key="x", max_retries=0)
        bc = openai.OpenAI(base_url=back + "/v1", api_key="x", max_retries=0)
        kw = dict(prompt="match goal team sport", max_tokens=5, temperature=0)
        r = fc.completions.create(model="auto", **kw)
        chosen = r.model_extra["routing"]["adapters"][0]["name"]
        assert chosen == "sports-lora" and r.model == "auto"  # named as asked, as without a backend (sweep 19)
        assert r.choices[0].text == bc.completions.create(model=chosen, **kw).choices[0].text
        # a stream as the server gives it without a backend: every chunk named as asked, this server's routing
        # (not the backend's own) on the chunk with the finish reason, the usage chunk after it without
        for c in (fc, bc):
            chunks = list(c.chat.completions.create(model="ctg", messages=[{"role": "user", "content": "goal"}],
                                                    max_tokens=4, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            assert {k.model for k in chunks} == {"ctg"} and not chunks[-1].choices and chunks[-1].usage
            [fin] = [k for k in chunks if k.choices and k.choices[0].finish_reason]
            assert fin.model_extra["routing"]["kind"] == "router" and fin.model_extra["routing"]["model"] == "ctg"
            assert fin.model_extra["routing"]["adapters"][0]["name"] in ("flights-lora", "sports-lora")
            assert "routing" not in chunks[-1].model_extra
    with serving(s, base=str(tiny_llama), backend=f"http://127.0.0.1:{free_port()}") as lonely:
        r = httpx.post(lonely + "/v1/completions", json={"model": "auto", "prompt": "x"}, timeout=30)
        assert r.status_code == 502 and "cannot be reached" in r.json()["error"]["message"]


def _env(home):
    return {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_EMBEDDER": "hash", "LORAPLEX_DEVICE": "cpu",
            "LORAPLEX_DTYPE": "float32", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_the_cli_serves_sees_a_cli_registration_and_stops_cleanly_on_ctrl_c(settings, tiny_llama, tmp_path):
    from loraplex import api

    a = make_peft_adapter(tiny_llama, tmp_path / "a", r=2, targets=("q_proj", "v_proj"), causal=True, seed=51)
    b = make_peft_adapter(tiny_llama, tmp_path / "b", r=2, targets=("q_proj", "v_proj"), causal=True, seed=52)
    api.register(a, name="a-lora", description="flights", base=str(tiny_llama), settings=settings)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", "--base", str(tiny_llama), "--port", str(port)],
                            env=_env(settings.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        reg = subprocess.run([sys.executable, "-m", "loraplex", "adapters", "register", str(b), "--name", "b-lora",
                              "--description", "sports", "--base", str(tiny_llama)], env=_env(settings.home),
                             capture_output=True, text=True, timeout=180)
        assert reg.returncode == 0, reg.stderr
        ids = {m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}
        assert {"a-lora", "b-lora", "auto"} <= ids
        done: dict = {}

        def long_request():
            done["r"] = httpx.post(url + "/v1/completions", json={"model": "b-lora", "prompt": "goal", "max_tokens": 200,
                                                                 "temperature": 0}, timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)  # the request is in flight
        proc.send_signal(signal.SIGINT)
        t.join(120)
        assert done["r"].status_code == 200 and done["r"].json()["usage"]["completion_tokens"] > 0
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out and "stopped" in out
        with socket.socket() as sock:  # nothing listens on the port any more (TIME_WAIT aside)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def _fake_backend(seen: dict | None = None):
    """An OpenAI-shaped backend that fails on request (by prompt): a 500, a 401, a list, a cut stream; `slow`
    answers after 20 s, and notes in `seen["left"]` when the caller went away first."""
    import asyncio

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    async def completions(request):  # a plain Starlette route: it reads its request (and sees the caller leave)
        body = await request.json()
        p = body["prompt"]
        if seen is not None:
            seen["body"] = body
            seen["authorization"] = request.headers.get("authorization")
        if p == "slow":
            for _ in range(200):
                await asyncio.sleep(0.1)
                if await request.is_disconnected():
                    (seen if seen is not None else {})["left"] = True
                    return JSONResponse({"error": {"message": "nobody is listening"}}, status_code=500)
            return JSONResponse({"choices": [{"index": 0, "text": "late", "finish_reason": "stop"}]})
        if p == "m500":
            return JSONResponse({"error": {"message": "backend exploded"}}, status_code=500)
        if p == "m401":
            return JSONResponse({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}},
                                status_code=401)
        if p == "mlist":
            return JSONResponse([1, 2, 3])
        if p == "mempty":
            return JSONResponse({"id": "x", "object": "text_completion", "choices": []})
        if p == "mfoo":
            return JSONResponse({"id": "x", "object": "text_completion", "choices": [{"foo": 1}]})
        from starlette.responses import Response as Raw

        ok = '{"choices": [{"index": 0, "text": "fine", "finish_reason": "stop"}]}'
        raw = {  # sweep 36: refusals in vLLM's older and FastAPI's shapes, a redirect, answers JSON cannot carry
            "e400obj": (400, '{"object": "error", "message": "context too long", "type": "BadRequestError"}'),
            "e422detail": (422, '{"detail": [{"loc": ["body", "temperature"], "msg": "Input should be less than 2"}]}'),
            "e404bare": (404, "not here"),
            "redirect": (307, ""),
            "nomodel": (200, ok),
            "nulltext": (200, '{"choices": [{"index": 0, "text": null, "finish_reason": "stop"}]}'),
            "nan": (200, '{"choices": [{"index": 0, "text": "a", "finish_reason": "stop", "logprobs": NaN}]}'),
            "surrogate": (200, '{"choices": [{"index": 0, "text": "\\ud800 x", "finish_reason": "stop"}]}'),
            "huge": (200, '{"choices": [{"index": 0, "text": "' + "x" * 3000 + '", "finish_reason": "stop"}]}'),
            # sweep 41: JSON deeper than the recursion limit, FastAPI's detail with a `loc` that is no list
            "deep": (200, '{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}"),
            "deep500": (500, "[" * 100_000 + "]" * 100_000),
            "e422loc": (422, '{"detail": [{"loc": 5, "msg": "bad"}]}'),
            "e500loc": (500, '{"detail": [{"loc": null, "msg": "bad"}]}'),
        }
        if p in raw and not body.get("stream"):
            status, text = raw[p]
            return Raw(text, status_code=status, media_type="application/json",
                       headers={"location": "http://127.0.0.1:1/v2/completions"} if status == 307 else None)

        async def cut():
            yield 'data: {"choices": [{"index": 0, "text": "half"}]}\n\n'

        async def split():  # one event's JSON over two data: lines (SSE joins them with a newline)
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\n'
            yield 'data: {"choices": [{"index": 0,\ndata:  "text": "B"}]}\n\n'
            yield 'data: {"choices": [{"index": 0, "text": "C", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'

        async def failing():
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\n'
            yield 'data: {"error": {"message": "backend blew up", "code": 500}}\n\ndata: [DONE]\n\n'

        async def garbled():
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\ndata: {not json\n\ndata: [DONE]\n\n'

        async def empty():  # a usage chunk and [DONE], no choice ever (sweep 27: relayed as a success)
            yield 'data: {"id": "x", "choices": [], "usage": {"prompt_tokens": 1}}\n\ndata: [DONE]\n\n'

        async def intchoices():  # choices that are not a list (sweep 36: a traceback cut the stream)
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\ndata: {"id": "x", "choices": 5}\n\ndata: [DONE]\n\n'

        async def snan():  # NaN is no JSON number (it was relayed as it came)
            yield 'data: {"choices": [{"index": 0, "text": "A", "logprobs": NaN}]}\n\ndata: [DONE]\n\n'

        async def nomodel():
            yield 'data: {"choices": [{"index": 0, "text": "A", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'

        async def longline():  # one line of 3,000 bytes (a comment): past a MAX_ANSWER of 2,000 (sweep 38)
            yield ": " + "y" * 3000 + "\n\n"
            yield 'data: {"choices": [{"index": 0, "text": "A", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'

        async def errobj():  # vLLM's older error event, mid-stream (sweep 38: relayed as a chunk)
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\n'
            yield 'data: {"object": "error", "message": "out of memory", "code": 500}\n\ndata: [DONE]\n\n'

        async def trickle():  # slow chunks; notes whether it ran to its end or was cancelled (its client left)
            done = False
            try:
                for i in range(60):
                    yield f'data: {{"choices": [{{"index": 0, "text": "t{i}"}}]}}\n\n'
                    await asyncio.sleep(0.1)
                done = True
                yield 'data: [DONE]\n\n'
            finally:
                if seen is not None:
                    seen["trickle"] = "complete" if done else "cancelled"

        async def silent():  # one chunk, then nothing (a long prefill, a stuck device: sweep 41)
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\n'
            await asyncio.sleep(30)

        async def drip():  # one chunk, then a byte now and then that never ends an event (sweep 43)
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\n'
            for _ in range(100):
                await asyncio.sleep(0.3)
                yield "d"

        async def sdeep():
            yield 'data: {"choices": [{"index": 0, "text": "A"}]}\n\n'
            yield 'data: {"choices": ' + "[" * 100_000 + "]" * 100_000 + '}\n\ndata: [DONE]\n\n'

        streams = {"silent": silent, "drip": drip, "sdeep": sdeep, "split": split, "failing": failing, "garbled": garbled, "empty": empty, "intchoices": intchoices,
                   "nan": snan, "nomodel": nomodel, "longline": longline, "errobj": errobj, "trickle": trickle}
        return StreamingResponse(streams.get(p, cut)(), media_type="text/event-stream")

    app.add_route("/v1/completions", completions, methods=["POST"])

    async def lora_update(request):  # vLLM's runtime adapter loading: a name starting "refuse" is refused
        body = await request.json()
        if seen is not None:
            seen.setdefault("updates", []).append((request.url.path, body))
        if body["lora_name"].startswith("refuse"):
            return JSONResponse({"error": {"message": f"cannot load {body['lora_name']}"}}, status_code=400)
        if body["lora_name"].startswith("slow"):
            await asyncio.sleep(20)
        if body["lora_name"].startswith("deep"):
            from starlette.responses import Response as Raw

            return Raw("[" * 100_000 + "]" * 100_000, status_code=500, media_type="application/json")
        if body["lora_name"].startswith("loc"):
            return JSONResponse({"detail": [{"loc": 3, "msg": "x"}]}, status_code=400)
        return JSONResponse("Success")

    app.add_route("/v1/load_lora_adapter", lora_update, methods=["POST"])
    app.add_route("/v1/unload_lora_adapter", lora_update, methods=["POST"])

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        th.join(30)


def test_a_failing_backend_is_the_backends_failure(llama_home, tiny_llama):
    """Sweep 14: a backend's 500 reached the client as a 500 and its 401 as the client's wrong key; a 200 list
    went through as the answer; a stream cut without [DONE] ended in loraplex's own [DONE]; `trace` was dropped."""
    s, _ = llama_home
    with _fake_backend() as back, serving(s, base=str(tiny_llama), backend=back) as front:
        def ask(prompt, **kw):
            return httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": prompt,
                                                              "max_tokens": 2, **kw}, timeout=30)

        for prompt, said in (("m500", "answered 500: backend exploded"), ("m401", "answered 401: Incorrect API key"),
                             ("mlist", "answered 200 with no completion"),
                             ("mempty", "answered 200 with no completion"), ("mfoo", "answered 200 with no completion")):
            r = ask(prompt)
            assert r.status_code == 502 and said in r.json()["error"]["message"], (prompt, r.text)
        r = ask("x", trace=True)
        assert r.status_code == 400 and r.json()["error"]["param"] == "trace", r.text
        r = ask("cut", stream=True)
        events = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
        assert "[DONE]" not in events and "ended its stream without [DONE]" in events[-1], events
        assert json.loads(events[0])["routing"]["level"] == "request"
        # sweep 19: an event over several data: lines was dropped (its text lost, the answer ending "stop"), and
        # the backend's own error event passed through as it was, with this server's routing on it
        events = [ln[5:].strip() for ln in ask("split", stream=True).text.splitlines() if ln.startswith("data:")]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["A", "B", "C"] and events[-1] == "[DONE]"
        for prompt, said in (("failing", "failed mid-stream: backend blew up"),
                             ("garbled", "sent an event that is not a completion chunk"),
                             ("intchoices", "sent an event that is not a completion chunk"),
                             ("errobj", "failed mid-stream: out of memory"),
                             ("empty", "ended its stream without a completion")):
            events = [ln[5:].strip() for ln in ask(prompt, stream=True).text.splitlines() if ln.startswith("data:")]
            err = json.loads(events[-2])
            assert events[-1] == "[DONE]" and said in err["error"]["message"] and back[:-3] in err["error"]["message"]
            assert "routing" not in err, events
            if prompt != "empty":
                assert json.loads(events[0])["choices"][0]["text"] == "A", events
        # sweep 36: refusals whose body is not {"error": {...}} keep their status and say why; the backend is named
        # in every 502; an answer JSON cannot carry is the backend's failure, never an internal error
        for prompt, status, said in (("deep", 502, "without valid JSON"), ("deep500", 502, "answered 500"),
                                     ("e422loc", 422, "refused the request: 5: bad"), ("e500loc", 502, "answered 500: bad"),
                                     ("e400obj", 400, "refused the request: context too long"),
                                     ("e422detail", 422, "refused the request: temperature: Input should be less than 2"),
                                     ("e404bare", 404, "refused the request (404)"),
                                     ("redirect", 502, "redirected (307) to 'http://127.0.0.1:1/v2/completions'"),
                                     ("nan", 502, "without valid JSON"), ("surrogate", 502, "not Unicode"),
                                     ("nulltext", 502, "with no completion")):
            r = ask(prompt)
            assert r.status_code == status and said in r.json()["error"]["message"], (prompt, r.text)
            if status == 502:
                assert back[:-3] in r.json()["error"]["message"], r.text
        for prompt in ("nan", "sdeep"):  # sdeep: a RecursionError ended the stream empty (sweep 41)
            events = [ln[5:].strip() for ln in ask(prompt, stream=True).text.splitlines() if ln.startswith("data:")]
            assert "not a completion chunk" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]", events
        # an answer without model, id or object is named as this server names its own, whole and streamed
        whole = ask("nomodel").json()
        assert whole["model"] == "flights-lora" and whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
        with httpx.stream("POST", front + "/v1/completions", json={"model": "flights-lora", "prompt": "nomodel",
                                                                  "max_tokens": 2, "stream": True}, timeout=30) as r:
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            chunk = json.loads(next(ln for ln in r.iter_lines() if ln.startswith("data:"))[5:])
        assert chunk["model"] == "flights-lora" and chunk["object"] == "text_completion" and "routing" in chunk


def test_with_a_backend_adapters_are_loaded_there_too(llama_home, tiny_llama, tmp_path):
    """/v1/load_lora_adapter registered an adapter here only: auto then routed prompts to a name the backend was
    never given (sweep 36). The backend is given it too (vLLM's same endpoint), and what it refuses is not
    registered here; an unload is sent on as well."""
    s, _ = llama_home
    seen: dict = {}
    peft = make_peft_adapter(tiny_llama, tmp_path / "p", r=2, targets=("q_proj", "v_proj"), causal=True, seed=61)
    with _fake_backend(seen) as back, serving(s, base=str(tiny_llama), backend=back) as front:
        def models():
            return {m["id"] for m in httpx.get(front + "/v1/models", timeout=10).json()["data"]}

        r = httpx.post(front + "/v1/load_lora_adapter", json={"lora_name": "new-lora", "lora_path": str(peft),
                                                              "description": "weather"}, timeout=60)
        assert r.status_code == 200 and "new-lora" in models(), r.text
        assert seen["updates"][-1] == ("/v1/load_lora_adapter", {"lora_name": "new-lora", "lora_path": str(peft)})
        r = httpx.post(front + "/v1/load_lora_adapter", json={"lora_name": "refuse-lora", "lora_path": str(peft),
                                                              "description": "weather"}, timeout=60)
        assert r.status_code == 400 and "'refuse-lora' was not registered" in r.json()["error"]["message"], r.text
        assert "cannot load refuse-lora" in r.json()["error"]["message"] and "refuse-lora" not in models()
        for name, status in (("deep-lora", 502), ("loc-lora", 400)):  # an internal error that kept it here (sweep 41)
            r = httpx.post(front + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(peft),
                                                                  "description": "weather"}, timeout=60)
            assert r.status_code == status and f"{name!r} was not registered" in r.json()["error"]["message"], r.text
            assert name not in models()
        r = httpx.post(front + "/v1/unload_lora_adapter", json={"lora_name": "new-lora"}, timeout=60)
        assert r.status_code == 200 and "new-lora" not in models(), r.text
        assert seen["updates"][-1] == ("/v1/unload_lora_adapter", {"lora_name": "new-lora"})


def test_a_backend_answer_is_read_up_to_a_bound(llama_home, tiny_llama, monkeypatch):
    """A backend's answer of any size was read whole (300 MiB to max_tokens 3 took 1.5 GB; sweep 36): past
    MAX_ANSWER it is the backend's failure."""
    import loraplex.serve.backend as backend_mod

    monkeypatch.setattr(backend_mod, "MAX_ANSWER", 2000)
    s, _ = llama_home
    with _fake_backend() as back, serving(s, base=str(tiny_llama), backend=back) as front:
        r = httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "huge"}, timeout=30)
        assert r.status_code == 502 and "answered more than" in r.json()["error"]["message"], r.text
        assert httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "nomodel"},
                          timeout=30).status_code == 200
        # a stream's line is counted as it comes, a comment's too: httpx held a whole line first (sweep 38)
        r = httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "longline", "stream": True},
                       timeout=30)
        events = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
        assert "sent a stream line of more than" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"


def test_backend_urls_that_cannot_work_are_refused():
    """Sweep 36: a negative port started a server whose every completion was an internal error, `--backend ""`
    served without a backend, a query, a fragment or an endpoint path were appended to; the server's own
    address forwarded every request to itself until the pool was full."""
    import socket

    from loraplex.errors import UserInputError
    from loraplex.serve.backend import checked_url
    from loraplex.serve.server import listening_socket, not_itself

    assert checked_url("http://127.0.0.1:8001/v1/") == "http://127.0.0.1:8001"
    assert checked_url("https://gpu.example:443/proxy/v1") == "https://gpu.example:443/proxy"
    assert checked_url("http://[::1]:8001") == "http://[::1]:8001"
    for url, said in (("", "expected the URL"), ("http://127.0.0.1:-5/v1", "expected the URL"),
                      ("http://127.0.0.1:0/v1", "expected the URL"), ("http://a b/v1", "expected the URL"),
                      ("http://127.0.0.1:8001/v1?x=1", "query or fragment"), ("http://127.0.0.1:8001/v1#f", "query or fragment"),
                      ("http://127.0.0.1:8001/v1/chat/completions", "not an endpoint"),
                      ("http://127.0.0.1:8001/v1/completions", "not an endpoint")):
        with pytest.raises(UserInputError, match=said):
            checked_url(url)
    with listening_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        # ::ffff:127.0.0.1 reaches the IPv4 socket too (sweep 41: it forwarded to itself without end)
        for url in (f"http://127.0.0.1:{port}/v1", f"http://localhost:{port}/v1", f"http://[::ffff:127.0.0.1]:{port}/v1"):
            with pytest.raises(UserInputError, match="this server's own address"):
                not_itself(url, sock)
        not_itself(f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/v1", sock)  # another port: fine
        not_itself(f"http://127.0.0.2:{port}/v1", sock)  # another loopback address is another server's (sweep 38)
    with listening_socket("0.0.0.0", 0) as anywhere:  # it accepts on every address of this machine (sweep 38)
        port = anywhere.getsockname()[1]
        for host in ("127.0.0.1", "127.0.0.2", "0.0.0.0"):
            with pytest.raises(UserInputError, match="this server's own address"):
                not_itself(f"http://{host}:{port}/v1", anywhere)


def test_backends_that_lead_back_are_a_508_not_a_loop(llama_home, tiny_llama):
    """Sweep 41: a --backend that leads back to the server (here through a second server forwarding to the
    first) forwarded each request without end, connections and memory growing after the client left. Each
    forwarded request names the servers it went through; the first to see itself again answers 508."""
    s, _ = llama_home
    second = free_port()
    with serving(s, base=str(tiny_llama), backend=f"http://127.0.0.1:{second}/v1") as first, \
            serving(s, base=str(tiny_llama), backend=first + "/v1", port=second) as back:
        assert back.endswith(f":{second}")
        r = httpx.post(first + "/v1/completions", json={"model": "sports-lora", "prompt": "hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 502, r.text  # the backend's failure, as any backend's
        assert "leads back to this server" in r.json()["error"]["message"]
        # a request that says it passed through as many servers as a loop could is refused before any work
        r = httpx.post(first + "/v1/completions", json={"model": "sports-lora", "prompt": "hi", "max_tokens": 2},
                       headers={"x-loraplex-hops": ",".join(f"{i:016x}" for i in range(8))}, timeout=60)
        assert r.status_code == 508 and r.json()["error"]["code"] == "loop_detected"
        # a byte that is not ASCII there was a 500 when the header was sent on (sweep 43): no server's id, ignored
        r = httpx.post(first + "/v1/completions", json={"model": "sports-lora", "prompt": "hi", "max_tokens": 2},
                       headers={"x-loraplex-hops": "caf\xe9".encode("latin-1")}, timeout=60)
        assert r.status_code != 500 and "leads back to this server" in r.json()["error"]["message"], r.text


def test_a_forwarded_request_ends_with_the_servers_stop():
    """A request waiting on a slow backend when the server stopped got a plain-text 500 once the grace period
    ran out (sweep 36): the wait asks the server's stop as it asks whether the client left."""
    import asyncio

    from loraplex.serve.backend import Backend
    from loraplex.serve.protocol import APIError

    async def main():
        with _fake_backend() as back:
            b = Backend(back)
            stop = APIError(503, "the server is shutting down")
            t0 = time.monotonic()
            with pytest.raises(APIError) as got:
                await b.forward("/v1/completions", {"model": "m", "prompt": "slow"}, {"model": "m"},
                                stopped=lambda: stop if time.monotonic() - t0 > 0.5 else None, every=0.1)
            assert got.value is stop and time.monotonic() - t0 < 10
            await b.close()

    asyncio.run(main())


def test_a_backend_that_does_not_answer_in_time_is_a_504():
    """Sweep 41: a backend that connected and never answered was "cannot be reached: ReadTimeout: " after 600 s,
    and one trickling its answer held the request without end: the whole answer is bounded, and a late one
    is a 504 saying so."""
    import asyncio

    from loraplex.serve.backend import Backend
    from loraplex.serve.protocol import APIError

    async def main():
        with _fake_backend() as back:
            b = Backend(back, timeout=1.5)
            t0 = time.monotonic()
            with pytest.raises(APIError) as got:
                await b.forward("/v1/completions", {"model": "m", "prompt": "slow"}, {"model": "m"}, every=0.1)
            assert got.value.status == 504 and "did not answer within 2 s" in got.value.message
            assert time.monotonic() - t0 < 10
            t0 = time.monotonic()  # a load sent on is bounded the same way (sweep 43: it waited for ever)
            err = await b.lora_update("/v1/load_lora_adapter", {"lora_name": "slow-x", "lora_path": "/nowhere"})
            assert err is not None and err.status == 504 and "did not answer within 2 s" in err.message
            assert time.monotonic() - t0 < 10
            await b.close()

    asyncio.run(main())


def test_a_silent_backends_stream_ends_with_the_servers_stop():
    """Sweep 41: a stream whose backend had gone quiet ignored the server's stop (asked only between lines)
    until uvicorn cancelled it: the client got an empty 200. Its 503 event and [DONE] come now, the chunk the
    backend sent before them too."""
    import asyncio

    from loraplex.serve.backend import Backend
    from loraplex.serve.protocol import APIError

    async def main():
        with _fake_backend() as back:
            b = Backend(back)
            stop = APIError(503, "the server is shutting down")
            t0 = time.monotonic()
            resp = await b.forward("/v1/completions", {"model": "m", "prompt": "silent", "stream": True},
                                   {"model": "m"}, stopped=lambda: stop if time.monotonic() - t0 > 1.0 else None,
                                   every=0.1)
            body = b"".join([part async for part in resp.body_iterator]).decode()
            events = [ln[5:].strip() for ln in body.splitlines() if ln.startswith("data:")]
            assert time.monotonic() - t0 < 10, events
            assert json.loads(events[0])["choices"][0]["text"] == "A", events
            assert "shutting down" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]", events
            await b.close()

    asyncio.run(main())


def test_a_stream_whose_backend_sends_no_event_in_time_ends_in_a_504():
    """Sweep 43: a backend that sent its headers, then a byte now and then that never made an event, held the
    stream open with nothing sent (each byte reset the read timeout): no event within the timeout is a 504
    event and [DONE], the chunk sent before it kept."""
    import asyncio

    from loraplex.serve.backend import Backend

    async def main():
        with _fake_backend() as back:
            b = Backend(back, timeout=1.5)
            t0 = time.monotonic()
            resp = await b.forward("/v1/completions", {"model": "m", "prompt": "drip", "stream": True}, {"model": "m"},
                                   every=0.1)
            body = b"".join([part async for part in resp.body_iterator]).decode()
            events = [ln[5:].strip() for ln in body.splitlines() if ln.startswith("data:")]
            assert time.monotonic() - t0 < 10, events
            assert json.loads(events[0])["choices"][0]["text"] == "A", events
            err = json.loads(events[-2])["error"]
            assert "sent no stream event within 1.5 s" in err["message"] and events[-1] == "[DONE]", events
            await b.close()

    asyncio.run(main())


def test_a_forwarded_request_carries_this_servers_defaults(llama_home, tiny_llama):
    """Forwarded without max_tokens and temperature, a request got the backend's defaults (vLLM: 16 tokens on
    completions) where the README promises loraplex's (sweep 27); what the request gives is kept. The backend
    gets --backend-api-key as a bearer key, never this server's own --api-key (sweep 36)."""
    s, _ = llama_home
    seen: dict = {}
    with _fake_backend(seen) as back, serving(s, base=str(tiny_llama), backend=back, api_key="front-key",
                                              backend_key="back-key") as front:
        httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "x"},
                   headers={"Authorization": "Bearer front-key"}, timeout=30)
        assert seen["body"]["max_tokens"] > 16 and seen["body"]["temperature"] == 1.0, seen
        assert seen["authorization"] == "Bearer back-key", seen
    with _fake_backend(seen) as back, serving(s, base=str(tiny_llama), backend=back) as front:
        httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "x"}, timeout=30)
        assert seen["authorization"] is None, seen
        httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "x", "max_tokens": 3,
                                                    "temperature": 0}, timeout=30)
        assert seen["body"]["max_tokens"] == 3 and seen["body"]["temperature"] == 0, seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_a_forwarded_request_cancels_it_at_the_backend(llama_home, tiny_llama, stream):
    """A non-streamed request forwarded to a backend ran there to its end after its client left, and was
    counted as a 200 (sweep 20): the backend's request is now closed when the client goes, and it is a 499.
    So is a streamed one whose client leaves before the backend's stream has begun (sweep 36)."""
    s, _ = llama_home
    seen: dict = {}
    with _fake_backend(seen) as back, serving(s, base=str(tiny_llama), backend=back) as front:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(front + "/v1/completions", json={"model": "flights-lora", "prompt": "slow", "max_tokens": 2,
                                                        "stream": stream}, timeout=1.0)
        t0 = time.monotonic()
        while "left" not in seen and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert seen.get("left"), "the backend went on answering a request nobody waited for"
        if stream:  # a client that leaves a relayed stream mid-way closes the backend's too (sweep 38: it ran on)
            with httpx.stream("POST", front + "/v1/completions", json={"model": "flights-lora", "prompt": "trickle",
                                                                      "stream": True}, timeout=30) as r:
                next(r.iter_lines())
            t0 = time.monotonic()
            while "trickle" not in seen and time.monotonic() - t0 < 4:
                time.sleep(0.1)
            assert seen.get("trickle") == "cancelled", seen.get("trickle")
        t0 = time.monotonic()
        while 'status="499"' not in (text := httpx.get(front + "/metrics", timeout=10).text) and time.monotonic() - t0 < 5:
            time.sleep(0.1)
        assert 'status="499"' in text and metric(text, 'loraplex_requests_total{endpoint="/v1/completions",status="200"}') == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_stops_the_server_as_ctrl_c_does(settings, tiny_llama, tmp_path, sig):
    """A service manager's stop (SIGTERM) printed `error: terminated ... before the command finished` and
    exit 143 (sweep 17): it is a normal end, as Ctrl-C is. SIGHUP (a closed terminal) raised wherever the event
    loop was: a traceback, a cut stream, or swallowed and the server went on (sweep 19): it stops it alike."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", "--base", str(tiny_llama), "--port", str(port)],
                            env=_env(settings.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # as a terminal has it
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert "stopped" in out and "error" not in out.lower() and "Traceback" not in out, out
    finally:
        proc.kill()


def test_a_termination_a_library_swallowed_is_not_lost(settings):
    """SIGTERM raised an Exception from the handler: a library's `except Exception` (an import's fallback, a
    `__del__`) swallowed it, and the command ran on and registered (sweep 17). It is a BaseException now,
    and the registry's next write raises it again."""
    from loraplex import errors
    from loraplex.registry.store import Registry

    try:
        try:
            errors.terminate("SIGTERM")
        except Exception:  # noqa: BLE001 (what a library does)
            pytest.fail("an `except Exception` caught the termination")
    except errors.Terminated:
        pass
    try:
        with pytest.raises(errors.Terminated, match="terminated \\(SIGTERM\\)"):
            with Registry.open(settings).transaction():
                pass
    finally:
        errors._TERMINATION.clear()


def test_a_ctrl_c_swallowed_by_a_destructor_is_not_lost(settings):
    """A Ctrl-C that landed in a profiler's `__del__` during garbage collection was swallowed ("Exception
    ignored in ...") and a stream ran on to its end, exit 0 (CI, 12-06). The CLI's SIGINT handler remembers
    it, and the next registry write raises it again."""
    import gc

    from loraplex import errors
    from loraplex.registry.store import Registry

    class Doomed:
        def __del__(self):
            errors.interrupt()  # what the signal handler does, here where Python cannot propagate it

    try:
        Doomed()
        gc.collect()  # the KeyboardInterrupt was printed and dropped: the code below still runs
        with pytest.raises(KeyboardInterrupt):
            with Registry.open(settings).transaction():
                pass
    finally:
        errors._TERMINATION.clear()


@contextlib.contextmanager
def _stopping(app, *before_stop):
    """The CLI's server (`Stopping`) for `app` in a thread on 127.0.0.1: yields (url, server, thread); on the
    way out `before_stop` are called (a test's held thread released), then the server is stopped."""
    import uvicorn

    from loraplex.serve.server import Stopping

    port = free_port()
    server = Stopping(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        while not server.started:
            assert th.is_alive() and time.monotonic() - t0 < 30
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", server, th
    finally:
        for fn in before_stop:
            fn()
        server.should_exit = True
        th.join(30)


@pytest.mark.parametrize("how", ["grace over", "second signal"])
def test_requests_running_at_a_stop_end_in_words(llama_home, tiny_llama, monkeypatch, how):
    """A generation still running when a stop signal's grace period ran out was cut mid-stream (no error
    event, no [DONE]) and the server logged the cancellation's traceback (sweep 19). Once the app's stop
    time comes, a stream ends with an error event and [DONE], and a waiting request is a 503. Ctrl-C twice (a
    user for whom the stop takes too long) was uvicorn's force exit: streams cut with no end, plain-text 500s
    and a traceback per request (sweep 56 F2): the requests end at once with the stop's 503, the server stops."""
    import signal

    from loraplex.serve import decode
    from loraplex.serve.server import build

    if how == "second signal":
        real = decode.Batch.advance

        def slow(self):  # a generation that is still running when the signals come
            time.sleep(0.05)
            return real(self)

        monkeypatch.setattr(decode.Batch, "advance", slow)
    s, _ = llama_home
    app, _ = build(s, base=str(tiny_llama))
    with _stopping(app) as (url, server, th):
        body = {"model": "flights-lora", "prompt": "late", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert "text_completion" in next(x for x in lines if x.startswith("data:"))
            if how == "grace over":
                app.stop_in(0)  # what a stop signal does, its grace period already over
            else:
                server.handle_exit(signal.SIGINT, None)  # what uvicorn's signal handler calls
                server.handle_exit(signal.SIGINT, None)
            t1 = time.monotonic()
            rest = [x for x in lines if x.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and "the server is shutting down" in rest[-2], rest[-3:]
        if how == "grace over":
            r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=60)
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
        else:
            assert "it was stopped at once" in rest[-2], rest[-2]
            assert time.monotonic() - t1 < 5, "the second signal's stop waited for the generation to end"
            th.join(30)
            assert not th.is_alive()


@pytest.mark.parametrize("where", ["auto", "register"])
def test_a_stop_ends_a_request_whose_work_is_in_a_thread_at_once(llama_home, tiny_llama, monkeypatch, where):
    """A request still in auto's decision (the query's embedding, in a worker thread) or in an adapter's
    registration was answered only when its thread returned, after a second Ctrl-C (sweeps 58 F9, 60 F4):
    it gets the stop's 503 at once."""
    from loraplex.embedders import HashEmbedder
    from loraplex.serve.engine import Engine
    from loraplex.serve.server import build

    entered, release = threading.Event(), threading.Event()
    real = HashEmbedder.encode

    def slow(self, texts):
        if any("slowly" in t for t in texts):
            entered.set()
            release.wait(60)
        return real(self, texts)

    def slow_register(self, *args, **kwargs):
        entered.set()
        release.wait(60)
        raise RuntimeError("not registered: the test's stand-in")

    monkeypatch.setattr(HashEmbedder, "encode", slow)
    monkeypatch.setattr(Engine, "register", slow_register)
    s, _ = llama_home
    app, _ = build(s, base=str(tiny_llama), auto={"route_threshold": -1.0, "generate_threshold": -1.0})
    with _stopping(app, release.set) as (url, server, th):
        out: dict = {}
        path, body = (("/v1/classify", {"model": "auto", "input": "slowly late flight", "labels": ["good", "bad"]})
                      if where == "auto" else
                      ("/v1/load_lora_adapter", {"lora_name": "x-lora", "lora_path": str(tiny_llama), "description": "x"}))
        ask = threading.Thread(target=lambda: out.update(r=httpx.post(url + path, timeout=60, json=body)))
        ask.start()
        assert entered.wait(30)
        t0 = time.monotonic()
        app.stop_in(0, "it was stopped at once (a second stop signal) before this request finished")
        ask.join(30)
        assert time.monotonic() - t0 < 3, "the stop waited for the embedding to end"
        assert out["r"].status_code == 503 and "stopped at once" in out["r"].json()["error"]["message"]


def test_a_router_over_an_adapter_that_answers_with_a_composition_is_not_forwarded(llama_home, tiny_llama, tmp_path):
    """A backend is asked for one adapter by name: an adapter that answers with a composition is refused
    when named, and so is a router that may pick it (it sent the summed stream's adapter alone; sweep 21)."""
    import shutil
    import sqlite3

    from loraplex.errors import UserInputError
    from loraplex.serve.engine import Engine, Target
    from loraplex.settings import Settings

    s, _ = llama_home
    home = tmp_path / "home"
    shutil.copytree(s.home, home)
    with sqlite3.connect(home / "registry.db") as c:  # sports-lora as an o-lora stream's second adapter
        c.execute("UPDATE adapters SET extra = json_set(extra, '$.summed', json('true'), '$.composition', "
                  "json('[\"flights-lora\", \"sports-lora\"]')) WHERE name = 'sports-lora'")
    s2 = Settings.load(home=home, embedder="hash", device="cpu", dtype="float32", cache_dir=s.cache_dir)
    engine = Engine(s2, base=str(tiny_llama))
    assert engine.choose(Target("adapter", "flights-lora"), ["goal"])[0].adapters == [("flights-lora", 1.0)]
    for target, said in ((Target("adapter", "sports-lora"), "'sports-lora' was trained by a continual stream"),
                         (Target("router", "ctg"), "router 'ctg' routes over 'sports-lora'")):
        with pytest.raises(UserInputError, match=said):
            engine.choose(target, ["match goal team"])
    with pytest.raises(UserInputError, match="routes over 'sports-lora'"):  # a refusal is not remembered as a pass
        engine.choose(Target("router", "ctg"), ["match goal team"])
    # a joint router's experts are its own copies, which no backend holds (the registered names were sent)
    with sqlite3.connect(home / "registry.db") as c:
        c.execute("UPDATE components SET extra = json_set(extra, '$.joint', json('true')) WHERE name = 'ctg'")
    with pytest.raises(UserInputError, match="router 'ctg' routes its own jointly trained experts"):
        Engine(s2, base=str(tiny_llama)).choose(Target("router", "ctg"), ["match goal team"])


def test_a_routers_forwarding_check_follows_the_registry(llama_home, tiny_llama, tmp_path):
    """choose() checks a router's experts once per registry state (not a lookup per expert per request):
    an expert that comes to answer with a composition later is refused after the server syncs."""
    import shutil
    import sqlite3

    from loraplex.errors import UserInputError
    from loraplex.serve.engine import Engine, Target
    from loraplex.settings import Settings

    s, _ = llama_home
    home = tmp_path / "home"
    shutil.copytree(s.home, home)
    s2 = Settings.load(home=home, embedder="hash", device="cpu", dtype="float32", cache_dir=s.cache_dir)
    engine = Engine(s2, base=str(tiny_llama))
    engine.sync()
    assert engine.choose(Target("router", "ctg"), ["match goal team"])[0].adapters
    with sqlite3.connect(home / "registry.db") as c:
        c.execute("UPDATE adapters SET extra = json_set(extra, '$.summed', json('true'), '$.composition', "
                  "json('[\"flights-lora\", \"sports-lora\"]')) WHERE name = 'sports-lora'")
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")  # as a write does
    engine.sync()
    with pytest.raises(UserInputError, match="router 'ctg' routes over 'sports-lora'"):
        engine.choose(Target("router", "ctg"), ["match goal team"])


def test_a_row_whose_scores_are_nan_ends_alone_with_the_error():
    """An adapter that overflows made NaN logits: sampling raised for the whole batch and greedy named token 0
    (sweep 64 F3's causal side). The row ends with NonFiniteScores; the other rows of its batch go on."""
    import torch

    from loraplex.errors import NonFiniteScores
    from loraplex.serve import decode

    class Cache:
        def batch_select_indices(self, sel):
            pass

    def step(ids, mask, pos, cache, rows):
        logits = torch.zeros(len(rows), 8)
        logits[:, 5] = 100.0  # token 5: the end of sequence, drawn at any temperature
        logits[0] = float("nan")
        return logits, Cache(), [{} for _ in rows]

    sampled = decode.Sampling(max_tokens=4, temperature=0.7, seed=1)
    bad, good = decode.GenRow([1, 2], sampled), decode.GenRow([1, 2, 3], sampled)
    b = decode.Batch(step, pad_id=0, eos_ids=[5], decode=lambda ids: "x" * len(ids))
    b.join([bad, good])
    assert bad.finish_reason == "error" and isinstance(bad.error, NonFiniteScores) and bad.ids == []
    assert good.finish_reason == "stop" and good.error is None and len(b) == 0
