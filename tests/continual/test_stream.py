"""End-to-end streams on a tiny BERT: outputs, registry records and lineage, methods, one-off forgetting."""

from __future__ import annotations

import json

import pytest
import yaml

from loraplex.continual.methods import METHODS
from loraplex.continual.spec import parse_spec
from tests.conftest import registry_state
from tests.continual.conftest import make_spec


def _run(cli, spec, out):
    res = cli("stream", "run", spec, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_o_lora_replay_stream_with_forgetting(cli, tmp_path, tiny_bert, task_dir):
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports", "markets")] + [{"forget": "sports"}]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, experiences=exps, steps=4)
    out = tmp_path / "run"
    res = _run(cli, spec, out)
    m, R = res["metrics"], res["matrix"]
    assert R["tasks"] == ["flights", "sports", "markets"] and len(R["R"]) == 4
    assert R["R"][0][2] is None and R["R"][0][1] is not None  # seen + next task only
    assert m["complete"] and m["units_done"] == 4
    assert [u["rows_per_step"] for u in m["units"][:3]] == [4, 4, 4]  # replay's rows share each batch of 4
    for k in ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting"):
        assert m[k] is not None
    f = m["forget_requests"][0]
    assert f["task"] == "sports" and f["groups_total"] == 2 and 1 <= f["groups_survived"] <= 2
    for name in ("matrix.json", "metrics.json", "heatmap.png", "spec.json", "run.json"):
        assert (out / name).is_file()
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "units" / "000-learn" / "logs" / "metrics.csv").is_file()
    assert list((out / "units" / "000-learn" / "checkpoints").glob("*.ckpt"))

    from loraplex import api
    from loraplex.settings import Settings

    reg = api.open_registry(Settings.load(home=cli.home, embedder="hash"))
    recs = {r.extra["unit"]: r for r in reg.list_adapters()}
    assert [recs[i].name for i in range(4)] == res["adapters"]
    assert recs[0].origin == "continual" and recs[0].snapshots
    assert recs[1].parents == [recs[0].name]
    edges = {(e.kind, e.target) for e in recs[3].edges}
    assert ("forgets", f"task:{task_dir / 'sports.jsonl'}") in edges and ("trained-from", f"adapter:{recs[2].name}") in edges
    assert recs[3].origin == "forgetting" and recs[3].metrics["groups_total"] == 2
    assert all("intermediate.dense" in m or "output.dense" in m for m in reg.load_adapter(recs[3])[1].modules)
    assert recs[3].extra["composition"] == [recs[i].name for i in range(4)]  # O-LoRA: every adapter active
    # an o-lora adapter answers with the stream's adapters summed up to it, as its accuracy was scored
    # (`eval` of it alone gave another figure than the one listed, and `serve` answered with it alone)
    assert recs[1].extra["summed"] is True and recs[1].composition == (recs[0].name, recs[1].name)
    listed = {r["name"]: r for r in json.loads(cli("adapters", "list", "--json").stdout)}
    assert listed[recs[1].name]["composition"] == [recs[0].name, recs[1].name]
    assert "composition" not in listed[recs[0].name]
    assert not any("accuracy_through" in r for r in listed.values())  # scored by what it answers with
    table = cli("adapters", "list").stdout
    assert "(router)" not in table
    ev = cli("eval", recs[1].name, "--task", str(task_dir / "sports.jsonl"), "--json", "--quiet")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["composition"] == [recs[0].name]
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(recs[1].metrics["row"]["sports"], abs=1e-4)
    assert not {recs[i].name for i in (1, 2, 3)} & {r.name for r in reg.list_adapters()
                                                   if r.id in set(reg.adapter_ids(routable=True).tolist())}
    import numpy as np

    from loraplex.registry.index import nearest_adapters

    hits = nearest_adapters(reg, np.ones((1, reg.signature_dim()), np.float32), 4, weight=0.8)  # builds the index
    assert [h.name for h in hits[0]] == [recs[0].name]  # `registry check` below: it holds what it should

    rep = cli("stream", "report", out, "--json")
    assert rep.exit_code == 0 and json.loads(rep.stdout)["matrix"] == R
    forgot = json.loads(rep.stdout)["metrics"]["forget_requests"][0]["forgot"]
    text = cli("stream", "report", out)
    verb = {True: "forgot", False: "did not forget", None: "forget request (not measured)"}[forgot]  # as measured
    assert "average accuracy" in text.stdout and f"\n{verb} sports" in text.stdout, text.stdout
    assert cli("registry", "check").exit_code == 0
    # a router over a composition: its shortlist keeps a summed adapter with the rest of it (it failed,
    # telling the user to name adapters they had not named, whenever retrieval put it first)
    fit = cli("router", "fit", "r1", "--router", "token-gate", "--adapters", f"{recs[0].name},{recs[1].name}",
              "--steps", "2", "--batch-size", "4", "--eval-limit", "4", "--val-limit", "4", "--quiet")
    assert fit.exit_code == 0, fit.output
    s = Settings.load(home=cli.home, embedder="hash")
    got = [api.load_routed_model("r1", texts=[t], shortlist=1, settings=s).experts
           for t in ("flight plane delayed", "match goal team win")]
    assert [recs[0].name, recs[1].name] in got and all(g in ([recs[0].name], [recs[0].name, recs[1].name]) for g in got)
    assert cli("router", "remove", "r1").exit_code == 0

    # one-off request against the composition the stream left (labels of a learned task)
    before = registry_state(cli.home)
    alone = cli("forget", "flights", "--adapters", recs[1].name)  # it answers with flights' adapter summed in
    assert alone.exit_code == 2 and f"name it with them ({recs[0].name},{recs[1].name}), not alone" in alone.stderr
    bad = cli("forget", "weather")
    assert bad.exit_code == 2 and "never learned" in bad.stderr and registry_state(cli.home) == before
    every = cli("forget", "markets", "--labels", "flat,down,up")  # was quietly taken as the whole task
    assert every.exit_code == 2 and "forgets the whole task; drop --labels" in every.stderr
    assert registry_state(cli.home) == before
    one = cli("forget", "markets", "--labels", "up", "--steps", "3", "--eval-limit", "6", "--json")
    assert one.exit_code == 0, one.output
    got = json.loads(one.stdout)
    assert got["labels"] == ["up"] and got["composition"][:-1] == recs[3].extra["composition"]
    new = reg.get_adapter(got["name"])
    assert new.origin == "forgetting" and new.parents == [recs[3].name]
    # sports, erased by the stream, is not retained (its rows would teach it back) nor forgotten again
    assert "sports" not in got["retained"] and "flights" in got["retained"]
    before = registry_state(cli.home)
    again = cli("forget", "sports")
    assert again.exit_code == 2 and "task 'sports' is already forgotten by this composition" in again.stderr
    again = cli("forget", "markets", "--labels", "up")
    assert again.exit_code == 2 and "label 'up' of 'markets' is already forgotten" in again.stderr
    # the labels left after 'up' are every other label: that request forgets the whole task (sweep 37: it was
    # taken, and 'up', erased before, counted as retained and came back)
    rest = cli("forget", "markets", "--labels", "flat,down")
    assert rest.exit_code == 2 and "forgets every label of 'markets': forget the whole task instead" in rest.stderr
    assert registry_state(cli.home) == before


