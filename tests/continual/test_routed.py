"""The `routed` continual method: a new adapter per task, a router grown by one expert and refitted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraplex import api
from loraplex.continual.methods import METHODS
from loraplex.settings import Settings
from tests.continual.conftest import make_spec

ROUTED = {"name": "routed", "router_steps": 5, "memory_per_task": 8}


def _settings(home):
    return Settings.load(home=home, embedder="hash", device="cpu", dtype="float32")


def _gates(run_dir, unit):
    return load_file(str(run_dir / "state" / f"unit-{unit:03d}" / "method.safetensors"))


@pytest.mark.parametrize("replay", [False, True])
def test_routed_stream_grows_and_refits_the_router(tmp_path, tiny_bert, task_dir, replay):
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports", "markets")] + [{"forget": "sports"}]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method=ROUTED, replay=replay, experiences=exps, steps=4)
    res = api.run_stream(spec, out=tmp_path / "run", progress=False, settings=_settings(tmp_path / "home"))
    assert res.metrics["complete"] and len(res.matrix["R"]) == 4
    assert all(v is not None for v in res.matrix["R"][2])
    state = json.loads((tmp_path / "run" / "state" / "unit-002" / "state.json").read_text())["method"]
    assert state["expert_tasks"] == ["flights", "sports", "markets"]
    assert state["modules"] and all("attention" in m for m in state["modules"])
    assert bool(state["memory"]) is not replay  # without a replay buffer the router keeps its own rows
    for unit, n in ((0, 1), (1, 2), (2, 3)):
        g = _gates(tmp_path / "run", unit)
        assert g and all(v.shape[0] == n for k, v in g.items() if k.endswith(".weight"))
    # the router was refitted (its training logs exist) once there were two adapters to choose between
    assert not (tmp_path / "run" / "units" / "000-router").exists()
    assert (tmp_path / "run" / "units" / "001-router" / "logs" / "metrics.csv").is_file()
    # the forgetting slot (feed-forward) is summed in, not routed: the router is unchanged by it
    g2, g3 = _gates(tmp_path / "run", 2), _gates(tmp_path / "run", 3)
    assert g2.keys() == g3.keys() and all(torch.equal(g2[k], g3[k]) for k in g2)
    if not replay:
        # a one-off request would act on summed adapters, not on the routed composition: refused
        from loraplex.errors import UserInputError

        with pytest.raises(UserInputError, match="router"):
            api.forget("markets", steps=2, eval_limit=4, progress=False, settings=_settings(tmp_path / "home"))
        # the stream's forgetting adapter erased sports from what the stream's router answered with; the
        # router is not registered, so summing its composition would be another model: nothing loads it
        from loraplex.serve.engine import Engine

        s = _settings(tmp_path / "home")
        gone = next(r for r in api.open_registry(s).list_adapters() if r.origin == "forgetting")
        assert gone.extra["summed"] is False and len(gone.composition) == 4
        for use in (lambda: api.evaluate(gone.name, settings=s), lambda: api.load_adapted(list(gone.composition), s)):
            with pytest.raises(UserInputError, match="answer through the stream's router, which is not registered"):
                use()
        engine = Engine(s, base=str(tiny_bert))
        assert gone.name not in {m["id"] for m in engine.models()}
        assert {m["id"] for m in engine.models()} >= set(gone.composition[:3])  # the learned ones answer alone
        with pytest.raises(UserInputError, match="cannot be loaded, evaluated or served"):
            engine.resolve(gone.name)
    # their listed accuracy is what the stream's router scored on their task, and the listing says so
    learned = [r for r in api.open_registry(_settings(tmp_path / "home")).list_adapters() if r.origin == "continual"]
    assert len(learned) == 3
    for rec in learned:
        assert rec.metrics["scored_through"] == "router"
        assert rec.summary()["accuracy_through"] == "router" and rec.summary()["accuracy"] is not None


def test_growing_keeps_the_earlier_experts_gate_rows(tiny_bert, settings):
    from loraplex.continual.slots import add_slot
    from loraplex.experts.layers import routed_layers
    from loraplex.experts.spec import LoraSpec
    from loraplex.models import load_base

    lb = load_base(str(tiny_bert), settings)
    spec = LoraSpec(r=2, alpha=4.0)
    mods = spec.resolve_targets(lb.fingerprint.linear_names(), lb.fingerprint.model_type)
    method = METHODS.build("routed", {})
    for i in range(2):
        slot = add_slot(lb.model, spec, mods, generator=torch.Generator().manual_seed(i))
        method.configure_train(lb.model, slot)
    method.modules, method.expert_tasks = sorted(mods), ["a", "b"]
    before = method._build(lb.model, seed=1).state_tensors()
    slot = add_slot(lb.model, spec, mods, generator=torch.Generator().manual_seed(2))
    method.configure_train(lb.model, slot)
    layer = routed_layers(lb.model)[mods[0]]
    assert layer.router is None and layer.static_gates[0, 0].tolist() == [0.0, 0.0, 1.0]  # the new adapter alone
    method.tensors, method.expert_tasks = before, ["a", "b", "c"]
    after = method._build(lb.model, seed=2).state_tensors()
    for k, v in before.items():
        assert after[k].shape[0] == 3 and torch.equal(after[k][:2], v)
    assert routed_layers(lb.model)[mods[0]].router is not None


def test_routed_resume_is_exact(tmp_path, tiny_bert, task_dir):
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports", "markets")]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method=ROUTED, replay=True, experiences=exps, steps=3)
    seen = []

    def changes_its_event(event):  # a callback's changes reached the result returned (sweep 26)
        seen.append(event["unit"])
        event["metrics"].clear()
        event["matrix"]["tasks"] = ["X"]

    ref = api.run_stream(spec, out=tmp_path / "ref", progress=False, settings=_settings(tmp_path / "h1"),
                         on_unit=changes_its_event)
    assert seen == [0, 1, 2] and ref.metrics and ref.matrix == api.stream_report(tmp_path / "ref")["matrix"]

    def stop_after_second(event):
        if event["unit"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.run_stream(spec, out=tmp_path / "run", progress=False, on_unit=stop_after_second,
                       settings=_settings(tmp_path / "h2"))
    assert not (tmp_path / "run" / "state" / "unit-002").exists()
    got = api.run_stream(spec, resume=tmp_path / "run", progress=False, settings=_settings(tmp_path / "h2"))
    assert got.resumed_from == 2 and got.matrix == ref.matrix
    a, b = _gates(tmp_path / "ref", 2), _gates(tmp_path / "run", 2)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_callback_that_waits_for_a_training_in_another_thread_does_not_hang_the_stream(tmp_path, tiny_bert,
                                                                                         task_dir):
    """Seeded jobs run one at a time (loraplex/seeding.py); a stream's on_unit callback that handed a training to
    a worker thread and waited for it waited for ever, the stream holding the lock (sweep 29). The callback runs
    outside the stream's job, and the stream goes on as it would have (the random state put back)."""
    import concurrent.futures as cf

    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method="seq-lora", replay=False, experiences=exps,
                     steps=2)
    ref = api.run_stream(spec, out=tmp_path / "ref", progress=False, settings=_settings(tmp_path / "h1"))
    pool, done = cf.ThreadPoolExecutor(1), []

    def trains_meanwhile(event):
        fut = pool.submit(api.train, str(task_dir / "markets.jsonl"), name=f"side-{event['unit']}", base=str(tiny_bert),
                          steps=1, progress=False, settings=_settings(tmp_path / "h2"))
        done.append(fut.result(timeout=120).record.name)

    got = api.run_stream(spec, out=tmp_path / "run", progress=False, on_unit=trains_meanwhile,
                         settings=_settings(tmp_path / "h2"))
    pool.shutdown()
    assert done == ["side-0", "side-1"] and got.matrix == ref.matrix


