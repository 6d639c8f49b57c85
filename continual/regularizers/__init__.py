"""Regularizers: objects with explicit hooks (on_experience_start, penalty, on_experience_end, state
dict) registered in the `REGULARIZERS` catalog (`base.py`): `o-lora` (orthogonal subspaces) and
`gs-lora` (group sparsity of a forgetting adapter)."""

from loraplex.continual.regularizers.base import REGULARIZERS, ExperienceContext, Regularizer

__all__ = ["REGULARIZERS", "ExperienceContext", "Regularizer"]