def test_causal_lm_stream_distils_replay_and_retention(cli, tmp_path, tiny_llama, task_dir, monkeypatch):
    # a causal-LM head's loss gives no label scores: the distillation scores its rows in a forward of its own
    import loraplex.continual.metrics as metrics

    monkeypatch.setattr(metrics, "FORGET_MIN_DROP", 2.0)  # no request counts as forgetting: its advice is given
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")] + [{"forget": "flights"}]
    spec = make_spec(tmp_path / "s.yaml", tiny_llama, task_dir, experiences=exps, steps=3, distill=1.0)
    res = _run(cli, spec, tmp_path / "run")
    units = res["metrics"]["units"]
    assert [u["kind"] for u in units] == ["learn", "learn", "forget"] and res["metrics"]["complete"]
    assert "distill" not in units[0]["losses"]  # nothing replayed yet
    assert units[1]["losses"]["distill"] >= 0 and units[2]["losses"]["distill"] >= 0
    state = json.loads((tmp_path / "run" / "state" / "unit-001" / "state.json").read_text())
    assert state["replay"]["scores"]["weight"] == 1.0 and state["replay"]["scores"]["table"]
    # in the stream's own terms (it has no --steps or --lr)
    assert res["metrics"]["forget_requests"][0]["warning"].endswith("try a larger forgetting.steps or forgetting.lr in the spec")