def test_routed_config_is_validated():
    from loraplex.errors import LoraplexError

    with pytest.raises((LoraplexError, ValueError)):
        METHODS.build("routed", {"router": "retrieval"})
    with pytest.raises((LoraplexError, ValueError)):
        METHODS.build("routed", {"router_config": {"joint": True}})
    with pytest.raises((LoraplexError, ValueError)):
        METHODS.build("routed", {"router_config": {"top_k": 0}})


def test_a_rank_routers_top_k_counts_ranks():
    """SMoRA's top_k counts ranks, not tasks: a routed stream refused any top_k above its task count, its own
    default of 8 included, where `router fit` takes it (sweep 37)."""
    from loraplex.continual.stream import _check_router_top_k
    from loraplex.errors import InvalidSpec

    tasks = {"a": None, "b": None, "c": None}
    _check_router_top_k(METHODS.build("routed", {"router": "rank", "router_config": {"top_k": 4}}), tasks, 2)
    with pytest.raises(InvalidSpec, match=r"top_k=7 is more than the 6 ranks the router would choose among \(3 tasks x lora.rank 2\)"):
        _check_router_top_k(METHODS.build("routed", {"router": "rank", "router_config": {"top_k": 7}}), tasks, 2)
    with pytest.raises(InvalidSpec, match="top_k=4 is more than the 3 tasks"):
        _check_router_top_k(METHODS.build("routed", {"router_config": {"top_k": 4}}), tasks, 2)


