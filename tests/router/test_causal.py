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
    out = api.query(["flight plane late", "match goal team"], router="ctg", trace=True, settings=settings)
    assert all(o["answer"] in ("good", "bad") and o["task"] in ("flights", "sports") for o in out)
    assert out[0]["tokens"] and {t["adapter"] for t in out[0]["tokens"]} <= {"flights-lora", "sports-lora"}
    d = make_peft_adapter(tiny_llama, tmp_path / "free", targets=("q_proj", "v_proj"), causal=True, seed=30)
    api.register(d, name="free-lora", description="free text", base=str(tiny_llama), settings=settings)
    gen = api.query(["the flight was"], router="retrieval", adapters=["free-lora"], settings=settings)[0]
    assert gen["task"] is None and isinstance(gen["answer"], str)
    with pytest.raises(Exception, match="routes adapters of base"):
        api.query(["x"], router="ctg", base="minilm", settings=settings)
