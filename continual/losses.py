"""Pure loss functions of the forgetting objective (GS-LoRA, arXiv 2403.11530, Sec. 3).

    L_forget = ReLU(BND - CE(scores_forget, y_forget))     bounded: no gradient once CE reaches BND
    L_retain = CE(scores_retain, y_retain)                  (the ordinary task loss on replayed data)

Maximising the cross-entropy of the forgotten data without a bound diverges (the loss is unbounded
above and drags the shared representation with it); the ReLU stops pushing once the forgotten data's
cross-entropy reaches BND. With BND = log(L), the cross-entropy of a uniform guess over L labels, the
forgotten task is driven to about chance level rather than to systematically wrong answers (which
would still reveal it). `bound_for` gives BND = bound * log(L).

GS-LoRA++ (arXiv 2501.09705) adds prototype supervision: move a forgotten class's logits away from its
prototype, pull retained classes' logits towards theirs. With loraplex's encoder head the scores
already are cosines to fixed label prototypes (the label texts embedded by the bare base), so the two
data losses above act on prototype logits and no separate prototype term is added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bound_for(n_labels: int, bound: float) -> float:
    """BND = bound * log(L): `bound` = 1 is the cross-entropy of a uniform guess over L labels."""
    return float(bound) * math.log(max(2, n_labels))


def bounded_forget_loss(scores: torch.Tensor, y: torch.Tensor, bnd: float) -> torch.Tensor:
    """ReLU(BND - mean CE) for scores (N, L) and gold labels y (N,): a scalar >= 0."""
    ce = F.cross_entropy(scores.float(), y)
    return F.relu(bnd - ce)