def test_replayed_rows_added_on_top_of_the_batch(cli, tmp_path, tiny_bert, task_dir):
    """replay.rows: added (DER++'s buffer minibatch beside the stream's): later units train on batch_size new
    rows plus the replayed ones."""
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, experiences=exps, steps=3)
    d = yaml.safe_load(spec.read_text())
    d["replay"]["rows"] = "added"
    spec.write_text(yaml.safe_dump(d))
    res = _run(cli, spec, tmp_path / "run")
    assert [u["rows_per_step"] for u in res["metrics"]["units"]] == [4, 5]  # 4 new + round(0.25 * 4) replayed
    d["replay"]["rows"] = "both"
    spec.write_text(yaml.safe_dump(d))
    bad = cli("stream", "run", spec, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "rows" in bad.stderr and "Traceback" not in bad.output


@pytest.mark.parametrize("method", ["seq-lora", "multitask"])
def test_other_methods(cli, tmp_path, tiny_bert, task_dir, method):
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method=method, replay=False, experiences=exps, steps=3)
    res = _run(cli, spec, tmp_path / "run")
    units = res["metrics"]["units"]
    if method == "multitask":
        assert len(res["matrix"]["R"]) == 1 and units[0]["steps"] == 6  # both tasks' steps in one unit
        assert res["metrics"]["backward_transfer"] is None
        # its adapter learned both tasks and records neither as its own: the refusals say so, and what to give
        # (sweep 63: "register the adapter with --task", for an adapter the stream had registered)
        ev = cli("eval", res["adapters"][0], "--quiet")
        assert ev.exit_code == 2 and "learned 2 tasks" in ev.stderr and "name the one to evaluate with --task" in ev.stderr
        q = cli("query", "late again", "--adapters", res["adapters"][0])
        assert q.exit_code == 2 and "name them with --labels" in q.stderr, q.output
    else:
        assert len(res["matrix"]["R"]) == 2
        from loraplex import api
        from loraplex.settings import Settings

        last = api.open_registry(Settings.load(home=cli.home, embedder="hash")).get_adapter(res["adapters"][-1])
        assert last.extra["composition"] == [last.name]  # one LoRA, fine-tuned in turn


def test_an_adapter_learned_after_a_forget_on_a_reused_slot_evaluates_as_recorded(cli, tmp_path, tiny_bert, task_dir):
    """seq-lora reuses one slot: after learn, forget, learn, the last adapter answers with the forgetting
    adapter and itself (the first's weights were trained on). `eval` demanded what the forgetting adapter had
    erased from, which the stream no longer held, while the server served the recorded composition (sweep 21)."""
    exps = [{"learn": str(task_dir / "flights.jsonl")}, {"forget": "flights"}, {"learn": str(task_dir / "sports.jsonl")}]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, method="seq-lora", replay=False, experiences=exps, steps=3)
    res = _run(cli, spec, tmp_path / "run")
    first, gone, last = res["adapters"]
    from loraplex import api
    from loraplex.settings import Settings

    rec = api.open_registry(Settings.load(home=cli.home, embedder="hash")).get_adapter(last)
    assert rec.composition == (gone, last)
    ev = cli("eval", last, "--json", "--quiet")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["composition"] == [gone]
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(rec.metrics["row"]["sports"], abs=1e-4)
    own = cli("eval", gone, "--json", "--quiet")  # the forgetting adapter on what it erased from, as recorded
    assert own.exit_code == 0 and json.loads(own.stdout)["composition"] == [first], own.output


