"""Few-shot refinement of a generated adapter in the generator's coordinates (generators/refine.py)."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.data import load_task
from loraplex.errors import InvalidSpec, UserInputError
from loraplex.experts.layers import routed_layers
from loraplex.generators import workflow
from loraplex.generators.base import GENERATORS, GenContext, Query
from loraplex.generators.refine import RefineConfig, examples_task, refine, refine_config
from loraplex.heads import head_for

from .conftest import FAST, TOY_TASKS

NAMES = [f"{n}-lora" for n in TOY_TASKS]


@pytest.fixture
def fitted(toy_registry, toy_tasks):
    """(generator fitted on flights and phones, the held-out music task, 12 of its labelled examples)."""
    settings, reg = toy_registry
    data = workflow.training_set(reg, NAMES).without(["music-lora"])
    entry = GENERATORS.get("sg-lora")
    gen = entry.factory(entry.make_config(FAST), GenContext(settings, reg.embedder_name, data.base))
    gen.fit(data)
    task = load_task(str(toy_tasks["music"]))
    examples = [(e.text, e.label) for e in task.train[:12]]
    return gen, task, examples


def _coords_loss(gen, x, task):
    """The examples' loss with the adapter decoded from coordinates x (m,)."""
    from loraplex.experts.layers import eject, inject

    base = gen.ctx.base()
    inject(base.model, [gen.data.layout.unflatten(gen.space.decode(x.reshape(1, -1))[0])])
    try:
        with torch.no_grad():
            y = torch.tensor([task.label_index(e.label) for e in task.train])
            return float(head_for(base).loss(base.model, base.tokenizer, [e.text for e in task.train], y, task))
    finally:
        eject(base.model)


def _direct(fitted, member: int = 0):
    """(generator, the examples' own task, a member's coordinates as the proposal, the base) for calling
    `refine` directly."""
    gen, task, examples = fitted
    return gen, examples_task(task.description, examples), gen.space.coords[member].clone(), gen.ctx.base()


def test_refinement_lowers_the_examples_loss_and_stays_in_the_space(fitted):
    gen, task, examples = fitted
    plain = gen.generate(Query(task.description), seed=0)
    ref = gen.generate(Query(task.description, examples, task=task), seed=0, refine=RefineConfig(steps=15, lr=0.2))
    info = ref.extra["refine"]
    assert info["steps"] == 15 and info["examples"] == 12
    assert info["loss_after"] < info["loss_before"] - 1e-3
    flat_plain = gen.data.layout.flatten(plain.adapter)
    flat_ref = gen.data.layout.flatten(ref.adapter)
    assert not torch.allclose(flat_plain, flat_ref)
    # the refined adapter is a point of the generator's space: encode/decode gives it back
    back = gen.space.decode(gen.space.encode(flat_ref.reshape(1, -1)))[0]
    assert torch.allclose(back, flat_ref, atol=1e-4, rtol=1e-3)
    # the base model is left as it was: no banks stay behind
    assert not routed_layers(gen.ctx.base().model)


def test_each_step_reported_is_where_a_shorter_refinement_ends(fitted):
    """on_refine_step's vector after step k is the adapter a k-step refinement writes (the bench reads its
    speed/quality curve from one run this way)."""
    gen, task, examples = fitted
    seen = {}
    q = Query(task.description, examples, task=task)
    full = gen.generate(q, seed=0, refine=RefineConfig(steps=6, lr=0.2), on_refine_step=lambda k, x: seen.setdefault(k, x))
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    short = gen.generate(q, seed=0, refine=RefineConfig(steps=3, lr=0.2))
    assert torch.allclose(seen[3], gen.data.layout.flatten(short.adapter), atol=1e-5)
    assert torch.allclose(seen[6], gen.data.layout.flatten(full.adapter), atol=1e-5)
    assert not torch.allclose(seen[3], seen[6])
    # so with the top block only: the vector reported keeps block 0 at the proposal, as the adapter written does
    top = {}
    short = gen.generate(q, seed=0, refine=RefineConfig(steps=3, lr=0.2, blocks=1), on_refine_step=lambda k, t: top.setdefault(k, t))
    assert torch.allclose(top[3], gen.data.layout.flatten(short.adapter), atol=1e-5)
    assert not torch.allclose(top[3], seen[3])


