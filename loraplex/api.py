"""The public Python API: the functions the CLI calls. No printing, no typer.

Every function that uses the registry or a model takes `settings` (default: `Settings.load()`, i.e. the
environment; `list_models`, `list_tasks`, `generator_methods` and `stream_report` need none). Every
function raises `loraplex.errors.LoraplexError` subclasses with a one-line message on bad input, a wrong argument type
included: each checks its arguments against its own signature, and the options it passes on against the
part's, before anything runs (`_checked`, `_delegate`: "3" is not a number, a string not a list of names). Functions that write
validate everything first and write last, in one registry transaction, so a failure leaves the
registry as it was.

    from loraplex import api
    rec = api.register("path/to/peft_dir", name="airline-v1", description="...", base="minilm")
    api.search("complaints about flights", k=3)
    res = api.train("airline", name="airline-v2", steps=100)
    api.evaluate("airline-v2", task="airline")

Each function is a delegate to the part that owns the job (registry/, continual/, router/,
generators/). It names the arguments that say what to act on; the part's own options, with their
defaults, pass through `**options` and are documented once, at the function the docstring names.
Nothing here is imported back by a part (tests/test_architecture.py). The parts are imported inside
the functions on purpose: this module is on the CLI's path, and a command pays only for the part it
uses (`loraplex adapters list` never imports torch or lightning).
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import inspect
import numbers
import os
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from loraplex.settings import Settings
from loraplex.tasks import MAX_NESTING  # levels of dicts and lists an argument may hold

if TYPE_CHECKING:
    from loraplex.continual.fit import TrainResult
    from loraplex.continual.stream import StreamResult
    from loraplex.registry.record import AdapterRecord
    from loraplex.registry.store import Registry
    from loraplex.router.fit import RouterFitResult
    from loraplex.router.model import RoutedModel


F = TypeVar("F", bound=Callable[..., Any])
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlist = 4


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {_SHORT.repr(value)}"


@functools.cache
def _validator(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A pydantic validator of `fn`'s arguments in strict mode (no coercion: "3" is not an int, True not
    a number, a str not a list of names), built from its annotations on first use. An annotation that
    names a type only imported for type checking (Registry, ...) is checked as Any."""
    from pydantic import ConfigDict, validate_call

    sig = inspect.signature(fn)
    hints: dict[str, Any] = {}
    for p in sig.parameters.values():
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, getattr(inspect.unwrap(fn), "__globals__", {}))  # noqa: S307 - its own annotation (a decorated one: the function it wraps)
            except Exception:
                ann = Any
        hints[p.name] = Any if ann is inspect.Parameter.empty else ann

    def shim(*args: Any, **kwargs: Any) -> None:
        return None

    shim.__signature__ = sig.replace(parameters=[p.replace(annotation=hints[p.name]) for p in sig.parameters.values()],
                                     return_annotation=inspect.Signature.empty)
    shim.__annotations__ = dict(hints)
    shim.__name__ = fn.__name__
    return validate_call(config=ConfigDict(strict=True, arbitrary_types_allowed=True))(shim)