def test_multitask_plan_groups_learning_runs(task_dir):
    spec = parse_spec({"method": "multitask", "experiences": [
        {"learn": str(task_dir / "flights.jsonl")}, {"learn": str(task_dir / "sports.jsonl")},
        {"forget": "flights"}, {"learn": str(task_dir / "markets.jsonl")}]})
    units = METHODS.build("multitask", {}).plan(spec.experiences, ["flights", "sports", "flights", "markets"])
    assert [(u.kind, u.tasks) for u in units] == [("learn", ("flights", "sports")), ("forget", ("flights",)),
                                                   ("learn", ("markets",))]
    seq = METHODS.build("seq-lora", {}).plan(spec.experiences, ["flights", "sports", "flights", "markets"])
    assert len(seq) == 4


def test_a_unit_that_diverges_says_what_the_stream_kept_and_which_spec_keys_to_lower(tmp_path, tiny_bert, task_dir,
                                                                                     monkeypatch):
    """train's words ('lower the learning rate (--lr)'; 'nothing was registered') were wrong in a stream:
    it has no --lr, and the units before the diverged one were registered (sweep 21)."""
    import loraplex.training as training
    from loraplex import api
    from loraplex.errors import Diverged
    from loraplex.settings import Settings

    calls = []
    real = training._check_finite

    def check(trainer, module):
        calls.append(1)
        if len(calls) == 2:
            where = "training diverged: after 3 steps the trained weights hold NaN or infinity (x.A)"
            raise Diverged(f"{where}; lower the learning rate (--lr); nothing was registered", detail=where)
        real(trainer, module)

    monkeypatch.setattr(training, "_check_finite", check)
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, experiences=exps, steps=3)
    s = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    with pytest.raises(Diverged) as err:
        api.run_stream(spec, out=tmp_path / "run", progress=False, settings=s)
    said = str(err.value)
    assert said.startswith("unit 1 (sports): training diverged: after 3 steps") and "--lr" not in said
    assert "lower trainer.lr" in said and "the 1 unit before it is saved" in said and "nothing was registered" not in said
    assert len(api.open_registry(s).list_adapters()) == 1


def test_a_forget_whose_buffer_holds_only_the_erased_task_retains_a_sample(tmp_path, tiny_bert, task_dir):
    """Sweep 50: a replay buffer whose rows were all the erased task's (budget 1) left the request with no
    retained row, and it said the composition had learned only that task: the kept tasks' sample is used then,
    as a stream without a buffer uses it."""
    from loraplex import api
    from loraplex.settings import Settings
    from tests.continual.conftest import make_spec

    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=2, experiences=[
        {"learn": str(task_dir / "flights.jsonl")}, {"learn": str(task_dir / "sports.jsonl")},
        {"forget": "flights"}])
    text = spec.read_text().replace("budget: 12", "budget: 1")
    spec.write_text(text)
    settings = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    res = api.run_stream(spec, out=tmp_path / "run", progress=False, settings=settings)
    [req] = res.metrics["forget_requests"]
    assert "nothing was retained" not in (req.get("warning") or ""), req
    assert req["retained_before"] is not None, req


def test_erasing_the_last_kept_task_says_the_others_were_erased_before(tmp_path, tiny_bert, task_dir):
    """A forget of the one task left after a stream erased the other warned "the composition learned only
    sports" (it learned flights too, erased before) and advised removing the task's adapters, which the
    composition's own use of them forbids (sweep 62)."""
    from loraplex import api
    from loraplex.settings import Settings
    from tests.continual.conftest import make_spec

    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=2, experiences=[
        {"learn": str(task_dir / "flights.jsonl")}, {"learn": str(task_dir / "sports.jsonl")}, {"forget": "flights"}])
    settings = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    api.run_stream(spec, out=tmp_path / "run", progress=False, settings=settings)
    got = api.forget(str(task_dir / "sports.jsonl"), steps=2, eval_limit=4, progress=False, settings=settings)
    warning = got.get("warning") or ""
    assert "every other task of the composition (flights) was erased before" in warning, warning
    assert "learned only" not in warning and "remove its adapters" not in warning
