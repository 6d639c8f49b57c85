"""Batched generation with the KV cache: rows decode together, each with its own sampling and stop.

Continuous batching: rows that arrive together are prefilled together (left padding, position ids
from the mask) and merged into the lane's running batch, which decodes one token per step for every
row. A row leaves at its own end (an end-of-sequence token, a stop string, `max_tokens`, or a cancel
from a client that went away): its KV cache rows are dropped (`Cache.batch_select_indices`), so the
remaining rows compute only for themselves. Where the cache cannot be merged (a cache type other than
transformers' DynamicCache), new rows wait for the running batch to end instead.

This module knows torch and nothing of loraplex: the engine hands it a `step` function that runs one
forward of the routed model for the live rows (with their gates) and returns the last logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from loraplex.errors import NonFiniteScores
from loraplex.heads import refuse_unreadable


GREEDY_BELOW = 1e-5
"""A temperature below this picks greedily (as vLLM does): dividing logits by 1e-300 gives inf - inf = nan."""


@dataclass
class Sampling:
    """How one row picks its tokens and when it stops."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def seed_state(seed: int) -> int:
    """The generator state of a request's 64-bit `seed`: a hash of all its bits. torch's CPU generator
    keeps only a seed's low 32 bits, so seeds 1 and 2**32 + 1 drew the same tokens (sweep 20)."""
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=4).digest(), "little")


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
    generated: int = 0  # tokens sampled, an end-of-sequence one included (usage's completion_tokens, as vLLM)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    error: Exception | None = None  # the row ended without an answer (finish_reason "error"): what to tell its caller
    generator: torch.Generator | None = None
    trace: bool = False  # the caller wants each token's routing (`on_token`'s info)
    gates: torch.Tensor | None = None  # (1, 1, S) the row's gates over the lane's bank, if it has static gates
    route: Any = None  # what the engine chose for the row (its routing summary)
    sums: Any = None  # per-adapter weight summed over the row's tokens (learned routers)
    count: int = 0  # tokens summed into `sums`
    experts: list[str] | None = None  # a router lane's: the names of the experts of the model the row runs on

    def __post_init__(self) -> None:
        if self.sampling.temperature >= GREEDY_BELOW:
            self.generator = torch.Generator()
            if self.sampling.seed is not None:
                self.generator.manual_seed(seed_state(int(self.sampling.seed)))
            else:
                self.generator.seed()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """The next token from logits (V,): greedy at temperature 0 (below GREEDY_BELOW), else nucleus sampling."""
    if s.temperature < GREEDY_BELOW or gen is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < s.top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _complete(text: str) -> int:
    """Characters of `text` that later tokens cannot change: all but a trailing run of U+FFFD (an incomplete
    UTF-8 sequence a byte-level tokenizer splits over tokens: an emoji, most CJK characters)."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    return n


def _advance(row: GenRow, token: int, decode: Callable[[list[int]], str], eos: set[int], info: dict) -> None:
    """Append a token, apply the stop rules and emit the text that can no longer change. Stops are looked
    for in the complete characters only (a placeholder U+FFFD is no character yet), and the characters
    held back for a stop that may still be completing are counted from there: counted from the raw text,
    a placeholder took a held character's place and the stream sent the start of a stop sequence that
    the whole answer cuts (sweep 20)."""
    s = row.sampling
    row.on_token(token, info)
    row.generated += 1
    if token in eos:
        row.finish_reason = "stop"
    else:
        row.ids.append(token)
        row.text = decode(row.ids)
        end = _complete(row.text)
        found = [at for stop in s.stop if (at := row.text.find(stop, max(0, row.sent - len(stop)), end)) >= 0]
        if found:  # the earliest, whichever stop it is (one token may hold two)
            row.text, row.finish_reason = row.text[:min(found)], "stop"
        if row.finish_reason is None and len(row.ids) >= s.max_tokens:
            row.finish_reason = "length"
    if row.finish_reason is None and row.cancelled():
        row.finish_reason = "cancelled"
    hold = 0 if row.done else max([len(x) - 1 for x in s.stop] + [0])
    safe = (len(row.text) if row.done else _complete(row.text)) - hold  # at the end: as the whole answer has it
    if safe > row.sent or row.done:
        row.emit(row.text[row.sent: max(safe, row.sent)])
        row.sent = max(safe, row.sent)


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[GenRow]], tuple[torch.Tensor, Any, list[dict]]]


def mergeable(cache: Any) -> bool:
    """Whether rows of two caches can be put into one (transformers' DynamicCache of plain layers)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
                                for layer in layers)


