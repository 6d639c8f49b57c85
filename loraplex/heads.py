"""How a base model answers a task: every task is text in, a label of its label set out.

Adapters carry no task-specific heads, so all tasks share one output space and accuracies compare
across tasks (as in the O-LoRA benchmark). Each model family registers a head in `HEADS`:

- `encoder` (sentence-transformers style): the text's pooled, L2-normalised embedding is compared with
  the embeddings of the label texts; scores = cos(text, label) / temperature, prediction = argmax. The
  label embeddings ("anchors") come from the bare base (adapters disabled), so every adapter and every
  router maps texts into one fixed space of labels. Training minimises cross-entropy over those scores.
- `causal` (rank classification, as in T0 / T-Few): the prompt is the task description, the text and
  "Answer:"; a label's score is the mean log-probability of its tokens after the prompt; prediction =
  argmax. Training is teacher-forced cross-entropy on the gold label's tokens. A task without a label
  set is answered by greedy generation from that prompt; a request with no task at all (auto's fallback
  to the bare base, an adapter registered without one) as one user turn of the tokenizer's chat
  template when it has one, as the server's chat completions ask it.

Both heads expose `scores(model, tokenizer, texts, task) -> (N, L)` and
`loss(model, tokenizer, texts, y, task) -> scalar`, which is all training and evaluation need.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from pydantic import Field

from loraplex.catalog import (MAX_BATCH, MAX_COUNT, MAX_TEMPERATURE, MIN_TEMPERATURE, Catalog, Options, bounded_ids,
                              clip_text, options)

if TYPE_CHECKING:
    import torch

    from loraplex.data import Task
    from loraplex.models import LoadedBase

ANCHOR_SETS = 1024
"""Label sets whose anchors an encoder head keeps per model (least recently used dropped)."""


class Head(Protocol):
    """How a base scores texts against a task's labels. Besides the methods below, a head says what
    else it can do: `embeds` (an encoder: `encode(model, tokenizer, texts) -> (N, D)` embeddings,
    `encode_mixed` for a batch mixing tasks, `anchors(model, tokenizer, task) -> (L, D)` and
    `scores_of(model, tokenizer, emb, task) -> (N, L)`, so scores come from one routed forward) and
    `generates` (a causal LM: `generate(model, tokenizer, texts, task) -> list[str]`, free text when a
    task has no label set)."""

    embeds: bool
    generates: bool

    def scores(self, model, tokenizer, texts: Sequence[str], task: "Task") -> "torch.Tensor": ...  # (N, L)

    def text_budget(self, tokenizer, task: "Task | None") -> int: ...  # tokens of a text `scores` reads; the rest is cut

    def loss(self, model, tokenizer, texts: Sequence[str], y: "torch.Tensor", task: "Task") -> "torch.Tensor": ...

    def scored_loss(self, model, tokenizer, texts: Sequence[str], y: "torch.Tensor", task: "Task"
                    ) -> tuple["torch.Tensor", "torch.Tensor | None"]: ...  # loss, and (N, L) scores of the same forward or None

    def hidden(self, model, tokenizer, texts: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor"]: ...


HEADS: Catalog[Head] = Catalog("model family")


class EncoderConfig(Options):
    model_config = options()

    max_length: int = Field(128, ge=8, le=MAX_COUNT)
    """Tokens per text (longer texts are truncated)."""
    temperature: float = Field(0.05, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Softmax temperature over cosine similarities to the label anchors."""
    pooling: str = "mean"
    """Sentence pooling: mean (sentence-transformers default) or cls."""


