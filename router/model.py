"""RoutedModel: a base model with a bank of E experts and a router, that answers queries and says how it routed.

The answer to a query (see `RoutedModel.answer`):
1. the query is routed: a learned router gates every token in every adapted projection; retrieval sets
   one constant gate vector per query;
2. the query's adapter is the one with the largest mean gate weight over its tokens (padding excluded)
   and over the routed projections; its task gives the label set (an expert without a task, e.g. a rank
   LoRA trained from scratch, borrows the nearest of the router's tasks by signature);
3. an encoder scores the routed model's embedding of the query against that task's label anchors; a
   causal LM does rank classification over that task's labels, or generates when the task has no
   label set (or there is no task at all).

`route(texts)` gives the trace: per token the adapter with the largest weight (mean over layers), per
transformer block the adapter with the largest mean weight over the tokens, and per query the mean
weight of every adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from loraplex.errors import UserInputError, as_out_of_memory
from loraplex.experts.layers import block_name, routed_layers, swapped, use_gates
from loraplex.heads import accuracy, best_labels, head_for, token_text
from loraplex.tasks import Task, checked_labels, checked_texts, label_fold


def _same_task(a: Task, b: Task) -> bool:
    """Whether `b` is task `a` itself: the same embedded task, or the same file however its path is written (a
    link, a `..`: the registry's `same_task_file`), never a namesake (sweep 48)."""
    from loraplex.registry.store import same_task_file

    if a.source == "embedded" or b.source == "embedded":
        return a.ref == b.ref
    return same_task_file(a.source, b.source)


@dataclass
class RowRoute:
    """How one query was routed."""

    weights: np.ndarray  # (E,) mean weight of each expert over tokens and layers
    tokens: list[tuple[str, int, float]] = field(default_factory=list)  # (token, expert, weight)
    layers: list[tuple[str, int, float]] = field(default_factory=list)  # (block, expert, weight)

    @property
    def top(self) -> int:
        return int(np.argmax(self.weights))


@dataclass
class _Call:
    ids: torch.Tensor | None  # (B, T)
    mask: torch.Tensor | None  # (B, T)
    per_layer: dict[str, torch.Tensor] | None  # layer -> (B, T, E) per-adapter weights


class Recorder:
    """Records, for every forward of `model` that routes, its input ids, mask and per-layer routing."""

    def __init__(self, model):
        self.model = model
        self.layers = routed_layers(model)
        self.calls: list[_Call] = []
        self._ids = self._mask = None

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        m = kwargs.get("attention_mask")
        self._ids = ids.detach().cpu() if isinstance(ids, torch.Tensor) else None
        self._mask = m.detach().bool().cpu() if isinstance(m, torch.Tensor) and m.dim() == 2 else None
        for layer in self.layers.values():
            layer.last_routing = None

    def _post(self, module, args, kwargs, output):
        if not any(layer.enabled for layer in self.layers.values()):
            return  # the bare base (label anchors): not a routed forward
        per = {n: l.last_routing.per_adapter().cpu() for n, l in self.layers.items() if l.last_routing is not None}
        self.calls.append(_Call(self._ids, self._mask, per or None))

    @contextmanager
    def recording(self) -> Iterator["Recorder"]:
        old = {n: l.record for n, l in self.layers.items()}
        h1 = self.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        h2 = self.model.register_forward_hook(self._post, with_kwargs=True)
        try:
            for layer in self.layers.values():
                layer.record = True
            yield self
        finally:
            h1.remove()
            h2.remove()
            for n, layer in self.layers.items():
                layer.record = old[n]
                layer.last_routing = None


def block_of(layer: str) -> str:
    """The transformer block a projection belongs to (`experts.layers.block_name`), or the projection itself."""
    return block_name(layer) or layer


def routers_off(model):
    """Learned routers detached during the block (static gates then decide, e.g. an oracle's one-hot)."""
    return swapped(model, "router", None)


def labels_task(labels: Sequence[str], like: Any = None) -> Task:
    """The task of answering with `labels`: `like` itself when it has that label set, in the order asked (a
    causal LM reads the task's description in its prompt: the same labels in another order were a new task,
    "answer with one of: ...", and the adapter was asked with a prompt it was never trained on), else a task
    of those labels, with `like`'s label texts for the labels it shares."""
    if like is not None and len(like.labels) == len(labels) and set(like.labels) == set(labels):
        return like if tuple(like.labels) == tuple(labels) else dataclasses.replace(like, labels=tuple(labels))
    own = {label_fold(lab): lab for lab in like.labels} if like is not None else {}
    if like is not None and len(own) == len(like.labels) == len(labels) and set(own) == {label_fold(x) for x in labels}:
        # its own labels in another case ("Negative" for "negative") or Unicode normalisation (an NFD "café"
        # typed on a Mac): the adapter reads the names it was trained on (a causal LM scores them; another
        # spelling was a new task, answered otherwise), and the answer is given in the query's spelling
        mine = tuple(own[label_fold(x)] for x in labels)
        return dataclasses.replace(like, labels=mine, spelled={m: x for m, x in zip(mine, labels) if m != x})
    texts = {lab: like.label_text(own[label_fold(lab)]) for lab in labels if label_fold(lab) in own}
    return Task(name="labels", description="answer with one of: " + ", ".join(labels), labels=tuple(labels),
                train=(), validation=(), test=(), label_texts=texts, source="query")


def _inference(fn):
    """A RoutedModel method run under torch.no_grad with the model in eval mode (dropout off), the modes the
    caller had restored after: a model a user left in train() mode answered at random (sweep 26). One call at
    a time per model: a call sets the gates, hooks and modes on the model's shared modules, and calls from
    several threads (a thread pool serving one loaded model) failed with shape errors or answered with another
    call's gates, without a word (sweep 69); they wait for each other (a re-entrant lock: `answer` routes)."""

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with self._calls:
            training = [m for m in self.model.modules() if m.training]
            for m in training:
                m.training = False
            try:
                with torch.no_grad():
                    return fn(self, *args, **kwargs)
            except Exception as exc:  # a failed allocation named as api.query names it (it was the raw
                oom = as_out_of_memory(exc, f"RoutedModel.{fn.__name__}()")  # RuntimeError of the allocator: sweep 42)
                if oom is None:
                    raise
                raise oom from exc
            finally:
                for m in training:
                    m.training = True

    return run


class RoutedModel:
    """A loaded base with E experts and a router (learned gates, or retrieval's static gates)."""

    def __init__(self, lb, experts: list[str], expert_tasks: list[Any], *, router=None, retrieval=None,
                 signatures=None, embedder=None, record=None, task_pool: Sequence[Any] = (),
                 task_signatures: np.ndarray | None = None):
        self.lb = lb
        self.head = head_for(lb)
        self.experts = list(experts)
        self.expert_tasks = list(expert_tasks)
        self.router = router
        self.retrieval = retrieval
        self.signatures = signatures
        self.embedder = embedder
        self.record = record
        self.task_pool = list(task_pool)
        self.task_signatures = task_signatures
        self.lb.model.eval()
        self._calls = threading.RLock()  # one call at a time (`_inference`)

    @property
    def model(self):
        return self.lb.model

    @property
    def tokenizer(self):
        return self.lb.tokenizer

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    # ---- gates -------------------------------------------------------------------------------
    def static_gates(self, texts: Sequence[str], labels: Sequence[str] | None = None) -> torch.Tensor | None:
        """(N, 1, E) retrieval gates for the texts, or None for a learned router. `labels`: the label set
        the texts are to be answered with; adapters trained on it rank higher (RetrievalRouter.label_bonus)."""
        if self.retrieval is None:
            if self.router is None:  # loaded with adapters only: nothing chooses among them
                raise UserInputError("this model has no router: answer each text with a chosen adapter "
                                     "(answer_each(texts, adapters)), or load it with router='retrieval' or a stored "
                                     "router")
            return None
        q = self.embedder.encode(list(texts))
        scores = self.retrieval.scores(q, self.signatures)  # (N, E)
        bonus = self.retrieval.label_bonus(labels, [t.labels if t is not None else None for t in self.expert_tasks])
        g = self.retrieval.gates(scores if bonus is None else scores + bonus[None, :])  # (N, E)
        return torch.from_numpy(g).to(self.lb.device).unsqueeze(1)

    def one_hot(self, experts: Sequence[int]) -> torch.Tensor:
        """(N, 1, E) gates selecting one expert per row (a heterogeneous batch)."""
        g = torch.zeros(len(experts), 1, self.n_experts, device=self.lb.device)
        g[torch.arange(len(experts)), 0, torch.as_tensor(list(experts))] = 1.0
        return g

    # ---- routing and traces ------------------------------------------------------------------
    def _rows_from_call(self, call: _Call, static: torch.Tensor | None, trace: bool) -> list[RowRoute]:
        B = call.ids.shape[0] if call.ids is not None else static.shape[0]
        mask = call.mask if call.mask is not None else torch.ones(call.ids.shape, dtype=torch.bool)
        if call.per_layer:  # in the model's own order (layer 2 before layer 10, not as strings sort)
            order = list(routed_layers(self.model))
            names = [n for n in order if n in call.per_layer] + sorted(set(call.per_layer) - set(order))
            stack = torch.stack([call.per_layer[n] for n in names])  # (L, B, T, E)
        else:  # static gates: the same weights for every token and layer
            names = list(routed_layers(self.model))
            g = static[:, 0].float().cpu()
            g = g.abs() / g.abs().sum(-1, keepdim=True).clamp_min(1e-12)  # (B, E)
            stack = g[None, :, None, :].expand(len(names), B, mask.shape[1], -1)
        m = mask.float()[None, :, :, None]  # (1, B, T, 1)
        per_token = (stack * m).mean(0)  # (B, T, E)
        # a distribution over the adapters: a projection an adapter has no module on gives it no weight there,
        # which left a rank router's lone shortlisted adapter at 0.667 where token-gate said 1.0 (sweep 30)
        per_token = per_token / per_token.sum(-1, keepdim=True).clamp_min(1e-12)
        row_w = per_token.sum(1) / mask.float().sum(1, keepdim=True).clamp_min(1.0)  # (B, E)
        rows = []
        for b in range(B):
            r = RowRoute(row_w[b].numpy())
            if trace:
                valid = mask[b].nonzero().flatten().tolist()
                ids = call.ids[b].tolist() if call.ids is not None else []
                # bookkeeping tokens ([CLS], [SEP], padding) are left out; [UNK] is what the model read of a
                # character it does not know, an emoji's row (it was left out too: an emoji-only trace was empty)
                special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
                for t in valid:
                    if t < len(ids) and ids[t] not in special:
                        w, e = per_token[b, t].max(-1)
                        text = token_text(self.tokenizer, ids[t])
                        r.tokens.append((text if text.strip() else repr(text), int(e), float(w)))  # '\n\n', not a blank
                blocks: dict[str, list[int]] = {}
                for i, n in enumerate(names):
                    blocks.setdefault(block_of(n), []).append(i)
                denom = mask[b].float().sum().clamp_min(1.0)
                for blk, idx in blocks.items():
                    wb = (stack[idx, b] * mask[b].float()[None, :, None]).sum((0, 1)) / (denom * len(idx))  # (E,)
                    w, e = wb.max(-1)
                    r.layers.append((blk, int(e), float(w)))
            rows.append(r)
        return rows

    @_inference
    def route(self, texts: Sequence[str], *, trace: bool = False, static: torch.Tensor | None = None) -> list[RowRoute]:
        """How each text is routed (one forward through the routed model)."""
        if not isinstance(trace, bool):  # "no" and 1 were read as true (sweep 69): `query` refuses them too
            raise UserInputError(f"trace must be true or false, got {type(trace).__name__} {str(trace)[:40]!r}")
        if static is None:
            static = self.static_gates(texts)
        rec = Recorder(self.model)
        with rec.recording(), use_gates(self.model, static):
            self.head.hidden(self.model, self.tokenizer, list(texts))
        call = next(c for c in rec.calls)
        return self._rows_from_call(call, static, trace)

    # ---- answers -----------------------------------------------------------------------------
    def task_of(self, text_rows: Sequence[str], routes: Sequence[RowRoute]) -> list[Any]:
        """The task whose label set answers each query (its top expert's task, else the nearest router task)."""
        out: list[Any] = [self.expert_tasks[r.top] for r in routes]
        missing = [i for i, t in enumerate(out) if t is None]
        if missing and self.task_pool and self.task_signatures is not None and self.embedder is not None:
            q = self.embedder.encode([text_rows[i] for i in missing])  # (M, D)
            best = np.argmax(q @ self.task_signatures.T, axis=1)
            for i, j in zip(missing, best):
                out[i] = self.task_pool[int(j)]
        return out

    @_inference
    def answer(self, texts: Sequence[str], *, trace: bool = False, labels: Sequence[str] | None = None
               ) -> list[dict[str, Any]]:
        """Route and answer each text: {"query", "task", "answer", "adapters", "tokens", "layers"}.

        `labels`: the answers the caller wants (at least two, checked by `loraplex.tasks.checked_labels`):
        retrieval prefers adapters trained on that label set, and every text is answered with one of
        them (label texts taken from the routed adapter's task where it has the label). The texts are
        checked (`loraplex.tasks.checked_texts`: a list of non-empty strings) and stripped."""
        texts = checked_texts(texts)
        labels = None if labels is None else checked_labels(labels)
        static = self.static_gates(texts, labels)
        routes = self.route(texts, trace=trace, static=static)
        tasks = self.task_of(texts, routes)
        if labels:
            tasks = [labels_task(labels, t) for t in tasks]
        answers: list[Any] = [None] * len(texts)
        # A causal head turns each text into several sequences (one per label, batched its own way), so
        # its static gates cannot follow the texts row by row: rows are grouped by task and gate row,
        # and each group's one gate row (1, 1, E) broadcasts over whatever batches the head makes.
        per_row = static is not None and not self.head.embeds
        groups: dict[Any, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault((id(t), static[i].cpu().numpy().tobytes() if per_row else None), []).append(i)
        for rows in groups.values():
            task = tasks[rows[0]]
            sub = [texts[i] for i in rows]
            g = (static[rows[:1]] if per_row else static[rows]) if static is not None else None
            with use_gates(self.model, g):
                labels = self._answer_group(sub, task)
            for i, a in zip(rows, labels):
                answers[i] = a
        out = []
        for i, (text, r) in enumerate(zip(texts, routes)):
            ads = [{"name": self.experts[e], "weight": round(float(w), 4)}
                   for e, w in sorted(enumerate(r.weights), key=lambda x: -x[1]) if w > 5e-4]
            item = {"query": text, "task": tasks[i].name if tasks[i] is not None else None, "answer": answers[i],
                    "adapters": ads}
            if trace:
                item["tokens"] = [{"token": t, "adapter": self.experts[e], "weight": round(w, 4)} for t, e, w in r.tokens]
                item["layers"] = [{"layer": b, "adapter": self.experts[e], "weight": round(w, 4)} for b, e, w in r.layers]
            out.append(item)
        return out

    def _answer_group(self, texts: list[str], task) -> list[Any]:
        if task is not None and task.labels:
            scores = self.head.scores(self.model, self.tokenizer, texts, task)  # (N, L)
            return [task.answer_label(task.labels[i]) for i in best_labels(scores)]
        if self.head.generates:
            return self.head.generate(self.model, self.tokenizer, texts, task)
        raise UserInputError(
            "no label set to answer with: the query was routed to adapters that record no task of their own (one "
            "learned on several tasks, or registered without --task), and an encoder answers with a task's labels: "
            "name them with --labels")

    # ---- heterogeneous batch -----------------------------------------------------------------
    def expert_indices(self, experts: Sequence[int | str], n: int) -> list[int]:
        """The bank index of each of `n` rows' experts, given by name or number (refused: another count, an
        unknown name, a number out of range, anything else)."""
        if isinstance(experts, (str, bytes)):
            raise UserInputError("experts must be a list (one adapter per text), got one string")
        experts = list(experts)
        if len(experts) != n:
            raise UserInputError(f"{n} texts but {len(experts)} adapters; give one adapter per text")
        idx = []
        for e in experts:
            if isinstance(e, str):
                if e not in self.experts:
                    raise UserInputError(f"adapter {e!r} is not in this model (its adapters: "
                                         f"{', '.join(self.experts[:8])}{', ...' if len(self.experts) > 8 else ''})")
                idx.append(self.experts.index(e))
            elif isinstance(e, numbers.Integral) and not isinstance(e, bool):
                i = int(e)
                if not 0 <= i < len(self.experts):
                    raise UserInputError(f"adapter number {i} is out of range: this model has {len(self.experts)} (0 to "
                                         f"{len(self.experts) - 1})")
                idx.append(i)
            else:
                raise UserInputError(f"an adapter is named (a string) or numbered (an int), got {e!r}")
        return idx

    @_inference
    def answer_each(self, texts: Sequence[str], experts: Sequence[int | str], *,
                    labels: Sequence[str] | None = None) -> list[Any]:
        """Answer row i with expert experts[i] alone (one forward for an encoder: gates (N, 1, E) one-hot);
        `labels`: with one of these (as `answer`), not with the expert's task's label set. An expert is
        named (one of `experts`) or numbered (0 .. E-1); one per text."""
        texts = checked_texts(texts)
        labels = None if labels is None else checked_labels(labels)
        idx = self.expert_indices(experts, len(texts))
        tasks = [self.expert_tasks[i] for i in idx]
        if labels:
            made: dict[int, Any] = {}  # one labels task per expert task (the causal path groups rows by task)
            tasks = [made.setdefault(id(t), labels_task(labels, t)) for t in tasks]
        with routers_off(self.model), use_gates(self.model, self.one_hot(idx)):
            if self.head.embeds:
                emb = self.head.encode(self.model, self.tokenizer, texts)  # (N, D), one routed forward
                out = []
                for i, t in enumerate(tasks):
                    if t is None or not t.labels:
                        out.append(None)
                        continue
                    s = emb[i] @ self.head.anchors(self.model, self.tokenizer, t).T  # (L,)
                    out.append(t.answer_label(t.labels[best_labels(s)[0]]))
                return out
        # a causal head scores each row as L label continuations (rows x L sequences): rows go in groups of one
        # task and one expert, whose gates (1, 1, E) fit every sequence (per-row gates did not: a crash)
        out: list[Any] = [None] * len(texts)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault((id(t), idx[i]), []).append(i)
        for (_, e), rows in groups.items():
            g = self.one_hot([e])
            with routers_off(self.model), use_gates(self.model, g):
                res = self._answer_group([texts[i] for i in rows], tasks[rows[0]])
            for i, a in zip(rows, res):
                out[i] = a
        return out

    # ---- evaluation --------------------------------------------------------------------------
    @_inference
    def scores_and_routes(self, texts: list[str], task) -> tuple[torch.Tensor, list[RowRoute]]:
        """Label scores (N, L) on `task` and the routing of each text (retrieval: knowing the task's labels);
        one forward for encoders."""
        static = self.static_gates(texts, task.labels if task is not None else None)
        if self.head.embeds:
            rec = Recorder(self.model)
            with rec.recording(), use_gates(self.model, static):
                scores = self.head.scores(self.model, self.tokenizer, texts, task)
            return scores, self._rows_from_call(rec.calls[0], static, False)
        routes = self.route(texts, static=static)
        with use_gates(self.model, static):
            scores = self.head.scores(self.model, self.tokenizer, texts, task)
        return scores, routes

    @_inference
    def evaluate(self, tasks: Sequence[Any], *, split: str = "test", limit: int | None = None,
                 oracle: bool = True, batch_size: int = 64) -> dict[str, Any]:
        """Routing accuracy, routed accuracy and (optionally) the oracle accuracy, per task and overall.

        Routing accuracy: share of examples whose top expert (largest mean gate weight) is the one of
        their own task. Routed accuracy is scored on the example's own task's labels; answered accuracy is
        what `answer` (a query, the server) gives, the label set that of the task routing picks (the top
        expert's): where experts answer with other label sets it is lower (a bbc row answered with another
        task's two labels: 87.5% routed, 56% answered; sweep 30). The oracle is the task's own expert alone
        (one-hot gates, router detached). Each overall figure is the mean over tasks (routing accuracy's over
        the tasks that have an expert): routing was pooled over rows while the others were means over tasks,
        so one task of 500 rows hid two of one row never routed right (97.9% beside 33.6%; sweep 57).
        """
        rows, tot_n = [], 0  # eval mode: `_inference`
        for task in tasks:
            ex = list(task.split(split))[:limit] if limit else list(task.split(split))
            if not ex:
                continue
            # the expert of this very task (its ref: an embedded name or a file's path), never of a namesake: a
            # file `airline.jsonl` of sport/tech rows was scored as airline-lora's task (sweep 48)
            own = next((i for i, t in enumerate(self.expert_tasks) if t is not None and _same_task(t, task)), None)
            correct = routed_ok = answered = 0
            for i in range(0, len(ex), batch_size):
                chunk = ex[i: i + batch_size]
                texts = [e.text for e in chunk]
                scores, routes = self.scores_and_routes(texts, task)
                pred = best_labels(scores)
                right = [int(p == task.label_index(e.label)) for p, e in zip(pred, chunk)]
                correct += sum(right)
                routed_ok += sum(int(r.top == own) for r in routes) if own is not None else 0
                picked = self.task_of(texts, routes)
                same = [t is not None and _same_task(t, task) and t.labels == task.labels for t in picked]
                answered += sum(r for r, ok in zip(right, same) if ok)
                other = [k for k, ok in enumerate(same)  # answered with another task's labels (none: not
                         if not ok and picked[k] is not None and picked[k].labels]  # answered, so not right)
                if other:
                    got = self.answer([texts[k] for k in other])
                    answered += sum(int(g["answer"] is not None and label_fold(str(g["answer"]))
                                        == label_fold(chunk[k].label)) for g, k in zip(got, other))
            row = {"task": task.name, "adapter": self.experts[own] if own is not None else None, "n": len(ex),
                   "routing_accuracy": routed_ok / len(ex) if own is not None else None,
                   "accuracy": correct / len(ex), "answered_accuracy": answered / len(ex), "oracle_accuracy": None}
            if oracle and own is not None:
                g = self.one_hot([own])
                with routers_off(self.model), use_gates(self.model, g):
                    row["oracle_accuracy"] = accuracy(self.head, self.model, self.tokenizer, task, split, limit)["accuracy"]
            tot_n += len(ex)
            rows.append(row)
        accs = [r["accuracy"] for r in rows]
        said = [r["answered_accuracy"] for r in rows]
        orcs = [r["oracle_accuracy"] for r in rows if r["oracle_accuracy"] is not None]
        routed = [r["routing_accuracy"] for r in rows if r["routing_accuracy"] is not None]
        return {
            "tasks": rows,
            "routing_accuracy": sum(routed) / len(routed) if routed else None,
            "accuracy": sum(accs) / len(accs) if accs else None,
            "answered_accuracy": sum(said) / len(said) if said else None,
            "oracle_accuracy": sum(orcs) / len(orcs) if orcs else None,
            "n": tot_n,
        }
