"""Interop with the real `peft`: import PEFT directories, export them back, same outputs, same merge."""

import json

import pytest
import torch

from loraplex import api
from loraplex.experts.layers import eject, inject, merge
from loraplex.experts.peft_io import read_peft_dir
from tests.conftest import make_peft_adapter

CASES = {
    "bert": dict(targets=("query", "value", "attention.output.dense"), causal=False),
    "llama": dict(targets=("q_proj", "v_proj", "o_proj"), causal=True),
    "gpt2": dict(targets=("c_attn",), causal=True, fan_in_fan_out=True),
}


def _inputs(base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    return tok(["the flight was late again", "great service thanks"], return_tensors="pt", padding=True)


def _out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _load_base(base_dir, causal):
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(str(base_dir)).eval()


@pytest.fixture(params=sorted(CASES))
def case(request, tiny_bert, tiny_llama, tiny_gpt2):
    kind = request.param
    return kind, {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind], CASES[kind]


def test_import_matches_peft_outputs(case, tmp_path):
    from peft import PeftModel

    kind, base_dir, c = case
    extra = {"fan_in_fan_out": True} if c.get("fan_in_fan_out") else {}
    peft_dir = make_peft_adapter(base_dir, tmp_path / "peft", targets=c["targets"], causal=c["causal"], **extra)
    x = _inputs(base_dir)
    ref = _out(PeftModel.from_pretrained(_load_base(base_dir, c["causal"]), str(peft_dir)).eval(), x)
    adapter, _ = read_peft_dir(peft_dir)
    ours = _load_base(base_dir, c["causal"])
    inject(ours, [adapter])
    got = _out(ours, x)
    bare = _out(_load_base(base_dir, c["causal"]), x)
    assert (ref - bare).abs().max() > 1e-3, "the adapter must change the output for this test to mean anything"
    assert (got - ref).abs().max() < 1e-5


def test_register_export_roundtrip_same_outputs(case, tmp_path, settings):
    from peft import PeftModel

    kind, base_dir, c = case
    extra = {"fan_in_fan_out": True} if c.get("fan_in_fan_out") else {}
    peft_dir = make_peft_adapter(base_dir, tmp_path / "peft", targets=c["targets"], causal=c["causal"], **extra)
    api.register(peft_dir, name=f"{kind}-a", description="a test adapter", settings=settings, base=str(base_dir))
    out_dir = api.export(f"{kind}-a", tmp_path / "exported", settings=settings)
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    x = _inputs(base_dir)
    ref = _out(PeftModel.from_pretrained(_load_base(base_dir, c["causal"]), str(out_dir)).eval(), x)
    lb, _ = api.load_adapted([f"{kind}-a"], settings)
    assert (_out(lb.model, x) - ref).abs().max() < 1e-5
    # and re-registering the export gives identical tensors
    api.register(out_dir, name=f"{kind}-b", description="round trip", settings=settings)
    a1 = api.open_registry(settings).load_adapter(f"{kind}-a")[1]
    a2 = api.open_registry(settings).load_adapter(f"{kind}-b")[1]
    assert a1.modules == a2.modules
    for m in a1.modules:
        assert torch.equal(a1.weights[m][0], a2.weights[m][0]) and torch.equal(a1.weights[m][1], a2.weights[m][1])


def test_merge_equals_peft_merge(case, tmp_path):
    from peft import PeftModel

    kind, base_dir, c = case
    extra = {"fan_in_fan_out": True} if c.get("fan_in_fan_out") else {}
    peft_dir = make_peft_adapter(base_dir, tmp_path / "peft", targets=c["targets"], causal=c["causal"], **extra)
    merged_ref = PeftModel.from_pretrained(_load_base(base_dir, c["causal"]), str(peft_dir)).merge_and_unload()
    adapter, _ = read_peft_dir(peft_dir)
    ours = _load_base(base_dir, c["causal"])
    merge(ours, adapter)
    ref_sd = merged_ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.allclose(v, ref_sd[k], atol=1e-6), k


def test_mixed_ranks_equal_unpadded(tiny_llama, tmp_path):
    """Two adapters of ranks 2 and 6 in one bank: each, selected alone, equals itself injected alone."""
    a_dir = make_peft_adapter(tiny_llama, tmp_path / "a", r=2, targets=("q_proj", "v_proj"), causal=True, seed=3)
    b_dir = make_peft_adapter(tiny_llama, tmp_path / "b", r=6, targets=("q_proj", "k_proj"), causal=True, seed=4)
    a, _ = read_peft_dir(a_dir)
    b, _ = read_peft_dir(b_dir)
    x = _inputs(tiny_llama)
    singles = []
    for ad in (a, b):
        m = _load_base(tiny_llama, True)
        inject(m, [ad])
        singles.append(_out(m, x))
    from loraplex.experts.layers import use_gates

    both = _load_base(tiny_llama, True)
    inject(both, [a, b])
    for e in range(2):
        g = torch.zeros(1, 1, 2)
        g[..., e] = 1.0
        with use_gates(both, g):
            assert (_out(both, x) - singles[e]).abs().max() < 1e-5
    eject(both)
    assert (_out(both, x) - _out(_load_base(tiny_llama, True), x)).abs().max() == 0


def test_rank_and_alpha_patterns_roundtrip(tiny_bert, tmp_path, settings):
    from peft import PeftModel

    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "p", r=4, targets=("query", "value"),
                                 rank_pattern={"value": 2}, alpha_pattern={"query": 3.0})
    x = _inputs(tiny_bert)
    ref = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(peft_dir)).eval(), x)
    api.register(peft_dir, name="pat", description="patterns", base=str(tiny_bert), settings=settings)
    out_dir = api.export("pat", tmp_path / "out", settings=settings)
    again = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(out_dir)).eval(), x)
    lb, _ = api.load_adapted(["pat"], settings)
    assert (_out(lb.model, x) - ref).abs().max() < 1e-5
    assert (again - ref).abs().max() < 1e-5