def test_the_first_step_follows_the_true_gradient(fitted):
    """Adam's first step is -lr * sign(dL/dx): its signs must match the loss's finite differences."""
    gen, task, x0, base = _direct(fitted)
    lr = 1e-3
    x1, _ = refine(gen.space, x0, base, head_for(base), task, RefineConfig(steps=1, lr=lr, anchor=0.0))
    step = (x1 - x0) / lr  # (m,) = -sign(grad)
    checked = 0
    for i in range(x0.shape[0]):
        e = torch.zeros_like(x0)
        e[i] = 0.05
        fd = (_coords_loss(gen, x0 + e, task) - _coords_loss(gen, x0 - e, task)) / 0.1
        if abs(fd) > 1e-3:
            assert step[i].item() == pytest.approx(-float(torch.sign(torch.tensor(fd))), abs=1e-2), i
            checked += 1
    assert checked >= 2


def test_the_anchor_keeps_the_solution_near_the_proposal(fitted):
    gen, task, x0, base = _direct(fitted)
    free, _ = refine(gen.space, x0, base, head_for(base), task, RefineConfig(steps=10, lr=0.2, anchor=0.0))
    held, _ = refine(gen.space, x0, base, head_for(base), task, RefineConfig(steps=10, lr=0.2, anchor=1e4))
    assert (held - x0).norm() < 0.5 * (free - x0).norm()


def test_refinement_refuses_what_it_cannot_use(fitted):
    gen, task, examples = fitted
    with pytest.raises(UserInputError, match="needs labelled examples"):
        gen.generate(Query(task.description), refine=RefineConfig(steps=3))
    with pytest.raises(UserInputError, match="a label on every example"):
        examples_task("d", [("a", "good"), ("b", None)])
    with pytest.raises(UserInputError, match="at least 2 labels"):
        examples_task("d", [("a", "good"), ("b", "good")])
    with pytest.raises(InvalidSpec, match="invalid refine option steps"):
        refine_config(steps=-1)


def test_cli_generate_with_refinement(cli, toy_registry, toy_tasks, tmp_path):
    settings, reg = toy_registry
    r = cli("generate", "fit", "g", "--method", "sg-lora", "--set", "cvae.steps=150")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in toy_tasks["music"].read_text().splitlines()[:10]]
    f = tmp_path / "ex.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = cli("generate", "adapter", TOY_TASKS["music"][0], "--generator", "g", "--name", "music-gen",
            "--examples", str(f), "--refine-steps", "5", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["refine"]["steps"] == 5 and out["refine"]["examples"] == 10
    assert reg.get_adapter("music-gen").metrics["refine"]["steps"] == 5
    # refused before anything is written: no examples, unlabelled examples, a bad step count
    unlabelled = tmp_path / "plain.jsonl"
    unlabelled.write_text(json.dumps({"text": "a song"}) + "\n" + json.dumps({"text": "late plane"}) + "\n")
    for args, msg in ((["--refine-steps", "5"], "pass --examples FILE"),
                      (["--refine-steps", "5", "--examples", str(unlabelled)], "a label on every example"),
                      (["--refine-steps", "-2", "--examples", str(f)], "invalid refine option steps"),
                      (["--refine-blocks", "1", "--examples", str(f)], "pass --refine-steps N too"),
                      (["--refine-blocks", "-1", "--examples", str(f)], "invalid refine option blocks"),
                      (["--refine-steps", "2", "--refine-blocks", "-1", "--examples", str(f)],
                       "invalid refine option blocks")):
        r = cli("generate", "adapter", "a new task", "--generator", "g", "--name", "x-gen", *args)
        assert r.exit_code == 2 and msg in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not reg.has_adapter("x-gen")
    # the top block only: recorded with the refinement, and said
    r = cli("generate", "adapter", TOY_TASKS["music"][0], "--generator", "g", "--name", "music-top",
            "--examples", str(f), "--refine-steps", "3", "--refine-blocks", "1")
    assert r.exit_code == 0, r.stderr
    assert "in 3 steps (the top 1 block only)" in r.stdout
    assert reg.get_adapter("music-top").metrics["refine"]["blocks"] == 1
    # a count at least the adapter's blocks refines every module, is not said to be a top-block refinement, and
    # says it refined every block (it said nothing: sweep 61)
    r = cli("generate", "adapter", TOY_TASKS["music"][0], "--generator", "g", "--name", "music-all",
            "--examples", str(f), "--refine-steps", "3", "--refine-blocks", "2")
    assert r.exit_code == 0 and "the top" not in r.stdout, r.output
    assert "(every block: --refine-blocks 2 is at least the blocks the adapter reaches)" in r.stdout, r.output
    assert "blocks" not in reg.get_adapter("music-all").metrics["refine"]


