"""Classification on the engine's models (`Engine.classify`): rows of every request on the slot bank go
through shared forwards (cut wherever the rows would need more adapters than the bank has slots), and
a router's rows through that router's model. Each text gets its label, the label scores as softmax,
and its routing. A request that names its labels is answered with them (`router.model.labels_task`: the
routed adapter's label texts where it has those labels), the bare base included.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from loraplex.errors import LoraplexError, UserInputError
from loraplex.experts.layers import use_gates
from loraplex.heads import best_labels
from loraplex.router.model import labels_task
from loraplex.serve.targets import Route, Target, route_summary, top_adapters

if TYPE_CHECKING:
    from loraplex.serve.engine import Engine

__all__ = ["classify", "chunks"]

@torch.no_grad()
def classify(engine: Engine, items: Sequence[tuple[list[str], Target, list[Route] | None, Sequence[str] | None]],
             keep: set[str] = frozenset()) -> list[list[dict[str, Any]] | Exception]:
    """Each item's texts labelled (label, label scores as softmax, routing); rows of every item on
    the slot bank go through one forward. An `auto` item comes with its routes (`auto`, decided in
    its request's worker); an item's label set (or None) answers its texts. A failing item gets its
    exception, the others go on. `keep`: adapters of rows still generating, whose slots are not evicted."""
    out: list[Any] = [None] * len(items)
    texts, routes, tasks, owner = [], [], [], []
    for k, (xs, tg, decided, labels) in enumerate(items):
        try:
            if tg.kind == "router":
                out[k] = _classify_router(engine, list(xs), tg.name, labels)
                continue
            if tg.kind == "auto" and (decided is None or len(decided) != len(xs)):
                raise ValueError("auto's routes are decided before its job is submitted (Engine.auto)")
            one = engine.route_of(tg) if tg.kind != "auto" else None  # read once (a composition is a record read)
            rs = list(decided) if one is None else [dataclasses.replace(one, adapters=list(one.adapters)) for _ in xs]
            made: dict[Any, Any] = {}  # one labels task per routed task in an item (rows then share forwards)
            ts = [_label_task(engine, r, tg, labels, made) for r in rs]
        except LoraplexError as exc:
            out[k] = exc
            continue
        texts += xs
        routes += rs
        tasks += ts
        owner += [k] * len(xs)
    if texts:
        scores = _scores(engine, texts, routes, tasks, keep)
        for k in set(owner):
            try:  # one request's NaN scores (an adapter that overflows) fail that request, not the batch (sweep 66)
                out[k] = [_labelled(tasks[i], scores[i], route_summary(routes[i]), engine.cut(texts[i], tasks[i]))
                          for i in range(len(texts)) if owner[i] == k]
            except LoraplexError as exc:
                out[k] = exc
    return out


def chunks(routes: Sequence[Route], fits: Callable[[set[str]], bool]) -> list[list[int]]:
    """Row indices in order, cut wherever a chunk's adapters would no longer `fit` in the slot bank at once
    (`Engine.fits`, beside the running rows' slots)."""
    out: list[list[int]] = [[]]
    used: set[str] = set()
    for i, r in enumerate(routes):
        need = {a for a, _ in r.adapters}
        if out[-1] and not fits(used | need):
            out.append([])
            used = set()
        out[-1].append(i)
        used |= need
    return out


def check_answerable(routes: Sequence[Route] | None, labels: Sequence[str] | None) -> None:
    """Before any forward: without `labels`, an input `auto` passed to the bare base has no label set to
    answer with. A 400 naming the first such input and how many there are (not one input of 2,048 failing
    the request after every other was scored)."""
    if labels:
        return
    routes = list(routes or ())
    refuse_base_answers([not r.adapters for r in routes], [r.reason for r in routes])


def refuse_base_answers(to_base: Sequence[bool], reasons: Sequence[str | None]) -> None:
    """The 400 of `check_answerable` for inputs (`to_base[i]`) a classification without labels would answer
    with the bare base; also asked by `Engine.auto` on the decisions, before any adapter is written or
    candidate logged for the request's other inputs (a refused request changes nothing)."""
    fell = [i for i, b in enumerate(to_base) if b]
    if not fell:
        return
    more = f" (and {len(fell) - 1} more of {len(to_base)})" if len(fell) > 1 else ""
    raise UserInputError(f"input {fell[0]}{more}: auto passed it to the bare base, which has no label set to "
                         f"classify with (give labels): {reasons[fell[0]] or 'no adapter is registered for this base'}"
                         ).about("labels")


def _label_task(engine: Engine, r: Route, tg: Target, labels: Sequence[str] | None, made: dict[Any, Any]):
    """The task a row is answered on: its top adapter's, or the label set its request names."""
    if labels:
        like = engine.task_of(max(r.adapters, key=lambda x: x[1])[0]) if r.adapters else None
        return made.setdefault(id(like), labels_task(labels, like))
    if not r.adapters:
        if tg.kind == "auto":
            raise UserInputError(f"auto passed this input to the bare base, which has no label set to classify "
                                 f"with (give labels): {r.reason or 'no adapter is registered for this base'}"
                                 ).about("labels")
        raise UserInputError(f"{tg.name!r} has no label set to classify with: name an adapter, a router or auto, "
                             "or give labels").about("labels")
    top = max(r.adapters, key=lambda x: x[1])[0]
    task = engine.task_of(top)
    if task is None or not task.labels:
        raise UserInputError(f"adapter {top!r} records no task with labels: nothing to classify with (give "
                             "labels)").about("labels")
    return task


def _scores(engine: Engine, texts: list[str], routes: list[Route], tasks: list[Any],
            keep: set[str] = frozenset()) -> list[torch.Tensor]:
    model, tok, head = engine.lb.model, engine.tokenizer, engine.head
    scores: list[Any] = [None] * len(texts)
    for chunk in chunks(routes, lambda names: engine.fits(names, keep)):
        g = engine.gates([routes[i] for i in chunk], keep)
        if hasattr(head, "encode"):  # an encoder: one forward for every row, then each row's anchors
            with use_gates(model, g):
                emb = head.encode(model, tok, [texts[i] for i in chunk])  # (N, D)
            for j, i in enumerate(chunk):
                scores[i] = head.scores_of(model, tok, emb[j:j + 1], tasks[i])[0]
            continue
        # a causal LM scores every label as its own sequence (batched inside the head), so rows share a
        # forward when they share a task and a routing: the gates (1, 1, S) then fit every sequence
        keys = [(id(tasks[i]), tuple(routes[i].adapters)) for i in chunk]
        for rows in _groups(keys):
            with use_gates(model, g[rows[:1]] if g is not None else None):
                s = head.scores(model, tok, [texts[chunk[j]] for j in rows], tasks[chunk[rows[0]]])
            for j, r in enumerate(rows):
                scores[chunk[r]] = s[j]
    return scores


def _classify_router(engine: Engine, texts: list[str], name: str, labels: Sequence[str] | None
                     ) -> list[dict[str, Any]]:
    rm = engine.router_model(name)
    routes = rm.route(texts)
    tasks = rm.task_of(texts, routes)
    if labels:
        made: dict[Any, Any] = {}
        tasks = [made.setdefault(id(t), labels_task(labels, t)) for t in tasks]
    if any(t is None or not t.labels for t in tasks):
        raise UserInputError(f"router {name!r} routed a text to an adapter with no label set")
    out: list[Any] = [None] * len(texts)
    for rows in _groups(tasks):
        s, _ = rm.scores_and_routes([texts[i] for i in rows], tasks[rows[0]])
        for j, i in enumerate(rows):
            out[i] = _labelled(tasks[i], s[j], {"adapters": top_adapters(rm.experts, routes[i].weights)},
                               engine.cut(texts[i], tasks[i]))
    return out


def _groups(keys: Sequence[Any]) -> list[list[int]]:
    """Indices grouped by key (tasks by identity, or hashable keys), in order of first appearance."""
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k if isinstance(k, (tuple, int, str)) else id(k), []).append(i)
    return list(out.values())


def _labelled(task, scores: torch.Tensor, routing: dict[str, Any], cut: bool) -> dict[str, Any]:
    """One answer; `truncated`: the head read only the text's start (what its context leaves for it)."""
    top = best_labels(scores)[0]  # NaN scores (an adapter that overflows) are refused, not a label and a 500 on NaN JSON
    p = torch.softmax(scores.float(), -1).tolist()
    return {"task": task.name, "label": task.answer_label(task.labels[top]),
            "scores": {task.answer_label(lab): round(v, 6) for lab, v in zip(task.labels, p)}, "truncated": cut, "routing": routing}
