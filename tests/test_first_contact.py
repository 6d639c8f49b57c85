"""What broke when loraplex was tried as a new user would (issue 15), each through the CLI: a task file
trained with --description only, PEFT exports peft's Auto classes load, brackets in user text, plain
output when piped, train's --eval-limit, a forgetting request that did not forget, and DDP (rank 0
alone writes)."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_peft_adapter, registry_state


def _bare_task_file(root: Path, n: int = 80) -> Path:
    """A JSONL task file with no sidecar: its description can only come from --description."""
    rnd = random.Random(0)
    words = {"good": ["great", "good", "love", "thanks", "happy"], "bad": ["awful", "bad", "hate", "terrible", "angry"]}
    rows = []
    for i in range(n):
        lab = "good" if i % 2 else "bad"
        rows.append({"text": " ".join(rnd.sample(words[lab], 2) + ["the", "flight"]) + f" {i}", "label": lab})
    f = root / "weather.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_task_file_trained_with_description_is_usable_again(cli, tiny_bert, tmp_path, monkeypatch):
    f = _bare_task_file(tmp_path)
    r = cli("train", f, "--name", "weather-lora", "--base", tiny_bert, "--description", "is the traveller happy",
            "--steps", "4", "--rank", "2", "--eval-limit", "5", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["test_n"] == 5
    # every later command that needs the task finds its description on the record
    ev = cli("eval", "weather-lora", "--task", f, "--json", "--quiet")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["task"] == "weather"
    bare = cli("eval", "--task", f, "--base", tiny_bert, "--json", "--quiet")
    assert bare.exit_code == 0, bare.output
    own = cli("eval", "weather-lora", "--json", "--quiet")  # no --task: the adapter's own
    assert own.exit_code == 0 and json.loads(own.stdout)["task"] == "weather", own.output
    none = cli("eval", "--base", tiny_bert, "--quiet")
    assert none.exit_code == 2 and "the bare base has no task of its own" in none.stderr, none.output
    # any spelling of its path: relative to the working directory, with `..` (only the absolute one worked)
    import os

    monkeypatch.chdir(tmp_path)
    for spelling in (f.name, f"../{tmp_path.name}/{f.name}", f"./{f.name}"):
        ev = cli("eval", "weather-lora", "--task", spelling, "--json", "--quiet")
        assert ev.exit_code == 0 and json.loads(ev.stdout)["task"] == "weather", (spelling, ev.output)
    assert os.getcwd() == str(tmp_path)
    q = cli("query", "great flight", "--router", "retrieval", "--json")
    assert q.exit_code == 0, q.output
    assert json.loads(q.stdout)["answer"] in ("good", "bad")
    card = json.loads(cli("adapters", "show", "weather-lora", "--json").stdout)["extra"]["task_cards"][str(f)]
    assert card == {"name": "weather", "description": "is the traveller happy", "labels": ["bad", "good"],
                    "label_texts": {}}
    # the file moved away: routing still knows the labels; evaluating says the rows are gone
    f.rename(tmp_path / "moved.jsonl")
    q = cli("query", "great flight", "--router", "retrieval", "--json")
    assert q.exit_code == 0, q.output
    before = registry_state(cli.home)
    ev = cli("eval", "weather-lora", "--task", f, "--quiet")
    assert ev.exit_code != 0 and "task file is gone" in ev.output and "Traceback" not in ev.output
    assert registry_state(cli.home) == before


def test_train_eval_limit_is_checked(cli, tiny_bert, tmp_path):
    f = _bare_task_file(tmp_path)
    before = registry_state(cli.home)
    for bad in ("0", "-3"):
        r = cli("train", f, "--name", "w", "--base", tiny_bert, "--description", "d", "--steps", "2",
                "--eval-limit", bad, "--quiet")
        assert r.exit_code == 2 and "--eval-limit" in r.output, r.output
    assert registry_state(cli.home) == before


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
def test_export_loads_through_peft_auto_classes(cli, tiny_llama, tiny_bert, tmp_path, causal):
    import torch
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction, PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    base = tiny_llama if causal else tiny_bert
    targets = ("q_proj", "v_proj") if causal else ("query", "value")
    src = make_peft_adapter(base, tmp_path / "src", targets=targets, causal=causal)
    r = cli("adapters", "register", src, "--name", "a", "--description", "an adapter", "--base", base)
    assert r.exit_code == 0, r.output
    out = tmp_path / "export"
    assert cli("adapters", "export", "a", out).exit_code == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == ("CAUSAL_LM" if causal else "FEATURE_EXTRACTION")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert _mode(out / name) == 0o666 & ~umask, name
    cfg["base_model_name_or_path"] = str(base)  # the Auto class loads the base from here
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    auto = (AutoPeftModelForCausalLM if causal else AutoPeftModelForFeatureExtraction).from_pretrained(str(out))
    ref = PeftModel.from_pretrained((AutoModelForCausalLM if causal else AutoModel).from_pretrained(str(base)), str(src))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = auto(input_ids=ids), ref(input_ids=ids)
    key = "logits" if causal else "last_hidden_state"
    torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_user_text_with_brackets_is_printed_as_written(cli, tiny_bert, tmp_path):
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    desc = "support tickets [v2] for [bold]customers[/bold] with a rather long description that would fold in a table"
    assert cli("adapters", "register", src, "--name", "tickets", "--description", desc, "--base", tiny_bert).exit_code == 0
    listing = cli("adapters", "list").stdout
    # piped (not a terminal): one row a line, never folded mid-word, nothing read as markup
    assert desc in listing
    assert any(line.startswith("tickets ") and desc in line for line in listing.splitlines())
    shown = cli("adapters", "show", "tickets").stdout
    assert f"description: {desc}" in shown
    f = _bare_task_file(tmp_path)
    ev = cli("eval", "--task", f, "--base", tiny_bert, "--limit", "3", "--quiet")
    # the bare task file has no description: eval says so in one line
    assert ev.exit_code != 0 and "no task description" in ev.output
    (tmp_path / "weather.task.json").write_text(json.dumps({"description": "weather [beta]"}))
    ev = cli("eval", "--task", f, "--base", tiny_bert, "--limit", "3", "--quiet")
    assert ev.exit_code == 0, ev.output
    assert "[test, n=3]" in ev.stdout


def test_forget_that_does_not_forget_says_so(cli, tiny_bert, tmp_path, monkeypatch):
    from tests.continual.conftest import write_task

    f = write_task(tmp_path, "flights", n=40)
    r = cli("train", f, "--name", "fl", "--base", tiny_bert, "--steps", "30", "--lr", "3e-2", "--rank", "2",
            "--batch-size", "8", "--quiet")
    assert r.exit_code == 0, r.output
    # a learning rate too small to change anything: the forgotten rows' accuracy stays where it was
    r = cli("forget", str(f), "--adapters", "fl", "--base", tiny_bert, "--steps", "2", "--lr", "1e-12",
            "--eval-limit", "20", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["forgot"] is False and "did not forget" in res["warning"]
    assert "warning: the request did not forget" in r.stderr
    # evaluated, it stands on the composition it erases from (alone on the bare base it measured something else),
    # and retrieval never routes to it: it answers no task, it erases one (sweep 13)
    ev = cli("eval", res["name"], "--limit", "20", "--json")
    assert ev.exit_code == 0, ev.output
    ev = json.loads(ev.stdout)
    assert ev["composition"] == ["fl"] and ev["accuracy"] == pytest.approx(res["forgotten_after"]), (ev, res)
    q = cli("query", "flight delayed again", "--top-k", "2", "--json")  # only fl can be routed to: 2 is refused
    assert q.exit_code == 2 and "top_k=2 is more than the 1 adapter(s) retrieval can route over" in q.stderr, q.output
    q = cli("query", "flight delayed again", "--json")
    assert q.exit_code == 0, q.output
    assert res["name"] not in q.stdout and "fl" in q.stdout, q.stdout
    from loraplex.continual import request

    seen, real = {}, request.forget  # --batch-size and --set reach the training (sweep 40: no way to bound a request)
    monkeypatch.setattr(request, "forget", lambda **kw: (seen.update(kw), real(**kw))[1])
    r = cli("forget", str(f), "--adapters", "fl", "--base", tiny_bert, "--steps", "1", "--lr", "1e-12",
            "--eval-limit", "20", "--quiet", "--name", "again", "--batch-size", "4", "--set", "retain_budget=8")
    assert r.exit_code == 0 and r.stdout.startswith("did not forget flights"), r.output
    assert seen["trainer"].batch_size == 4 and seen["forgetter"].config.retain_budget == 8
    # the forgetting adapter means nothing without the composition it erases from: its members stay until it goes
    bad = cli("adapters", "remove", "fl")
    assert bad.exit_code == 2 and "forgetting adapter" in bad.stderr and "erases from" in bad.stderr, bad.output
    assert cli("adapters", "remove", res["name"]).exit_code == 0
    assert cli("adapters", "remove", "again").exit_code == 0
    assert cli("adapters", "remove", "fl").exit_code == 0


def test_forget_summary_flags_a_rise():
    from loraplex.continual.metrics import forget_request_summary

    row = lambda acc: {"t": {"accuracy": acc, "labels": {"a": [round(acc * 100), 100], "b": [round(acc * 100), 100]}},
                       "u": {"accuracy": 0.8, "labels": {}}}
    rose = forget_request_summary(row(0.105), row(0.421), "t", None, ["u"], 3)
    assert rose["forgot"] is False and "10.5 to 42.1" in rose["warning"] and rose["warning"].endswith("try more --steps or a higher --lr")
    fell = forget_request_summary(row(0.9), row(0.33), "t", None, ["u"], 3)
    assert fell["forgot"] is True and fell["warning"] is None


def _loraplex(*args: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("loraplex")
    return subprocess.run([str(exe), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_once(tmp_path, tiny_bert):
    """`--devices 2 --strategy ddp` on CPU (gloo): Lightning re-runs the command in rank 1, which trains
    beside rank 0 and writes nothing: one run directory, one adapter per unit, one line of output."""
    import yaml

    from tests.continual.conftest import write_task

    tasks = [write_task(tmp_path, n, n=24) for n in ("flights", "sports")]
    home = tmp_path / "home"
    env = {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_EMBEDDER": "hash", "LORAPLEX_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LORAPLEX_RUN_DIR"):
        env.pop(var, None)
    spec = tmp_path / "ddp.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "ddp", "base": str(tiny_bert), "seed": 0, "lora": {"rank": 2},
        "trainer": {"steps": 3, "batch_size": 4, "eval_limit": 8, "snapshots": 1, "lr": 3e-2, "devices": 2,
                    "strategy": "ddp", "accelerator": "cpu"},
        "method": "o-lora", "experiences": [{"learn": str(t)} for t in tasks]}))
    out = tmp_path / "run"
    r = _loraplex("stream", "run", spec, "--out", out, "--quiet", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not empty" not in r.stderr and "already exists" not in r.stderr
    assert [p.name for p in (out / "state").iterdir()] and not list((out / "state").glob(".unit-*.tmp"))
    assert sorted(p.name for p in (out / "state").iterdir()) == ["unit-000", "unit-001"]
    names = [a["name"] for a in json.loads(_loraplex("adapters", "list", "--json", env=env).stdout)]
    assert len(names) == 2, names
    assert not (home / "runs").exists() or not list((home / "runs").iterdir())
    r = _loraplex("stream", "run", spec, "--resume", out, "--quiet", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(_loraplex("adapters", "list", "--json", env=env).stdout)) == 2
    # one-off training: registered once, one answer, exit 0
    (tmp_path / "odd").mkdir()
    odd = write_task(tmp_path / "odd", "flights", n=30)
    r = _loraplex("train", odd, "--name", "one", "--base", tiny_bert, "--steps", "2", "--rank", "2",
                  "--devices", "2", "--strategy", "ddp", "--eval-limit", "4", "--quiet", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # the validation accuracy stored is over every rank's rows (the 3 of 30 rows' split), not rank 0's 2
    # (sweep 16), and no row twice (DDP's sampler pads 3 rows to 4 by repeating one)
    assert json.loads(_loraplex("adapters", "show", "one", "--json", env=env).stdout)["metrics"]["val_n"] == 3
    assert "already exists" not in r.stdout + r.stderr
    assert r.stdout.count("trained one") == 1, r.stdout
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1, runs
    assert len(json.loads(_loraplex("adapters", "list", "--json", env=env).stdout)) == 3
    # a router fitted on two processes: stored once by rank 0, no worker's message (sweep 12: the worker
    # stored it too, or printed "LOCAL_RANK=1 ... no WORLD_SIZE" once Lightning had cleared WORLD_SIZE)
    r = _loraplex("router", "fit", "r", "--router", "mixer", "--adapters", ",".join(names), "--steps", "2",
                  "--devices", "2", "--strategy", "ddp", "--eval-limit", "4", "--quiet", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("fitted router r") == 1 and "LOCAL_RANK" not in r.stderr and "error" not in r.stderr, r
    assert [c["name"] for c in json.loads(_loraplex("router", "list", "--json", env=env).stdout)] == ["r"]


def test_files_the_readme_names_are_shipped():
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/.])((?:examples|docs)/[\w./-]+\.\w+)", readme))
    assert named, "the README names example files"
    missing = sorted(p for p in named if not (root / p).exists())
    assert not missing, missing
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert link.startswith("http") or (root / link).exists(), link


def test_query_routed_to_adapters_without_a_task_says_so(cli, tiny_bert, tmp_path):
    """An encoder answers with a task's labels: adapters registered without --task give one clear line."""
    src = make_peft_adapter(tiny_bert, tmp_path / "src")
    assert cli("adapters", "register", src, "--name", "notask", "--description", "some adapter",
               "--base", tiny_bert).exit_code == 0
    before = registry_state(cli.home)
    r = cli("query", "hello there", "--router", "retrieval")
    assert r.exit_code == 2 and "no label set to answer with" in r.output and "Traceback" not in r.output
    assert registry_state(cli.home) == before


