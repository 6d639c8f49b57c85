"""Answering with a routed model: batched queries, heterogeneous batches, and a stored router's evaluation.

How an answer is made: the query is routed (a learned router gates each token in each adapted
projection; retrieval gives the query constant gates from the nearest adapter signatures). The
adapter with the largest mean gate weight over the query's tokens (for retrieval: the nearest
adapter) names the task whose label set answers it; an encoder base scores the routed model's
embedding of the query against that task's label anchors, a causal base does rank classification
over that task's labels, or generates text when the task has no label set (router/model.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from loraplex.catalog import MAX_BATCH
from loraplex.errors import UserInputError
from loraplex.tasks import checked_labels, checked_texts
from loraplex.router import auto
from loraplex.router.load import is_untrained, load_routed_model, nearest_bases, shortlist_groups


def query(reg, settings, texts: Sequence[str], *, router: str | None = None, adapters: Sequence[str] | None = None,
          trace: bool = False, base: str | None = None, shortlist: int | None = None, batch_size: int = 32,
          config: dict[str, Any] | None = None, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Answer queries with a routed model, `batch_size` at a time. One dict per query:
    `{"query", "task", "answer", "adapters": [{"name", "weight"}], "tokens": [...], "layers": [...]}`
    (tokens and layers with `trace`). Without `router`, retrieval over the whole registry (or over
    `adapters`) routes; `router="auto"`: router/auto.py decides per query. `labels`: answer with one of
    these, routing (retrieval, auto) toward adapters trained on them (`RoutedModel.answer`)."""
    if router is not None and (not isinstance(router, str) or not router.strip()):
        raise UserInputError(f"--router must name a router, 'retrieval' or 'auto', got {router!r}")
    if base is not None and (not isinstance(base, str) or not base.strip()):  # "" was read as no base (sweep 69)
        raise UserInputError(f"the base is empty: name a base model, or leave it out, got {base!r}").about("base")
    texts = checked_texts(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        # unbounded, 10**20 was taken: one forward of every query (sweep 57), where the other --batch-size stop
        raise UserInputError(f"--batch-size must be a whole number from 1 to {MAX_BATCH:,} (got {batch_size!r})")
    if labels is not None:
        labels = checked_labels(labels)
    if router == "auto":
        return _query_auto(reg, settings, texts, adapters=adapters, shortlist=shortlist, base=base, trace=trace,
                           batch_size=batch_size, config=config, labels=labels)
    if adapters is not None and (isinstance(adapters, str) or not list(adapters)):  # [] is not "the whole registry"
        raise UserInputError("the adapter list is empty: name the adapters to route over, or leave it out for the "
                             "whole registry" if not isinstance(adapters, str) else
                             "adapters must be a list of names, got one string")
    if router is None:
        router = "retrieval"
    if shortlist is not None:
        return _query_shortlisted(reg, settings, texts, router=router, adapters=adapters, trace=trace, base=base,
                                  shortlist=shortlist, batch_size=batch_size, config=config, labels=labels)
    # retrieval over the whole registry depends on the queries: rebuilt per batch, and on a registry of several
    # bases each query is answered on its own nearest adapter's base (its queries batched together)
    per_batch = is_untrained(router) and not adapters
    if per_batch and base is None and len({n for n, _ in reg.base_fingerprints().values()}) > 1:
        groups: dict[str | None, list[int]] = {}
        for i, b in enumerate(nearest_bases(reg, texts, config)):
            groups.setdefault(b, []).append(i)
        out_of: list[dict[str, Any] | None] = [None] * len(texts)
        for b, rows in groups.items():
            for ans, j in zip(_answered(reg, settings, router, [texts[j] for j in rows], b, batch_size, config,
                                        labels, trace), rows):
                out_of[j] = ans
        return out_of  # type: ignore[return-value]
    if per_batch:
        return _answered(reg, settings, router, texts, base, batch_size, config, labels, trace)
    rm = load_routed_model(reg, settings, router, adapters, texts=texts[:batch_size], base=base, config=config,
                           labels=labels, share_base=True)  # never handed out: the base's weights and tokenizer
    out: list[dict[str, Any]] = []                            # shared, not copied
    for i in range(0, len(texts), batch_size):
        out.extend(rm.answer(texts[i: i + batch_size], trace=trace, labels=labels))
    return out


def _answered(reg, settings, router, texts: list[str], base, batch_size, config, labels, trace) -> list[dict[str, Any]]:
    """Retrieval over the whole registry, `batch_size` queries at a time, its candidates drawn per batch."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        rm = load_routed_model(reg, settings, router, None, texts=chunk, base=base, config=config, labels=labels,
                               share_base=True)
        out.extend(rm.answer(chunk, trace=trace, labels=labels))
    return out


def _query_shortlisted(reg, settings, texts: list[str], *, router, adapters, trace, base, shortlist, batch_size,
                       config, labels) -> list[dict[str, Any]]:
    """A stored router restricted to each query's own `shortlist` nearest adapters. A learned router mixes every
    adapter it is loaded with, so a query is answered by a model of its own shortlist alone (a batch's union
    made a query's answer depend on its neighbours; sweep 30); queries whose shortlists are equal share one
    model and are batched (a model per query made 128 queries 2.4x slower; sweep 29)."""
    out: list[dict[str, Any] | None] = [None] * len(texts)
    groups = shortlist_groups(reg, router, texts, shortlist, labels) if router and shortlist >= 1 else [(None, [])]
    for keep, rows in groups:  # (None, []): load_routed_model says why no shortlist applies
        rm = load_routed_model(reg, settings, router, adapters, texts=[texts[j] for j in rows], base=base,
                               shortlist=shortlist, config=config, labels=labels, share_base=True, keep=keep)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            for j, ans in zip(chunk, rm.answer([texts[j] for j in chunk], trace=trace, labels=labels)):
                out[j] = ans
    return out  # type: ignore[return-value]


def _query_auto(reg, settings, texts: list[str], *, adapters, shortlist, base, trace, batch_size,
                config, labels) -> list[dict[str, Any]]:
    """`query --router auto`: route, generate or fall back per request (router/auto.py)."""
    if adapters is not None:
        raise UserInputError("--router auto decides over the whole registry; --adapters does not apply")
    if shortlist is not None:
        raise UserInputError("--shortlist applies to a stored learned router, not to --router auto")
    out: list[dict[str, Any]] = []
    for i in range(0, len(texts), batch_size):
        out.extend(auto.answer(reg, settings, texts[i: i + batch_size], config, base=base, trace=trace,
                               labels=labels))
    return out


def answer_each(reg, settings, texts: Sequence[str], adapters: Sequence[str]) -> list[Any]:
    """A heterogeneous batch: row i answered by adapter adapters[i] alone, all rows in one forward pass."""
    texts = checked_texts(texts)
    odd = None if isinstance(adapters, str) else next((a for a in adapters if not isinstance(a, str)), None)
    if odd is not None:
        raise UserInputError(f"adapters must be adapter names (strings), got {odd!r}")
    if isinstance(adapters, str) or len(texts) != len(adapters := list(adapters)):
        raise UserInputError(f"{len(texts)} texts but {1 if isinstance(adapters, str) else len(adapters)} adapter "
                             "names; give one adapter per row")
    rm = load_routed_model(reg, settings, None, list(dict.fromkeys(adapters)), share_base=True)
    return rm.answer_each(texts, adapters)


def evaluate_router(reg, settings, name: str, *, tasks: Sequence[str] | None = None, split: str = "test",
                    limit: int | None = None) -> dict[str, Any]:
    """Routing accuracy, routed accuracy and each adapter alone (oracle), per task, for a stored router."""
    if split not in ("train", "validation", "test"):
        raise UserInputError(f"unknown split {split!r} (train, validation, test)")
    if limit is not None and limit < 1:
        raise UserInputError("--limit must be at least 1")
    if tasks is not None and not list(tasks):  # [] is not "all": leave it out for the router's own tasks
        raise UserInputError("the task list is empty: name the tasks to evaluate on, or leave it out for the router's own")
    rm = load_routed_model(reg, settings, name)
    task_objs = [reg.load_task(t) for t in tasks] if tasks else list(rm.task_pool)
    joint_scratch = bool(rm.record.extra.get("joint")) and not rm.record.members
    res = rm.evaluate(task_objs, split=split, limit=limit, oracle=not joint_scratch)
    return {"router": name, "method": rm.record.method, "base": rm.record.base, "split": split, **res}
