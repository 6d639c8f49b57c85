"""Continual learning and one-adapter training: the stream (spec, methods, run directory, report),
replay, the O-LoRA and GS-LoRA regularizers, forgetting requests, metrics, and `fit_adapter` (one
task, continual/fit.py). The shared Lightning code (`ContinualModule`, `TrainConfig`, the trainer and
`fit`) is `loraplex/training.py`; continual/module.py only re-exports `ContinualModule`."""
