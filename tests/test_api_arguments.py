"""The Python API's boundary: an argument of the wrong type, a string where a list of names is due, an
unknown option, all refused in one line (UserInputError naming the argument) before anything runs, and
the registry left as it was. Before, these ended in TypeError, AttributeError, sqlite3's
ProgrammingError, or a string split into characters ("no adapter named 'd'")."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

from loraplex import api
from loraplex.errors import UserInputError
from tests.conftest import make_peft_adapter, registry_state


@pytest.fixture
def one_adapter(settings, tiny_bert, tmp_path):
    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "peft")
    api.register(peft_dir, name="dp", description="airline tweets", task="airline", base=str(tiny_bert),
                 settings=settings)
    return settings


DEMO_SPEC = str(Path(__file__).resolve().parents[1] / "examples" / "streams" / "demo.yaml")
CALLS = [
    # a dict passed strict mode (a model is built from it) and then died as AttributeError (sweep 15)
    (lambda s: api.list_adapters(settings={"home": str(s.home)}), "list_adapters(): settings must be Settings | None, got dict"),
    (lambda s: api.show("dp", {"home": str(s.home)}), "show(): settings must be Settings | None, got dict"),
    # an OS error about a path the caller gave was a raw FileNotFoundError / NotADirectoryError (sweep 15)
    (lambda s: api.export("dp", "/proc/loraplex-no-such/x", settings=s), "No such file or directory (/proc/loraplex-no-such"),
    (lambda s: api.export("dp", s.home / "blobs" / "x", settings=s), "inside the registry home"),  # was written there
    (lambda s: api.load_routed_model("retrieval", settings=s), "give the query texts, or the adapters"),  # "base None"
    # options passed on to a pydantic config were coerced from text, against the API's strict types (sweep 15)
    (lambda s: api.train("airline", name="t5", steps="5", settings=s), "train(): steps must be int, got str '5'"),
    (lambda s: api.train("airline", name="t5", lr="0.01", settings=s), "train(): lr must be float, got str '0.01'"),
    (lambda s: api.query(["x"], config={"top_k": "2"}, settings=s), "query(): config top_k must be int, got str '2'"),
    (lambda s: api.query(["x"], router="auto", config={"route_threshold": "0.3"}, settings=s),
     "query(): config route_threshold must be float, got str '0.3'"),
    (lambda s: api.fit_router("r9", router="mixer", adapters=["dp", "dp"], config={"top_k": "2"}, settings=s),
     "fit_router(): config top_k must be int, got str '2'"),
    (lambda s: api.forget("airline", adapters=["dp"], alpha="1", settings=s), "forget(): alpha must be float, got str '1'"),
    # an empty list read as "all", an unknown member as "at least 2 adapters, got 1" (sweep 15)
    (lambda s: api.fit_generator("g", method="sg-lora", adapters=[], settings=s), "the adapter list is empty"),
    (lambda s: api.fit_generator("g", method="sg-lora", adapters=["nope"], settings=s), "no adapter named 'nope'"),
    (lambda s: api.run_stream(str(Path(__file__).parent.parent / "examples" / "streams" / "reference.yaml"),
                              out=__file__, settings=s), "Not a directory"),
    (lambda s: api.show(["dp"], settings=s), "show(): name must be str, got list"),
    (lambda s: api.show(Path("dp"), settings=s), "show(): name must be str, got PosixPath"),
    (lambda s: api.remove(["dp"], settings=s), "remove(): name must be str"),
    (lambda s: api.search(5, settings=s), "search(): text must be str, got int 5"),
    (lambda s: api.search("cars", k="3", settings=s), "search(): k must be int, got str '3'"),
    (lambda s: api.search("cars", k=True, settings=s), "search(): k must be int, got bool True"),
    (lambda s: api.search("cars", k=2.5, settings=s), "search(): k must be int, got float 2.5"),
    (lambda s: api.export(None, "/tmp/x", settings=s), "export(): name must be str, got NoneType"),
    (lambda s: api.export("dp", 5, settings=s), "export(): out_dir must be str | Path, got int 5"),
    (lambda s: api.register(None, name="a", description="b", settings=s), "register(): path must be str | Path"),
    (lambda s: api.register("/tmp", name="a", description=["d"], settings=s), "register(): description must be str | None, got list"),
    (lambda s: api.register("/tmp", name=5, description="d", settings=s), "register(): name must be str, got int 5"),
    (lambda s: api.list_tasks(["news-topics"]), "list_tasks(): family must be str | None, got list"),
    (lambda s: api.load_adapted("dp", settings=s), "load_adapted(): names must be a list of strings"),
    (lambda s: api.load_adapted([5], settings=s), "(names[0] is int 5)"),
    (lambda s: api.evaluate("dp", task=3, settings=s), "evaluate(): task must be str | Path | None, got int 3"),
    (lambda s: api.evaluate("dp", task="airline", bogus=1, settings=s), "evaluate(): unknown option 'bogus' (options: task,"),
    (lambda s: api.train(None, name="x", settings=s), "train(): task must be str"),
    (lambda s: api.fit_generator("g", method="sg-lora", bogus=1, settings=s), "fit_generator(): unknown option 'bogus'"),
    (lambda s: api.fit_router("r", router="token-gate", adapters="dp,cp", settings=s),
     "fit_router(): adapters must be a list of strings (Sequence[str]), not one string 'dp,cp'"),
    (lambda s: api.generate_adapter(5, generator="g", name="n", settings=s), "generate_adapter(): description must be str"),
    (lambda s: api.generate_adapter("d", generator="g", name="n", bogus=1, settings=s), "generate_adapter(): unknown option 'bogus'"),
    (lambda s: api.generate_adapter("d", generator="g", name="n", examples=[["a", "b"]], settings=s),
     "generate_adapter(): examples must be"),
    (lambda s: api.query("good car", settings=s), "query(): texts must be a list of strings"),
    (lambda s: api.query([5], settings=s), "(texts[0] is int 5)"),
    (lambda s: api.query(["a"], adapters="dp", settings=s), "query(): adapters must be a list of strings"),
    (lambda s: api.query(["a"], batch_size="2", settings=s), "query(): batch_size must be int, got str '2'"),
    (lambda s: api.query(["a"], config="top_k=2", settings=s), "query(): config must be dict[str, Any] | None"),
    (lambda s: api.query(["a"], bogus=1, settings=s), "query(): unknown option 'bogus'"),
    (lambda s: api.answer_each("ab", "dp", settings=s), "answer_each(): texts must be a list of strings"),
    (lambda s: api.answer_each(["fine", " "], ["dp", "dp"], settings=s), "text 2 is empty"),
    (lambda s: api.run_stream(None, settings=s), "run_stream(): spec must be str | Path"),
    (lambda s: api.stream_report(5), "stream_report(): run_dir must be str | Path, got int 5"),
    (lambda s: api.forget("t", labels="ab", settings=s), "forget(): labels must be a list of strings"),
    (lambda s: api.list_adapters("x"), "list_adapters(): settings must be Settings | None, got str 'x'"),
    (lambda s: api.search(settings=s), "search(): missing argument 'text'"),
    # a keyword-only one too, not "name must be str, got ArgsKwargs(...)" (sweep 55)
    (lambda s: api.train("airline", settings=s), "train(): missing argument 'name'"),
    (lambda s: api.generate_adapter("desc", name="n", settings=s), "generate_adapter(): missing argument 'generator'"),
    # an empty path is refused, not read as the working directory (sweep 55: register("") registered the cwd)
    (lambda s: api.register("", name="rr", description="d", settings=s), "a path is empty"),
    (lambda s: api.stream_report(""), "a path is empty"),
    (lambda s: api.run_stream(" ", settings=s), "a path is empty"),
    (lambda s: api.generate_adapter("d", generator="g", name="n", examples="", settings=s), "a path is empty"),
    # sweep 69: out="" wrote a stream's run into the working directory; a NUL byte was the OS's raw ValueError;
    # an empty label list erased the whole task
    (lambda s: api.run_stream(DEMO_SPEC, out="", settings=s), "a path is empty"),
    (lambda s: api.run_stream(DEMO_SPEC, resume="", settings=s), "a path is empty"),
    (lambda s: api.register("a\x00b", name="rr", description="d", settings=s), "path 'a\\x00b' holds a NUL byte"),
    (lambda s: api.export("dp", "a\x00b", settings=s), "path 'a\\x00b' holds a NUL byte"),
    (lambda s: api.forget("t", labels=[], settings=s), "the label list is empty: name the labels to erase"),
    (lambda s: api.show("dp", bogus=1, settings=s), "show(): unknown option 'bogus' (it takes no options)"),
    (lambda s: api.query(["late flight"], base="", settings=s), "the base is empty"),  # it answered (sweep 69)
    (lambda s: api.load_routed_model(router="", adapters=["dp"], settings=s), "router must name a router"),
    (lambda s: api.fit_generator("g", method="sg-lora", config={"top_k": "2"}, settings=s),
     "fit_generator(): config top_k must be int, got str '2'"),
]


@pytest.mark.parametrize("i", range(len(CALLS)))
def test_wrong_arguments_are_named_in_one_line(one_adapter, i):
    call, match = CALLS[i]
    before = registry_state(one_adapter.home)
    with pytest.raises(UserInputError) as exc:
        call(one_adapter)
    assert match in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)
    assert registry_state(one_adapter.home) == before


def test_a_message_quoting_a_huge_argument_is_cut_as_the_cli_cuts_it(one_adapter):
    """`api.show("x" * 100_000)` raised AdapterNotFound quoting the whole name (a 100 kB log line; sweep 69): the
    API's messages are cut at the CLI's length, saying how long they were."""
    from loraplex.errors import MAX_MESSAGE, AdapterNotFound

    with pytest.raises(AdapterNotFound) as exc:
        api.show("x" * 100_000, settings=one_adapter)
    msg = str(exc.value)
    assert len(msg) <= MAX_MESSAGE and msg.startswith("no adapter named 'xxx") and msg.endswith(" characters)"), msg


def test_right_arguments_still_pass(one_adapter):
    """The check does not refuse what the functions take: a tuple of names, a Path, keyword options."""
    assert [r.name for r in api.list_adapters(one_adapter)] == ["dp"]
    assert api.show("dp", settings=one_adapter)["name"] == "dp"
    hits = api.search("airline", k=1, settings=one_adapter)
    assert [h["name"] for h in hits] == ["dp"]
    out = api.query(("late flight", "lost bag"), adapters=("dp",), batch_size=1, settings=one_adapter)
    assert len(out) == 2


def _public_functions():
    return [(n, f) for n, f in vars(api).items() if inspect.isfunction(f) and not n.startswith("_")
            and f.__module__ == api.__name__]


def test_every_public_function_checks_its_arguments():
    """A new API function without the boundary check would take any type again."""
    unchecked = [n for n, f in _public_functions() if not hasattr(f, "__wrapped__")]
    assert not unchecked, unchecked


def test_every_api_annotation_resolves():
    """An annotation the checker cannot resolve is checked as Any, i.e. not at all: every parameter of
    every API function must name real types."""
    for name, fn in _public_functions():
        for p in inspect.signature(fn.__wrapped__).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                continue
            assert p.annotation is not inspect.Parameter.empty, (name, p.name)
            eval(p.annotation, vars(api))  # NameError if it names a type imported only for type checking


def test_empty_strings_are_not_not_given(one_adapter, tiny_bert, tmp_path):
    """Sweep 15: train('') read the current directory, register(base='') used the adapter's own base,
    forget(name='') made up a name; a router named as an adapter was refused only after its whole fit."""
    s = one_adapter
    before = registry_state(s.home)
    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "peft2")
    for call, said in [
        (lambda: api.train("", name="t", base=str(tiny_bert), steps=1, settings=s), "the task is empty"),
        (lambda: api.register(peft_dir, name="r2", description="d", base="", settings=s), "the base is empty"),
        (lambda: api.forget("airline", adapters=["dp"], name="", steps=1, settings=s), "name must not be empty"),
        (lambda: api.fit_router("dp", router="mixer", adapters=["dp", "dp"], steps=1, settings=s),
         "an adapter named 'dp' already exists: a router of that name"),
    ]:
        with pytest.raises(UserInputError, match=said):
            call()
    assert registry_state(s.home) == before


def test_an_export_to_a_tilde_path_lands_in_the_home_folder(one_adapter, tmp_path, monkeypatch):
    """`~/x` made a folder named `~` in the current directory (sweep 15); every other path expands it."""
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    monkeypatch.chdir(tmp_path)
    out = api.export("dp", "~/exported", settings=one_adapter)
    assert Path(out) == tmp_path / "me" / "exported" and (Path(out) / "adapter_config.json").is_file()
    assert not (tmp_path / "~").exists()


def test_settings_changed_without_validation_are_checked_at_the_boundary(tmp_path):
    """Settings.model_copy(update=...) skips pydantic's validation: home=None was a raw TypeError and an unknown
    device was blamed on the base model (sweep 26). The api checks the settings it is given again."""
    from loraplex.errors import UserInputError
    from loraplex.settings import Settings

    s = Settings.load(home=tmp_path / "h", embedder="hash")
    for update, said in (({"home": None}, "settings.home=None"), ({"device": "gpu"}, "settings.device='gpu'"),
                         ({"dtype": "int8"}, "settings.dtype='int8'")):
        with pytest.raises(UserInputError, match=re.escape(said)):
            api.list_adapters(s.model_copy(update=update))
    assert api.list_adapters(s) == []


def test_numpy_integers_and_other_sequences_are_taken_as_what_they_are(tmp_path):
    """The strict check refused a NumPy integer ("k must be int") and a UserList ("must be Sequence[str]"),
    what a notebook passes (sweep 26); they are taken as int and list. A str is still not a number."""
    from collections import UserList

    import numpy as np

    from loraplex.settings import Settings

    s = Settings.load(home=tmp_path / "h", embedder="hash")
    assert api.search("flights", k=np.int64(2), settings=s) == []
    # inside a config dict too: refused as "top_k must be int, got int64" by query and fit_router (sweep 40)
    with pytest.raises(UserInputError, match="no adapters|empty|registry"):
        api.query(["late flight"], router="retrieval", config={"top_k": np.int64(2)}, settings=s)
    assert api.list_tasks(family=None)  # unchanged
    with pytest.raises(UserInputError, match="k must be int"):
        api.search("flights", k="2", settings=s)
    with pytest.raises(UserInputError, match="k must be int"):
        api.search("flights", k=np.bool_(True), settings=s)
    with pytest.raises(UserInputError, match="no adapters|empty|registry"):
        api.query(UserList(["my flight"]), router="retrieval", settings=s)
    # a NumPy bool is a bool ("overwrite must be bool, got bool np.True_"), and list items are made plain as a
    # dict's values are (`keep=list(np.argsort(...))` was "keep must be Sequence[int]"; sweep 55)
    assert api.check(repair=(np.arange(3) > 5).any(), settings=s) is not None
    with pytest.raises(UserInputError) as exc:
        api.load_routed_model("retrieval", None, shortlist=1, keep=list(np.argsort([3, 1]))[:1], settings=s)
    assert "keep must be" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("call, said", [
    (lambda s, p: api.search("\ud800", k=1, settings=s), r"search\(\): text is not valid UTF-8"),
    (lambda s, p: api.query(["good \ud800 flight"], adapters=["dp"], settings=s), r"query\(\): texts\[0\] is not valid"),
    (lambda s, p: api.show("\ud800", s), r"show\(\): name is not valid"),
    (lambda s, p: api.remove("\udcff", s), r"remove\(\): name is not valid"),
    (lambda s, p: api.query(["x"], router="auto", config={"generator": "g\ud800"}, settings=s),
     r"query\(\): config\['generator'\] is not valid"),
    (lambda s, p: api.register(p, name="r1", description="d \ud800", base="minilm", settings=s),
     r"register\(\): description is not valid"),
    # a task file named by a Path whose name is not UTF-8: a raw UnicodeEncodeError from sqlite (sweep 42)
    (lambda s, p: api.evaluate("dp", task=Path(os.fsdecode(b"/tmp/t\xff.jsonl")), limit=2, settings=s),
     r"evaluate\(\): task is not valid"),
    (lambda s, p: api.train(Path(os.fsdecode(b"/tmp/t\xff.jsonl")), name="t2", steps=1, settings=s),
     r"train\(\): task is not valid"),
    (lambda s, p: api.fit_router("r", router="mixer", tasks=[Path(os.fsdecode(b"/tmp/t\xff.jsonl"))], settings=s),
     r"fit_router\(\): tasks\[0\] is not valid"),
])
def test_lone_surrogates_are_refused_at_the_boundary(one_adapter, tiny_bert, tmp_path, call, said):
    """A str holding a lone surrogate (json.loads('"\\ud800"')) passed the type check and was a TypeError from
    the tokenizer or a UnicodeEncodeError from sqlite (sweep 40); the CLI and the server refused it already."""
    peft_dir = make_peft_adapter(tiny_bert, tmp_path / "peft2")
    before = registry_state(one_adapter.home)
    with pytest.raises(UserInputError, match=said):
        call(one_adapter, peft_dir)
    assert registry_state(one_adapter.home) == before


def test_a_description_with_a_lone_surrogate_is_refused_in_one_line():
    """validate_description's own refusal re-encoded the bad character with surrogateescape, which only takes
    U+DC80-DCFF: '\\ud800' raised a second UnicodeEncodeError from inside the except (sweep 40)."""
    from loraplex.tasks import validate_description

    with pytest.raises(UserInputError, match=r"lone surrogate '\\ud800' at character 2"):
        validate_description("d \ud800")
    with pytest.raises(UserInputError, match=r"undecodable byte b'\\xff' at character 2"):
        validate_description("d \udcff")


def test_labels_given_as_an_iterator_are_read_once():
    """checked_labels checked an iterator's items (consuming it) and then took its len(): a raw TypeError
    from answer(labels=iter([...])), where texts given the same way were taken (sweep 40)."""
    from loraplex.tasks import checked_labels, checked_texts

    assert checked_labels(iter(["good", "bad"])) == ("good", "bad")
    assert checked_labels(x for x in [" good", "bad "]) == ("good", "bad")
    with pytest.raises(UserInputError, match="labels must be a list of strings, got one string"):
        checked_labels("good")
    with pytest.raises(UserInputError, match="labels must be a list of strings, got int"):
        checked_labels(5)
    with pytest.raises(UserInputError, match="at most"):
        checked_labels(str(i) for i in range(10**9))  # read no further than one past the bound
    with pytest.raises(UserInputError, match="label 1 is not valid UTF-8 text"):  # was "an empty label name"
        checked_labels(["\ud800", "bad"])
    with pytest.raises(UserInputError, match="text 2 is not valid UTF-8 text"):
        checked_texts(["fine", "bad \udcff"])


@pytest.mark.parametrize("kwargs, said", [
    ({"share_base": True}, "unknown option 'share_base'"),  # it handed out the process cache's own base
    ({"base": "minilm"}, "base choose adapters for a router"),
    ({"texts": ["x"], "labels": ["a", "b"]}, "texts, labels choose adapters for a router"),
    ({"keep": [0]}, "keep choose adapters for a router"),
])
def test_load_routed_model_refuses_what_it_would_drop(one_adapter, kwargs, said):
    """Without a router, base, labels, texts and keep were dropped without a word, and share_base=True
    broke the README's "your own model" (sweep 40)."""
    with pytest.raises(UserInputError, match=re.escape(said)):
        api.load_routed_model(None, ["dp"], settings=one_adapter, **kwargs)


