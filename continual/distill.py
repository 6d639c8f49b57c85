"""Stored scores as distillation targets: a row's scores from an earlier model, matched by the current one.

Two places keep a model's past answers on some rows and pull the model being trained back towards them
(`ContinualModule.task_loss` adds `weight * KL(stored || now)` over the batch rows that have an entry,
using the scores of the same forward as the task loss):

- a forgetting request (GS-LoRA retention): the retained rows as the composition scored them just
  before the request (`ForgetObjective.teacher`);
- replay with `distill > 0` (DER++, Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual
  Learning: a Strong, Simple Baseline"): each replayed row as the composition scored it right after the
  row's task was learned, stored in the buffer with the row (`ReplayBuffer.scores`) and saved with it.
  DER++ matches stored logits with an MSE; we match the softmax distributions with a KL, the same form
  as the retention term, because the encoder head's scores are temperature-scaled cosines whose overall
  offset carries no prediction (KL ignores it, an MSE would spend capacity on it).

Rows are keyed by (task, text). Scores are kept on the CPU as float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from loraplex.training import Row, as_row


class StoredScores:
    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)
        self.table: dict[tuple[str, str], Any] = {}  # (task, text) -> (L,) float32 tensor

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, row: Row):
        """The stored (L,) scores of a row (a Row or a plain (text, label, task) tuple), or None."""
        row = as_row(row)
        return self.table.get((row.task, row.text))

    def record(self, head: Any, model: Any, tokenizer: Any, rows: Sequence[Row], tasks: dict[str, Any],
               *, batch_size: int = 64) -> int:
        """Score the rows not stored yet with the model as it is now (eval mode, no gradient); returns
        how many were added. Rows already stored keep their earlier scores."""
        if self.weight == 0:
            return 0
        by_task: dict[str, list[str]] = {}
        for r in map(as_row, rows):
            if (r.task, r.text) not in self.table:
                by_task.setdefault(r.task, []).append(r.text)
        was = model.training
        model.eval()
        added = 0
        try:
            with torch.no_grad():
                for t, texts in by_task.items():
                    texts = list(dict.fromkeys(texts))
                    for i in range(0, len(texts), batch_size):
                        sc = head.scores(model, tokenizer, texts[i : i + batch_size], tasks[t])  # (n, L)
                        for text, row in zip(texts[i : i + batch_size], sc):
                            self.table[(t, text)] = row.detach().float().cpu()
                            added += 1
        finally:
            model.train(was)
        return added

    def keep_only(self, rows: Sequence[Row]) -> None:
        """Drop the entries of rows that are not in `rows` (e.g. rows the buffer let go)."""
        keys = {(r.task, r.text) for r in map(as_row, rows)}
        self.table = {k: v for k, v in self.table.items() if k in keys}

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight,
                "table": [[t, text, [float(x) for x in v.tolist()]] for (t, text), v in sorted(self.table.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight = float(state.get("weight", self.weight))
        self.table = {(t, text): torch.tensor(v, dtype=torch.float32) for t, text, v in state.get("table", [])}