def _check_arguments(where: str, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse a call whose arguments do not fit `fn`'s signature, in one line naming the argument
    (UserInputError), before anything runs: the API's one boundary check of argument types."""
    from pydantic import ValidationError

    from loraplex.errors import UserInputError

    params = list(inspect.signature(fn).parameters.values())
    given = {**{p.name: a for p, a in zip(params, args)}, **kwargs}
    s = given.get("settings")
    if s is not None and not isinstance(s, Settings):  # strict mode still builds a model from a dict, then drops it
        raise UserInputError(f"{where}(): settings must be Settings | None, got {type(s).__name__} {_SHORT.repr(s)} "
                             "(Settings.load(home=...) makes one)")
    if s is not None:  # model_copy(update=...) and model_construct skip validation: checked again, as load checks
        try:
            Settings.model_validate(s.model_dump())
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            raise UserInputError(f"{where}(): settings.{key}={getattr(s, key, None)!r}: "
                                 f"{err['msg'].removeprefix('Value error, ')}") from None
    try:
        _validator(fn)(*args, **kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        params = list(inspect.signature(fn).parameters.values())
        loc = list(err["loc"])
        head = loc[0] if loc else "?"
        if isinstance(head, int):
            head = params[head].name if head < len(params) else f"#{head + 1}"
        kind = err["type"]
        if kind in ("missing_argument", "missing_keyword_only_argument", "missing_positional_only_argument"):
            raise UserInputError(f"{where}(): missing argument {head!r}") from None
        if kind == "unexpected_keyword_argument":
            known = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name != "settings"]
            takes = f"options: {', '.join(known)}" if known else "it takes no options"  # not "(options: )": sweep 69
            raise UserInputError(f"{where}(): unknown option {head!r} ({takes})") from None
        if kind in ("unexpected_positional_argument", "multiple_argument_values"):
            raise UserInputError(f"{where}(): {err['msg'].lower()} ({head!r})") from None
        value = kwargs.get(head) if head in kwargs else next(
            (a for p, a in zip(params, args) if p.name == head), err.get("input"))
        ann = next((p.annotation for p in params if p.name == head), None)
        want = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        if kind == "sequence_str":
            raise UserInputError(f"{where}(): {head} must be a list of strings ({want}), not one string "
                                 f"{_SHORT.repr(value)}") from None
        item = "".join(f"[{i}]" for i in loc[1:] if isinstance(i, int))
        detail = f" ({head}{item} is {_shown(err.get('input'))})" if item else ""
        raise UserInputError(f"{where}(): {head} must be {want}, got {_shown(value)}{detail}") from None


def _check_text(where: str, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse a string argument (or one inside a list or dict argument) that holds a lone UTF-16 surrogate
    (`json.loads('"\\ud800"')`, a byte read with surrogateescape): no tokenizer, table or file takes it, and
    it failed deep inside with a TypeError (sweep 40). The CLI refuses it in argv, the server in the body."""
    from loraplex.errors import UserInputError
    from loraplex.tasks import lone_surrogate

    named = {**{p.name: a for p, a in zip(inspect.signature(fn).parameters.values(), args)}, **kwargs}
    for name, value in named.items():
        try:
            at = lone_surrogate(value)
        except UserInputError as exc:  # nested too deeply
            raise UserInputError(f"{where}(): {name} is {exc}") from None
        if at is not None:
            raise UserInputError(f"{where}(): {name}{''.join(f'[{p!r}]' for p in at)} is not valid UTF-8 text "
                                 "(it holds a lone surrogate, such as a JSON \\ud800 escape or a byte that is not UTF-8)")


def _fs(task: Any) -> Any:
    """A task named by a path (a `pathlib.Path` to a task file) as the string the parts take (sweep 40)."""
    return os.fspath(task) if isinstance(task, os.PathLike) else task


def _plain(value: Any, depth: int = 0) -> Any:
    """A value the strict check would refuse only for its class, as the plain Python value it is: a NumPy
    integer, float or bool (what `np.argmax`, a DataFrame's shape and `(a > 0).any()` give) as int, float or
    bool, also inside lists and dicts, a Sequence that is not a list or tuple (a UserList) as a list. Not a
    coercion: "3" stays a str, True a bool (sweep 26)."""
    if isinstance(value, dict):  # a config dict's values too (`config={"top_k": np.int64(2)}`; sweep 40)
        if depth >= MAX_NESTING:  # a RecursionError otherwise (sweep 42)
            from loraplex.errors import UserInputError
            raise UserInputError(f"a dict argument is nested more than {MAX_NESTING} levels deep")
        plain = {k: _plain(v, depth + 1) for k, v in value.items()}
        if any(plain[k] is not v for k, v in value.items()):
            value = copy.copy(value)  # its own class kept (the CLI's SetOptions says "--set" in refusals)
            value.update(plain)
        return value
    if isinstance(value, (list, tuple)):  # their items too (`keep=list(np.argsort(...))`; sweep 55)
        if depth >= MAX_NESTING:  # left as it is: the check names the option nested too deep
            return value
        items = [_plain(v, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if type(value) in (list, tuple) else items
    if isinstance(value, (bool, int, float, str, bytes)) or value is None:
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # was "must be bool, got bool"
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, collections.abc.Sequence):
        return list(value)
    return value


def _checked(fn: F) -> F:
    """The API function `fn` with its arguments checked against its signature first (`_check_arguments`)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        from loraplex.errors import MAX_MESSAGE, LoraplexError, as_out_of_memory, cut_message, os_error

        args, kwargs = tuple(_plain(a) for a in args), {k: _plain(v) for k, v in kwargs.items()}
        _check_arguments(fn.__name__, fn, args, kwargs)
        _check_text(fn.__name__, fn, args, kwargs)
        try:
            return fn(*args, **kwargs)
        except OSError as exc:  # a path the caller gave (an export into /proc, a run directory that is a file)
            raise os_error(exc) from exc
        except LoraplexError as exc:  # its message cut as the CLI cuts it: a lookup of a 100,000-character name
            if len(str(exc)) > MAX_MESSAGE:  # echoed the whole name (sweep 69)
                exc.args = (cut_message(str(exc)),)
            raise
        except Exception as exc:  # a failed allocation: the machine's state, named as the CLI names it (sweep 40)
            oom = as_out_of_memory(exc, f"{fn.__name__}()")
            if oom is None:
                raise
            raise oom from exc

    return call  # type: ignore[return-value]


def _router_config(where: str, router: Any, config: Any) -> None:
    """`config` of a query: retrieval's options (no router, `retrieval`) or auto's, typed (`_typed`)."""
    if router == "auto":
        from loraplex.router.auto import AutoConfig

        _typed(where, AutoConfig, config, field="config ")
    elif router in (None, "retrieval"):
        from loraplex.router.base import ROUTERS

        _typed(where, ROUTERS.get("retrieval").config_cls, config, field="config ")


def _typed(where: str, model: Any, values: dict[str, Any] | None, *, field: str = "") -> None:
    """Options the API passes on to a pydantic config (`**options` of train, forget, fit_router; a `config`
    dict), checked for type as the API's own arguments are: strict, so "5" is not a number there either
    (the config itself is lax: a stream spec's YAML reads `1e-3` as text). Ranges are left to the config."""
    if not values or not isinstance(values, dict) or model is None:
        return
    from pydantic import ValidationError

    from loraplex.errors import UserInputError

    known = {k: v for k, v in values.items() if k in getattr(model, "model_fields", {})}
    try:
        model.model_validate(known, strict=True)
    except ValidationError as exc:
        for e in exc.errors():
            if e["type"] in ("int_type", "float_type", "bool_type", "string_type") and len(e["loc"]) == 1:
                # the CLI's `--set` dict (cli._options.SetOptions; the API does not import the CLI)
                from_set = type(values).__name__ == "SetOptions"
                named = f"--set {e['loc'][0]}" if from_set else f"{where}(): {field}{e['loc'][0]}"
                raise UserInputError(f"{named} must be {e['type'][:-5]}, got "
                                     f"{type(e['input']).__name__} {_SHORT.repr(e['input'])}") from None


def _delegate(where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` with the options passed through `**options` checked against `fn`'s
    signature first: an unknown option or a value of the wrong type is named, not a TypeError."""
    _check_arguments(where, fn, args, kwargs)
    return fn(*args, **kwargs)


@_checked
def open_registry(settings: Settings | None = None) -> "Registry":
    """The registry of `settings` (default: the environment's)."""
    from loraplex.registry.store import Registry
    return Registry.open(settings)


def _open(settings: Settings | None) -> "tuple[Registry, Settings]":
    """The registry and the settings a part's job takes (default: the environment's)."""
    s = settings or Settings.load()
    return open_registry(s), s


# ---- the registry: adapters in and out (registry/) -------------------------------------------
@_checked
def register(path: str | Path, *, name: str, description: str | None = None, task: str | None = None,
             base: str | None = None, settings: Settings | None = None) -> "AdapterRecord":
    """Register a PEFT LoRA directory under `name` (`description`, default: the task's own). Returns the
    AdapterRecord."""
    from loraplex.registry.adapters import register_peft
    return register_peft(*_open(settings), path, name=name, description=description, task=task, base=base)


@_checked
def list_adapters(settings: Settings | None = None, *, base: str | None = None,
                  damaged: list[str] | None = None) -> list["AdapterRecord"]:
    """Every registered adapter's record, or those of `base` (`damaged`: a list that collects the damaged
    records' messages, which are then left out instead of failing the whole listing; with `base`, only
    that base's)."""
    from loraplex.models import resolve_base

    want = resolve_base(base).name if base is not None else None
    return open_registry(settings).list_adapters(base=want, damaged=damaged)


@_checked
def show(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """One adapter's record, lineage and snapshots."""
    from loraplex.registry.adapters import describe
    return describe(open_registry(settings), name)


@_checked
def search(text: str, k: int = 5, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The k adapters whose descriptions are nearest to `text` (cosine similarity), best first."""
    from loraplex.registry import adapters
    return adapters.search(open_registry(settings), text, k)


@_checked
def export(name: str, out_dir: str | Path, *, overwrite: bool = False, settings: Settings | None = None) -> Path:
    """Write a registered adapter as a PEFT directory that PeftModel.from_pretrained loads."""
    from loraplex.registry.adapters import export_peft
    return export_peft(open_registry(settings), name, out_dir, overwrite=overwrite)


@_checked
def remove(name: str, settings: Settings | None = None):
    """Remove an adapter (refused while a router or generator uses it)."""
    from loraplex.registry import adapters
    return adapters.remove(open_registry(settings), name)


@_checked
def graph(settings: Settings | None = None) -> dict[str, Any]:
    """The lineage graph as JSON (nodes and edges)."""
    from loraplex.registry.lineage import graph_json
    return graph_json(open_registry(settings))


@_checked
def check(*, repair: bool = False, settings: Settings | None = None):
    """Verify the registry's records, blobs and caches (and repair what can be)."""
    from loraplex.registry.check import check as run_check
    return run_check(open_registry(settings), repair=repair, component_problem=_stored_config_problem)


def _stored_config_problem(rec) -> str | None:
    """What is wrong with a stored router's or generator's configuration (`registry check`), or None."""
    from loraplex.errors import IntegrityError, UnknownComponent
    from loraplex.generators.base import GENERATORS
    from loraplex.router.base import ROUTERS

    try:
        (ROUTERS if rec.kind == "router" else GENERATORS).stored_config(rec.method, rec.config, f"{rec.kind} {rec.name!r}")
    except (IntegrityError, UnknownComponent) as exc:
        return str(exc)
    return None


# ---- models, tasks; one adapter: load, evaluate, train (continual/fit.py) ---------------------
@_checked
def list_models() -> list[dict[str, Any]]:
    """The embedded base models."""
    from loraplex.models import list_models as models
    return models()


@_checked
def list_tasks(family: str | None = None) -> list[dict[str, Any]]:
    """The embedded tasks (of one library family, if given)."""
    from loraplex.data import list_tasks as tasks
    return tasks(family)


@_checked
def load_adapted(names: Sequence[str], settings: Settings | None = None):
    """The adapters' common base with them injected (a bank of E = len(names)): (LoadedBase, records)."""
    from loraplex.router.load import load_adapted as load
    reg, s = _open(settings)
    return load(reg, names, s)


@_checked
def evaluate(name: str | None, *, task: str | Path | None = None, settings: Settings | None = None,
             **options: Any) -> dict[str, Any]:
    """Accuracy of an adapter (name=None: the bare base) on a task's split (default: the adapter's own task)
    (continual.fit.evaluate_adapter)."""
    from loraplex.continual.fit import evaluate_adapter
    return _delegate("evaluate", evaluate_adapter, *_open(settings), name, task=_fs(task), **options)


@_checked
def train(task: str | Path, *, name: str, settings: Settings | None = None, **options: Any) -> "TrainResult":
    """Fine-tune, evaluate and register one LoRA adapter (continual.fit.train_adapter)."""
    from loraplex.continual.fit import train_adapter
    from loraplex.training import TrainConfig

    _typed("train", TrainConfig, options)
    return _delegate("train", train_adapter, *_open(settings), _fs(task), name=name, **options)


# ---- generators (SG-LoRA, ICM-LoRA): an adapter for a new task (generators/workflow.py) -------
@_checked
def fit_generator(name: str, *, method: str, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Fit a generator (e.g. sg-lora) on registered adapters and store it (generators.workflow.fit). Its
    `config` is checked for type as fit_router's is: strict ("2" is not a number; it was stored as 2: sweep 69)."""
    from loraplex.generators import workflow
    from loraplex.generators.base import GENERATORS

    if isinstance(method, str) and method in GENERATORS.names():
        _typed("fit_generator", GENERATORS.get(method).config_cls, options.get("config"), field="config ")
    return _delegate("fit_generator", workflow.fit, *_open(settings), name, method=method, **options)


@_checked
def generate_adapter(description: str, *, generator: str, name: str,
                     examples: str | Path | Sequence[tuple[str, str | None]] | None = None,
                     settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Write an adapter with a stored generator and register it (generators.workflow.generate). `examples`:
    labelled (text, label) rows, or a .jsonl/.csv file of them, read before anything else is checked so a
    bad file is named first."""
    from loraplex.generators import workflow
    rows = workflow.read_examples(examples) if isinstance(examples, (str, Path)) else (examples or [])
    return _delegate("generate_adapter", workflow.generate, *_open(settings), description, generator=generator,
                     name=name, examples=rows, **options)


@_checked
def list_generators(settings: Settings | None = None, *, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """The stored generators' summaries (`damaged`: as `list_routers`)."""
    from loraplex.generators import workflow
    return workflow.list_generators(open_registry(settings), damaged=damaged)


@_checked
def remove_generator(name: str, settings: Settings | None = None):
    """Remove a stored generator."""
    from loraplex.generators import workflow
    return workflow.remove(open_registry(settings), name)


@_checked
def generator_methods() -> dict[str, str]:
    """The generator methods: name -> one-line summary."""
    from loraplex.generators.base import GENERATORS
    return dict(GENERATORS.summaries())


# ---- routing: compose registered adapters at run time (router/) -------------------------------
@_checked
def fit_router(name: str, *, router: str, settings: Settings | None = None, **options: Any) -> "RouterFitResult":
    """Train router `router` (token-gate, mixer, rank), evaluate it, store it (router.fit.fit_router)."""
    from loraplex.router.base import ROUTERS
    from loraplex.router.fit import fit_router as fit
    from loraplex.training import TrainConfig

    _typed("fit_router", TrainConfig, options)
    if router in ROUTERS.names():
        _typed("fit_router", ROUTERS.get(router).config_cls, options.get("config"), field="config ")
    if isinstance(options.get("tasks"), (list, tuple)):
        options["tasks"] = [_fs(t) for t in options["tasks"]]
    return _delegate("fit_router", fit, *_open(settings), name, method=router, **options)


@_checked
def load_routed_model(router: str | None = None, adapters: Sequence[str] | None = None, *,
                      settings: Settings | None = None, **options: Any) -> "RoutedModel":
    """A `RoutedModel` ready to answer and trace queries (router.load.load_routed_model)."""
    from loraplex.errors import UserInputError
    from loraplex.router.load import load_routed_model as load

    known = ("texts", "base", "shortlist", "config", "labels", "keep")
    odd = next((k for k in options if k not in known), None)
    if odd is not None:  # share_base among them: the model returned is the caller's own (sweep 40)
        raise UserInputError(f"load_routed_model(): unknown option {odd!r} (options: {', '.join(known)})")
    given = [k for k in ("texts", "base", "labels", "keep") if options.get(k) is not None]  # each was dropped unsaid
    if router is not None and (not isinstance(router, str) or not router.strip()):  # "" was read as no router
        raise UserInputError(f"load_routed_model(): router must name a router, 'retrieval', or be left out, got "
                             f"{router!r}")  # (sweep 69), where query refused it
    if not router and given:
        raise UserInputError(f"load_routed_model(): {', '.join(given)} choose adapters for a router; without one the "
                             "adapters named are loaded as they are")
    stored = router not in (None, "retrieval")  # retrieval reads texts itself; a stored router only for its shortlist
    if options.get("keep") is not None:  # keep is a shortlist drawn already: texts and labels would draw another
        beside = [k for k in ("texts", "labels") if options.get(k) is not None]  # (silently dropped: sweep 43)
        if beside:
            raise UserInputError(f"load_routed_model(): {', '.join(beside)} draw a shortlist, and keep is one drawn "
                                 "already: give one or the other")
        sl = options.get("shortlist")
        if isinstance(sl, int) and not isinstance(sl, bool) and len(set(options["keep"])) > sl:
            raise UserInputError(f"load_routed_model(): keep names {len(set(options['keep']))} adapters, more than "
                                 f"the shortlist of {sl}")
    for k, does in (("labels", "prefer adapters trained on them"), ("keep", "picks one of shortlist_groups' member sets"),
                    ("texts", "are the queries a shortlist is drawn for")):
        if k in given and options.get("shortlist") is None and (k != "texts" or stored):
            raise UserInputError(f"load_routed_model(): {k} {does} when a stored router's shortlist is drawn: give "
                                 "shortlist too" + (" (retrieval reads a query's labels when it answers: "
                                                    "answer(texts, labels=...))" if k == "labels" else ""))
    _router_config("load_routed_model", router, options.get("config"))
    return _delegate("load_routed_model", load, *_open(settings), router, adapters, **options)


@_checked
def query(texts: Sequence[str], *, router: str | None = None, settings: Settings | None = None,
          **options: Any) -> list[dict[str, Any]]:
    """Answer queries with a routed model, batched: one dict per query (router.query.query)."""
    from loraplex.router.query import query as answer

    _router_config("query", router, options.get("config"))
    return _delegate("query", answer, *_open(settings), texts, router=router, **options)


@_checked
def answer_each(texts: Sequence[str], adapters: Sequence[str], settings: Settings | None = None) -> list[Any]:
    """A heterogeneous batch: row i answered by adapter adapters[i] alone, all rows in one forward pass."""
    from loraplex.router.query import answer_each as each
    return each(*_open(settings), texts, adapters)


@_checked
def evaluate_router(name: str, *, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Routing, routed and oracle accuracy per task of a stored router (router.query.evaluate_router)."""
    from loraplex.router.query import evaluate_router as evaluate_stored
    if isinstance(options.get("tasks"), (list, tuple)):  # task files as paths, as fit_router takes them (sweep 42)
        options["tasks"] = [_fs(t) for t in options["tasks"]]
    return _delegate("evaluate_router", evaluate_stored, *_open(settings), name, **options)


@_checked
def list_routers(settings: Settings | None = None, *, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """The stored routers' summaries as plain JSON values: name, method, base, adapters, routing_accuracy,
    accuracy, created_at (`damaged`: a list that collects the damaged records' messages, which are then left
    out instead of failing the listing). They were the registry's records, which json cannot dump (sweeps 40
    and 55), unlike `list_generators`' rows; `show_router` gives a whole record."""
    return [{"name": r.name, "method": r.method, "base": r.base, "adapters": list(r.members),
             "routing_accuracy": r.metrics.get("routing_accuracy"), "accuracy": r.metrics.get("accuracy"),
             "created_at": r.created_at}
            for r in open_registry(settings).list_components("router", damaged=damaged)]


@_checked
def show_router(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """A stored router's record as JSON."""
    return open_registry(settings).get_component("router", name).model_dump(mode="json")


@_checked
def remove_router(name: str, settings: Settings | None = None):
    """Remove a stored router (its record; None when the record was damaged, removed all the same)."""
    return open_registry(settings).remove_component("router", name)


# ---- continual: streams of tasks and forgetting requests (continual/) -------------------------
@_checked
def run_stream(spec: str | Path, *, settings: Settings | None = None, **options: Any) -> "StreamResult":
    """Run a stream spec, or resume a run (continual.stream.run_stream)."""
    from loraplex.continual.stream import run_stream as run
    return _delegate("run_stream", run, spec, settings=settings, **options)


@_checked
def stream_report(run_dir: str | Path) -> dict[str, Any]:
    """A finished or partial stream run's matrix and metrics: {"run_dir", "matrix", "metrics"}."""
    from loraplex.continual.report import load_report
    return load_report(run_dir)


@_checked
def forget(task: str | Path, *, settings: Settings | None = None, config: dict[str, Any] | None = None,
           **options: Any) -> dict[str, Any]:
    """Erase TASK (or some of its labels) from the composition (continual.request.forget_composition).
    GS-LoRA's options are given as keywords or as `config` (a dict, what the CLI's `--set` makes); a key
    of `config` that is an option of the request itself (steps, lr, batch_size, seed, ...) or no GS-LoRA
    option at all is refused by name (the CLI passed them as keywords, and one it also passed itself was a
    TypeError: sweep 42)."""
    from loraplex.continual.forgetting import FORGETTERS
    from loraplex.continual.request import forget_composition
    from loraplex.errors import UserInputError

    cls = FORGETTERS.get("gs-lora").config_cls
    if config:
        from_set = type(config).__name__ == "SetOptions"  # the CLI's --set dict
        named = (lambda k: f"--set {k}") if from_set else (lambda k: f"forget(): config[{k!r}]")
        own = set(inspect.signature(forget_composition).parameters) - {"reg", "settings", "gs_lora"}
        for key in config:
            if key in own:
                flag = {"progress": "--quiet", "task": "the TASK argument"}.get(key, f"--{key.replace('_', '-')}")
                raise UserInputError(f"{named(key)}: not a GS-LoRA option but the request's own: give "
                                     f"{flag if from_set else key + '=...'} instead")
            if key not in cls.model_fields:
                raise UserInputError(f"{named(key)}: unknown GS-LoRA option {key!r} "
                                     f"(options: {', '.join(sorted(set(cls.model_fields) - own))})")
        _typed("forget", cls, config)
        twice = sorted(set(config) & set(options))
        if twice:
            raise UserInputError(f"forget(): {twice[0]} given both as a keyword and in config")
        options = {**options, **config}
    _typed("forget", cls, options)
    return _delegate("forget", forget_composition, *_open(settings), _fs(task), **options)
