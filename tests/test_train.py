"""Training end to end: the CLI trains a LoRA with Lightning, evaluates it, registers it with snapshots."""

import json

import pytest

from loraplex import api


def _task_file(tmp_path):
    import random

    rnd = random.Random(0)
    good = ["great", "good", "love", "thanks", "happy"]
    bad = ["awful", "bad", "hate", "terrible", "angry"]
    rows = []
    for i in range(120):
        lab = "good" if i % 2 else "bad"
        words = rnd.sample(good if lab == "good" else bad, 2) + rnd.sample(["the", "flight", "crew", "seat", "service"], 2)
        rnd.shuffle(words)
        rows.append({"text": " ".join(words), "label": lab})
    f = tmp_path / "toy.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "toy.task.json").write_text(json.dumps({"description": "is the passenger happy or not", "labels": ["bad", "good"]}))
    return f


def test_cli_train_eval_on_a_task_file(cli, tiny_bert, tmp_path):
    f = _task_file(tmp_path)
    r = cli("train", f, "--name", "toy-lora", "--base", tiny_bert, "--steps", "40", "--lr", "1e-2", "--rank", "4",
            "--batch-size", "8", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    m = out["metrics"]
    assert m["steps"] == 40 and m["accuracy"] >= 0.9 and m["accuracy"] > m["base_accuracy"]
    from pathlib import Path

    run = Path(out["run_dir"])
    assert (run / "logs" / "metrics.csv").exists() and (run / "checkpoints" / "last.ckpt").exists()
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(".bank." in k for k in ckpt["state_dict"]), "checkpoints hold the adapter only"
    show = json.loads(cli("adapters", "show", "toy-lora", "--json").stdout)
    assert show["origin"] == "trained" and len(show["snapshots"]) == 4 and show["task"] == str(f)
    assert {"kind": "trained-on", "target": f"task:{f}"} in show["edges"]
    ev = json.loads(cli("eval", "toy-lora", "--task", f, "--vs-base", "--json").stdout)
    # the record keeps metrics rounded to 4 decimals
    assert ev["accuracy"] == pytest.approx(m["accuracy"], abs=1e-4)
    assert ev["base_accuracy"] == pytest.approx(m["base_accuracy"], abs=1e-4)
    bare = json.loads(cli("eval", "--task", f, "--base", tiny_bert, "--json").stdout)
    assert bare["adapter"] is None and bare["accuracy"] == pytest.approx(m["base_accuracy"])
    assert cli("registry", "check").exit_code == 0


@pytest.mark.slow
def test_minilm_short_real_training(tmp_path):
    """A short real run on a slice of an embedded task: the adapter beats the bare base."""
    from loraplex.settings import Settings

    s = Settings.load(home=tmp_path / "home", embedder="minilm", device="cpu", dtype="float32")
    res = api.train("airline", name="air", base="minilm", steps=30, train_limit=600, batch_size=16, progress=False, settings=s)
    m = res.metrics
    assert m["accuracy"] > m["base_accuracy"] + 0.2
    hits = api.search("tweets complaining about delayed flights", k=1, settings=s)
    assert hits[0]["name"] == "air"
    rec = api.open_registry(s).get_adapter("air")
    assert len(rec.snapshots) == 4 and rec.metrics["accuracy"] == m["accuracy"]


@pytest.mark.slow
def test_smollm2_loads_and_ranks_labels(tmp_path):
    """The embedded causal LM: GGUF converted once to safetensors in the cache, rank classification works."""
    from loraplex.data import load_task
    from loraplex.heads import accuracy, head_for
    from loraplex.models import load_base
    from loraplex.settings import Settings

    s = Settings.load(home=tmp_path / "home", cache_dir=tmp_path / "cache", device="cpu", dtype="float32")
    lb = load_base("smollm2", s)
    assert (tmp_path / "cache" / "models" / "smollm2" / "model.safetensors").exists()
    res = accuracy(head_for(lb), lb.model, lb.tokenizer, load_task("bbc"), "test", limit=15)
    assert res["n"] == 15 and res["accuracy"] > 0.3  # chance is 0.2 on five topics


def test_a_task_the_base_reads_as_unknown_tokens_only_is_refused(cli, tiny_bert, tmp_path):
    """Emoji-only texts were each one `[UNK]` to a WordPiece base: the task trained and scored 0 without a word
    (sweep 15). A task with one readable text among them still trains."""
    from tests.conftest import registry_state

    rows = [{"text": e * 2, "label": lab} for e, lab in [("\U0001F600", "good"), ("\U0001F621", "bad")] * 12]
    f = tmp_path / "emoji.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = registry_state(cli.home)
    r = cli("train", f, "--name", "e", "--base", tiny_bert, "--steps", "1", "--description", "moods", "--quiet")
    assert r.exit_code == 2 and "every training text reads as unknown tokens only to this model" in r.stderr, r.output
    assert registry_state(cli.home) == before


def test_texts_with_more_than_one_label_are_said(cli, tiny_bert, tmp_path):
    """Rows repeating one text with conflicting labels were accepted without a word (sweep 15): they still
    train (real data is noisy), and the user is told."""
    f = _task_file(tmp_path)
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    rows += [{"text": "the flight crew", "label": "good"}, {"text": "the flight crew", "label": "bad"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = cli("train", f, "--name", "c", "--base", tiny_bert, "--steps", "1", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert ("warning: task 'toy': 1 text(s) appear with more than one label (e.g. 'the flight crew': bad, good)"
            in r.stderr), r.stderr
    assert json.loads(r.stdout)["warnings"] == [r.stderr.split("warning: ", 1)[1].strip()]
    # a column the file has that loraplex does not read: on stderr, and in the JSON's warnings too (sweep 23)
    f.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(rows)))
    r = cli("train", f, "--name", "c2", "--base", tiny_bert, "--steps", "1", "--quiet", "--json")
    said = [line.split("warning: ", 1)[1] for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert r.exit_code == 0 and any("column(s) 'id' not read" in w for w in said), r.output
    assert json.loads(r.stdout)["warnings"] == said


def test_a_name_a_router_holds_is_refused_before_training(cli, tiny_bert, tmp_path, monkeypatch):
    """An existing router's name was refused only after the whole training (sweep 16); an adapter's was
    refused up front."""
    import loraplex.continual.fit as fit
    from loraplex.registry.store import Registry
    from loraplex.settings import Settings

    def no_training(*a, **k):
        raise AssertionError("trained before the name was checked")

    monkeypatch.setattr(fit, "fit_adapter", no_training)
    reg = Registry.open(Settings.load())
    reg._db()  # the database, with its tables
    with reg.write_lock(), reg.transaction() as c:  # a router row is all the name check reads
        c.execute("INSERT INTO components(kind, name, method, base, config, blob, members, metrics, extra, created_at)"
                  " VALUES ('router', 'r1', 'mixer', 'b', '{}', 'x', '[]', '{}', '{}', '0')")
    out = cli("train", _task_file(tmp_path), "--name", "r1", "--base", tiny_bert, "--steps", "1", "--quiet")
    assert out.exit_code == 2 and "a router named 'r1' already exists" in out.stderr, out.output


def _with_one_untrained(tmp_path, rows, label):
    """`rows` plus one row of `label` whose text the hash split keeps out of train (the first such text)."""
    from loraplex.data import load_task_file

    f = tmp_path / "odd.jsonl"
    for k in range(200):
        f.write_text("\n".join(json.dumps(r) for r in rows + [{"text": f"the odd one {k}", "label": label}]))
        if label not in {e.label for e in load_task_file(f, description="d").train}:
            return f
    raise AssertionError("no text the split keeps out of train")


def test_a_split_that_leaves_labels_untrained_is_said(cli, tiny_bert, tmp_path):
    """Nine rows of `a` and one of `b`, which the hash split put in test: trained as a one-label task without a
    word (sweep 16). Said, not refused: a file of a few rows may keep one label in train (review)."""
    rows = [{"text": f"the flight {w}", "label": "a"} for w in ("late", "crew", "seat", "gate", "bag", "plane",
                                                                "good", "bad", "great")]
    f = _with_one_untrained(tmp_path, rows, "b")
    r = cli("train", f, "--name", "odd", "--base", tiny_bert, "--steps", "1", "--description", "d", "--quiet")
    assert r.exit_code == 0 and "1 of its 2 labels have no training row (e.g. 'b'" in r.stderr, r.output
    rows += [{"text": f"the b {w}", "label": "b"} for w in ("x", "y", "z", "w", "v")]
    f = _with_one_untrained(tmp_path, rows, "c")
    r = cli("train", f, "--name", "odd2", "--base", tiny_bert, "--steps", "1", "--description", "d", "--quiet")
    assert r.exit_code == 0 and "1 of its 3 labels have no training row (e.g. 'c'" in r.stderr, r.output
    # a train limit that keeps rows of one label only (sweep 18 F12): the same, said of the rows trained on
    from loraplex.data import load_task_file

    train = load_task_file(f, description="d").train
    first = next(i for i, e in enumerate(train) if e.label != train[0].label)  # the first rows are all one label
    r = cli("train", f, "--name", "odd3", "--base", tiny_bert, "--steps", "1", "--description", "d", "--quiet",
            "--train-limit", str(first))
    assert r.exit_code == 0 and "labels have no row among the first " + f"{first:,} training rows" in r.stderr, r.output


def test_eval_on_a_task_file_whose_labels_changed_is_refused(cli, tiny_bert, tmp_path):
    """The task file's labels renamed after training: `eval` scored the adapter on labels it never learned and
    said nothing, while queries answered with the learned ones (sweep 17)."""
    f = _task_file(tmp_path)
    assert cli("train", f, "--name", "t1", "--base", tiny_bert, "--steps", "1", "--quiet").exit_code == 0
    assert cli("eval", "t1", "--limit", "4").exit_code == 0
    f.write_text(f.read_text().replace('"good"', '"fine"'))
    (tmp_path / "toy.task.json").write_text(json.dumps({"description": "is the passenger happy or not"}))
    r = cli("eval", "t1", "--limit", "4")
    want = f"the labels of {f} changed since adapter 't1' was trained (bad, good -> bad, fine)"
    assert r.exit_code == 2 and want in r.stderr, r.output
    # the same file spelled another way (with `..`, through a link) is the file it learned (sweep 23)
    (tmp_path / "sub").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "toy.jsonl").symlink_to(f)
    for spelled in (tmp_path / "sub" / ".." / "toy.jsonl", tmp_path / "other" / "toy.jsonl"):
        r = cli("eval", "t1", "--limit", "4", "--task", str(spelled))
        assert r.exit_code == 2 and "changed since adapter 't1' was trained (bad, good -> bad, fine)" in r.stderr, r.output
    # forget reads the composition's tasks from the same files: it trained and registered a forgetting
    # adapter on labels the composition never learned, and '--labels fine' erased a label it never had (sweep 23)
    from tests.conftest import registry_state

    before = registry_state(cli.home)
    for extra in ((), ("--labels", "fine")):
        r = cli("forget", "toy", "--adapters", "t1", "--steps", "1", "--eval-limit", "4", "--quiet", *extra)
        assert r.exit_code == 2 and want in r.stderr, r.output
    assert registry_state(cli.home) == before
    # the labels as trained, their texts changed in the sidecar: another classifier too (sweep 18 F20)
    f.write_text(f.read_text().replace('"fine"', '"good"'))
    side = tmp_path / "toy.task.json"
    side.write_text(json.dumps({"description": "is the passenger happy or not", "label_texts": {"good": "great"}}))
    r = cli("eval", "t1", "--limit", "4")
    want = f"the label texts of {f} changed since adapter 't1' was trained (label 'good': 'good' -> 'great')"
    assert r.exit_code == 2 and want in r.stderr, r.output


@pytest.mark.parametrize("n, world", [(3, 2), (4, 2), (1, 2), (130, 3)])
def test_evaluation_rows_are_read_once_in_shards_of_one_length(monkeypatch, n, world):
    """Under DDP each validation row is scored by one process only (Lightning's sampler repeated rows to
    pad the shards, and the summed counts counted them twice), while every process reads as many rows, and
    so as many batches: DDP synchronises buffers at each process's first validation forward."""
    import torch.distributed as dist

    from loraplex.training import PADDING, Row, make_loader

    rows = [Row(f"text {i}", 0, "t") for i in range(n)]
    shards = []
    for rank in range(world):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        shards.append([r for batch in make_loader(rows, 64, shuffle=False) for r in batch])
    assert len({len(s) for s in shards}) == 1  # one length
    read = sorted(r.text for s in shards for r in s if r.task != PADDING)
    assert read == sorted(r.text for r in rows)  # every row once
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert [r for b in make_loader(rows, 64, shuffle=False) for r in b] == rows  # one process: all, in order


def test_labels_changed_since_training_with_label_texts_in_the_record_name_the_change(cli, tiny_bert, tmp_path):
    """An adapter trained with label texts, its file's labels renamed and its sidecar gone: the record's
    label texts were checked against the file's new labels and blamed a sidecar that did not exist (sweep 22)."""
    f = _task_file(tmp_path)
    side = tmp_path / "toy.task.json"
    side.write_text(json.dumps({"description": "is the passenger happy or not", "label_texts": {"good": "a happy one"}}))
    assert cli("train", f, "--name", "t2", "--base", tiny_bert, "--steps", "1", "--quiet").exit_code == 0
    f.write_text(f.read_text().replace('"good"', '"fine"'))
    side.unlink()
    r = cli("eval", "t2", "--limit", "4", "--description", "is the passenger happy or not")
    want = f"the labels of {f} changed since adapter 't2' was trained (bad, good -> bad, fine)"
    assert r.exit_code == 2 and want in r.stderr and "task.json" not in r.stderr, r.output


def test_more_snapshots_than_steps_is_said():
    """trainer.snapshots above what the steps allow was cut down without a word (5 asked, 1 kept; sweep 21)."""
    import warnings

    from loraplex.errors import LoraplexWarning
    from loraplex.experts.spec import LoraSpec
    from loraplex.training import AdapterSnapshots

    with pytest.warns(LoraplexWarning, match="5 snapshots were asked for and 1 will be kept: a run of 2 steps has 1 before"):
        assert AdapterSnapshots(LoraSpec(r=2), steps=2, count=5).at == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AdapterSnapshots(LoraSpec(r=2), steps=10, count=3).at == [2, 5, 8]


@pytest.mark.parametrize("change", ["removed", "registered anew"])
def test_forget_over_a_member_changed_meanwhile_registers_nothing(cli, tiny_bert, tmp_path, monkeypatch, change):
    """An adapter of the composition removed (or registered anew with other weights) while `forget` trained
    over it: the forgetting adapter was registered over a composition that no longer existed (listed, check
    'consistent', every use failing on the member's name) or silently composed with other weights (sweep 24)."""
    import loraplex.continual.request as request
    from loraplex.registry.store import Registry
    from loraplex.settings import Settings
    from tests.conftest import make_peft_adapter

    f = _task_file(tmp_path)
    for n in ("m1", "m2"):
        assert cli("train", f, "--name", n, "--base", tiny_bert, "--steps", "1", "--quiet").exit_code == 0
    real = request.register_from_dir

    def meanwhile(reg, *a, **kw):
        reg.remove_adapter("m2")
        if change == "registered anew":
            api.register(make_peft_adapter(tiny_bert, tmp_path / "peft"), name="m2", description="another m2",
                         base=str(tiny_bert), settings=Settings.load(embedder="hash"))
        return real(reg, *a, **kw)

    monkeypatch.setattr(request, "register_from_dir", meanwhile)
    r = cli("forget", "toy", "--adapters", "m1,m2", "--name", "f1", "--steps", "1", "--eval-limit", "4", "--quiet")
    assert r.exit_code == 1 and f"adapter 'm2' {'was removed' if change == 'removed' else 'was registered anew (other weights)'} " \
        "while adapter 'f1' was being made over it; nothing was registered" in r.stderr, r.output
    assert not Registry(cli.home, embedder="hash").has_adapter("f1")


def test_an_adapter_trained_with_its_own_description_answers_with_it_over_the_sidecars(cli, tiny_bert, tmp_path):
    """`train --description D` on a file with a sidecar: the adapter was trained with D in its prompt (a causal
    LM's) and its record keeps D, but answering read the sidecar's description (sweep 23)."""
    from loraplex.registry.store import Registry

    f = _task_file(tmp_path)  # its sidecar says "is the passenger happy or not"
    for n, d in (("d1", "answer good when the passenger is pleased"), ("d2", "say bad for any complaint")):
        assert cli("train", f, "--name", n, "--base", tiny_bert, "--steps", "1", "--description", d, "--quiet").exit_code == 0
    reg = Registry(cli.home, embedder="hash")
    assert reg.adapter_task(reg.get_adapter("d1")).description == "answer good when the passenger is pleased"
    assert reg.adapter_task(reg.get_adapter("d2")).description == "say bad for any complaint"
    assert reg.answering_task(str(f)).description == "is the passenger happy or not"  # no adapter named: the file's


def test_a_record_of_this_path_stands_in_only_for_what_the_file_lacks_and_only_for_its_labels(cli, tiny_bert, tmp_path):
    """Sweep 23: label texts deleted from a sidecar came back from an older adapter's record (a new adapter
    trained on them, and one file scored differently by path); a new file of other labels saved at a path
    an old adapter used took that adapter's description (a sport/tech classifier registered as the old
    task's 'polarity of product reviews')."""
    from loraplex.registry.store import Registry

    f = _task_file(tmp_path)
    side = tmp_path / "toy.task.json"
    side.write_text(json.dumps({"description": "is the passenger happy or not", "label_texts": {"good": "a happy one"}}))
    assert cli("train", f, "--name", "lt", "--base", tiny_bert, "--steps", "1", "--quiet").exit_code == 0
    side.write_text(json.dumps({"description": "is the passenger happy or not"}))  # the texts dropped
    reg = Registry(cli.home, embedder="hash")
    assert reg.load_task(str(f)).label_texts == {}
    assert reg.adapter_task(reg.get_adapter("lt")).label_texts == {"good": "a happy one"}  # what lt learned
    side.unlink()
    assert reg.load_task(str(f)).label_texts == {"good": "a happy one"}  # no sidecar: the record stands in
    f.write_text("".join(json.dumps({"text": f"{w} {i}", "label": w}) + "\n" for i in range(30) for w in ("sport", "tech")))
    r = cli("train", f, "--name", "other", "--base", tiny_bert, "--steps", "1", "--quiet")
    assert r.exit_code == 2 and "no task description (the one on record for this path was of other labels, bad, good" \
        in r.stderr, r.output


def test_answering_with_an_adapter_does_not_read_its_task_file(cli, tiny_bert, tmp_path, monkeypatch):
    """Every retrieval or auto query read the whole task file of every candidate adapter (rows it never
    uses): one adapter of a 37 MB file made unrelated queries 20 s slower, and printed that file's warnings
    on each (sweep 23). Answering needs the labels, texts and description the adapter's card holds."""
    import loraplex.data as data
    from loraplex.registry.store import Registry

    f = _task_file(tmp_path)
    assert cli("train", f, "--name", "card", "--base", tiny_bert, "--steps", "1", "--quiet").exit_code == 0
    reg = Registry(cli.home, embedder="hash")
    rec = reg.get_adapter("card")

    def no_reading(path, lines=None):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(data, "read_rows", no_reading)
    t = reg.adapter_task(rec)
    assert (t.name, t.labels, t.description) == ("toy", ("bad", "good"), "is the passenger happy or not")
    q = cli("query", "great crew, thanks", "--router", "retrieval")
    assert q.exit_code == 0 and "read " not in q.output, q.output
    with pytest.raises(AssertionError, match="read "):  # rows asked for: the file is read
        reg.adapter_task(rec, rows=True)


def test_seeded_trainings_from_two_threads_give_what_each_gives_alone(tiny_bert, tmp_path, settings):
    """Trainings seed the process's random generators and draw from them (dropout, shuffling): two run from two
    threads drew interleaved, and each adapter differed from the same seeded call alone (sweep 26). They now
    run one at a time (loraplex/seeding.py)."""
    import threading

    f = _task_file(tmp_path)
    kw = dict(base=str(tiny_bert), steps=6, batch_size=8, rank=4, progress=False, settings=settings)
    alone = [api.train(str(f), name=f"alone-{i}", seed=i, **kw).record.blob for i in (1, 2)]
    got, errors = {}, []

    def go(i):
        try:
            got[i] = api.train(str(f), name=f"both-{i}", seed=i, **kw).record.blob
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    ts = [threading.Thread(target=go, args=(i,)) for i in (1, 2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and [got[1], got[2]] == alone


def test_a_forgetting_adapter_that_erased_a_members_task_is_refused_by_a_router_in_words(cli, tiny_bert, tmp_path):
    """`router fit --adapters f1` said "name it with them (m1,m2,f1)", and naming them was refused as "two
    adapters share task" (sweep 30): the refusal says why such a composition cannot be in a learned router."""
    f = _task_file(tmp_path)
    g = tmp_path / "other.jsonl"
    g.write_text(f.read_text())
    (tmp_path / "other.task.json").write_text(json.dumps({"description": "is the crew good", "labels": ["bad", "good"]}))
    assert cli("train", f, "--name", "m1", "--base", tiny_bert, "--steps", "1", "--quiet").exit_code == 0
    r = cli("train", g, "--name", "m2", "--base", tiny_bert, "--steps", "1", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("forget", "toy", "--adapters", "m1,m2", "--name", "f1", "--steps", "1", "--eval-limit", "4", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("router", "fit", "r", "--router", "token-gate", "--adapters", "m1,m2,f1", "--steps", "1", "--quiet")
    assert r.exit_code == 2 and "erased task 'toy'" in r.stderr and "cannot route this composition" in r.stderr, r.output