def cuts(head: Head, tokenizer, text: str, task: "Task | None") -> bool:
    """Whether `head` scoring `text` on `task` reads only its start (more tokens than `text_budget`)."""
    budget = head.text_budget(tokenizer, task)
    part = clip_text(text, budget + 1)  # a text past what budget + 1 tokens can hold is cut whatever it says
    return part != text or len(tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"]) > budget


@HEADS.register("encoder", EncoderConfig, summary="nearest label embedding (sentence encoders)")
class EncoderHead:
    embeds = True
    generates = False

    def __init__(self, config: EncoderConfig):
        self.config = config
        self._anchors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {texts: (L, D)}

    def text_budget(self, tokenizer, task=None) -> int:
        """Tokens of a text read: max_length less the tokenizer's own ([CLS], [SEP]); the rest is cut."""
        return self.config.max_length - tokenizer.num_special_tokens_to_add(pair=False)

    def _tokenize(self, model, tokenizer, texts: Sequence[str]):
        n = self.config.max_length
        enc = tokenizer([clip_text(t, n) for t in texts], padding=True, truncation=True, max_length=n, return_tensors="pt",
                        split_special_tokens=True)  # a "[SEP]" typed into a text is those characters
        return {k: v.to(next(model.parameters()).device) for k, v in enc.items()}

    def hidden(self, model, tokenizer, texts):
        """Token states (B, T, D) of the last layer and the attention mask (B, T)."""
        enc = self._tokenize(model, tokenizer, texts)
        out = model(**enc)
        return out.last_hidden_state, enc["attention_mask"]

    def encode(self, model, tokenizer, texts: Sequence[str]) -> "torch.Tensor":
        """(N, D) L2-normalised sentence embeddings, pooled as sentence-transformers does."""
        import torch.nn.functional as F

        h, mask = self.hidden(model, tokenizer, texts)  # (B, T, D), (B, T)
        if self.config.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def check_labels(self, tokenizer, task: "Task") -> None:
        """A task's label texts must be different token sequences to this tokenizer (`_distinct_to`): checked
        when its anchors are first made, and by `adapters register --task` before the task is recorded."""
        _distinct_to(tokenizer, task.labels, [task.label_text(lab) for lab in task.labels], task,
                     read=self.config.max_length - 2)  # [CLS] ... [SEP]

    def anchors(self, model, tokenizer, task: "Task") -> "torch.Tensor":
        """(L, D) embeddings of the label texts by the bare base (cached per model and label set,
        the ANCHOR_SETS most recently used)."""
        import torch

        from loraplex.experts.layers import adapters_disabled

        texts = tuple(task.label_text(lab) for lab in task.labels)
        per_model = self._anchors.setdefault(model, OrderedDict())
        if texts in per_model:
            per_model.move_to_end(texts)
        else:
            self.check_labels(tokenizer, task)
            was_training = model.training
            model.eval()  # anchors are fixed points: no dropout, whenever they are first asked for
            try:
                with torch.no_grad(), adapters_disabled(model):
                    per_model[texts] = self.encode(model, tokenizer, texts)
            finally:
                model.train(was_training)
            while len(per_model) > ANCHOR_SETS:  # label sets named per query (a server's) must not pile up
                per_model.popitem(last=False)
        return per_model[texts]

    def scores(self, model, tokenizer, texts, task):
        return self.scores_of(model, tokenizer, self.encode(model, tokenizer, texts), task)  # (N, L)

    def scores_of(self, model, tokenizer, emb: "torch.Tensor", task: "Task") -> "torch.Tensor":
        """(N, L) scores of sentence embeddings emb (N, D) against a task's label anchors."""
        return emb @ self.anchors(model, tokenizer, task).T / self.config.temperature

    def encode_mixed(self, model, tokenizer, texts: Sequence[str], *, per_forward: int = 256) -> "torch.Tensor":
        """(N, D) embeddings of texts of any tasks, forwarded in length buckets (`length_buckets`).

        The sentence embedding does not depend on the task, only the scores do (`scores_of`), so a batch
        that mixes tasks (replay) needs one forward per length bucket, not one per task."""
        import torch

        n = self.config.max_length
        lengths = [len(ids) for ids in tokenizer([clip_text(t, n) for t in texts], truncation=True, max_length=n,
                                                 split_special_tokens=True)["input_ids"]]
        out: list = [None] * len(texts)
        for bucket in length_buckets(lengths, per_forward=per_forward):
            emb = self.encode(model, tokenizer, [texts[i] for i in bucket])
            for j, i in enumerate(bucket):
                out[i] = emb[j]
        return torch.stack(out)

    def loss(self, model, tokenizer, texts, y, task):
        return self.scored_loss(model, tokenizer, texts, y, task)[0]

    def scored_loss(self, model, tokenizer, texts, y, task):
        """Cross-entropy of the scores, and the scores (one forward serves both)."""
        import torch.nn.functional as F

        scores = self.scores(model, tokenizer, texts, task)
        return F.cross_entropy(scores, y), scores


def _distinct_to(tokenizer, labels: Sequence[str], texts: Sequence[str], task: "Task | None" = None, *,
                 fix: str = "give them texts that differ in words (a task file: `label_texts` in its sidecar)",
                 read: int | None = None) -> None:
    """Refuse label texts the tokenizer reads as the same tokens ("A" and "a" to an uncased encoder, two
    emoji it does not know): their anchors would be one point, and the answer between them a coin toss.
    Checked for every label set the first time its anchors are made: a request's (`query --labels`,
    /v1/classify's `labels`) and a task's (train and eval meet it before training: an adapter trained on
    such labels could never tell them apart, and trained without a word). A causal LM ranks each label's
    text as the prompt's continuation (`CausalHead`): `fix` says what to change."""
    from loraplex.errors import UserInputError

    seen: dict[tuple[int, ...], tuple[str, tuple[int, ...]]] = {}
    for lab, text in zip(labels, texts):
        full = tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        ids = full[:read] if read is not None else full  # what the head reads of it (`read` tokens at most)
        if ids in seen:
            asked = task is None or task.source == "query"  # a request's own labels (an HTTP body's `labels`)
            whose = "" if asked else f"task {task.name!r} ({task.ref}): "
            how = (f"they differ only after their first {read} tokens, all of a label this model reads"
                   if seen[ids][1] != full else "its tokenizer folds case and accents, and reads a character it "
                   "does not know as one unknown token")
            if asked and "task file" in fix:  # a request's labels have no sidecar to fix (sweep 18 F21)
                fix = "give labels that differ in words"
            err = UserInputError(f"{whose}labels {seen[ids][0][:80]!r} and {lab[:80]!r} read the same to this model "
                                 f"({how}): {fix}")
            raise err.about("labels") if asked else err
        seen[ids] = (lab, full)


def texts_readable(tokenizer, task: "Task", limit: int = 256) -> None:
    """Refuse a task whose training texts this tokenizer reads as nothing but unknown tokens (emoji-only
    texts to MiniLM's WordPiece are each one `[UNK]`): every input is then the same, whatever its label,
    and training learns nothing, without a word. Checked on the first `limit` training texts; one readable
    text among them is enough to pass (a mix of words and emoji is a task)."""
    from loraplex.errors import UserInputError

    unk = getattr(tokenizer, "unk_token_id", None)
    rows = list(task.train[:limit])
    if unk is None or not rows:
        return
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}
    blind = 0
    for e in rows:
        ids = [i for i in tokenizer(clip_text(e.text, 512), add_special_tokens=False, split_special_tokens=True)["input_ids"]
               if i not in special]
        blind += bool(ids) and all(i == unk for i in ids)
    if blind == len(rows):
        raise UserInputError(f"task {task.name!r}: every training text reads as unknown tokens only to this model "
                             f"(its vocabulary has none of their characters, e.g. {rows[0].text[:20]!r}), so every input "
                             "is the same and nothing can be learned; give texts in words it knows, or another base")


