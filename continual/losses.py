"""Pure loss functions of the forgetting objective (GS-LoRA, arXiv 2403.11530, Sec. 3).

    L_forget = ReLU(BND - CE(scores_forget, y_forget))     bounded: no gradient once CE reaches BND
    L_retain = CE(scores_retain, y_retain)                  (the ordinary task loss on replayed data)
             + gamma * KL(p_before || p_now)                 (distillation: keep retained predictions)

Maximising the cross-entropy of the forgotten data without a bound diverges (the loss is unbounded
above and drags the shared representation with it); the ReLU stops pushing once the forgotten data's
cross-entropy reaches BND. With BND = log(L), the cross-entropy of a uniform guess over L labels, the
forgotten task is driven to about chance level rather than to systematically wrong answers (which
would still reveal it). `bound_for` gives BND = bound * log(L); the default bound is 1.3, not 1: a
batch-mean cross-entropy of exactly log(L) still leaves the argmax right on many rows (measured: the
forgotten task at 43% for chance 33% with 1.0, at 31.5% with 1.3).

The distillation term is ours (gamma = `distill_weight`; 0 gives the paper's loss). Cross-entropy on
gold labels lets the forgetting adapter keep *training* on the small replayed set, moving retained
predictions (and, for tasks that share a label set with the forgotten one, pulling them towards the
forgotten task's new, uniform answers); matching the predictions the composition gave before the
request (p_before, computed once before the forgetting slot is added) pins them instead, and its
optimum is a zero update on retained inputs, which is also what the group lasso favours.

GS-LoRA++ (arXiv 2501.09705) adds prototype supervision: move a forgotten class's logits away from its
prototype, pull retained classes' logits towards theirs. With loraplex's encoder head the scores
already are cosines to fixed label prototypes (the label texts embedded by the bare base), so the two
data losses above act on prototype logits and no separate prototype term is added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loraplex.training import distill_loss  # noqa: F401 (the distillation term; the training module uses it)


def bound_for(n_labels: int, bound: float) -> float:
    """BND = bound * log(L): `bound` = 1 is the cross-entropy of a uniform guess over L labels."""
    return float(bound) * math.log(max(2, n_labels))


def bounded_forget_loss(scores: torch.Tensor, y: torch.Tensor, bnd: float) -> torch.Tensor:
    """ReLU(BND - mean CE) for scores (N, L) and gold labels y (N,): a scalar >= 0.

    The bound is on the batch mean, as in the paper. Bounding each row instead (mean_i ReLU(BND - CE_i))
    pushes every row's gold label below 1/L and so drives accuracy to ~0, not to chance (we tried it)."""
    return F.relu(bnd - F.cross_entropy(scores.float(), y))