def test_refinement_reads_many_examples_a_batch_at_a_time(fitted, monkeypatch):
    """100,000 examples went through one forward and backward (the machine ran out of memory, sweep 15):
    each step reads `batch_size` of them, in turn; a few-shot set is one batch, as before."""
    gen, task0, examples = fitted
    task = examples_task(task0.description, examples)
    base = gen.ctx.base()
    head = head_for(base)
    seen = []
    real = head.loss
    monkeypatch.setattr(head, "loss", lambda m, t, texts, y, tk: seen.append(list(texts)) or real(m, t, texts, y, tk))
    refine(gen.space, gen.space.coords[0].clone(), base, head, task, RefineConfig(steps=3, batch_size=5))
    texts = [e.text for e in task.train]
    assert [len(b) for b in seen] == [5, 5, 5, 5]
    assert seen[0] == texts[:5] and seen[1] == texts[5:10] and seen[2] == texts[10:] + texts[:3]
    assert seen[-1] == seen[0]  # the loss after is measured on the batch the loss before was


def test_refined_against_the_task_the_adapter_answers_with(toy_registry, toy_tasks):
    """Sweep 42: `generate adapter --refine-steps` refined on a task of the examples' bare label words while
    the registered adapter answers with its parent's task (its label set and label texts): the reported loss
    was not the adapter's, and refining on the answering task reached 85% where the CLI's reached 77%. It is
    refined on the task it records, and the loss it reports is the registered adapter's on the examples."""
    from loraplex.experts.layers import eject, inject
    from loraplex.generators.base import CVAEGenerator
    from loraplex.models import load_base

    settings, reg = toy_registry
    workflow.fit(reg, settings, "g", method="sg-lora", config={"cvae": {"steps": 150}})
    music = load_task(str(toy_tasks["music"]))
    examples = [(e.text, e.label) for e in music.train[:10]]
    examples.sort(key=lambda e: e[1] != "good")  # "good" first: the examples' own order of labels differs
    seen = []
    real = CVAEGenerator.generate
    CVAEGenerator.generate = lambda self, query, **kw: seen.append((query, kw)) or real(self, query, **kw)
    try:
        out = workflow.generate(reg, settings, TOY_TASKS["music"][0], generator="g", name="music-ref",
                                examples=examples, refine_steps=3)
    finally:
        CVAEGenerator.generate = real
    rec = reg.get_adapter("music-ref")
    answering = reg.answering_task(rec.task, card=(rec.extra.get("task_cards") or {}).get(rec.task), rows=False)
    [(query, kw)] = [(q, kw) for q, kw in seen if kw.get("refine") is not None]
    assert query.task is not None and query.task.labels == answering.labels == ("bad", "good")
    assert query.task.label_texts == answering.label_texts
    lb = load_base(rec.base, settings)
    inject(lb.model, [reg.load_adapter(rec)[1]])
    try:
        with torch.no_grad():
            y = torch.tensor([answering.label_index(lab) for _, lab in examples])
            loss = float(head_for(lb).loss(lb.model, lb.tokenizer, [t for t, _ in examples], y, answering))
    finally:
        eject(lb.model)
    assert loss == pytest.approx(out["refine"]["loss_after"], abs=2e-3)


def test_an_example_text_that_is_not_unicode_is_refused_before_the_generator_runs():
    """Sweep 42: an examples file with a JSON \\ud800 escape in a text ended in the tokenizer's TypeError (exit 70)
    after the generator had run; `train` refuses the same file in one line."""
    with pytest.raises(UserInputError, match="example 2: the text is not valid UTF-8 text"):
        workflow._checked_examples([("fine text", "good"), ("bad \ud800 text", "bad")])


# ---- refining the top blocks only (RefineConfig.blocks) ---------------------------------------------------------
def _slots_by_block(layout):
    from loraplex.experts.layers import block_name

    return {s: int(block_name(s.name).rpartition(".")[2]) for s in layout.slots}


