"""Replay: a budgeted buffer of earlier tasks' examples, mixed into later experiences' batches.

Replay lives on the data side (no loss term of its own): after each learning experience the task's
training rows are offered to the buffer; during later experiences `mixed_batches` fills a share
(`mix`) of every batch from the buffer, so earlier tasks keep contributing to the task loss. With
`rows: added` the replayed rows come on top of the batch's `batch_size` new rows instead of taking
their place: DER++ samples its buffer minibatch beside the stream's, so the new task's gradient per
step is the same as without replay (and each step is longer).

Budget: `budget` examples in all, or `share` of each task's training rows (each task keeps
ceil(share * n) rows). Policies:
- `reservoir` (Vitter's Algorithm R): with a total budget, a uniform sample of every row offered so
  far, whatever the task (big tasks hold more of the buffer); with a share, one reservoir per task.
- `class-balanced`: equal quotas per (task, label) class; when a new task arrives the total budget is
  re-divided and each class keeps a uniformly random subset of its rows (rows are stored in a random
  order, so trimming keeps a prefix); the remainder goes to the tasks in turn, so a budget below the
  number of classes still keeps rows of every task (and says so in a warning). With a share, the task's
  quota is divided over its labels.

Everything random comes from the buffer's own numpy generator, whose state is part of `state_dict`
(with the rows), so a run resumed from a saved buffer makes the same choices as one never stopped.
`remove(task, labels)` drops a forgotten task's (or labels') rows for good.

Distillation (`distill` > 0, DER++): the buffer also keeps, for each stored row, the scores the
composition gave it right after the row's task was learned (`scores`, a `continual.distill.StoredScores`
recorded by the stream loop after each learning unit's evaluation, saved with the rows); later units
add `distill * KL(stored || now)` on the replayed rows to their cross-entropy on the gold labels.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from loraplex.continual.distill import StoredScores
from loraplex.errors import LoraplexWarning
from loraplex.training import Row


class ReplayBuffer:
    def __init__(self, *, budget: int | None = None, share: float | None = None, policy: str = "reservoir",
                 seed: int = 0, distill: float = 0.0, knob: str = "replay.budget"):
        """`knob`: the option that sets `budget`, as a warning about it names it."""
        self.knob = knob
        if (budget is None) == (share is None):
            raise ValueError("give a budget or a share, exactly one")
        if policy not in ("reservoir", "class-balanced"):
            raise ValueError(f"unknown replay policy {policy!r}")
        self.budget, self.share, self.policy = budget, share, policy
        self.rng = np.random.default_rng(seed)
        self.classes: dict[tuple[str, int], list[Row]] = {}  # class-balanced storage
        self.rows: list[Row] = []  # reservoir storage (global), or per task below
        self.per_task: dict[str, list[Row]] = {}
        self.seen: dict[str, int] = {}  # reservoir counters: "*" for the global one, else per task
        self.scores = StoredScores(distill)  # (task, text) -> scores when the task was learned (distill > 0)

    @classmethod
    def from_settings(cls, settings: Any, seed: int) -> "ReplayBuffer":
        return cls(budget=settings.budget, share=settings.share, policy=settings.policy, seed=seed,
                   distill=settings.distill)

    # ---- filling ------------------------------------------------------------------------------
    def add_task(self, task: str, rows: Sequence[Row]) -> None:
        """Offer a finished task's training rows (in a random order drawn from the buffer's generator)."""
        order = self.rng.permutation(len(rows))
        rows = [Row(*rows[i]) for i in order]
        if self.policy == "reservoir":
            if self.budget is not None:
                self._reservoir(self.rows, rows, self.budget, "*")
            else:
                self.per_task[task] = []
                self._reservoir(self.per_task[task], rows, math.ceil(self.share * len(rows)), task)
            self.scores.keep_only(self.contents())
            return
        by_label: dict[int, list[Row]] = {}
        for r in rows:
            by_label.setdefault(r.label, []).append(r)
        for lab, rs in sorted(by_label.items()):
            self.classes[(task, lab)] = rs
        if self.budget is not None:
            quotas = _split(self.budget, _by_task_in_turn(self.classes))
            starved = sorted({k[0] for k in self.classes} - {k[0] for k, q in quotas.items() if q})
            if any(q == 0 for q in quotas.values()):
                warnings.warn(f"replay: a budget of {self.budget:,} rows is below the {len(self.classes):,} (task, "
                              f"label) classes it balances over: {sum(q == 0 for q in quotas.values()):,} keep no "
                              "row" + (f", and tasks {', '.join(starved)} none at all" if starved else "")
                              + f" (raise {self.knob})", LoraplexWarning, stacklevel=2)
        else:
            keys = [(task, lab) for lab in sorted(by_label)]
            quotas = {k: self._quota_of(k) for k in self.classes if k[0] != task}
            quotas.update(_split(math.ceil(self.share * len(rows)), keys))
        for k in list(self.classes):
            self.classes[k] = self.classes[k][: quotas.get(k, 0)]
        self.scores.keep_only(self.contents())

    def _quota_of(self, key: tuple[str, int]) -> int:
        return len(self.classes[key])

    def _reservoir(self, store: list[Row], rows: Sequence[Row], cap: int, key: str) -> None:
        n = self.seen.get(key, 0)
        for r in rows:
            n += 1
            if len(store) < cap:
                store.append(r)
            else:
                j = int(self.rng.integers(0, n))
                if j < cap:
                    store[j] = r
        self.seen[key] = n

    # ---- reading ------------------------------------------------------------------------------
    def contents(self) -> list[Row]:
        """Every stored row (a stable order: by task, then label, then storage order)."""
        if self.policy == "class-balanced":
            return [r for k in sorted(self.classes) for r in self.classes[k]]
        if self.budget is not None:
            return list(self.rows)
        return [r for t in sorted(self.per_task) for r in self.per_task[t]]

    def __len__(self) -> int:
        return len(self.contents())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.contents():
            out[r.task] = out.get(r.task, 0) + 1
        return out

    def remove(self, task: str, labels: Sequence[int] | None = None) -> int:
        """Drop a task's rows (or only those with the given label indices); returns how many went."""
        def gone(r: Row) -> bool:
            return r.task == task and (labels is None or r.label in labels)

        before = len(self)
        self.rows = [r for r in self.rows if not gone(r)]
        self.per_task = {t: [r for r in rs if not gone(r)] for t, rs in self.per_task.items()}
        self.classes = {k: [r for r in rs if not gone(r)] for k, rs in self.classes.items()}
        self.classes = {k: rs for k, rs in self.classes.items() if rs}
        self.scores.keep_only(self.contents())
        return before - len(self)

    # ---- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget, "share": self.share, "policy": self.policy,
            "rng": self.rng.bit_generator.state,
            "rows": [list(r) for r in self.rows],
            "per_task": {t: [list(r) for r in rs] for t, rs in self.per_task.items()},
            "classes": [[k[0], k[1], [list(r) for r in rs]] for k, rs in sorted(self.classes.items())],
            "seen": dict(self.seen),
            "scores": self.scores.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget, self.share, self.policy = state["budget"], state["share"], state["policy"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.rows = [Row(*r) for r in state["rows"]]
        self.per_task = {t: [Row(*r) for r in rs] for t, rs in state["per_task"].items()}
        self.classes = {(t, int(lab)): [Row(*r) for r in rs] for t, lab, rs in state["classes"]}
        self.seen = {k: int(v) for k, v in state["seen"].items()}
        if "scores" in state:
            self.scores.load_state_dict(state["scores"])


def _by_task_in_turn(classes) -> list[tuple[str, int]]:
    """The (task, label) classes in the order a budget's remainder is handed out: the tasks' first labels,
    then their second ones, ... (tasks and labels sorted, so a resumed buffer orders them alike). With a
    budget below the number of classes every task still gets rows while there are rows to give (sorted
    keys gave them all to the alphabetically first tasks: a task of 300 labels took the whole buffer)."""
    per: dict[str, list[tuple[str, int]]] = {}
    for k in sorted(classes):
        per.setdefault(k[0], []).append(k)
    longest = max((len(v) for v in per.values()), default=0)
    return [ks[i] for i in range(longest) for ks in per.values() if i < len(ks)]


def _split(total: int, keys: Sequence[Any]) -> dict[Any, int]:
    """`total` divided as evenly as possible over `keys` (the first ones get the remainder)."""
    if not keys:
        return {}
    q, rem = divmod(int(total), len(keys))
    return {k: q + (1 if i < rem else 0) for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------
# batches of an experience


def cycle(rows_by_task: dict[str, Sequence[Row]], rng: np.random.Generator) -> Iterator[Row]:
    """An endless stream of rows: a task drawn uniformly at random, then its next row in a reshuffled pass."""
    tasks = sorted(t for t, rs in rows_by_task.items() if rs)
    if not tasks:
        return
    orders = {t: iter(()) for t in tasks}
    while True:
        t = tasks[int(rng.integers(0, len(tasks)))] if len(tasks) > 1 else tasks[0]
        nxt = next(orders[t], None)
        if nxt is None:
            orders[t] = iter(rng.permutation(len(rows_by_task[t])).tolist())
            nxt = next(orders[t])
        yield rows_by_task[t][nxt]


def replayed_per_batch(n_old: int, batch_size: int, mix: float, *, has_new: bool = True) -> int:
    """Rows of each batch drawn from the buffer: round(mix * batch_size), at least 1 and at most
    batch_size - 1 when both kinds of rows exist; all of the batch when there are no new rows."""
    if not n_old or mix <= 0:
        return 0
    if not has_new:
        return min(n_old, batch_size)
    return min(n_old, batch_size - 1, max(1, round(mix * batch_size)))


def mixed_batches(new: dict[str, Sequence[Row]], old: Sequence[Row], *, steps: int, batch_size: int, mix: float,
                  rng: np.random.Generator, added: bool = False) -> list[list[Row]]:
    """`steps` batches of `batch_size` rows: round(mix * batch_size) drawn from `old` (without replacement
    within a batch) when it is non-empty, the rest from the new tasks (balanced over tasks). `added`: the
    replayed rows come on top of `batch_size` new rows instead (DER++'s buffer minibatch beside the
    stream's), so the new tasks get as many rows per step as without replay."""
    has_new = any(len(v) for v in new.values())
    if not has_new and not old:
        raise ValueError("an experience needs new rows or replayed rows")
    k_old = replayed_per_batch(len(old), batch_size, mix, has_new=has_new)
    n_new = batch_size if added else batch_size - k_old
    stream = cycle(new, rng)
    batches = []
    for _ in range(steps):
        batch = [next(stream) for _ in range(n_new)] if has_new else []
        if k_old:
            batch += [old[int(i)] for i in rng.choice(len(old), size=k_old, replace=False)]
        batches.append(batch)
    return batches