def label_names_read_apart(family: str, tokenizer, labels: Sequence[str]) -> None:
    """Refuse label names the family's head would read as one (UserInputError): what an encoder anchors
    on (the names, as label texts) or a causal LM ranks (" " + name). For a label set that is checked
    before any head scores it (a generated adapter's example labels)."""
    texts = [" " + lab for lab in labels] if family == "causal" else list(labels)
    _distinct_to(tokenizer, labels, texts, fix="give them names that differ in words")


def length_buckets(lengths: Sequence[int], *, per_forward: int = 256) -> list[list[int]]:
    """Indices of `lengths` split into buckets of similar length, each forwarded padded to its longest.

    Minimises sum_b (rows_b * longest_b) + per_forward * n_buckets (tokens computed, padding included,
    plus a fixed cost per forward in token units) over splits of the sorted lengths: a batch of tweets
    stays one forward; a few long articles among them get their own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    srt = [lengths[i] for i in order]
    n = len(srt)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last bucket = sorted rows i..j-1, padded to srt[j-1]
            c = best[i] + (j - i) * srt[j - 1] + per_forward
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


class CausalConfig(Options):
    model_config = options()

    max_length: int = Field(192, ge=16, le=MAX_COUNT)
    """Tokens of prompt plus answer (the text is cut to fit, and a long task description too)."""
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    """Sequences per forward when scoring labels."""
    max_new_tokens: int = Field(32, ge=1, le=MAX_COUNT)
    """Tokens generated for a task without a label set."""


MIN_TEXT_TOKENS = 32
"""Tokens of the text a causal prompt keeps however long the task's description is (the description is cut)."""
MAX_LABEL_TOKENS = 64
"""The longest label (in tokens) a causal LM scores: each is scored after every prompt, at the vocabulary's
width per token (a 300-token label took gigabytes)."""


