"""Bad input through the CLI: one clear line, a non-zero exit, no traceback, the registry unchanged."""

import pytest

from tests.conftest import make_peft_adapter, registry_state


@pytest.fixture
def two_bases(cli, tiny_bert, tiny_llama, peft_dirs, task_files, tmp_path):
    """Adapters flights-lora, sports-lora (tiny BERT) and llama-lora (tiny Llama) registered through the CLI."""
    for name in ("flights", "sports"):
        r = cli("adapters", "register", peft_dirs[name], "--name", f"{name}-lora", "--description", f"{name} adapter",
                "--task", task_files[name], "--base", tiny_bert)
        assert r.exit_code == 0, r.output
    d = make_peft_adapter(tiny_llama, tmp_path / "llama", targets=("q_proj", "v_proj"), causal=True)
    r = cli("adapters", "register", d, "--name", "llama-lora", "--description", "a llama adapter", "--base", tiny_llama)
    assert r.exit_code == 0, r.output
    return cli


def _fails(cli, args, code, *needles, input=None):
    before = registry_state(cli.home)
    r = cli(*args, input=input)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in r.output, r.output
    assert registry_state(cli.home) == before
    return r


def test_unknown_router_method(two_bases):
    _fails(two_bases, ["router", "fit", "r", "--router", "gate-of-babel", "--adapters", "flights-lora"], 2,
           "unknown router 'gate-of-babel'", "token-gate", "mixer", "rank")


def test_unknown_stored_router_in_query(two_bases):
    _fails(two_bases, ["query", "flight late", "--router", "nope"], 2, "no router named 'nope'", "--router retrieval")
    _fails(two_bases, ["router", "eval", "nope"], 2, "no router named 'nope'")


def test_unknown_adapter(two_bases):
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "flights-lora,ghost-lora"], 2,
           "no adapter named 'ghost-lora'")
    _fails(two_bases, ["query", "flight late", "--router", "retrieval", "--adapters", "ghost-lora"], 2,
           "no adapter named 'ghost-lora'")


def test_adapters_of_another_base(two_bases, tiny_llama):
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "flights-lora,llama-lora"], 2,
           "different base")
    _fails(two_bases, ["query", "flight late", "--router", "retrieval", "--adapters", "flights-lora,llama-lora"], 2,
           "different base")
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "flights-lora,sports-lora",
                       "--base", tiny_llama], 2, "not")


def test_empty_queries(two_bases, tmp_path):
    _fails(two_bases, ["query", "   ", "--router", "retrieval"], 2, "the query is empty")
    # no visible character: refused as the server refuses it (scored and logged as a candidate: sweep 25)
    _fails(two_bases, ["query", "\u200b", "--router", "auto"], 2, "the query is empty (no visible character)")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\u200b\u200b\n")
    _fails(two_bases, ["query", "--input", empty], 2, "no queries")
    _fails(two_bases, ["query", "--input", tmp_path / "missing.txt"], 2, "no such file")
    # more adapters to mix than the registry has: refused, as with --adapters (it mixed what there was; sweep 35)
    _fails(two_bases, ["query", "late flight", "--top-k", "99", "--set", "candidates=200"], 2,
           "top_k=99 is more than the", "adapter(s) retrieval can route over here")


def test_bad_router_config_and_tasks(two_bases):
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "flights-lora,sports-lora",
                       "--set", "warp=9"], 2, "invalid configuration for token-gate", "warp")
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "flights-lora,sports-lora",
                       "--set", "top_k=0"], 2, "top_k")
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "flights-lora,sports-lora",
                       "--tasks", "airline"], 2, "one per adapter")
    _fails(two_bases, ["router", "fit", "r", "--router", "retrieval", "--adapters", "flights-lora"], 2,
           "needs no training")
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate"], 2, "--adapters")
    _fails(two_bases, ["router", "fit", "../r", "--router", "token-gate", "--adapters", "flights-lora"], 2, "router name")


def test_adapter_without_a_task_needs_tasks(two_bases, tiny_llama, tmp_path):
    _fails(two_bases, ["router", "fit", "r", "--router", "token-gate", "--adapters", "llama-lora"], 2,
           "has no task", "--tasks")


def test_two_task_files_with_one_stem_are_named_with_their_paths(cli, tiny_bert, peft_dirs, task_files, tmp_path):
    """Two different files named reviews.jsonl: the refusal said the adapters "share task 'reviews'"."""
    import json
    import shutil

    for i, name in enumerate(("flights", "sports")):
        d = tmp_path / f"v{i}"
        d.mkdir()
        shutil.copy(task_files[name], d / "reviews.jsonl")
        side = json.loads(task_files[name].with_name(f"{name}.task.json").read_text())
        side.pop("name", None)  # the task is then named after its file: "reviews", twice
        (d / "reviews.task.json").write_text(json.dumps(side))
        r = cli("adapters", "register", peft_dirs[name], "--name", f"r{i}", "--description", f"{name} reviews",
                "--task", d / "reviews.jsonl", "--base", tiny_bert)
        assert r.exit_code == 0, r.output
    _fails(cli, ["router", "fit", "rt", "--router", "token-gate", "--adapters", "r0,r1", "--steps", "1"], 2,
           "tasks are both named 'reviews'", str(tmp_path / "v0" / "reviews.jsonl"), str(tmp_path / "v1" / "reviews.jsonl"))
    v0, v1 = tmp_path / "v0" / "reviews.jsonl", tmp_path / "v1" / "reviews.jsonl"
    # the same two files given with --tasks, to a jointly trained router (it said "a task is listed twice")
    _fails(cli, ["router", "fit", "rj", "--router", "mixer", "--tasks", f"{v0},{v1}", "--base", tiny_bert, "--steps", "1"],
           2, "two tasks in --tasks are both named 'reviews'", str(v0), str(v1), "sidecar 'name'")
    _fails(cli, ["router", "fit", "rj", "--router", "mixer", "--tasks", f"{v0},{v0}", "--base", tiny_bert, "--steps", "1"],
           2, f"--tasks names '{v0}' twice")
    _fails(cli, ["router", "fit", "rt", "--router", "token-gate", "--adapters", "r0,r1", "--tasks", f"{v1},{v0}",
                 "--steps", "1"], 2, "two adapters' tasks are both named 'reviews': r0 (", str(v0), str(v1))


def test_retrieval_over_two_bases_answers_each_query_on_its_own_base(two_bases, tmp_path):
    """A batch was routed among the adapters of its single best hit's base, so a query's adapter (and model)
    depended on its neighbours and on --batch-size (sweep 35): each query goes to its own nearest's base."""
    import json

    q = tmp_path / "q.txt"
    q.write_text("flight plane gate seat crew bag delayed late lost great\na llama adapter\n")
    whole = json.loads(two_bases("query", "--input", q, "--json").output)
    alone = json.loads(two_bases("query", "--input", q, "--json", "--batch-size", "1").output)
    names = [[a["name"] for a in r["adapters"]] for r in whole]
    assert names == [[a["name"] for a in r["adapters"]] for r in alone] == [["flights-lora"], ["llama-lora"]], names
