"""ICM-LoRA: "In-Context Meta LoRA Generation" (Shao et al., arXiv 2501.17635; IJCAI 2025).

A LoRA for a task is written from a few examples of it: the base model reads the examples in
context, its hidden states give a task vector, and a conditional VAE trained on the LoRAs of all known
tasks (and the checkpoints of their training runs) decodes LoRA parameters conditioned on it.

What this module implements (shared parts in base.py, cvae.py, space.py):

    h_i   = pool(last hidden states of the base over example i, "text\\nAnswer: label")
            pool = the last token's state for a causal LM (the paper's "last time step"), the masked
            mean over tokens for an encoder (its sentence embedding)
    v     = normalise(mean_i h_i)                  the task vector of n_examples examples
    s_j   = cos(v, v_j),  w = softmax(top-k(s) / T)  its similarity profile over the known tasks' vectors
    v~    = normalise(sum_j w_j v_j)               the known tasks' vectors aggregated by the similarities
    c     = [tanh(W_r v~), w, t = 1]               the condition
    z     ~ N(0, I) scaled by sample_scale         the paper samples the CVAE's standard-normal prior
    theta = ParamSpace.decode(g(z, c))

Fitting: each member adapter's task vector v_j comes from n_examples examples of the task it was
trained on (its record's task: an embedded task or a task file), taken from the training split in a
seeded order; the CVAE is fitted on every member's adapter and training snapshots (the paper trains on
the checkpoints of the last epochs), loss = MSE + beta KL as in the paper. An example set whose task
vector is at cosine distance > max_distance from every known task's vector is refused (`OutOfRange`).

Simplifications, and why: the paper's CVAE is a 1-D convolutional network over the normalised,
flattened LoRA (so a 1% generator can still emit millions of weights); here the CVAE works in the
coordinates of the span of its training vectors (ParamSpace), because a few adapters cannot
determine a network over the raw ~150k-dimensional vector. The task vector enters the condition through its
similarities to the known tasks' vectors (the profile w and the aggregate v~, fixed functions of the
task vector and the stored known vectors) rather than raw: a decoder fitted on five tasks' vectors
extrapolates arbitrarily from a sixth, while a profile over known tasks is an interpolation of the
conditions it was fitted on (`fuse_condition=false` feeds the raw task vector, as the paper does). Each example is read on its own and the states averaged,
rather than all examples concatenated into one prompt: an encoder's 128-token window does not fit
eight tweets.
"""

from __future__ import annotations

import random
import warnings
from typing import Sequence

import torch
from pydantic import Field

from loraplex.catalog import MAX_TEMPERATURE, MIN_TEMPERATURE
from loraplex.data import load_task
from loraplex.errors import InvalidTaskFile, LoraplexWarning, TaskNotFound, UserInputError
from loraplex.generators.base import GENERATORS, CVAEGenerator, GeneratorConfig, Query, TrainingSet
from loraplex.heads import head_for
from loraplex.tasks import changed_from_card


class ICMLoRAConfig(GeneratorConfig):
    """ICM-LoRA: a generator conditioned on an in-context task vector from a few examples."""

    n_examples: int = Field(8, ge=1, le=256)
    """Examples read in context to form a task vector (of a member's task, and at most this many of a query's)."""
    max_distance: float = Field(0.68, gt=0, le=2)
    """Refuse an example set whose cosine distance to the nearest known task vector exceeds this. With
    minilm and 8 labelled examples, an embedded sentiment task's vector is within 0.54-0.65 of its nearest
    other sentiment task's, and the BBC topic task's 0.72 from its nearest sentiment task's."""
    temperature: float = Field(0.02, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Softmax temperature over the top-k cosine similarities of task vectors."""


def _pool_last_token(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) right-padded -> (B, D) the state of each sequence's last real token."""
    last = mask.long().sum(1).clamp_min(1) - 1  # (B,)
    return h[torch.arange(h.shape[0]), last]


def _pool_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D) the masked mean over tokens."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


# How a model family turns hidden states into one vector per example.
POOLING = {"causal": _pool_last_token, "encoder": _pool_mean}


def in_context_text(text: str, label: str | None) -> str:
    return f"{text}\nAnswer: {label}" if label else text


def task_vector(base, examples: Sequence[tuple[str, str | None]]) -> torch.Tensor:
    """(D,) unit task vector of a few examples, read by `base` (a LoadedBase) without any adapter."""
    head = head_for(base)
    pool = POOLING[base.family]
    texts = [in_context_text(t, lab) for t, lab in examples]
    with torch.no_grad():
        h, mask = head.hidden(base.model, base.tokenizer, texts)  # (B, T, D), (B, T)
        pooled = pool(h.float(), mask)  # (B, D)
    return torch.nn.functional.normalize(pooled.mean(0), dim=0)  # (D,)


def task_examples(task_ref: str, n: int, seed: int, card: dict | None = None) -> list[tuple[str, str]]:
    """n examples of a registered task's training split, in a seeded order (`card`: what the registry
    recorded of the task, see `Registry.task_card`)."""
    task = load_task(task_ref, card=card)
    moved = changed_from_card(card, task)
    if moved is not None and moved[0] == "labels":  # edited since: examples of labels never learned
        raise TaskNotFound(f"the labels of {task_ref} changed since it was recorded ({moved[1]})")
    rows = list(task.split("train"))  # a task left only on record (its file gone) says so
    if not rows:
        raise TaskNotFound(f"{task_ref}: task {task.name!r} has no training rows to take examples from")
    random.Random(seed).shuffle(rows)
    return [(e.text, e.label) for e in rows[:n]]


@GENERATORS.register("icm-lora", ICMLoRAConfig, summary="ICM-LoRA: an adapter from a few examples (in-context task vector)")
class ICMLoRA(CVAEGenerator):
    method = "icm-lora"

    def what(self) -> str:
        return "example set"

    def represent_members(self, data: TrainingSet) -> torch.Tensor:
        vecs = []
        for name, ref in zip(data.members, data.tasks):
            if not ref:
                raise UserInputError(
                    f"icm-lora reads examples of each member's task, and adapter {name!r} records no task "
                    "(register it with --task, or leave it out with --adapters)")
            try:
                ex = task_examples(ref, self.config.n_examples, self.config.cvae.seed, data.task_cards.get(ref))
            except (TaskNotFound, InvalidTaskFile) as exc:
                raise UserInputError(f"icm-lora cannot read the task of adapter {name!r}: {exc}") from None
            vecs.append(task_vector(self.ctx.base(), ex))
        return torch.stack(vecs)  # (N, D)

    def represent_query(self, query: Query) -> torch.Tensor:
        if not query.examples:
            raise UserInputError("icm-lora writes an adapter from examples of the task: pass --examples FILE")
        rows = list(query.examples)
        if len(rows) > self.config.n_examples:  # a seeded draw, as its members' examples are drawn: the file's first
            # rows (one label, in a sorted file) gave another adapter than the same rows shuffled (sweep 61)
            rows = sorted(rows, key=lambda r: (r[0], r[1] or ""))  # the same rows in any order: the same draw
            random.Random(self.config.cvae.seed).shuffle(rows)
            warnings.warn(f"icm-lora reads {self.config.n_examples} of the {len(rows)} examples in context (its "
                          "n_examples; a seeded draw, as for the adapters it learned from)", LoraplexWarning, stacklevel=2)
        return task_vector(self.ctx.base(), rows[: self.config.n_examples])

    def prior(self, mu, logvar, weights):
        """The CVAE's standard-normal prior, as in the paper."""
        return torch.zeros(mu.shape[1]), torch.ones(mu.shape[1])