@HEADS.register("causal", CausalConfig, summary="label with the highest log-likelihood (causal LMs)")
class CausalHead:
    embeds = False
    generates = True

    def __init__(self, config: CausalConfig):
        self.config = config
        self._checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> label sets read apart

    def check_labels(self, tokenizer, task: "Task") -> None:
        """A label set's texts (the words scored for each label: `label_texts`, else the names) must be
        different token sequences to this tokenizer (a byte-level BPE reads every text apart; a lossy one
        may not): two that are one sequence score alike, for ever."""
        seen = self._checked.setdefault(tokenizer, OrderedDict())  # label sets, most recently used last
        texts = [task.label_text(lab) for lab in task.labels]
        key = (tuple(task.labels), tuple(texts))
        if key in seen:
            seen.move_to_end(key)
        else:
            _distinct_to(tokenizer, task.labels, [" " + t for t in texts], task,
                         fix="give them texts that differ in words (a causal LM scores each label's text: its name, "
                             "or its `label_texts` in the task file's sidecar)")
            long = next((lab for lab in task.labels if len(self._label_ids(tokenizer, task, lab)) > MAX_LABEL_TOKENS), None)
            if long is not None:  # every label is scored after every prompt: memory grows with its length x vocab
                from loraplex.errors import UserInputError

                where = "" if task.source == "query" else f"task {task.name!r}: "
                n = len(self._label_ids(tokenizer, task, long))
                what = (f"label {long[:60]!r}" if task.label_text(long) == long else
                        f"text {task.label_text(long)[:60]!r} of label {long[:40]!r}")
                err = UserInputError(f"{where}the {what} is {n} tokens long; a causal LM scores label texts of at "
                                     f"most {MAX_LABEL_TOKENS} tokens")
                raise err.about("labels") if task.source == "query" else err
            seen[key] = None
            while len(seen) > ANCHOR_SETS:  # label sets named per request (a server's) must not pile up
                seen.popitem(last=False)

    def _frame(self, tokenizer, task: "Task | None") -> tuple[list[int], list[int], int]:
        """The prompt's tokens before and after the text, and how many of the text's tokens fit between."""
        head = tokenizer(f"{task.description}\n\nText: " if task else "Text: ", add_special_tokens=True,
                         split_special_tokens=True)["input_ids"]
        tail = tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
        room = self.config.max_length - len(tail) - 8 - MIN_TEXT_TOKENS  # what the description may take
        if len(head) > room:  # a long description (10,000 characters may be 2,000 tokens) is cut too, its start kept
            desc = tokenizer(task.description, add_special_tokens=True, split_special_tokens=True)["input_ids"]
            sep = tokenizer("\n\nText: ", add_special_tokens=False)["input_ids"]
            head = desc[: max(1, room - len(sep))] + sep
        return head, tail, max(8, self.config.max_length - len(head) - len(tail) - 8)

    def text_budget(self, tokenizer, task=None) -> int:
        """Tokens of a text `scores` reads for `task` (what its prompt leaves of max_length); the rest is cut."""
        return self._frame(tokenizer, task)[2]

    def _prompt_ids(self, tokenizer, task: "Task | None", text: str) -> list[int]:
        head, tail, budget = self._frame(tokenizer, task)
        body = tokenizer(clip_text(text, budget), add_special_tokens=False,  # typed control tokens are text
                         split_special_tokens=True)["input_ids"][:budget]
        return head + body + tail

    def _chat_ids(self, tokenizer, text: str) -> list[int]:
        """A request with no task, as one user turn of the tokenizer's chat template (an instruct model asked
        "Text: ...\nAnswer:" with no task description often answers nothing), as the server's chat does."""
        budget = max(8, self.config.max_length - 32)  # room for the template's own tokens
        return chat_ids(tokenizer, [{"role": "user", "content": text}], content_limit=budget)  # the text cut, not the template

    def _label_ids(self, tokenizer, task: "Task", label: str) -> list[int]:
        """The tokens scored (and trained) for `label`: its text (the task's `label_texts`, else its name) as
        the answer's continuation, a verbalizer; the answer given is the label itself."""
        return tokenizer(" " + task.label_text(label), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _batch(self, tokenizer, seqs: list[list[int]], device):
        import torch

        T = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids.to(device), mask.to(device)

    def hidden(self, model, tokenizer, texts):
        seqs = [self._prompt_ids(tokenizer, None, t) for t in texts]
        ids, mask = self._batch(tokenizer, seqs, next(model.parameters()).device)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1], mask

    def _continuation_logprob(self, model, tokenizer, prompts: list[list[int]], conts: list[list[int]]):
        """Mean log-probability of each continuation after its prompt, (N,)."""
        import torch

        device = next(model.parameters()).device
        out = []
        bs = self.config.batch_size
        for i in range(0, len(prompts), bs):
            P, C = prompts[i : i + bs], conts[i : i + bs]
            ids, mask = self._batch(tokenizer, [p + c for p, c in zip(P, C)], device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            # the log-softmax at the label positions only (position t predicts token t+1): (B, K, V), K the
            # longest label, not (B, T, V) again for every prompt position
            K = max(1, max(len(c) for c in C))
            pos = torch.zeros(len(P), K, dtype=torch.long, device=device)
            sel = torch.zeros(len(P), K, device=device)
            for j, (p, c) in enumerate(zip(P, C)):
                pos[j, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=device)
                sel[j, : len(c)] = 1.0
            at = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()  # (B, K, V)
            tgt = ids.gather(1, pos + 1)  # (B, K) the label's tokens
            tok_lp = torch.log_softmax(at, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, K)
            out.append((tok_lp * sel).sum(1) / sel.sum(1).clamp_min(1.0))
        return torch.cat(out)

    def scores(self, model, tokenizer, texts, task):
        self.check_labels(tokenizer, task)
        L = len(task.labels)
        prompts, conts = [], []
        for t in texts:
            p = self._prompt_ids(tokenizer, task, t)
            for lab in task.labels:
                prompts.append(p)
                conts.append(self._label_ids(tokenizer, task, lab))
        return self._continuation_logprob(model, tokenizer, prompts, conts).view(len(texts), L)  # (N, L)

    def loss(self, model, tokenizer, texts, y, task):
        import torch

        self.check_labels(tokenizer, task)
        device = next(model.parameters()).device
        seqs, spans = [], []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for t, yi in zip(texts, y.tolist()):
            p = self._prompt_ids(tokenizer, task, t)
            c = self._label_ids(tokenizer, task, task.labels[yi]) + eos
            seqs.append(p + c)
            spans.append((len(p), len(p) + len(c)))
        ids, mask = self._batch(tokenizer, seqs, device)
        labels = torch.full_like(ids, -100)
        for j, (a, b) in enumerate(spans):
            labels[j, a:b] = ids[j, a:b]
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def scored_loss(self, model, tokenizer, texts, y, task):
        """The language-model loss of the gold continuations; its forward gives no label scores (None)."""
        return self.loss(model, tokenizer, texts, y, task), None

    def generate(self, model, tokenizer, texts: Sequence[str], task: "Task | None" = None) -> list[str]:
        import torch

        device = next(model.parameters()).device
        seqs = [self._prompt_ids(tokenizer, task, t) if task is not None or not getattr(tokenizer, "chat_template", None)
                else self._chat_ids(tokenizer, t) for t in texts]
        T = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding for generation
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        from transformers import LogitsProcessorList

        def checked(input_ids, scores):  # each step's scores: greedy over NaN named token 0, text no score made (sweep 66)
            refuse_unreadable(scores)
            return scores

        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=self.config.max_new_tokens, do_sample=False, pad_token_id=pad,
                                 logits_processor=LogitsProcessorList([checked]))
        return [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]


