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
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loraplex.errors import (
    AlreadyExists,
    IncompatibleAdapter,
    InvalidSpec,
    UserInputError,
)
from loraplex.ranks import is_worker
from loraplex.settings import Settings


def _settings(settings: Settings | None) -> Settings:
    return settings or Settings.load()


def open_registry(settings: Settings | None = None):
    from loraplex.registry.store import Registry

    s = _settings(settings)
    return Registry(s.home, embedder=s.embedder)


def _embed(reg, texts: Sequence[str]) -> np.ndarray:
    from loraplex.embedders import get_embedder

    return get_embedder(reg.embedder_name).encode(list(texts))


def _prototype(reg, texts: Sequence[str], limit: int = 256) -> np.ndarray | None:
    """Mean embedding (renormalised) of up to `limit` training inputs: the adapter's data signature."""
    if not texts:
        return None
    v = _embed(reg, list(texts)[:limit]).mean(0)
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else None


# ---------------------------------------------------------------------------------------------
# registering adapters


def _align_modules(adapter, fp):
    """Map an adapter's module names onto the base's when they differ by a leading component.

    PEFT names modules relative to the model it wrapped: an adapter trained on `BertForSequenceClassification`
    says `bert.encoder...` where the bare `BertModel` has `encoder...`, and one trained on `LlamaModel`
    lacks the `model.` that `LlamaForCausalLM` has. Exact names win; otherwise one leading component is
    dropped or the base's common first component is added, if that makes every name fit.
    """
    from loraplex.experts.spec import Adapter

    names = adapter.modules
    if all(n in fp.modules for n in names):
        return adapter
    candidates = []
    firsts = {n.split(".", 1)[0] for n in names if "." in n}
    if len(firsts) == 1:
        p = firsts.pop() + "."
        candidates.append(lambda n, p=p: n[len(p):] if n.startswith(p) else n)
    base_firsts = {n.split(".", 1)[0] for n in fp.modules if "." in n}
    for p in sorted(base_firsts):
        candidates.append(lambda n, p=p: f"{p}.{n}")
    for f in candidates:
        mapped = {f(n): w for n, w in adapter.weights.items()}
        if len(mapped) == len(names) and all(m in fp.modules for m in mapped):
            if adapter.spec.rank_pattern or adapter.spec.alpha_pattern:
                spec = adapter.spec.model_copy(update={
                    "rank_pattern": {f(k) if k in names else k: v for k, v in adapter.spec.rank_pattern.items()},
                    "alpha_pattern": {f(k) if k in names else k: v for k, v in adapter.spec.alpha_pattern.items()},
                })
            else:
                spec = adapter.spec
            return Adapter(spec, mapped)
    return adapter


def register(
    path: str | Path,
    *,
    name: str,
    description: str,
    task: str | None = None,
    base: str | None = None,
    settings: Settings | None = None,
):
    """Register a PEFT LoRA directory under `name`. Returns the AdapterRecord."""
    from loraplex.experts.peft_io import read_peft_dir
    from loraplex.models import fingerprint, resolve_base
    from loraplex.registry.record import AdapterDraft, Edge, validate_description, validate_name

    s = _settings(settings)
    validate_name(name)
    if not description or not description.strip():
        raise UserInputError("a description is required (--description): it is how the adapter is found and routed to")
    description = validate_description(description)
    reg = open_registry(s)
    if reg.has_adapter(name):
        raise AlreadyExists(f"an adapter named {name!r} already exists")
    adapter, cfg = read_peft_dir(path)
    ref = resolve_base(base or cfg.get("base_model_name_or_path"))
    fp = fingerprint(ref, s)
    adapter = _align_modules(adapter, fp)
    adapter.check_fits(fp, name=f"adapter at {path}")
    task_obj = reg.load_task(task) if task else None
    edges = (Edge.to_task(task_obj.ref, "trained-on"),) if task_obj else ()
    draft = AdapterDraft(
        name=name, base=ref.name, base_sha=fp.sha, family=ref.family, description=description.strip(),
        task=task_obj.ref if task_obj else None, origin="imported", spec=adapter.spec, edges=edges,
        extra={"source": str(Path(path).absolute()),
               **({"task_cards": {task_obj.ref: task_obj.card()}} if task_obj else {})},
    )
    emb = _embed(reg, [draft.description])[0]
    proto = _prototype(reg, [e.text for e in task_obj.train]) if task_obj else None
    return reg.add_adapter(draft, adapter, embedding=emb, prototype=proto, embedder=reg.embedder_name,
                           fingerprint_json=fp.model_dump_json())


