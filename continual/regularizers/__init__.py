"""Regularizers: objects with explicit hooks (on_experience_start, penalty, on_experience_end, state
dict) registered in a Catalog. Filled in by the continual-learning issue."""