def test_top_blocks_move_only_their_modules(fitted):
    """blocks=1 on the 2-block tiny BERT: the adapter's block-0 modules stay at the proposal, block 1's move."""
    from loraplex.generators.refine import refined_theta

    gen, task, x0, base = _direct(fitted)
    x1, info = refine(gen.space, x0, base, head_for(base), task, RefineConfig(steps=5, lr=0.2, blocks=1))
    assert info["loss_after"] < info["loss_before"]
    before, after = gen.space.decode(x0.reshape(1, -1))[0], refined_theta(gen.space, x1, x0, 1)
    for slot, block in _slots_by_block(gen.data.layout).items():
        part = slice(slot.offset, slot.offset + slot.size)
        moved = not torch.allclose(before[part], after[part])
        assert moved == (block == 1), slot.name
    # a whole-model refinement moves block 0 too (the option is what keeps it)
    xa, _ = refine(gen.space, x0, base, head_for(base), task, RefineConfig(steps=5, lr=0.2))
    low = [s for s, b in _slots_by_block(gen.data.layout).items() if b == 0][0]
    assert not torch.allclose(before[low.a_slice], refined_theta(gen.space, xa, x0)[low.a_slice])
    # and a count of blocks at least the adapter's is every module
    xb, _ = refine(gen.space, x0, base, head_for(base), task, RefineConfig(steps=5, lr=0.2, blocks=2))
    assert torch.allclose(xb, xa, atol=1e-6)
    assert not routed_layers(base.model)


def test_the_lower_blocks_run_once_and_give_what_the_whole_model_gives(fitted, monkeypatch):
    """With the examples in one batch, block 0 runs for the cache only, and the refinement is the one the whole
    model would give step by step; a cache that reads wrong (a model whose blocks pass more than hidden states)
    is noticed at the first step and the whole model runs instead."""
    from loraplex.generators import refine as refine_mod

    gen, task, x0, base = _direct(fitted, 1)
    head = head_for(base)
    block0 = base.model.encoder.layer[0]
    calls = []
    hook = block0.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached, info = refine(gen.space, x0, base, head, task, RefineConfig(steps=6, lr=0.2, blocks=1))
        assert 1 <= len(calls) <= 2  # the cache's one pass (the examples, and the label texts the first time)
        assert base.model.encoder.layer[0] is block0  # the lower blocks are put back
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(refine_mod._LowerBlocksOnce, "usable", lambda self: False)
            whole, info_whole = refine(gen.space, x0, base, head, task, RefineConfig(steps=6, lr=0.2, blocks=1))
        assert len(calls) >= 7
    finally:
        hook.remove()
    assert torch.allclose(cached, whole, atol=1e-5)
    assert info == info_whole
    fill = refine_mod._LowerBlocksOnce.fill

    def wrong(self, run):  # what a model whose blocks need more than their hidden states would read
        value = fill(self, run)
        self.kept = {shape: h.flip(0) for shape, h in self.kept.items()}  # states of other rows
        return value

    monkeypatch.setattr(refine_mod._LowerBlocksOnce, "fill", wrong)
    fallback, info_fb = refine(gen.space, x0, base, head, task, RefineConfig(steps=6, lr=0.2, blocks=1))
    # the whole model's refinement (to float noise: the failed pass ran first), not one read through wrong states
    assert torch.allclose(fallback, whole, atol=1e-3) and info_fb == info_whole
    assert base.model.encoder.layer[0] is block0
    # a model whose loop fails on the skipped blocks (sweep 54: DeBERTa unpacked two values, ModernBERT read an
    # attribute): the whole model runs instead, not an internal error
    monkeypatch.undo()

    def fails(self, *args, **kwargs):
        raise AttributeError("'_Skipped' object has no attribute 'attention_type'")

    monkeypatch.setattr(refine_mod._Skipped, "forward", fails)
    failed, info_failed = refine(gen.space, x0, base, head, task, RefineConfig(steps=6, lr=0.2, blocks=1))
    assert torch.allclose(failed, whole, atol=1e-3) and info_failed == info_whole
    assert base.model.encoder.layer[0] is block0


def test_skipped_blocks_answer_as_the_blocks_did():
    """Blocks that return (hidden, attention) and a loop that reads each block's attributes (DeBERTa's and
    ModernBERT's forms): the cached path gives the whole model's value."""
    from torch import nn

    from loraplex.generators.refine import _LowerBlocksOnce

    class Block(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.lin, self.kind = nn.Linear(4, 4), kind

        def forward(self, hidden_states, scale=1.0):
            return hidden_states + scale * torch.tanh(self.lin(hidden_states)), None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 4)
            self.layers = nn.ModuleList([Block(k) for k in ("a", "b", "a", "b")])

        def forward(self, x):
            h = self.emb(x)
            for block in self.layers:
                h, _ = block(h, scale=2.0 if block.kind == "a" else 0.5)
            return float(h.pow(2).sum())

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 5, 3)
    once = _LowerBlocksOnce(net, "layers", 2)
    with torch.no_grad():
        whole = once.fill(lambda: net(x))
        with once.skipping():
            assert net.layers[1].kind == "b"
            cached = net(x)
        assert isinstance(net.layers[0], Block)
    assert cached == pytest.approx(whole, rel=1e-6)