def head_for(base: "LoadedBase") -> Head:
    """The head of a loaded base's family, configured from the model directory where it says how."""
    cfg: dict = {}
    if base.family == "encoder":
        pooling_cfg = Path(base.ref.path(base.settings)) / "1_Pooling" / "config.json"
        if pooling_cfg.is_file():
            p = json.loads(pooling_cfg.read_text())
            if p.get("pooling_mode_cls_token") and not p.get("pooling_mode_mean_tokens"):
                cfg["pooling"] = "cls"
    positions = model_positions(base.model)
    default = HEADS.get(base.family).config_cls.model_fields["max_length"].default
    # a causal LM reads the prompt (cut to max_length) and then a label of up to MAX_LABEL_TOKENS
    answer = MAX_LABEL_TOKENS + 1 if base.family == "causal" else 0
    if positions is not None and positions < default + answer:  # a model of few positions: read what it can take
        least = HEADS.get(base.family).config_cls.model_fields["max_length"].metadata[0].ge
        usable = positions - 2 - answer  # position ids offset by padding (RoBERTa-style) leave two unused
        if usable < least:
            from loraplex.errors import ModelNotFound

            raise ModelNotFound(f"base {base.ref.name!r} reads at most {positions} tokens (its position embeddings); "
                                f"loraplex's {base.family} head needs at least {least + 2 + answer}")
        cfg["max_length"] = usable
    return HEADS.build(base.family, cfg)