def test_a_bad_routed_spec_is_refused_before_anything_runs(cli, tmp_path, tiny_bert, task_dir):
    from tests.conftest import registry_state

    before = registry_state(cli.home)
    for method in ({"name": "routed", "router": "retrieval"}, {"name": "routed", "router_config": {"top_k": 0}}):
        spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method=method)
        res = cli("stream", "run", spec, "--out", tmp_path / "run")
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "s.yaml" in res.stderr, res.output
        assert not (tmp_path / "run").exists() and registry_state(cli.home) == before
    # a top_k above the tasks the stream learns was capped without a word, where `router fit` refuses it
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method={"name": "routed", "router_config": {"top_k": 10}})
    res = cli("stream", "run", spec, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "method.router_config.top_k=10 is more than the" in res.stderr, res.output
    assert not (tmp_path / "run").exists() and registry_state(cli.home) == before
    res = cli("stream", "run", spec)  # no --out: the run directory under the home is not made for a refused spec
    assert res.exit_code == 2 and not list((cli.home / "runs").glob("stream-*")), res.output
    # a forgetting slot in a routed projection: an internal error mid-run (after two units), now refused first
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")] + [{"forget": "flights"}]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method=ROUTED, experiences=exps,
                     forgetting={"name": "gs-lora", "rank": 2, "steps": 2, "targets": ["query"]})
    res = cli("stream", "run", spec, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "forgetting.targets and lora.targets share 'encoder.layer.0.attention.self.query'" in res.stderr
    assert not (tmp_path / "run").exists() and registry_state(cli.home) == before
    # a task its base reads as unknown tokens only (emoji to WordPiece) is refused before anything runs, as train does
    import json

    emoji = tmp_path / "emoji.jsonl"
    emoji.write_text("".join(json.dumps({"text": e * 2, "label": lab}) + "\n"
                             for e, lab in [("\U0001F600", "good"), ("\U0001F621", "bad")] * 12))
    (tmp_path / "emoji.task.json").write_text(json.dumps({"description": "moods"}))
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, experiences=[{"learn": str(emoji)}])
    res = cli("stream", "run", spec, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "every training text reads as unknown tokens only" in res.stderr, res.output
    assert not (tmp_path / "run").exists() and registry_state(cli.home) == before
