"""The public Python API: the few functions the CLI calls. No printing, no typer.

Every function takes `settings` (default: `Settings.load()`, i.e. the environment) and raises
`loraplex.errors.LoraplexError` subclasses with a one-line message on bad input. Functions that write
validate everything first and write last, in one registry transaction, so a failure leaves the
registry as it was.

    from loraplex import api
    rec = api.register("path/to/peft_dir", name="airline-v1", description="...", base="minilm")
    api.search("complaints about flights", k=3)
    res = api.train("airline", name="airline-v2", steps=100)
    api.evaluate("airline-v2", task="airline")

Each function delegates to the part that owns the job (registry/, continual/, router/, generators/);
nothing here is imported back by a part (tests/test_architecture.py). The parts are imported inside
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


def _settings(settings: Settings | None) -> Settings:
    return settings or Settings.load()


def open_registry(settings: Settings | None = None) -> "Registry":
    from loraplex.registry.store import Registry

    return Registry.open(settings)


# ---------------------------------------------------------------------------------------------
# the registry: adapters in and out (registry/adapters.py)


def register(path: str | Path, *, name: str, description: str, task: str | None = None, base: str | None = None,
             settings: Settings | None = None) -> "AdapterRecord":
    """Register a PEFT LoRA directory under `name`. Returns the AdapterRecord."""
    from loraplex.registry import adapters

    s = _settings(settings)
    return adapters.register_peft(open_registry(s), s, path, name=name, description=description, task=task, base=base)


def list_adapters(settings: Settings | None = None):
    return open_registry(settings).list_adapters()


def show(name: str, settings: Settings | None = None) -> dict[str, Any]:
    from loraplex.registry import adapters

    return adapters.describe(open_registry(settings), name)


def search(text: str, k: int = 5, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The k adapters whose descriptions are nearest to `text` (cosine similarity), best first."""
    from loraplex.registry import adapters

    return adapters.search(open_registry(settings), text, k)


def export(name: str, out_dir: str | Path, *, overwrite: bool = False, settings: Settings | None = None) -> Path:
    """Write a registered adapter as a PEFT directory that PeftModel.from_pretrained loads."""
    from loraplex.registry import adapters

    return adapters.export_peft(open_registry(settings), name, out_dir, overwrite=overwrite)


def remove(name: str, settings: Settings | None = None):
    from loraplex.registry import adapters

    return adapters.remove(open_registry(settings), name)


def graph(settings: Settings | None = None) -> dict[str, Any]:
    from loraplex.registry.lineage import graph_json

    return graph_json(open_registry(settings))


def check(*, repair: bool = False, settings: Settings | None = None):
    from loraplex.registry.check import check as run_check

    return run_check(open_registry(settings), repair=repair)


# ---------------------------------------------------------------------------------------------
# models, tasks; one adapter: load, evaluate, train (continual/fit.py)


def list_models() -> list[dict[str, Any]]:
    from loraplex.models import list_models as _lm

    return _lm()


def list_tasks(family: str | None = None) -> list[dict[str, Any]]:
    from loraplex.data import list_tasks as _lt

    return _lt(family)


def load_adapted(names: Sequence[str], settings: Settings | None = None, *, reg=None):
    """Load the adapters' common base and inject them (a bank of E = len(names)). Returns (LoadedBase, records)."""
    from loraplex.router.load import load_adapted as _load

    s = _settings(settings)
    return _load(reg or open_registry(s), names, s)