def model_positions(model) -> int | None:
    """How many tokens the model's position embeddings hold (None: it names no limit)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def unreadable(scores: "torch.Tensor") -> "torch.Tensor":
    """(N,) which rows of scores (N, K) no answer can be read from: a NaN or +infinity anywhere, or every score
    -infinity (-infinity alone is an impossible choice, as a generation step's processors make them)."""
    import torch

    return torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)


def refuse_unreadable(scores: "torch.Tensor") -> None:
    """NonFiniteScores where any row of scores (N, K) is `unreadable`: an argmax over NaN names the first label
    (or token 0), an answer no score made (sweeps 64, 66). Every answer loraplex reads from scores checks here:
    labels (`best_labels`), the CLI's generation and the server's decoding (training's validation reads its own
    argmax: a fit that diverged is said after it, `Diverged`)."""
    from loraplex.errors import NonFiniteScores

    bad = unreadable(scores)
    if bool(bad.any()):
        raise NonFiniteScores(f"the model's scores are NaN or infinite for {int(bad.sum())} of the {bad.shape[0]} "
                              "text(s) scored together: an adapter in use (or 16-bit precision) overflows the forward, "
                              "so no answer is given")


def best_labels(scores: "torch.Tensor") -> list[int]:
    """The index of each row's best score (scores (N, L), or one row (L,): a list of one), refused where a row
    is `unreadable`."""
    rows = scores.reshape(1, -1) if scores.dim() == 1 else scores
    refuse_unreadable(rows)
    return rows.argmax(-1).tolist()


def predict(head: Head, model, tokenizer, texts: Sequence[str], task: "Task", batch_size: int = 64,
            progress: str | None = None) -> list[int]:
    """Index of the predicted label for each text (no gradients, batched). With `progress` (a label),
    a progress bar over the texts on stderr."""
    import torch

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=progress, unit="row", leave=False, dynamic_ncols=True)
    preds: list[int] = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i : i + batch_size]
                preds.extend(best_labels(head.scores(model, tokenizer, chunk, task)))
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return preds


def split_predictions(head: Head, model, tokenizer, task: "Task", split: str = "test", limit: int | None = None,
                      batch_size: int = 64, progress: str | None = None) -> tuple[list, list[int]]:
    """(examples, predicted label indices) for the first `limit` examples of a split, in eval mode."""
    examples = task.split(split)[:limit] if limit else task.split(split)
    if not examples:
        return [], []
    was_training = model.training
    model.eval()
    try:
        preds = predict(head, model, tokenizer, [e.text for e in examples], task, batch_size, progress)
    finally:
        model.train(was_training)
    return examples, preds


def accuracy(head: Head, model, tokenizer, task: "Task", split: str = "test", limit: int | None = None,
             batch_size: int = 64, progress: str | None = None) -> dict:
    """Accuracy on a split: {"accuracy", "n", "correct"} (`progress`: a label for a progress bar)."""
    examples, preds = split_predictions(head, model, tokenizer, task, split, limit, batch_size, progress)
    if not examples:
        return {"accuracy": float("nan"), "n": 0, "correct": 0}
    correct = sum(int(p == task.label_index(e.label)) for p, e in zip(preds, examples))
    return {"accuracy": correct / len(examples), "n": len(examples), "correct": correct}


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table: printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order), as character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    return {chr(b if b in keep else next(extra)): b for b in range(256)}