def test_eval_takes_a_description_for_a_file_without_one(cli, tiny_bert, tmp_path):
    """`eval --task FILE` on a file with no sidecar said "pass --description", which eval did not have."""
    f = _bare_task_file(tmp_path)
    r = cli("eval", "--task", f, "--base", tiny_bert, "--quiet")
    assert r.exit_code == 2 and "no task description: write " in r.stderr and "--description of train, eval and adapters register" in r.stderr, r.output
    r = cli("eval", "--task", f, "--base", tiny_bert, "--description", "is the traveller happy", "--json", "--quiet")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] > 0, r.output


def test_a_task_file_that_no_longer_loads_does_not_break_queries(cli, tiny_bert, tmp_path):
    """Routing re-read every adapter's task file: one trimmed (or edited, or read by stricter rules than it
    was trained under) failed every query of the registry, naming that file. The recorded card answers."""
    f = _bare_task_file(tmp_path)
    r = cli("train", f, "--name", "weather-lora", "--base", tiny_bert, "--description", "is the traveller happy",
            "--steps", "2", "--rank", "2", "--eval-limit", "5", "--quiet")
    assert r.exit_code == 0, r.output
    f.write_text('{"text": "great", "label": "good"}\n{"text": "awful", "label": "bad"}\n')  # 2 rows: refused now
    q = cli("query", "great flight", "--router", "retrieval", "--json")
    assert q.exit_code == 0 and json.loads(q.stdout)["answer"] in ("good", "bad"), q.output
    c = cli("registry", "check")
    assert c.exit_code == 0 and "the task file of weather-lora no longer loads" in c.stdout, c.output
    ev = cli("eval", "weather-lora", "--task", f, "--quiet")
    assert ev.exit_code == 2 and "too few examples" in ev.stderr, ev.output


