"""`model: auto` on the server is router/auto.py's decision: a request that fits a registered adapter is
routed, a foreign one is answered by the bare base and logged as a candidate task, and the routing
object says which happened and why."""

import json

import httpx

import openai

from tests.serve_util import llama_home, serving  # noqa: F401 (a fixture)

# hash-embedder scale (see serve_util.serving)
AUTO = {"route_threshold": 0.2, "generate_threshold": 0.1}


def test_auto_routes_or_falls_back_and_says_why(llama_home):
    s, _ = llama_home
    log = s.home / "candidates.jsonl"
    before = log.read_text().splitlines() if log.exists() else []
    with serving(s, auto=AUTO) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        fit = client.completions.create(model="auto", prompt="flight plane gate seat crew bag delayed late lost great",
                                        max_tokens=3, temperature=0)
        foreign = client.completions.create(model="auto", prompt="qqq zzz xxyyzz", max_tokens=3, temperature=0)
        base = client.completions.create(model=_base(client), prompt="qqq zzz xxyyzz", max_tokens=3, temperature=0)
        # a prompt with no visible character: nothing to route by, not a candidate new task (sweep 27: logged)
        blank = client.completions.create(model="auto", prompt="  \u200b ", max_tokens=2, temperature=0)
        assert blank.model_extra["routing"]["decision"] == "base"
        assert "no visible character" in blank.model_extra["routing"]["reason"]
        # nothing the embedder reads (emoji only): every such text is one point, which auto wrote an adapter for
        # and routed every later one to at similarity 1.0 (sweep 57); the base answers, nothing is logged
        unread = client.completions.create(model="auto", prompt="\U0001F621\U0001F355", max_tokens=2, temperature=0)
        assert unread.model_extra["routing"]["decision"] == "base"
        assert "reads nothing of the text" in unread.model_extra["routing"]["reason"]
        # without labels, the inputs auto passes to the base cannot be classified: a 400 naming the first and
        # counting them, before any forward (sweep 19: "this input", one of 2,048, after all were scored)
        r = httpx.post(url + "/v1/classify", json={"model": "auto", "input": [
            "flight plane gate seat crew bag delayed late lost great", "qqq zzz xxyyzz", "zzz qqq"]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "labels", r.text
        assert r.json()["error"]["message"].startswith("input 1 (and 1 more of 3): auto passed it to the bare base")
    r_fit, r_foreign = fit.model_extra["routing"], foreign.model_extra["routing"]
    assert r_fit["decision"] == "route" and r_fit["adapters"][0]["name"] == "flights-lora"
    assert "route threshold" in r_fit["reason"]
    assert r_foreign["decision"] == "base" and r_foreign["adapters"] == []
    assert "no-generator threshold" in r_foreign["reason"]  # no generator stored: route or base
    assert foreign.choices[0].text == base.choices[0].text  # the bare base answered
    logged = [json.loads(x)["query"] for x in log.read_text().splitlines()[len(before):]]
    # a request auto's decision fell to the base; the refused classification logged (and wrote) nothing (sweep 25)
    assert logged == ["qqq zzz xxyyzz"]


def test_an_embedder_without_reads_is_taken_to_read_every_text(llama_home, monkeypatch):
    """`reads` came after embedders were pluggable: one registered without it failed every auto decision
    with an AttributeError (sweep 58 F3)."""
    import types

    from loraplex import api
    from loraplex.embedders import get_embedder
    from loraplex.router import auto

    s, _ = llama_home
    inner = get_embedder("hash")
    plain = types.SimpleNamespace(name="hash", dim=inner.dim, encode=inner.encode)  # name, dim, encode only
    monkeypatch.setattr(auto, "get_embedder", lambda name: plain)
    reg = api.open_registry(s)
    d = auto.decide(reg, ["flight plane gate seat crew bag delayed late lost great"], auto.AutoConfig(**AUTO))[0]
    assert d.action == "route" and d.nearest == "flights-lora", d


def _base(client) -> str:
    return next(m.id for m in client.models.list().data if m.model_extra["loraplex"]["kind"] == "base")


def test_an_adapter_auto_chose_that_is_removed_before_its_forward_is_a_409(llama_home, tmp_path, monkeypatch):
    """auto decides in the request's worker, the forward runs later on the batching thread: an adapter removed
    in between answered 404 model_not_found naming it, for a request that named `auto`, which exists (sweep 33).
    It is a 409 model_changed (send it again: auto decides anew), whole and streamed."""
    import shutil

    from loraplex import api
    from loraplex.serve.engine import Engine
    from loraplex.settings import Settings

    s, _ = llama_home
    shutil.copytree(s.home, tmp_path / "home")
    s2 = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32", cache_dir=s.cache_dir)
    api.remove_router("ctg", settings=s2)
    decide = Engine.auto

    def decide_then_remove(self, texts, **kw):
        routes = decide(self, texts, **kw)
        api.remove(routes[0].adapters[0][0], settings=s2)
        return routes

    monkeypatch.setattr(Engine, "auto", decide_then_remove)
    prompt = "flight plane gate seat crew bag delayed late lost great"
    with serving(s2) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 2}, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_changed", r.text
        assert "the adapter 'auto' chose for this request was removed" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 2,
                                                                  "stream": True}, timeout=60) as r:
            events = [x for x in r.iter_lines() if x.startswith("data:")]
        assert "model_changed" in events[-2] and events[-1] == "data: [DONE]", events