def test_the_cache_reads_a_causal_lm_as_its_whole_forward(tiny_llama, settings):
    """Llama's blocks return a tensor and take position embeddings from the model: the cached path's loss is
    the whole model's."""
    from loraplex.experts.layers import inject_new
    from loraplex.experts.spec import LoraSpec
    from loraplex.generators.refine import _LowerBlocksOnce
    from loraplex.models import load_base

    lb = load_base(str(tiny_llama), settings)
    task = examples_task("Is the review good or bad?", [("a great film", "good"), ("dull and long", "bad"),
                                                         ("loved it", "good")])
    layers = inject_new(lb.model, LoraSpec(r=2, alpha=4.0, target_modules=("q_proj", "v_proj")),
                        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], seed=3)
    for layer in layers.values():
        torch.nn.init.normal_(layer.bank.B, std=0.5)
    lb.model.eval()
    head = head_for(lb)
    y = torch.tensor([task.label_index(e.label) for e in task.train])
    loss = lambda: float(head.loss(lb.model, lb.tokenizer, [e.text for e in task.train], y, task))  # noqa: E731
    once = _LowerBlocksOnce(lb.model, "model.layers", 1)
    assert once.usable()
    with torch.no_grad():
        whole = once.fill(loss)
        with once.skipping():
            assert isinstance(lb.model.model.layers[0], torch.nn.Module) and lb.model.model.layers[0] is not None
            cached = loss()
    assert cached == pytest.approx(whole, rel=1e-5)
    assert type(lb.model.model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_refine_blocks_is_refused_where_it_cannot_apply(fitted):
    from loraplex.generators.layout import ParamLayout
    from loraplex.generators.refine import top_blocks

    gen, _, _ = fitted
    assert top_blocks(gen.data.layout, 0) is None and top_blocks(gen.data.layout, 5) is None
    slots, stack, first = top_blocks(gen.data.layout, 1)
    assert stack == "encoder.layer" and first == 1 and all(".layer.1." in s.name for s in slots)
    two = ParamLayout(gen.data.layout.spec, [("encoder.block.0.q", 2, 4, 4), ("decoder.block.0.q", 2, 4, 4)])
    with pytest.raises(InvalidSpec, match="invalid refine option blocks: 1 needs .* one stack.*decoder.block, encoder.block"):
        top_blocks(two, 1)
    flat = ParamLayout(gen.data.layout.spec, [("pooler.dense", 2, 4, 4)])
    with pytest.raises(InvalidSpec, match="stacks: none"):
        top_blocks(flat, 1)
    with pytest.raises(InvalidSpec, match="invalid refine option blocks"):
        refine_config(blocks=-1)


def test_refinement_keeps_a_module_no_head_reads(settings, tiny_bert, toy_tasks):
    """Adapters with BERT's pooler among their modules (PEFT `all-linear`): the pooler is kept in an adapter but
    not put into the model (no head reads it), and refinement wrote every slot into the model: an internal
    error, KeyError 'pooler.dense' (sweep 54). It refines, with and without --refine-blocks."""
    from loraplex import api

    from .conftest import add_toy

    reg = api.open_registry(settings)
    for i, (name, (desc, _)) in enumerate(TOY_TASKS.items()):
        add_toy(reg, settings, tiny_bert, f"{name}-lora", toy_tasks[name], desc, seed=10 + i,
                targets=("query", "value", "pooler.dense"))
    data = workflow.training_set(reg, NAMES).without(["music-lora"])
    assert "pooler.dense" in data.layout.modules
    entry = GENERATORS.get("sg-lora")
    gen = entry.factory(entry.make_config(FAST), GenContext(settings, reg.embedder_name, data.base))
    gen.fit(data)
    task = load_task(str(toy_tasks["music"]))
    q = Query(task.description, [(e.text, e.label) for e in task.train[:12]], task=task)
    for blocks in (0, 1):
        ref = gen.generate(q, seed=0, refine=RefineConfig(steps=3, lr=0.2, blocks=blocks))
        assert ref.extra["refine"]["loss_after"] < ref.extra["refine"]["loss_before"], blocks
        assert "pooler.dense" in ref.adapter.weights