def test_patterns_of_an_adapter_made_on_a_wrapped_model_keep_their_modules(tiny_bert, tmp_path, settings):
    """An adapter made on BertForSequenceClassification names `bert.encoder...`; its modules are renamed onto
    the bare base, and a regex pattern key (`bert\\.encoder\\.layer\\.0\\..*`) matched nothing afterwards: layer 0
    ran at lora_alpha, silently, and the export wrote the wrong alpha too (sweep 28)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    wrapped = BertForSequenceClassification.from_pretrained(str(tiny_bert))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                     alpha_pattern={r"bert\.encoder\.layer\.0\..*": 64}, rank_pattern={r".*layer\.1\.attention.*value": 2})
    get_peft_model(wrapped, cfg).save_pretrained(str(tmp_path / "p"))
    x = _inputs(tiny_bert)
    ref_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(str(tiny_bert)),
                                          str(tmp_path / "p")).eval()
    with torch.no_grad():
        ref = ref_model.base_model.model.bert(**x).last_hidden_state
    api.register(tmp_path / "p", name="wrapped", description="patterns on a wrapped model", base=str(tiny_bert),
                 settings=settings)
    lb, _ = api.load_adapted(["wrapped"], settings)
    bare = _out(_load_base(tiny_bert, False), x)
    assert (ref - bare).abs().max() > 1e-3
    assert (_out(lb.model, x) - ref).abs().max() < 1e-5
    out_dir = api.export("wrapped", tmp_path / "out", settings=settings)
    again = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(out_dir)).eval(), x)
    assert (again - ref).abs().max() < 1e-5


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_inits_that_leave_the_base_as_it_is_are_read(init, tiny_bert, tmp_path, settings):
    """PEFT's "orthogonal" and MiCA initialisations leave the base's weights as they are and compute a plain
    LoRA; they were refused as if they rewrote the base (sweep 28). PiSSA (which does) still is, saying so."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(5)
    pm = get_peft_model(_load_base(tiny_bert, False), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                 init_lora_weights=init))
    with torch.no_grad():  # trained: A and B both non-zero
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(str(tmp_path / "p"))
    x = _inputs(tiny_bert)
    ref = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(tmp_path / "p")).eval(), x)
    api.register(tmp_path / "p", name="init", description="an adapter", base=str(tiny_bert), settings=settings)
    lb, _ = api.load_adapted(["init"], settings)
    assert (_out(lb.model, x) - ref).abs().max() < 1e-5
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    from loraplex.errors import InvalidAdapter

    with pytest.raises(InvalidAdapter, match="changes the base model's weights"):
        api.register(tmp_path / "p", name="pissa", description="an adapter", base=str(tiny_bert), settings=settings)