def test_each_adapter_answers_with_the_task_it_learned(cli, tiny_bert, tmp_path):
    """Two adapters trained on one file with different descriptions both answered with the newest one's
    (a causal LM is prompted with it); and a file edited to other labels after training made the adapter
    answer with labels it never learned. Each adapter now answers from its own card."""
    from loraplex.registry import Registry

    f = _bare_task_file(tmp_path)
    for name, desc in (("first", "is the traveller happy"), ("second", "did the flight go well")):
        r = cli("train", f, "--name", name, "--base", tiny_bert, "--description", desc, "--steps", "1", "--rank", "2",
                "--eval-limit", "5", "--quiet")
        assert r.exit_code == 0, r.output
    reg = Registry(cli.home)
    assert [reg.adapter_task(reg.get_adapter(n)).description for n in ("first", "second")] == [
        "is the traveller happy", "did the flight go well"]
    f.write_text("".join(json.dumps({"text": f"row {i}", "label": "yes no maybe".split()[i % 3]}) + "\n" for i in range(9)))
    assert reg.adapter_task(reg.get_adapter("first")).labels == ("bad", "good")
    q = cli("query", "great flight", "--adapters", "first", "--json")
    assert q.exit_code == 0 and json.loads(q.stdout)["answer"] in ("good", "bad"), q.output
    c = cli("registry", "check")
    assert c.exit_code == 0 and "adapter 'first' learned the labels bad, good" in c.stdout, c.output