def test_load_routed_model_labels_and_keep_go_with_a_shortlist(one_adapter):
    for k, v in (("labels", ["a", "b"]), ("keep", [0])):
        with pytest.raises(UserInputError, match=f"{k} .* give shortlist too"):
            api.load_routed_model("retrieval", ["dp"], settings=one_adapter, **{k: v})


def test_a_failed_allocation_is_named_as_the_cli_names_it(monkeypatch):
    """The CPU allocator's RuntimeError ("can't allocate memory") left the api as itself, where the CLI prints it
    as one line (sweep 40: a forget step on smollm2 under a memory limit). The api raises OutOfMemory."""
    from loraplex import data
    from loraplex.errors import OutOfMemory

    def boom(family):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 235929600 bytes")

    monkeypatch.setattr(data, "list_tasks", boom)
    with pytest.raises(OutOfMemory, match=r"out of memory \(RuntimeError: .*can't allocate memory.*list_tasks\(\) needed"):
        api.list_tasks()
    monkeypatch.setattr(data, "list_tasks", lambda family: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug stays a bug
        api.list_tasks()


def test_a_loaded_models_failed_allocation_is_named_too(one_adapter, monkeypatch):
    """The model load_routed_model returns raised the allocator's raw RuntimeError where api.query raised
    OutOfMemory for the same texts (sweep 42)."""
    from loraplex.errors import OutOfMemory
    from loraplex.router.model import RoutedModel

    model = api.load_routed_model("retrieval", ["dp"], settings=one_adapter)

    def boom(self, texts, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 603979776 bytes")

    monkeypatch.setattr(RoutedModel, "route", boom)
    with pytest.raises(OutOfMemory, match=r"RoutedModel.answer\(\) needed more memory"):
        model.answer(["a late flight"])


def test_a_task_file_may_be_named_by_a_path(one_adapter, tmp_path, monkeypatch):
    """train, evaluate, forget and fit_router(tasks=...) refused a pathlib.Path to a task file ("task must be str,
    got PosixPath"), where every other path argument took one (sweep 40). They take it as its string."""
    from loraplex.continual import fit as cfit
    from loraplex.router import fit as rfit

    seen = []
    monkeypatch.setattr(cfit, "train_adapter", lambda reg, s, task, **kw: seen.append(task))
    monkeypatch.setattr(cfit, "evaluate_adapter", lambda reg, s, name, task=None, **kw: seen.append(task))
    monkeypatch.setattr(rfit, "fit_router", lambda reg, s, name, method, tasks=None, **kw: seen.append(tasks))
    p = tmp_path / "rev.jsonl"
    api.train(p, name="rv", settings=one_adapter)
    api.evaluate("dp", task=p, settings=one_adapter)
    api.fit_router("rr", router="mixer", tasks=[p, "airline"], settings=one_adapter)
    assert seen == [str(p), str(p), [str(p), "airline"]]
    with pytest.raises(UserInputError, match=re.escape("task must be str | Path, got int")):
        api.train(5, name="rv", settings=one_adapter)


def test_arguments_nested_past_any_option_are_refused_not_a_recursion_error(one_adapter):
    """Sweep 42: a config dict or an option nested thousands of levels deep was a raw RecursionError from the
    boundary's own walks over them."""
    d = cur = {}
    for _ in range(3000):
        cur["a"] = {}
        cur = cur["a"]
    deep = cur = []
    for _ in range(3000):
        cur.append([])
        cur = cur[0]
    with pytest.raises(UserInputError, match="nested more than 64 levels deep"):
        api.query(["hello"], router="retrieval", config=d, settings=one_adapter)
    with pytest.raises(UserInputError, match=r"train\(\): tasks is a value nested more than 64 levels deep"):
        api.train("airline", name="zz", tasks=deep, settings=one_adapter)


def test_forget_takes_gs_lora_options_as_a_config_dict(one_adapter):
    """GS-LoRA's options as `config` (what the CLI's --set makes): a key that is the request's own option or
    no GS-LoRA option is named, before anything is read (sweep 42: the CLI's keywords collided)."""
    for config, said in (({"seed": 1}, "config['seed']: not a GS-LoRA option but the request's own: give seed=..."),
                         ({"nosuch": 1}, "config['nosuch']: unknown GS-LoRA option"),
                         ({"retain_budget": "x"}, "retain_budget must be int")):
        with pytest.raises(UserInputError, match=re.escape(said)):
            api.forget("airline", config=config, settings=one_adapter)
    with pytest.raises(UserInputError, match="given both as a keyword and in config"):
        api.forget("airline", config={"retain_budget": 8}, retain_budget=8, settings=one_adapter)