def list_adapters(settings: Settings | None = None):
    return open_registry(settings).list_adapters()


def show(name: str, settings: Settings | None = None) -> dict[str, Any]:
    reg = open_registry(settings)
    rec = reg.get_adapter(name)
    out = rec.model_dump(mode="json")
    out["parents"] = rec.parents
    out["used_by"] = [f"{c.kind}:{c.name}" for c in reg.components_using(name)]
    return out


def search(text: str, k: int = 5, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The k adapters whose descriptions are nearest to `text` (cosine similarity), best first."""
    from loraplex.registry.index import SignatureIndex

    if not text or not text.strip():
        raise UserInputError("the search text is empty")
    if k < 1:
        raise UserInputError("-k must be at least 1")
    reg = open_registry(settings)
    if reg.count() == 0:
        return []
    idx = SignatureIndex.sync(reg)
    scores, ids = idx.search(_embed(reg, [text]), k)
    names = reg.names_by_id([int(i) for i in ids[0] if i >= 0])
    out = []
    for sc, i in zip(scores[0], ids[0]):
        if i < 0 or int(i) not in names:
            continue
        rec = reg.get_adapter(names[int(i)])
        out.append({"name": rec.name, "score": round(float(sc), 4), "task": rec.task, "base": rec.base,
                    "description": rec.description})
    return out


def export(name: str, out_dir: str | Path, *, overwrite: bool = False, settings: Settings | None = None) -> Path:
    """Write a registered adapter as a PEFT directory that PeftModel.from_pretrained loads."""
    from loraplex.experts.peft_io import peft_config, write_peft_dir
    from loraplex.models import Fingerprint, resolve_base

    reg = open_registry(settings)
    rec, adapter = reg.load_adapter(name)
    fps = reg.base_fingerprints()
    if rec.base_sha not in fps:
        raise IncompatibleAdapter(f"adapter {name!r}: the fingerprint of its base is missing (run `loraplex registry check`)")
    fp = Fingerprint.model_validate_json(fps[rec.base_sha][1])
    try:
        peft_name = resolve_base(rec.base).peft_name
    except UserInputError:
        peft_name = rec.base
    cfg = peft_config(adapter, base_model_name_or_path=peft_name, all_linear=fp.linear_names(),
                      fan_in_fan_out=any(m in fp.conv1d for m in adapter.modules), family=rec.family)
    return write_peft_dir(adapter, out_dir, cfg, overwrite=overwrite)


def remove(name: str, settings: Settings | None = None):
    from loraplex.errors import AdapterNotFound

    reg = open_registry(settings)
    if not reg.has_adapter(name):
        raise AdapterNotFound(f"no adapter named {name!r} in the registry at {reg.home}")
    users = reg.components_using(name)
    if users:
        who = ", ".join(f"{c.kind} {c.name!r}" for c in users)
        raise UserInputError(f"adapter {name!r} is used by {who}; remove that first")
    return reg.remove_adapter(name)  # None: a damaged record (see `registry check`), removed all the same


def graph(settings: Settings | None = None) -> dict[str, Any]:
    from loraplex.registry.lineage import graph_json

    return graph_json(open_registry(settings))


def check(*, repair: bool = False, settings: Settings | None = None):
    from loraplex.registry.check import check as run_check

    return run_check(open_registry(settings), repair=repair)


# ---------------------------------------------------------------------------------------------
# models, tasks, loading adapters onto a base


def list_models() -> list[dict[str, Any]]:
    from loraplex.models import list_models as _lm

    return _lm()


def list_tasks(family: str | None = None) -> list[dict[str, Any]]:
    from loraplex.data import list_tasks as _lt

    return _lt(family)


def load_adapted(names: Sequence[str], settings: Settings | None = None, *, reg=None):
    """Load the adapters' common base and inject them (a bank of E = len(names)). Returns (LoadedBase, records)."""
    from loraplex.experts.layers import inject
    from loraplex.router.load import load_members

    s = _settings(settings)
    lb, recs, ads = load_members(reg or open_registry(s), names, s, together="combined")
    inject(lb.model, ads)
    return lb, recs


def evaluate(
    name: str | None,
    *,
    task: str,
    base: str | None = None,
    split: str = "test",
    limit: int | None = None,
    vs_base: bool = False,
    progress: bool = False,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Accuracy of an adapter (or, with name=None, of the bare base) on a task's split (`progress`: a
    progress bar on stderr for each evaluation)."""
    from loraplex.experts.layers import adapters_disabled
    from loraplex.heads import accuracy, head_for
    from loraplex.models import load_base, resolve_base

    s = _settings(settings)
    if split not in ("train", "validation", "test"):
        raise UserInputError(f"unknown split {split!r} (train, validation, test)")
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be at least 1 (got {limit})")
    reg = open_registry(s)
    t = reg.load_task(task)
    if name is None:
        lb = load_base(resolve_base(base or "minilm"), s)
        res = accuracy(head_for(lb), lb.model, lb.tokenizer, t, split, limit,
                       progress=f"evaluating the bare base on {t.name}" if progress else None)
        return {"adapter": None, "base": lb.ref.name, "task": t.name, "split": split, **res}
    rec = reg.get_adapter(name)
    if base is not None and resolve_base(base).name != rec.base:
        raise IncompatibleAdapter(f"adapter {name!r} was registered for base {rec.base!r}, not {base!r}")
    lb, _ = load_adapted([name], s, reg=reg)
    head = head_for(lb)
    res = accuracy(head, lb.model, lb.tokenizer, t, split, limit,
                   progress=f"evaluating {name} on {t.name}" if progress else None)
    out = {"adapter": name, "base": lb.ref.name, "task": t.name, "split": split, **res}
    if vs_base:
        with adapters_disabled(lb.model):
            out["base_accuracy"] = accuracy(head, lb.model, lb.tokenizer, t, split, limit,
                                            progress=f"evaluating the bare base on {t.name}" if progress else None)["accuracy"]
    return out


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    record: Any
    metrics: dict[str, Any]
    run_dir: Path


def _run_dir(s: Settings, name: str) -> Path:
    """A new run directory under the home; the same one in every DDP rank (loraplex.ranks)."""
    from loraplex.ranks import shared_run_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return shared_run_dir(s.home / "runs" / f"{name}-{stamp}")


def train(
    task: str,
    *,
    name: str,
    base: str = "minilm",
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = (),
    description: str | None = None,
    eval_limit: int | None = None,
    settings: Settings | None = None,
    **train_options: Any,
) -> TrainResult:
    """Fine-tune one LoRA adapter on a task, evaluate it (and the bare base) on the first `eval_limit`
    test rows (default: all), and register it with its snapshots."""
    from pydantic import ValidationError

    from loraplex.continual.fit import TrainConfig, fit_adapter
    from loraplex.data import load_task
    from loraplex.experts.spec import LoraSpec
    from loraplex.heads import accuracy, head_for
    from loraplex.models import load_base, resolve_base
    from loraplex.registry.record import AdapterDraft, Edge, validate_description, validate_name

    s = _settings(settings)
    validate_name(name)
    if description is not None:
        description = validate_description(description)
    reg = open_registry(s)
    if reg.has_adapter(name) and not is_worker():
        raise AlreadyExists(f"an adapter named {name!r} already exists")
    try:
        cfg = TrainConfig(**train_options)
        spec = LoraSpec(r=rank, alpha=alpha if alpha is not None else 2.0 * rank, target_modules=tuple(targets))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = " " + ".".join(map(str, err["loc"])) if err["loc"] else ""
        raise InvalidSpec(f"invalid training option{where}: {err['msg'].removeprefix('Value error, ')}") from None
    if eval_limit is not None and (isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1):
        raise UserInputError(f"--eval-limit must be a whole number of at least 1, not {eval_limit!r}")
    t = reg.load_task(task, description=description)
    ref = resolve_base(base)
    lb = load_base(ref, s)
    head = head_for(lb)
    def bar(who: str) -> str | None:
        return f"evaluating {who} on {t.name}" if cfg.progress else None

    if is_worker():  # a DDP worker trains its share and leaves evaluating and registering to rank 0
        result = fit_adapter(lb, t, spec, cfg, _run_dir(s, name))
        return TrainResult(None, result.metrics, result.run_dir)
    base_acc = accuracy(head, lb.model, lb.tokenizer, t, "test", eval_limit, progress=bar("the bare base"))["accuracy"]
    result = fit_adapter(lb, t, spec, cfg, _run_dir(s, name))
    test = accuracy(head, lb.model, lb.tokenizer, t, "test", eval_limit, progress=bar(name))
    metrics = {**result.metrics, "accuracy": round(test["accuracy"], 4), "base_accuracy": round(base_acc, 4),
               "test_n": test["n"], "task": t.name}
    draft = AdapterDraft(
        name=name, base=ref.name, base_sha=lb.fingerprint.sha, family=ref.family, description=t.description,
        task=t.ref, origin="trained", spec=spec, metrics=metrics, edges=(Edge.to_task(t.ref, "trained-on"),),
        extra={"run_dir": str(result.run_dir), "train_config": cfg.model_dump(mode="json"),
               "task_cards": {t.ref: t.card()}},
    )
    emb = _embed(reg, [t.description])[0]
    proto = _prototype(reg, [e.text for e in t.train])
    rec = reg.add_adapter(draft, result.adapter, embedding=emb, prototype=proto, snapshots=result.snapshots,
                          embedder=reg.embedder_name, fingerprint_json=lb.fingerprint.model_dump_json())
    return TrainResult(rec, metrics, result.run_dir)


def parse_list(value: str | None) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"] (for comma-separated CLI options)."""
    if not value:
        return []
    return [v for v in (x.strip() for x in re.split(r"[,\s]+", value)) if v]


# ---------------------------------------------------------------------------------------------
# generators (SG-LoRA, ICM-LoRA): write an adapter for a new task from its description or examples


def fit_generator(
    name: str,
    *,
    method: str,
    adapters: Sequence[str] | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Fit a generator (a catalog method, e.g. sg-lora) on registered adapters and their snapshots; store it."""
    from loraplex.generators import workflow

    s = _settings(settings)
    return workflow.fit(open_registry(s), s, name, method=method, adapters=adapters, config=config, progress=progress)


def generate_adapter(
    description: str,
    *,
    generator: str,
    name: str,
    examples: str | Path | None = None,
    seed: int = 0,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Write an adapter for a new task with a stored generator and register it (origin "generated")."""
    from loraplex.generators import workflow
    from loraplex.generators.icm_lora import read_examples

    s = _settings(settings)
    rows = read_examples(examples) if examples is not None else []
    return workflow.generate(open_registry(s), s, description, generator=generator, name=name, examples=rows, seed=seed)


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


def fit_router(
    name: str,
    *,
    router: str,
    adapters: Sequence[str] = (),
    tasks: Sequence[str] | None = None,
    base: str | None = None,
    config: dict[str, Any] | None = None,
    eval_limit: int | None = 200,
    settings: Settings | None = None,
    **train_options: Any,
):
    """Train router `router` (token-gate, mixer, rank) over `adapters` on their tasks, evaluate it, store it.

    `config` holds the router's options (its pydantic config); `train_options` are `TrainConfig` fields
    (steps, lr, batch_size, train_limit, ...). Returns a `RouterFitResult(record, metrics, run_dir)`.
    """
    from pydantic import ValidationError

    from loraplex.continual.fit import TrainConfig
    from loraplex.router.fit import fit_router as _fit

    train_options.setdefault("lr", 1e-2)  # gates are small linear classifiers: a higher rate than adapters
    try:
        tc = TrainConfig(**train_options)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = " " + ".".join(map(str, err["loc"])) if err["loc"] else ""
        raise InvalidSpec(f"invalid training option{where}: {err['msg'].removeprefix('Value error, ')}") from None
    return _fit(name, method=router, adapters=list(adapters), tasks=list(tasks) if tasks else None, base=base,
                config=config, train_config=tc, eval_limit=eval_limit, settings=_settings(settings))


def load_routed_model(
    router: str | None = None,
    adapters: Sequence[str] | None = None,
    *,
    texts: Sequence[str] | None = None,
    base: str | None = None,
    shortlist: int | None = None,
    config: dict[str, Any] | None = None,
    settings: Settings | None = None,
):
    """A `RoutedModel` (router/model.py) ready to answer and trace queries.

    - `router=NAME`: a router stored by `fit_router` (restricted to the `shortlist` adapters retrieval
      finds nearest to `texts`, if given);
    - `router="retrieval"`: signature retrieval over `adapters` (or, without, the registry's adapters
      nearest to `texts`), `config` being RetrievalConfig's options;
    - no router: the adapters in one bank with no router, for heterogeneous batches
      (`RoutedModel.answer_each(texts, adapter_per_row)`).
    """
    from loraplex.router.load import load_bank, load_retrieval, load_router

    s = _settings(settings)
    reg = open_registry(s)
    if shortlist is not None and shortlist < 1:
        raise UserInputError("--shortlist must be at least 1")
    if router == "retrieval":
        return load_retrieval(reg, s, adapters=adapters, texts=texts or [], base=base, config=config)
    if router:
        if adapters:
            raise UserInputError(f"router {router!r} routes over the adapters it was fitted on; --adapters goes with --router retrieval")
        from loraplex.errors import ComponentNotFound

        try:
            return load_router(reg, router, s, base=base, shortlist=shortlist, texts=texts)
        except ComponentNotFound:
            known = ", ".join(c.name for c in reg.list_components("router")) or "none"
            raise ComponentNotFound(f"no router named {router!r} in the registry at {reg.home} "
                                    f"(stored routers: {known}; or --router retrieval)") from None
    if not adapters:
        raise UserInputError("name a router (--router NAME or --router retrieval) or the adapters to load")
    return load_bank(reg, adapters, s)


def query(
    texts: Sequence[str],
    *,
    router: str | None = None,
    adapters: Sequence[str] | None = None,
    trace: bool = False,
    base: str | None = None,
    shortlist: int | None = None,
    batch_size: int = 32,
    config: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """Answer queries with a routed model, batched. One dict per query:
    `{"query", "task", "answer", "adapters": [{"name", "weight"}], "tokens": [...], "layers": [...]}`
    (tokens and layers with `trace`).

    How the answer is made: the query is routed (a learned router gates each token in each adapted
    projection; retrieval gives the query constant gates from the nearest adapter signatures). The
    adapter with the largest mean gate weight over the query's tokens (for retrieval: the nearest
    adapter) names the task whose label set answers it; an encoder base scores the routed model's
    embedding of the query against that task's label anchors, a causal base does rank classification
    over that task's labels, or generates text when the task has no label set. Without `router`,
    retrieval over the whole registry (or over `adapters`) routes.
    """
    texts = [t.strip() for t in texts]
    if not texts or not all(texts):
        raise UserInputError("the query is empty")
    if batch_size < 1:
        raise UserInputError("--batch-size must be at least 1")
    if router == "auto":
        return _query_auto(texts, adapters=adapters, shortlist=shortlist, base=base, trace=trace,
                           batch_size=batch_size, config=config, settings=settings)
    if router is None:
        router = "retrieval"
    out: list[dict[str, Any]] = []
    rm = None
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        # retrieval over the whole registry and shortlists depend on the queries: rebuild per batch
        if rm is None or (router == "retrieval" and not adapters) or shortlist is not None:
            rm = load_routed_model(router, adapters, texts=chunk, base=base, shortlist=shortlist, config=config,
                                   settings=settings)
        out.extend(rm.answer(chunk, trace=trace))
    return out


def _query_auto(texts, *, adapters, shortlist, base, trace, batch_size, config, settings) -> list[dict[str, Any]]:
    """`query --router auto`: route, generate or fall back per request (router/auto.py)."""
    from loraplex.router import auto

    if adapters:
        raise UserInputError("--router auto decides over the whole registry; --adapters does not apply")
    if shortlist is not None:
        raise UserInputError("--shortlist applies to a stored learned router, not to --router auto")
    s = _settings(settings)
    reg = open_registry(s)
    out: list[dict[str, Any]] = []
    for i in range(0, len(texts), batch_size):
        out.extend(auto.answer(reg, s, texts[i: i + batch_size], config, base=base, trace=trace))
    return out


def answer_each(texts: Sequence[str], adapters: Sequence[str], settings: Settings | None = None) -> list[Any]:
    """A heterogeneous batch: row i answered by adapter adapters[i] alone, all rows in one forward pass."""
    if len(texts) != len(adapters):
        raise UserInputError(f"{len(texts)} texts but {len(adapters)} adapter names; give one adapter per row")
    if not texts:
        raise UserInputError("no texts")
    names = list(dict.fromkeys(adapters))
    rm = load_routed_model(None, names, settings=settings)
    return rm.answer_each(list(texts), list(adapters))


def evaluate_router(
    name: str,
    *,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Routing accuracy, routed accuracy and each adapter alone (oracle), per task, for a stored router."""

    if split not in ("train", "validation", "test"):
        raise UserInputError(f"unknown split {split!r} (train, validation, test)")
    if limit is not None and limit < 1:
        raise UserInputError("--limit must be at least 1")
    s = _settings(settings)
    rm = load_routed_model(name, settings=s)
    reg = open_registry(s)
    task_objs = [reg.load_task(t) for t in tasks] if tasks else list(rm.task_pool)
    joint_scratch = bool(rm.record.extra.get("joint")) and not rm.record.members
    res = rm.evaluate(task_objs, split=split, limit=limit, oracle=not joint_scratch)
    return {"router": name, "method": rm.record.method, "base": rm.record.base, "split": split, **res}


def list_routers(settings: Settings | None = None) -> list[Any]:
    return open_registry(settings).list_components("router")


def show_router(name: str, settings: Settings | None = None) -> dict[str, Any]:
    rec = open_registry(settings).get_component("router", name)
    return rec.model_dump(mode="json")


def remove_router(name: str, settings: Settings | None = None):
    return open_registry(settings).remove_component("router", name)


# ---------------------------------------------------------------------------------------------
# continual: streams of tasks (O-LoRA, replay, multitask) and forgetting requests (GS-LoRA)


def run_stream(
    spec: str | Path,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    on_unit: Any = None,
    settings: Settings | None = None,
):
    """Run a stream spec (or resume DIR); returns a `continual.stream.StreamResult`.

    `on_unit(event)` is called after each unit with {"unit", "label", "total", "matrix", "metrics"}.
    """
    from loraplex.continual.stream import run_stream as _run

    return _run(spec, out=out, resume=resume, settings=_settings(settings), progress=progress, on_unit=on_unit)


def stream_report(run_dir: str | Path) -> dict[str, Any]:
    """A finished or partial stream run's matrix and metrics: {"run_dir", "matrix", "metrics"}."""
    from loraplex.continual.report import load_report

    p = Path(run_dir).expanduser()
    if not p.is_dir():
        raise UserInputError(f"{p}: no such run directory")
    return load_report(p)


def current_composition(reg, *, adapters: Sequence[str] = (), base: str | None = None):
    """The adapters a one-off forgetting request acts on, as registry records.

    `adapters` names them explicitly. Otherwise the composition is the one recorded by the most
    recently registered adapter that carries one (`extra["composition"]`): the adapters active after
    the last unit of the latest stream run, or after the latest `loraplex forget`, on `base` if given.
    """
    from loraplex.models import resolve_base

    if adapters:
        return [reg.get_adapter(n) for n in adapters]
    want = resolve_base(base).name if base else None
    recs = [r for r in reg.list_adapters() if r.extra.get("composition") and (want is None or r.base == want)]
    if not recs:
        where = f" on base {want!r}" if want else ""
        raise UserInputError(f"no composition to forget from{where}: no stream has run in this registry; "
                             "name the adapters with --adapters a,b")
    latest = max(recs, key=lambda r: r.id)
    from loraplex.continual.methods import METHODS

    method = latest.extra.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    if name in METHODS.names() and not METHODS.get(name).factory.summed:
        raise UserInputError(f"the latest composition (of {latest.name!r}) answers through its stream's router; "
                             "a one-off request acts on summed adapters: put a `forget:` experience in the "
                             "stream instead, or name the adapters with --adapters a,b")
    missing = [n for n in latest.extra["composition"] if not reg.has_adapter(n)]
    if missing:
        raise UserInputError(f"the latest composition (of {latest.name!r}) lists adapters that were removed: "
                             f"{', '.join(missing)}; name the adapters with --adapters a,b")
    return [reg.get_adapter(n) for n in latest.extra["composition"]]


def forget(
    task: str,
    *,
    labels: Sequence[str] = (),
    adapters: Sequence[str] = (),
    base: str | None = None,
    name: str | None = None,
    steps: int = 100,
    lr: float = 2e-3,
    batch_size: int = 16,
    eval_limit: int | None = 300,
    seed: int = 0,
    progress: bool = True,
    settings: Settings | None = None,
    **gs_lora: Any,
) -> dict[str, Any]:
    """Erase TASK (or some of its labels) from the current composition with a GS-LoRA adapter.

    The composition is `adapters`, or the latest one recorded in the registry (see
    `current_composition`); TASK must be one of the tasks its adapters were trained on. The forgetting
    adapter is trained exactly as a stream's forgetting experience (continual.forgetting), retained data
    being a class-balanced sample of the composition's other tasks, and is registered with origin
    "forgetting", a `forgets` edge to the task and a `trained-from` edge to the composition's last
    adapter; its record carries the new composition (the old one plus itself). `gs_lora` options
    override the GS-LoRA configuration (sparsity_weight, bound, rank, ...). Returns a summary dict.
    """
    from loraplex.continual.evaluation import evaluate_tasks
    from loraplex.continual.fit import rows_of
    from loraplex.continual.forgetting import FORGETTERS, forget_request, retained_sample
    from loraplex.continual.metrics import forget_request_summary
    from loraplex.continual.registration import register_from_dir, safe_part, write_unit_adapter
    from loraplex.fsio import atomic_write
    from loraplex.continual.slots import extract_slot
    from loraplex.continual.spec import TrainerSettings
    from loraplex.errors import TaskNotFound
    from loraplex.heads import head_for
    from loraplex.models import fingerprint, resolve_base
    from loraplex.registry.record import validate_name
    from pydantic import ValidationError

    s = _settings(settings)
    reg = open_registry(s)
    recs = current_composition(reg, adapters=adapters, base=base)
    refs: list[str] = []
    for r in recs:
        if r.origin == "forgetting":
            continue
        for ref in (r.extra.get("tasks") or ([r.task] if r.task else [])):
            if ref not in refs:
                refs.append(ref)
    learned = [reg.load_task(ref) for ref in refs]
    target = next((t for t in learned if task in (t.name, t.ref)), None)
    if target is None:
        known = ", ".join(t.name for t in learned) or "none"
        raise TaskNotFound(f"cannot forget {task!r}: the composition never learned it (its tasks: {known})")
    labels = tuple(labels) or None
    if labels:
        bad = [lab for lab in labels if lab not in target.labels]
        if bad:
            raise UserInputError(f"task {target.name!r} has no label {bad[0]!r} (labels: {', '.join(target.labels)})")
        if set(labels) == set(target.labels):
            labels = None
    try:
        forgetter = FORGETTERS.build("gs-lora", {**gs_lora, "steps": steps, "lr": lr})
        trainer = TrainerSettings(steps=steps, lr=lr, batch_size=batch_size, eval_limit=eval_limit, snapshots=3)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidSpec(f"invalid option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = name or f"forget-{safe_part(target.name, 40)}-{stamp}"
    validate_name(name)
    if reg.has_adapter(name):
        raise AlreadyExists(f"an adapter named {name!r} already exists")
    ref = resolve_base(recs[0].base)
    fp = fingerprint(ref, s)
    forgetter.modules(fp)

    lb, _ = load_adapted([r.name for r in recs], s, reg=reg)
    head = head_for(lb)
    tasks = {t.name: t for t in learned}
    ev = dict(split="test", limit=eval_limit)
    before = evaluate_tasks(head, lb.model, lb.tokenizer, learned, **ev)
    objective = forgetter.objective(target, labels)
    forget_rows = [r for r in rows_of(target, "train") if objective.is_forget(r)]
    retained = retained_sample(learned, budget=forgetter.config.retain_budget, seed=seed,
                               split_rows=lambda t: rows_of(t, "train"), exclude=objective.is_forget)
    run_dir = s.home / "runs" / f"forget-{name}"
    out = forget_request(model=lb.model, tokenizer=lb.tokenizer, head=head, fingerprint=lb.fingerprint,
                         forgetter=forgetter, task=target, labels=labels, forget_rows=forget_rows, retained=retained,
                         tasks=tasks, trainer=trainer, seed=seed, run_dir=run_dir / "train", device=s.resolved_device(),
                         progress=progress, label=f"forget {target.name}")
    after = evaluate_tasks(head, lb.model, lb.tokenizer, learned, **ev)
    summary = forget_request_summary(before, after, target.name, labels,
                                     [t.name for t in learned if t.name != target.name], len(target.labels))
    gs = next(iter(out["regularizers"].values()), {})
    summary.update({k: gs.get(k) for k in ("groups_survived", "groups_total")})
    fspec = out["spec"].model_copy(update={"target_modules": tuple(out["surviving_modules"])})
    adapter = extract_slot(lb.model, fspec, out["slot"], modules=out["surviving_modules"])
    what = target.name + (f" (labels {', '.join(labels)})" if labels else "")
    composition = [r.name for r in recs] + [name]
    record = {
        "name": name, "base": ref.name, "family": ref.family, "origin": "forgetting", "task": target.ref,
        "description": f"Forgetting adapter (GS-LoRA): erases {what} from the composition. The erased task: "
                       f"{target.description}",
        "edges": [{"target": f"task:{target.ref}", "kind": "forgets"},
                  {"target": f"adapter:{recs[-1].name}", "kind": "trained-from"}],
        "metrics": {"accuracy": summary["forgotten_after"], **{
            k: summary[k] for k in ("forgotten_before", "forgotten_after", "retained_before", "retained_after",
                                    "retained_drop", "chance", "groups_survived", "groups_total")},
                    "steps": out["outcome"].steps, "train_seconds": out["outcome"].seconds},
        "extra": {"run_id": name, "unit": 0, "run_dir": str(run_dir), "tasks": [target.ref],
                  "task_cards": {target.ref: target.card()},
                  "labels": list(labels) if labels else None, "composition": composition},
    }
    state = run_dir / "adapter"
    state.mkdir(parents=True, exist_ok=True)
    write_unit_adapter(state, adapter, out["outcome"].snapshots, record)
    atomic_write(run_dir / "summary.json", _json_dumps(summary))
    rec = register_from_dir(reg, state, fingerprint=fp)
    return {"name": rec.name, "task": target.name, "labels": list(labels) if labels else None,
            "composition": composition, "run_dir": str(run_dir), **summary}


def _json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
