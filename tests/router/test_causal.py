"""A causal base (tiny Llama): a fitted router answers by rank classification over the routed task's
labels; an adapter without a task answers by generation."""

import pytest

from tests.conftest import make_peft_adapter


def test_causal_router_ranks_labels_and_generates_without_a_task(settings, tiny_llama, task_files, tmp_path):
    from loraplex import api

    for i, name in enumerate(("flights", "sports")):
        d = make_peft_adapter(tiny_llama, tmp_path / name, r=2 + 2 * i, targets=("q_proj", "v_proj"), causal=True,
                              seed=20 + i)
        api.register(d, name=f"{name}-lora", description=f"{name} messages", task=str(task_files[name]),
                     base=str(tiny_llama), settings=settings)
    res = api.fit_router("ctg", router="token-gate", adapters=["flights-lora", "sports-lora"], settings=settings,
                         steps=3, batch_size=4, eval_limit=2, val_limit=4, progress=False)
    assert res.metrics["steps"] == 3
    # one adapter answering several rows of a heterogeneous batch crashed on a causal base (sweep 15)
    each = api.answer_each(["flight late", "plane late", "match goal"], ["flights-lora", "flights-lora", "sports-lora"],
                           settings=settings)
    assert len(each) == 3 and all(a in ("good", "bad") for a in each), each
    alone = [api.answer_each([t], [a], settings=settings)[0] for t, a in
             zip(["flight late", "plane late", "match goal"], ["flights-lora", "flights-lora", "sports-lora"])]
    assert each == alone
    out = api.query(["flight plane late", "match goal team"], router="ctg", trace=True, settings=settings)
    assert all(o["answer"] in ("good", "bad") and o["task"] in ("flights", "sports") for o in out)
    assert out[0]["tokens"] and {t["adapter"] for t in out[0]["tokens"]} <= {"flights-lora", "sports-lora"}
    d = make_peft_adapter(tiny_llama, tmp_path / "free", targets=("q_proj", "v_proj"), causal=True, seed=30)
    api.register(d, name="free-lora", description="free text", base=str(tiny_llama), settings=settings)
    gen = api.query(["the flight was"], router="retrieval", adapters=["free-lora"], settings=settings)[0]
    assert gen["task"] is None and isinstance(gen["answer"], str)
    with pytest.raises(Exception, match="routes adapters of base"):
        api.query(["x"], router="ctg", base="minilm", settings=settings)


def test_retrieval_on_a_causal_base_answers_several_queries_of_one_task_as_each_alone(settings, tiny_llama,
                                                                                      task_files, tmp_path):
    """Several queries routed to one task in a batch: the causal head's per-label sequences do not line up
    with the texts, so each gate row must apply to its own queries (this raised a size mismatch)."""
    from loraplex import api

    for i, name in enumerate(("flights", "sports")):
        d = make_peft_adapter(tiny_llama, tmp_path / name, r=2 + 2 * i, targets=("q_proj", "v_proj"), causal=True,
                              seed=40 + i)
        api.register(d, name=f"{name}-lora", description=f"{name} messages", task=str(task_files[name]),
                     base=str(tiny_llama), settings=settings)
    texts = ["flight plane late", "flight bag lost", "match goal team", "flight gate crew"]
    kw = dict(router="retrieval", adapters=["flights-lora", "sports-lora"], settings=settings)
    together = api.query(texts, **kw)
    alone = [api.query([t], **kw)[0] for t in texts]
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert [r["adapters"] for r in together] == [r["adapters"] for r in alone]


def test_auto_on_a_causal_base_falls_back_to_the_bare_base_generating(settings, tiny_llama, task_files, tmp_path):
    from loraplex import api

    d = make_peft_adapter(tiny_llama, tmp_path / "flights", r=2, targets=("q_proj", "v_proj"), causal=True, seed=50)
    api.register(d, name="flights-lora", description="flights messages", task=str(task_files["flights"]),
                 base=str(tiny_llama), settings=settings)
    cfg = {"route_threshold": 0.2, "generate_threshold": 0.1}
    fit, foreign = api.query(["flight plane gate seat crew bag delayed late lost great", "qqq zzz xxyyzz"],
                             router="auto", config=cfg, settings=settings)
    assert fit["decision"] == "route" and fit["answer"] in ("good", "bad")
    assert foreign["decision"] == "base" and isinstance(foreign["answer"], str) and foreign["adapters"] == []