class Batch:
    """A running batch of one lane (continuous batching): rows join at any step (prefilled together,
    then merged into the running KV cache) and leave at their own end.

    `step(ids (b, t), mask (b, T), positions (b, t), cache, rows)` runs one forward of the lane's model
    for `rows` and returns (logits (b, V), cache, one routing dict per row for its new token). Each row
    keeps its own positions (from its own prompt), so the padding that aligns rows of different lengths
    in the cache is only masked out; columns that are padding in every row are trimmed away."""

    def __init__(self, step: Step, *, pad_id: int, eos_ids: Sequence[int], decode: Callable[[list[int]], str],
                 device: Any = "cpu"):
        self.step, self.pad_id, self.decode, self.device = step, pad_id, decode, device
        self.eos = {int(e) for e in eos_ids if e is not None}
        self.rows: list[GenRow] = []
        self.cache = self.mask = self.pos = self.nxt = None  # (b, T) mask, (b, 1) last positions, (b,) next ids
        self.finished: list[GenRow] = []

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self) -> bool:
        return not self.rows or mergeable(self.cache)

    def _pick(self, rows: list[GenRow], logits: torch.Tensor, infos: list[dict]) -> torch.Tensor:
        toks = []
        for j, r in enumerate(rows):
            try:  # an adapter (or 16-bit precision) that overflows: no token is drawn from NaN (sampling raised, and
                # failed every row of the batch; greedy named token 0), the row alone ends with the error
                refuse_unreadable(logits[j:j + 1])
            except NonFiniteScores as exc:
                r.error, r.finish_reason = exc, "error"
                toks.append(self.pad_id)
                continue
            tok = pick(logits[j], r.sampling, r.generator)
            _advance(r, tok, self.decode, self.eos, infos[j] if j < len(infos) else {})
            toks.append(tok)
        return torch.tensor(toks, dtype=torch.long, device=self.device)

    def _keep(self, rows, cache, mask, pos, nxt):
        keep = [j for j, r in enumerate(rows) if not r.done]
        self.finished += [r for r in rows if r.done]
        if len(keep) < len(rows) and keep:  # finished rows leave, their cache rows with them
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            rows, mask, pos, nxt = [rows[j] for j in keep], mask[sel], pos[sel], nxt[sel]
        return ([], None, None, None, None) if not keep else (rows, cache, mask, pos, nxt)

    @torch.no_grad()
    def join(self, new: Sequence[GenRow]) -> None:
        """Prefill `new` rows (one forward, left padding), pick their first tokens, merge them in."""
        new = list(new)
        T = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), T), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, T - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, T - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (n, T)
        logits, cache, infos = self.step(ids, mask, pos, None, new)
        nxt = self._pick(new, logits, infos)
        rows, cache, mask, pos, nxt = self._keep(new, cache, mask, pos[:, -1:], nxt)
        if not rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask, self.pos, self.nxt = rows, cache, mask, pos, nxt
            return
        L = max(self.mask.shape[1], mask.shape[1])  # align both on the right, pad on the left
        for a, b in zip(self.cache.layers, cache.layers):
            a.keys, a.values = (torch.cat([_lpad(x, L), _lpad(y, L)]) for x, y in ((a.keys, b.keys), (a.values, b.values)))
        self.mask = torch.cat([_lpad(self.mask, L), _lpad(mask, L)])
        self.rows, self.pos, self.nxt = self.rows + rows, torch.cat([self.pos, pos]), torch.cat([self.nxt, nxt])

    @torch.no_grad()
    def advance(self) -> None:
        """One decode step for every running row."""
        if not self.rows:
            return
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        pos = self.pos + 1
        logits, cache, infos = self.step(self.nxt[:, None], mask, pos, self.cache, self.rows)
        nxt = self._pick(self.rows, logits, infos)
        self.rows, self.cache, self.mask, self.pos, self.nxt = self._keep(self.rows, cache, mask, pos, nxt)
        if self.rows and mergeable(self.cache):
            lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
            if lead:
                self.mask = self.mask[:, lead:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]


def _lpad(x: torch.Tensor, L: int) -> torch.Tensor:
    """x (b, ..., T, [D]) padded with zeros on the left of its sequence dim to length L (dim -2 for
    cache tensors (b, H, T, D), dim -1 for masks (b, T))."""
    dim = -2 if x.dim() == 4 else -1
    n = L - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def generate(rows: Sequence[GenRow], step: Step, **kw: Any) -> None:
    """Generate every row to its end in one batch (no later joiners)."""
    b = Batch(step, **kw)
    b.join(rows)
    while len(b):
        b.advance()
