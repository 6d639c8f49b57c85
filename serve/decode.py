"""Batched generation with the KV cache: rows decode together, each with its own sampling and stop.

One gathered batch is prefilled together (left padding, position ids from the mask), then decoded one
token per step for every live row. A row leaves the batch at its own end (an end-of-sequence token,
a stop string, `max_tokens`, or a cancel from a client that went away): its KV cache rows are dropped
(`Cache.batch_select_indices`), so the remaining rows compute only for themselves. Rows do not join a
running batch; the next gathered batch starts when this one ends (per-request batching, see
serve/__init__.py for why).

This module knows torch and nothing of loraplex: the engine hands it a `step` function that runs one
forward of the routed model for the live rows (with their gates) and returns the last logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class Sampling:
    """How one row picks its tokens and when it stops."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenRow:
    """One request being generated. `emit(delta_text)` is called for each new piece of text that can
    no longer change, `on_token(id, routing)` for every token; `cancelled()` is polled every step."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[str], None] = lambda text: None
    on_token: Callable[[int, dict[str, Any]], None] = lambda token, info: None
    cancelled: Callable[[], bool] = lambda: False
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0:
            self.generator = torch.Generator()
            if self.sampling.seed is not None:
                self.generator.manual_seed(int(self.sampling.seed))
            else:
                self.generator.seed()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """The next token from logits (V,): greedy at temperature 0, else nucleus sampling."""
    if s.temperature <= 0 or gen is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < s.top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _advance(row: GenRow, token: int, decode: Callable[[list[int]], str], eos: set[int], info: dict) -> None:
    """Append a token, apply the stop rules and emit the text that can no longer change."""
    s = row.sampling
    row.on_token(token, info)
    if token in eos:
        row.finish_reason = "stop"
    else:
        row.ids.append(token)
        row.text = decode(row.ids)
        for stop in s.stop:
            at = row.text.find(stop, max(0, row.sent - len(stop)))
            if at >= 0:
                row.text, row.finish_reason = row.text[:at], "stop"
                break
        if row.finish_reason is None and len(row.ids) >= s.max_tokens:
            row.finish_reason = "length"
    if row.finish_reason is None and row.cancelled():
        row.finish_reason = "cancelled"
    hold = 0 if row.done else max([len(x) - 1 for x in s.stop] + [0])
    safe = len(row.text) - hold
    while safe > row.sent and row.text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for it
        safe -= 1
    if safe > row.sent or row.done:
        row.emit(row.text[row.sent: max(safe, row.sent)])
        row.sent = max(safe, row.sent)


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[int]], tuple[torch.Tensor, Any, list[dict]]]


@torch.no_grad()
def generate(rows: Sequence[GenRow], step: Step, *, pad_id: int, eos_ids: Sequence[int],
             decode: Callable[[list[int]], str], device: Any = "cpu") -> None:
    """Generate every row to its end. `step(ids (b, t), mask (b, T), positions (b, t), cache, live)`
    runs one forward for the live rows (indices into `rows`) and returns (logits (b, V), cache, one
    routing dict per live row for the new token)."""
    rows = list(rows)
    eos = {int(e) for e in eos_ids if e is not None}
    T = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's next token lands in the last column
        ids[i, T - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, T - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    live = list(range(len(rows)))
    cache = None
    step_ids, step_pos = ids, pos
    while live:
        logits, cache, infos = step(step_ids, mask, step_pos, cache, live)  # (b, V)
        nxt = []
        for j, i in enumerate(live):
            r = rows[i]
            tok = pick(logits[j], r.sampling, r.generator)
            _advance(r, tok, decode, eos, infos[j] if j < len(infos) else {})
            nxt.append(tok)
        keep = [j for j, i in enumerate(live) if not rows[i].done]
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch, their cache rows with them
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            mask, step_pos = mask[sel], step_pos[sel]
            live = [live[j] for j in keep]
            nxt = [nxt[j] for j in keep]
        step_ids = torch.tensor(nxt, dtype=torch.long, device=mask.device)[:, None]  # (b, 1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
