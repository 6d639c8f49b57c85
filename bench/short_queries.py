"""Handwritten short queries against the tasks' signatures: the mean-embedding prototype (what retrieval and
`auto` compare today, registry/signatures.py) against the mean of the 5 most similar training inputs.

`make demo`'s server answers "the prime minister called an early election" with the bare base: its
similarity to the bbc adapter's signature is 0.165, under auto's generate threshold (0.22, fitted on the
library's test texts, which for the news tasks are whole articles). A headline sits far from the centroid
of 256 articles on five topics, but close to the few articles on its own topic. This prints both scores
for a handful of handwritten headlines, tweets and off-topic questions, per task, with the registry's
embedder (MiniLM). No registry or adapter is needed.

    python bench/short_queries.py          # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO  # noqa: E402,F401  (sets the offline environment)

QUERIES = {  # text -> the task a person would route it to (None: no task of these fits)
    "the prime minister called an early election": "bbc",
    "Shares in Tesco fell 5% after weak Christmas sales": "bbc",
    "Arsenal beat Chelsea 2-0 at the Emirates": "bbc",
    "New James Bond film breaks box office records": "bbc",
    "Labour promises to cut taxes for families": "bbc",
    "Delta lost my luggage again, never flying with them": "airline",
    "iPhone 6 battery is terrible": "apple",
    "what is the capital of france": None,
    "recipe for chocolate cake": None,
}
TASKS = ("bbc", "airline", "apple")
TOP = 5


def main() -> int:
    import numpy as np

    from loraplex.data import load_task
    from loraplex.embedders import get_embedder

    emb = get_embedder("minilm")
    texts = list(QUERIES)
    Q = emb.encode(texts)
    proto, knn = {}, {}
    for t in TASKS:
        X = emb.encode([e.text for e in load_task(t).train[:256]])
        p = X.mean(0)
        proto[t] = Q @ (p / np.linalg.norm(p))
        knn[t] = np.sort(Q @ X.T, axis=1)[:, -TOP:].mean(1)
    print(f"{'query':52} {'want':8} " + " ".join(f"{t + ' proto':>13} {t + f' top{TOP}':>12}" for t in TASKS))
    for i, q in enumerate(texts):
        print(f"{q[:52]:52} {QUERIES[q] or '-':8} " + " ".join(f"{proto[t][i]:13.3f} {knn[t][i]:12.3f}" for t in TASKS))
    for name, s in (("prototype", proto), (f"top-{TOP} mean", knn)):
        best_in = [s[QUERIES[q]][i] for i, q in enumerate(texts) if QUERIES[q]]
        best_off = [max(s[t][i] for t in TASKS) for i, q in enumerate(texts) if not QUERIES[q]]
        print(f"{name:14} lowest score of a query to its own task {min(best_in):.3f}; "
              f"highest score of an off-topic query {max(best_off):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