def test_labels_a_causal_lm_reads_alike_are_refused(cli, tiny_llama, tmp_path):
    """A causal LM ranks the label names' token sequences: two that are one sequence to a lossy tokenizer
    (the tiny model's word pieces read two unknown emoji as [UNK]) scored alike for ever, unsaid."""
    f = tmp_path / "emoji.jsonl"
    f.write_text("".join(json.dumps({"text": f"{w} flight {i}", "label": lab}) + "\n"
                         for i in range(30) for w, lab in (("great", "\U0001F600"), ("awful", "\U0001F622"))))
    before = registry_state(cli.home)
    r = cli("train", f, "--name", "emoji", "--base", tiny_llama, "--description", "happy or sad", "--steps", "1",
            "--eval-limit", "4", "--quiet")
    assert r.exit_code == 2 and "read the same to this model" in r.stderr and "scores each label's text" in r.stderr, r.output
    assert registry_state(cli.home) == before


def test_a_task_whose_labels_read_alike_to_the_model_is_refused_before_training(cli, tiny_bert, tmp_path):
    """Two emoji the tokenizer does not know (or "Good" and "good" to an uncased one) are one point to the
    encoder: an adapter trained on them always answered the first, and training said nothing."""
    f = tmp_path / "emoji.jsonl"
    f.write_text("".join(json.dumps({"text": f"{w} flight {i}", "label": lab}) + "\n"
                         for i in range(30) for w, lab in (("great", "\U0001F600"), ("awful", "\U0001F622"))))
    before = registry_state(cli.home)
    r = cli("train", f, "--name", "emoji", "--base", tiny_bert, "--description", "happy or sad", "--steps", "2", "--quiet")
    assert r.exit_code == 2 and "read the same to this model" in r.stderr and "label_texts" in r.stderr, r.output
    assert "task 'emoji' (" in r.stderr, r.output  # which task, when it is not the one being trained
    assert registry_state(cli.home) == before
    f.with_name("emoji.task.json").write_text(json.dumps({"description": "happy or sad",
                                                          "label_texts": {"\U0001F600": "happy", "\U0001F622": "angry"}}))
    r = cli("train", f, "--name", "emoji", "--base", tiny_bert, "--steps", "2", "--quiet")
    assert r.exit_code == 0, r.output


