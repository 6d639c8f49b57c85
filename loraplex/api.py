"""The public Python API: the functions the CLI calls. No printing, no typer.

Every function takes `settings` (default: `Settings.load()`, i.e. the environment) and raises
`loraplex.errors.LoraplexError` subclasses with a one-line message on bad input. Functions that write
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

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from loraplex.settings import Settings

if TYPE_CHECKING:
    from loraplex.continual.fit import TrainResult
    from loraplex.continual.stream import StreamResult
    from loraplex.registry.record import AdapterRecord
    from loraplex.registry.store import Registry
    from loraplex.router.fit import RouterFitResult
    from loraplex.router.model import RoutedModel


def open_registry(settings: Settings | None = None) -> "Registry":
    """The registry of `settings` (default: the environment's)."""
    from loraplex.registry.store import Registry
    return Registry.open(settings)


def _open(settings: Settings | None) -> "tuple[Registry, Settings]":
    """The registry and the settings a part's job takes (default: the environment's)."""
    s = settings or Settings.load()
    return open_registry(s), s


# ---- the registry: adapters in and out (registry/) -------------------------------------------
def register(path: str | Path, *, name: str, description: str, task: str | None = None, base: str | None = None,
             settings: Settings | None = None) -> "AdapterRecord":
    """Register a PEFT LoRA directory under `name`. Returns the AdapterRecord."""
    from loraplex.registry.adapters import register_peft
    return register_peft(*_open(settings), path, name=name, description=description, task=task, base=base)


def list_adapters(settings: Settings | None = None) -> list["AdapterRecord"]:
    """Every registered adapter's record."""
    return open_registry(settings).list_adapters()


def show(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """One adapter's record, lineage and snapshots."""
    from loraplex.registry.adapters import describe
    return describe(open_registry(settings), name)


def search(text: str, k: int = 5, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The k adapters whose descriptions are nearest to `text` (cosine similarity), best first."""
    from loraplex.registry import adapters
    return adapters.search(open_registry(settings), text, k)


def export(name: str, out_dir: str | Path, *, overwrite: bool = False, settings: Settings | None = None) -> Path:
    """Write a registered adapter as a PEFT directory that PeftModel.from_pretrained loads."""
    from loraplex.registry.adapters import export_peft
    return export_peft(open_registry(settings), name, out_dir, overwrite=overwrite)


def remove(name: str, settings: Settings | None = None):
    """Remove an adapter (refused while a router or generator uses it)."""
    from loraplex.registry import adapters
    return adapters.remove(open_registry(settings), name)


def graph(settings: Settings | None = None) -> dict[str, Any]:
    """The lineage graph as JSON (nodes and edges)."""
    from loraplex.registry.lineage import graph_json
    return graph_json(open_registry(settings))


def check(*, repair: bool = False, settings: Settings | None = None):
    """Verify the registry's records, blobs and caches (and repair what can be)."""
    from loraplex.registry.check import check as run_check
    return run_check(open_registry(settings), repair=repair)


# ---- models, tasks; one adapter: load, evaluate, train (continual/fit.py) ---------------------
def list_models() -> list[dict[str, Any]]:
    """The embedded base models."""
    from loraplex.models import list_models as models
    return models()


def list_tasks(family: str | None = None) -> list[dict[str, Any]]:
    """The embedded tasks (of one library family, if given)."""
    from loraplex.data import list_tasks as tasks
    return tasks(family)


def load_adapted(names: Sequence[str], settings: Settings | None = None):
    """The adapters' common base with them injected (a bank of E = len(names)): (LoadedBase, records)."""
    from loraplex.router.load import load_adapted as load
    reg, s = _open(settings)
    return load(reg, names, s)


def evaluate(name: str | None, *, task: str, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Accuracy of an adapter (name=None: the bare base) on a task's split (continual.fit.evaluate_adapter)."""
    from loraplex.continual.fit import evaluate_adapter
    return evaluate_adapter(*_open(settings), name, task=task, **options)


def train(task: str, *, name: str, settings: Settings | None = None, **options: Any) -> "TrainResult":
    """Fine-tune, evaluate and register one LoRA adapter (continual.fit.train_adapter)."""
    from loraplex.continual.fit import train_adapter
    return train_adapter(*_open(settings), task, name=name, **options)


# ---- generators (SG-LoRA, ICM-LoRA): an adapter for a new task (generators/workflow.py) -------
def fit_generator(name: str, *, method: str, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Fit a generator (e.g. sg-lora) on registered adapters and store it (generators.workflow.fit)."""
    from loraplex.generators import workflow
    return workflow.fit(*_open(settings), name, method=method, **options)


def generate_adapter(description: str, *, generator: str, name: str, settings: Settings | None = None,
                     **options: Any) -> dict[str, Any]:
    """Write an adapter with a stored generator and register it (generators.workflow.generate_from_file)."""
    from loraplex.generators import workflow
    return workflow.generate_from_file(*_open(settings), description, generator=generator, name=name, **options)


def list_generators(settings: Settings | None = None) -> list[dict[str, Any]]:
    """The stored generators' summaries."""
    from loraplex.generators import workflow
    return workflow.list_generators(open_registry(settings))


def remove_generator(name: str, settings: Settings | None = None):
    """Remove a stored generator."""
    from loraplex.generators import workflow
    return workflow.remove(open_registry(settings), name)


def generator_methods() -> dict[str, str]:
    """The generator methods: name -> one-line summary."""
    from loraplex.generators.base import GENERATORS
    return dict(GENERATORS.summaries())


# ---- routing: compose registered adapters at run time (router/) -------------------------------
def fit_router(name: str, *, router: str, settings: Settings | None = None, **options: Any) -> "RouterFitResult":
    """Train router `router` (token-gate, mixer, rank), evaluate it, store it (router.fit.fit_router)."""
    from loraplex.router.fit import fit_router as fit
    return fit(*_open(settings), name, method=router, **options)


def load_routed_model(router: str | None = None, adapters: Sequence[str] | None = None, *,
                      settings: Settings | None = None, **options: Any) -> "RoutedModel":
    """A `RoutedModel` ready to answer and trace queries (router.load.load_routed_model)."""
    from loraplex.router.load import load_routed_model as load
    return load(*_open(settings), router, adapters, **options)


def query(texts: Sequence[str], *, router: str | None = None, settings: Settings | None = None,
          **options: Any) -> list[dict[str, Any]]:
    """Answer queries with a routed model, batched: one dict per query (router.query.query)."""
    from loraplex.router.query import query as answer
    return answer(*_open(settings), texts, router=router, **options)


def answer_each(texts: Sequence[str], adapters: Sequence[str], settings: Settings | None = None) -> list[Any]:
    """A heterogeneous batch: row i answered by adapter adapters[i] alone, all rows in one forward pass."""
    from loraplex.router.query import answer_each as each
    return each(*_open(settings), texts, adapters)


def evaluate_router(name: str, *, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Routing, routed and oracle accuracy per task of a stored router (router.query.evaluate_router)."""
    from loraplex.router.query import evaluate_router as evaluate_stored
    return evaluate_stored(*_open(settings), name, **options)


def list_routers(settings: Settings | None = None) -> list[Any]:
    """The stored routers' records."""
    return open_registry(settings).list_components("router")


def show_router(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """A stored router's record as JSON."""
    return open_registry(settings).get_component("router", name).model_dump(mode="json")


def remove_router(name: str, settings: Settings | None = None):
    """Remove a stored router."""
    return open_registry(settings).remove_component("router", name)


# ---- continual: streams of tasks and forgetting requests (continual/) -------------------------
def run_stream(spec: str | Path, *, settings: Settings | None = None, **options: Any) -> "StreamResult":
    """Run a stream spec, or resume a run (continual.stream.run_stream)."""
    from loraplex.continual.stream import run_stream as run
    return run(spec, settings=settings, **options)


def stream_report(run_dir: str | Path) -> dict[str, Any]:
    """A finished or partial stream run's matrix and metrics: {"run_dir", "matrix", "metrics"}."""
    from loraplex.continual.report import load_report
    return load_report(run_dir)


def forget(task: str, *, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Erase TASK (or some of its labels) from the composition (continual.request.forget_composition)."""
    from loraplex.continual.request import forget_composition
    return forget_composition(*_open(settings), task, **options)
