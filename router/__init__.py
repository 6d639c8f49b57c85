"""Routers: how registered adapters are composed at run time. A router only makes gates; the adapters sit
in one `LoraBank` per adapted projection (experts/bank.py) and every router feeds the same bank.

- `base.py`: the seam: `Routing` (gates, top-k indices, aux loss), the `ROUTERS` catalog, `LearnedRouter`
  (one gate module per RoutedLinear; its weights are the gates' state dicts);
- `token_gate.py` (MeteoRA), `mixer.py` (LoRA-Mixer), `rank.py` (SMoRA): learned routers;
- `retrieval.py`: nearest adapters by signature (faiss), constant gates per sequence, no training;
- `losses.py`: pure loss functions (gate cross-entropy, balance, entropy shaping);
- `model.py`: `RoutedModel` (answers, traces, heterogeneous batches, evaluation);
- `load.py`: routed models from the registry; `fit.py`: fitting a router with Lightning and storing it.

Heavy modules import torch; `from loraplex.router.base import ROUTERS` loads the methods lazily.
"""