def test_overlapping_pattern_keys_are_taken_in_the_files_order(tiny_bert, tmp_path, settings):
    """PEFT gives a module the first pattern key that matches it, in the file's order; the registry stored
    the spec with sorted keys, so `{"query": 16, "layer\\.0\\..*": 64}` gave layer 0's query 64, not 16 (sweep 28)."""
    from peft import PeftModel

    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "p", r=4, targets=("query", "value"))
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"query": 16, r"layer\.0\..*": 64}
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    x = _inputs(tiny_bert)
    ref = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(peft_dir)).eval(), x)
    api.register(peft_dir, name="order", description="overlapping patterns", base=str(tiny_bert), settings=settings)
    lb, recs = api.load_adapted(["order"], settings)
    assert (_out(lb.model, x) - ref).abs().max() < 1e-5
    out_dir = api.export("order", tmp_path / "out", settings=settings)
    again = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(out_dir)).eval(), x)
    assert (again - ref).abs().max() < 1e-5


def test_an_all_linear_adapter_answers_routed_and_a_pooler_only_one_is_refused(tiny_bert, tmp_path, settings):
    """PEFT's `all-linear` on BertModel adapts `pooler.dense`, which takes a (B, d) first-token tensor: every
    routed query over such an adapter was an internal error (sweep 28). The pooler's LoRA is kept in the adapter
    and its export, not applied (no head reads it, said in a warning); an adapter of the pooler alone is refused."""
    from peft import PeftModel

    from loraplex.errors import InvalidAdapter, LoraplexWarning

    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "p", targets="all-linear")
    with pytest.warns(LoraplexWarning, match="pooler.dense kept in the adapter"):
        api.register(peft_dir, name="all", description="complaints about flights", base=str(tiny_bert),
                     settings=settings)
    x = _inputs(tiny_bert)
    ref = _out(PeftModel.from_pretrained(_load_base(tiny_bert, False), str(peft_dir)).eval(), x)
    lb, _ = api.load_adapted(["all"], settings)
    assert (_out(lb.model, x) - ref).abs().max() < 1e-5  # the hidden states the heads read
    rm = api.load_routed_model("retrieval", ["all"], settings=settings)
    assert rm.answer(["the flight was late"], labels=["late", "on time"])[0]["answer"] in ("late", "on time")
    out_dir = api.export("all", tmp_path / "out", settings=settings)
    again = PeftModel.from_pretrained(_load_base(tiny_bert, False), str(out_dir)).eval()
    first = PeftModel.from_pretrained(_load_base(tiny_bert, False), str(peft_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(again(**x).pooler_output, first(**x).pooler_output, atol=1e-5)  # kept in the export
    only = make_peft_adapter(tiny_bert, tmp_path / "q", targets=("pooler.dense",))
    with pytest.raises(InvalidAdapter, match="no loraplex head reads"):
        api.register(only, name="pool", description="the pooler only", base=str(tiny_bert), settings=settings)