_BYTE_OF = _byte_level_alphabet()


def chat_ids(tokenizer, messages: Sequence[dict[str, str]], content_limit: int | None = None) -> list[int]:
    """The token ids of `messages` through the tokenizer's chat template, with each message's content read
    as text: a `<|im_end|>` typed into a message is those characters, not the control token that ends a turn
    (tokenizing the rendered template whole let a user close their turn and forge an assistant's). The
    template is rendered around a marker per message, its own text tokenized as the template writes it,
    each content with the tokenizer's special tokens split (and cut to `content_limit` tokens)."""
    return chat_ids_within(tokenizer, messages, content_limit=content_limit)[0]


def chat_ids_within(tokenizer, messages: Sequence[dict[str, str]], limit: int | None = None,
                    content_limit: int | None = None) -> tuple[list[int] | None, int]:
    """`chat_ids` and their count where that is at most `limit` tokens, else (None, a count over `limit` the
    chat has at least), a long content never tokenized whole (`catalog.bounded_ids`).

    The marker rendering keeps a template from reading the contents, and some templates do (Qwen3's drops
    earlier turns' `<think>` reasoning, Llama 3's trims each content: sweep 49 F5). So where the contents are
    not cut, the chat is rendered again on its real contents and tokenized as the template wrote it, as
    `apply_chat_template` (and vLLM) would, and that is the answer only if its control tokens (special or added,
    the unknown token too) are the very sequence the marker rendering gives, where contents are only text: any
    a content made (typed, a fullwidth `＜|im_end|＞` the tokenizer's normaliser folds, `<|im_` and `end|>` in two
    messages a template joins), or any the template writes only around the markers (an empty system message
    left out: a typed turn in its place), and the marker rendering stands (sweeps 51, 52). The contents' length
    (16 characters a token of `limit`) bounds that second pass where the marker rendering is over `limit`."""
    ids, n = _marked_chat_ids(tokenizer, messages, limit, content_limit)
    if content_limit is not None or (ids is None and sum(len(m["content"]) for m in messages) > 16 * limit):
        return ids, n  # cut contents, or so long that only a template dropping most of it would fit: not read twice
    real = tokenizer(_rendered(tokenizer, messages), add_special_tokens=False)["input_ids"]
    control = _control_ids(tokenizer)
    marked = ids if ids is not None else _marked_chat_ids(tokenizer, messages, None, None)[0]  # (within 16 * limit
    if [i for i in real if i in control] != [i for i in marked if i in control]:              # characters)
        return ids, n
    return (real, len(real)) if limit is None or len(real) <= limit else (None, len(real))


def _added_controls(tokenizer) -> set[int]:
    """The ids of the added tokens that are not special but could mark a turn (a fine-tune's `add_tokens` ChatML,
    Qwen3's `<tool_call>`): not a single character or a run of spaces, which code models add as plain text."""
    special = set(tokenizer.all_special_tokens)
    return {i for t, i in getattr(tokenizer, "added_tokens_encoder", {}).items()
            if t not in special and len(t.strip()) > 1}