def _long_labels(tmp_path, words: int):
    """A task file whose two labels are `words` words long and differ only in the last one."""
    a, b = "the " * words + "good", "the " * words + "bad"
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps({"text": f"{w} flight {i}", "label": lab}) + "\n"
                         for i in range(30) for w, lab in (("great", a), ("awful", b))))
    return f


def test_labels_that_differ_only_past_what_the_encoder_reads_are_refused(cli, tiny_bert, tmp_path):
    """Two labels of 200 words that differ in the last one: the encoder reads a label's first 128 tokens, so
    their anchors were one point, and the check compared the whole labels (sweep 16)."""
    f = _long_labels(tmp_path, 200)
    before = registry_state(cli.home)
    r = cli("train", f, "--name", "long", "--base", tiny_bert, "--description", "happy or sad", "--steps", "2",
            "--quiet")
    assert r.exit_code == 2 and "they differ only after their first 126 tokens" in r.stderr, r.output
    assert registry_state(cli.home) == before


def test_a_label_too_long_for_a_causal_lm_to_score_is_refused(cli, tiny_llama, tmp_path):
    """A 300-token label was scored after every prompt at the vocabulary's width per token: gigabytes, and an
    internal error on a memory limit (sweep 16)."""
    f = _long_labels(tmp_path, 70)
    before = registry_state(cli.home)
    r = cli("train", f, "--name", "long", "--base", tiny_llama, "--description", "happy or sad", "--steps", "1",
            "--eval-limit", "4", "--quiet")
    assert r.exit_code == 2 and "tokens long; a causal LM scores label texts of at most 64 tokens" in r.stderr, r.output
    assert registry_state(cli.home) == before