def test_a_label_set_in_another_order_is_the_routed_task_itself():
    """A causal LM reads the task's description in its prompt: the routed task's own labels in another order
    became a new task ("answer with one of: ...") and the adapter was asked with a prompt it never saw."""
    from loraplex.router.model import labels_task
    from loraplex.tasks import Task

    like = Task("films", "graded film opinions", ("good", "not good", "very good"), (), (), (),
                {"good": "a good film"}, source="x")
    assert labels_task(["good", "not good", "very good"], like) is like
    same = labels_task(["very good", "good", "not good"], like)  # its description, the labels in the order asked
    assert (same.name, same.description, same.labels) == ("films", "graded film opinions", ("very good", "good", "not good"))
    assert same.label_text("good") == "a good film"
    other = labels_task(["good", "not good"], like)
    assert other is not like and other.labels == ("good", "not good") and other.label_text("good") == "a good film"
    # its labels in another case: the task itself, read with its own names, answered with the query's (sweep 20)
    cased = labels_task(["Very Good", "GOOD", "not good"], like)
    assert (cased.name, cased.labels) == ("films", ("very good", "good", "not good"))
    assert [cased.answer_label(lab) for lab in cased.labels] == ["Very Good", "GOOD", "not good"]
    # ... or in another Unicode normalisation (an NFD "café" typed on a Mac; a new task of bare names whose
    # answers flipped: sweep 23), or a label of it named among others: its label text is kept
    cafe = Task("cafe", "coded reviews", ("caf\u00e9", "bar"), (), (), (), {"caf\u00e9": "a happy review"}, source="x")
    nfd = labels_task(["cafe\u0301", "bar"], cafe)
    assert (nfd.name, nfd.labels) == ("cafe", ("caf\u00e9", "bar")) and nfd.answer_label("caf\u00e9") == "cafe\u0301"
    mixed = labels_task(["CAFE\u0301", "bar", "baz"], cafe)
    assert mixed.name == "labels" and mixed.label_text("CAFE\u0301") == "a happy review"
    from loraplex.router.retrieval import label_overlap

    assert label_overlap(["cafe\u0301", " BAR"], [("caf\u00e9", "bar"), ("bar", "x")]).tolist() == pytest.approx([1.0, 1 / 3])


def test_block_token_gate_generates_the_same_with_and_without_the_kv_cache(tiny_llama):
    """token-gate shared=block on a Llama block: each decoding step routes its new token from the block's
    input, so greedy generation with the cache equals recomputing the whole sequence every step."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraplex.experts.layers import inject
    from loraplex.experts.spec import Adapter, LoraSpec
    from loraplex.router.base import ROUTERS

    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    g = torch.Generator().manual_seed(0)
    proj = ("q_proj", "v_proj", "o_proj", "down_proj")  # inputs of two widths in one block
    ads = [Adapter(LoraSpec(r=2, alpha=4), {
        n: (torch.randn(2, mod.in_features, generator=g) * 0.3, torch.randn(mod.out_features, 2, generator=g) * 0.3)
        for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in proj})
        for _ in range(4)]
    inject(m, ads)
    router = ROUTERS.build("token-gate", {"shared": "block", "init_std": 1.0})
    router.attach(m)
    assert {g.block for g in router.gates.values()} == {f"model.layers.{i}" for i in range(m.config.num_hidden_layers)}
    ids = torch.randint(5, m.config.vocab_size, (2, 6), generator=g)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    cached = m.generate(ids, **kw)
    assert cached.shape == (2, 10) and torch.equal(cached, m.generate(ids, use_cache=False, **kw))