def evaluate(name: str | None, *, task: str, base: str | None = None, split: str = "test", limit: int | None = None,
             vs_base: bool = False, progress: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    """Accuracy of an adapter (or, with name=None, of the bare base) on a task's split (`progress`: a
    progress bar on stderr for each evaluation)."""
    from loraplex.continual.fit import evaluate_adapter

    s = _settings(settings)
    return evaluate_adapter(open_registry(s), s, name, task=task, base=base, split=split, limit=limit,
                            vs_base=vs_base, progress=progress)


def train(task: str, *, name: str, base: str = "minilm", rank: int = 8, alpha: float | None = None,
          targets: Sequence[str] = (), description: str | None = None, eval_limit: int | None = None,
          settings: Settings | None = None, **train_options: Any) -> "TrainResult":
    """Fine-tune one LoRA adapter on a task, evaluate it (and the bare base) on the first `eval_limit`
    test rows (default: all), and register it with its snapshots. `train_options`: TrainConfig fields."""
    from loraplex.continual.fit import train_adapter

    s = _settings(settings)
    return train_adapter(open_registry(s), s, task, name=name, base=base, rank=rank, alpha=alpha, targets=targets,
                         description=description, eval_limit=eval_limit, **train_options)


# ---------------------------------------------------------------------------------------------
# generators (SG-LoRA, ICM-LoRA): write an adapter for a new task from its description or examples


def fit_generator(name: str, *, method: str, adapters: Sequence[str] | None = None,
                  config: dict[str, Any] | None = None, progress: bool = False,
                  settings: Settings | None = None) -> dict[str, Any]:
    """Fit a generator (a catalog method, e.g. sg-lora) on registered adapters and their snapshots; store it."""
    from loraplex.generators import workflow

    s = _settings(settings)
    return workflow.fit(open_registry(s), s, name, method=method, adapters=adapters, config=config, progress=progress)


def generate_adapter(description: str, *, generator: str, name: str, examples: str | Path | None = None,
                     seed: int = 0, refine_steps: int = 0, settings: Settings | None = None) -> dict[str, Any]:
    """Write an adapter for a new task with a stored generator and register it (origin "generated");
    `refine_steps` > 0 refines it on the labelled examples (generators/refine.py)."""
    from loraplex.generators import workflow
    from loraplex.generators.icm_lora import read_examples

    s = _settings(settings)
    rows = read_examples(examples) if examples is not None else []
    return workflow.generate(open_registry(s), s, description, generator=generator, name=name, examples=rows, seed=seed,
                             refine_steps=refine_steps)


def list_generators(settings: Settings | None = None) -> list[dict[str, Any]]:
    from loraplex.generators import workflow

    return workflow.list_generators(open_registry(settings))


def remove_generator(name: str, settings: Settings | None = None):
    from loraplex.generators import workflow

    return workflow.remove(open_registry(settings), name)


def generator_methods() -> dict[str, str]:
    from loraplex.generators.base import GENERATORS

    return dict(GENERATORS.summaries())


# ---------------------------------------------------------------------------------------------
# routing: compose registered adapters at run time (router/)


def fit_router(name: str, *, router: str, adapters: Sequence[str] = (), tasks: Sequence[str] | None = None,
               base: str | None = None, config: dict[str, Any] | None = None, eval_limit: int | None = 200,
               settings: Settings | None = None, **train_options: Any) -> "RouterFitResult":
    """Train router `router` (token-gate, mixer, rank) over `adapters` on their tasks, evaluate it, store it.

    `config` holds the router's options (its pydantic config); `train_options` are `TrainConfig` fields
    (steps, lr, batch_size, train_limit, ...). Returns a `RouterFitResult(record, metrics, run_dir)`.
    """
    from loraplex.router.fit import fit_router as _fit, router_train_config

    tc = router_train_config(**train_options)
    return _fit(name, method=router, adapters=list(adapters), tasks=list(tasks) if tasks else None, base=base,
                config=config, train_config=tc, eval_limit=eval_limit, settings=_settings(settings))


def load_routed_model(router: str | None = None, adapters: Sequence[str] | None = None, *,
                      texts: Sequence[str] | None = None, base: str | None = None, shortlist: int | None = None,
                      config: dict[str, Any] | None = None, settings: Settings | None = None) -> "RoutedModel":
    """A `RoutedModel` (router/model.py) ready to answer and trace queries.

    - `router=NAME`: a router stored by `fit_router` (restricted to the `shortlist` adapters retrieval
      finds nearest to `texts`, if given);
    - `router="retrieval"`: signature retrieval over `adapters` (or, without, the registry's adapters
      nearest to `texts`), `config` being RetrievalConfig's options;
    - no router: the adapters in one bank with no router, for heterogeneous batches
      (`RoutedModel.answer_each(texts, adapter_per_row)`).
    """
    from loraplex.router.load import load_routed_model as _load

    s = _settings(settings)
    return _load(open_registry(s), s, router, adapters, texts=texts, base=base, shortlist=shortlist, config=config)


def query(texts: Sequence[str], *, router: str | None = None, adapters: Sequence[str] | None = None,
          trace: bool = False, base: str | None = None, shortlist: int | None = None, batch_size: int = 32,
          config: dict[str, Any] | None = None, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Answer queries with a routed model, batched. One dict per query:
    `{"query", "task", "answer", "adapters": [{"name", "weight"}], "tokens": [...], "layers": [...]}`
    (tokens and layers with `trace`). Without `router`, retrieval over the whole registry (or over
    `adapters`) routes; how the answer is made: router/query.py.
    """
    from loraplex.router.query import query as _query

    s = _settings(settings)
    return _query(open_registry(s), s, texts, router=router, adapters=adapters, trace=trace, base=base,
                  shortlist=shortlist, batch_size=batch_size, config=config)


def answer_each(texts: Sequence[str], adapters: Sequence[str], settings: Settings | None = None) -> list[Any]:
    """A heterogeneous batch: row i answered by adapter adapters[i] alone, all rows in one forward pass."""
    from loraplex.router.query import answer_each as _each

    s = _settings(settings)
    return _each(open_registry(s), s, texts, adapters)


def evaluate_router(name: str, *, tasks: Sequence[str] | None = None, split: str = "test", limit: int | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """Routing accuracy, routed accuracy and each adapter alone (oracle), per task, for a stored router."""
    from loraplex.router.query import evaluate_router as _evaluate

    s = _settings(settings)
    return _evaluate(open_registry(s), s, name, tasks=tasks, split=split, limit=limit)


def list_routers(settings: Settings | None = None) -> list[Any]:
    return open_registry(settings).list_components("router")


def show_router(name: str, settings: Settings | None = None) -> dict[str, Any]:
    return open_registry(settings).get_component("router", name).model_dump(mode="json")


def remove_router(name: str, settings: Settings | None = None):
    return open_registry(settings).remove_component("router", name)


# ---------------------------------------------------------------------------------------------
# continual: streams of tasks (O-LoRA, replay, multitask) and forgetting requests (GS-LoRA)


def run_stream(spec: str | Path, *, out: str | Path | None = None, resume: str | Path | None = None,
               progress: bool = True, on_unit: Any = None, settings: Settings | None = None) -> "StreamResult":
    """Run a stream spec (or resume DIR); returns a `continual.stream.StreamResult`.

    `on_unit(event)` is called after each unit with {"unit", "label", "total", "matrix", "metrics"}.
    """
    from loraplex.continual.stream import run_stream as _run

    return _run(spec, out=out, resume=resume, settings=_settings(settings), progress=progress, on_unit=on_unit)


def stream_report(run_dir: str | Path) -> dict[str, Any]:
    """A finished or partial stream run's matrix and metrics: {"run_dir", "matrix", "metrics"}."""
    from loraplex.continual.report import load_report

    return load_report(run_dir)


def forget(task: str, *, labels: Sequence[str] = (), adapters: Sequence[str] = (), base: str | None = None,
           name: str | None = None, steps: int = 100, lr: float = 2e-3, batch_size: int = 16,
           eval_limit: int | None = 300, seed: int = 0, progress: bool = True, settings: Settings | None = None,
           **gs_lora: Any) -> dict[str, Any]:
    """Erase TASK (or some of its labels) from the current composition with a GS-LoRA adapter, trained
    as a stream's forgetting experience (which composition, which retained data, what is registered:
    continual/request.py). `gs_lora` options override the GS-LoRA configuration (sparsity_weight, bound,
    rank, ...). Returns a summary dict."""
    from loraplex.continual.request import forget_composition

    s = _settings(settings)
    return forget_composition(open_registry(s), s, task, labels=labels, adapters=adapters, base=base, name=name,
                              steps=steps, lr=lr, batch_size=batch_size, eval_limit=eval_limit, seed=seed,
                              progress=progress, **gs_lora)