def _control_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens and `_added_controls`; the unknown token only where plain text
    cannot make it (a byte-level tokenizer's, often `<|endoftext|>`: sweep 52), not where every unknown word
    reads as it."""
    ids = set(tokenizer.all_special_ids) | _added_controls(tokenizer)
    unk = tokenizer.unk_token_id
    if unk is not None and unk in tokenizer("\u0378 \U000e0fff", add_special_tokens=False)["input_ids"]:
        ids.discard(unk)  # (two code points no text means: unknown to a vocabulary, bytes to a byte-level one)
    return ids


def _rendered(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The chat template's text of `messages`, with the prompt of the assistant's turn; its own refusal of them
    (Gemma's "System role not supported", roles that must alternate) is the caller's bad input, not a fault of
    loraplex (sweep 49: a 500 with two tracebacks)."""
    from jinja2.exceptions import TemplateError

    from loraplex.errors import UserInputError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise UserInputError(f"the chat template of this base refuses these messages: {str(exc)[:300]}"
                             ).about("messages") from None
    except Exception as exc:  # a template that fails on some chats (`str + int`): these cannot be asked of this
        # base (a 400, as vLLM answers its template errors), not a fault of loraplex (sweep 51: a 500)
        raise UserInputError(f"the chat template of this base fails on these messages ({type(exc).__name__}: "
                             f"{str(exc)[:300]})").about("messages") from None


def _as_text(tokenizer) -> Callable[[str], list[int]]:
    """A text's token ids with no control token in them: special tokens split (`split_special_tokens`), and the
    added tokens that could mark a turn (`_added_controls`: a fine-tune's `add_tokens` ChatML, Qwen3's
    `<tool_call>`: sweep 51 F3), which that leaves whole, read by a copy of the tokenizer where they are special
    (one pass: cutting each typed one apart took 7.6 s over 320k characters of `<think>a`, sweep 52); a text
    that still gives one is cut in halves, each read the same way, until none does."""
    plain = _added_controls(tokenizer)
    reader = _text_reader(tokenizer, plain)

    def encode(text: str) -> list[int]:
        ids = reader(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if len(text) < 2 or not plain.intersection(ids):
            return ids
        return encode(text[: len(text) // 2]) + encode(text[len(text) // 2:])

    return encode


_READERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (its size, `_text_reader`)


def _text_reader(tokenizer, plain: set[int]):
    """`tokenizer`, or where it has added tokens that could mark a turn, a copy of it (made once, ~0.2 s; kept
    while the tokenizer lives and has that many tokens) in which they are special: the same ids, the same
    vocabulary, and `split_special_tokens` reads them as text."""
    if not plain:
        return tokenizer
    got = _READERS.get(tokenizer)
    if got is not None and got[0] == len(tokenizer):
        return got[1]
    import copy

    from tokenizers import AddedToken

    reader = copy.deepcopy(tokenizer)
    made = [tokenizer.added_tokens_decoder[i] for i in sorted(plain)]
    reader.add_special_tokens({"additional_special_tokens": [
        AddedToken(t.content, special=True, normalized=t.normalized, lstrip=t.lstrip, rstrip=t.rstrip,
                   single_word=t.single_word) for t in made]}, replace_extra_special_tokens=False)
    _READERS[tokenizer] = (len(tokenizer), reader)
    return reader


def _marked_chat_ids(tokenizer, messages: Sequence[dict[str, str]], limit: int | None,
                     content_limit: int | None) -> tuple[list[int] | None, int]:
    """`chat_ids_within` on a rendering with a marker in place of each content (what the template writes
    around the contents is tokenized as it is, each content as text: `_as_text`)."""
    import re
    import uuid

    tag = uuid.uuid4().hex
    marks = {f"<<{tag}-{i}>>": m["content"] for i, m in enumerate(messages)}
    text = _rendered(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)])
    ids: list[int] = []
    encode = _as_text(tokenizer)
    for piece in re.split(f"(<<{tag}-\\d+>>)", text):
        if piece in marks:
            content = marks[piece] if content_limit is None else clip_text(marks[piece], content_limit)
            if limit is None:
                ids += encode(content)[:content_limit]
                continue
            got, n = bounded_ids(encode, content, limit - len(ids))
            if got is None:
                return None, len(ids) + n
            ids += got[:content_limit]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return (ids, len(ids)) if limit is None or len(ids) <= limit else (None, len(ids))


def token_text(tokenizer, tok: int) -> str:
    """One token as a person reads it (a trace, a stream's token event): its text (byte-level BPE's `Ġflight`
    is ` flight`, WordPiece's `##ing` stays), or, for a piece of a character's bytes (a byte-fallback token
    decodes alone to U+FFFD), its bytes escaped (byte-level BPE) or the tokenizer's own name for it (`<0xE2>`)."""
    text = tokenizer.decode([tok], skip_special_tokens=True)
    if not text and tok == getattr(tokenizer, "unk_token_id", None):  # a character the model does not know:
        return str(tokenizer.unk_token)  # its name ([UNK]), not "" (an emoji's row in a trace was blank)
    if "\ufffd" not in text:
        return text
    name = tokenizer.convert_ids_to_tokens(tok)
    if not isinstance(name, str):
        return text
    if all(ch in _BYTE_OF for ch in name) and not name.startswith("<0x"):  # byte-level BPE (GPT-2, SmolLM2)
        return bytes(_BYTE_OF[ch] for ch in name).decode("utf-8", "backslashreplace")
    return name  # SentencePiece's byte fallback names the byte itself: <0xE2>
