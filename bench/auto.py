"""Fit `auto`'s thresholds (route / generate / fall back) on the embedded task library, and show the curve.

    python bench/auto.py [--queries 20] [--proto 128] [--out bench/results/auto.json]

`router/auto.py` decides from a request's best routing score s1 = max_i <q, c_i> over the registry
(c_i = 0.2 d_i + 0.8 p_i: description embedding and training-input prototype, minilm). This bench
builds every library task's signature the way registration does (`--proto` training inputs for the
prototype), takes `--queries` test texts of every task, and scores each query against three registries
made by leaving tasks out of the library (signatures only: no model is run):

  registered   every task is in the registry                       -> the right decision is route
  new task     every task whose texts overlap the query's task's     -> generate (its family is still
               (`library.text_pools`) is left out, while others of      known: a generator fitted on the
               its family stay                                          registry covers it)
  new world    every task of the query's corpus is left out          -> base (no family fits)

The thresholds (route_threshold >= generate_threshold) are chosen on a grid to maximise the decision
accuracy averaged over the three cases (each case weighted alike). Printed: the fit, then the curve: for
route thresholds around the fit, the share of each case's requests routed / generated / passed to the
base, and how often routing in the registered case picked the query's own adapter or an equivalent
(`library.equivalents`). How good the generated and routed answers are is measured by the generator and
routing studies (bench/generators.py, bench/scale.py); this fits only the decision.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO  # noqa: E402

W = 0.8  # retrieval's default prototype weight
CACHE = Path("/tmp/loraplex-bench-auto-embeddings.npz")  # text -> minilm embedding, reused across runs


class _Encoder:
    """minilm with an on-disk cache of the embeddings it has computed (a rerun costs no model time)."""

    def __init__(self):
        import numpy as np

        from loraplex.embedders import get_embedder

        self.emb = get_embedder("minilm")
        self.cache: dict[str, "np.ndarray"] = {}
        if CACHE.is_file():
            with np.load(CACHE, allow_pickle=False) as z:
                self.cache = dict(zip(z["texts"].tolist(), z["vecs"]))

    def encode(self, texts):
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            for t, v in zip(todo, self.emb.encode(todo)):
                self.cache[t] = v
            keys = list(self.cache)
            np.savez(CACHE, texts=np.array(keys), vecs=np.stack([self.cache[k] for k in keys]))
        return np.stack([self.cache[t] for t in texts]).astype(np.float32)


_ENC: "_Encoder | None" = None


def encoder() -> _Encoder:
    global _ENC
    if _ENC is None:
        _ENC = _Encoder()
    return _ENC


def signatures(per_task: int):
    """(names, tasks, routing vectors (N, D), the mean and std of each task's own training inputs'
    scores against its routing vector (N,), (N,))."""
    import numpy as np

    from loraplex.data import load_task
    from loraplex.library import all_task_names

    emb = encoder()
    names = list(all_task_names())
    tasks = {n: load_task(n) for n in names}
    desc = emb.encode([tasks[n].description for n in names])
    inputs = [emb.encode([e.text for e in tasks[n].train[:per_task]]) for n in names]
    proto = np.stack([x.mean(0) for x in inputs])
    proto /= np.linalg.norm(proto, axis=1, keepdims=True)
    vecs = ((1 - W) * desc + W * proto).astype(np.float32)
    own = [x @ vecs[i] for i, x in enumerate(inputs)]
    return names, tasks, vecs, np.array([o.mean() for o in own]), np.array([o.std() + 1e-6 for o in own])


def cases(names, tasks, route_vecs, n_queries: int, mu=None, sd=None):
    """Per query: its task, its s1 in each case (None where the case does not apply), and whether
    registered routing picked its own adapter or an equivalent."""
    import numpy as np

    from loraplex.data import EMBEDDED_TASKS
    from loraplex.library import equivalents, text_pools, text_source

    emb = encoder()
    fam = {n: EMBEDDED_TASKS[n]["family"] for n in names}
    rows = []
    for t in names:
        texts = [e.text for e in tasks[t].test[:n_queries]]
        S = emb.encode(texts) @ route_vecs.T  # (Q, N)
        if mu is not None:  # calibrated: how typical the score is of each adapter's own inputs
            S = (S - mu[None, :]) / sd[None, :]
        pools, src = text_pools(t), text_source(t)
        overlap = np.array([bool(pools & text_pools(n)) for n in names])
        same_corpus = np.array([text_source(n) == src for n in names])
        fam_left = any(fam[n] == fam[t] and not overlap[j] for j, n in enumerate(names))
        ok = {t} | equivalents(t)
        for i in range(len(texts)):
            top = names[int(S[i].argmax())]
            rows.append({
                "task": t, "family": fam[t],
                "registered": float(S[i].max()),
                "new_task": float(S[i][~overlap].max()) if fam_left else None,
                "new_world": float(S[i][~same_corpus].max()),
                "routed_right": top in ok,
            })
    return rows


def shares(scores, t_route: float, t_gen: float) -> tuple[float, float, float]:
    n = len(scores)
    r = sum(s >= t_route for s in scores) / n
    g = sum(t_gen <= s < t_route for s in scores) / n
    return r, g, 1 - r - g


def accuracy(rows, t_route: float, t_gen: float) -> tuple[float, dict]:
    by = {c: [r[c] for r in rows if r[c] is not None] for c in ("registered", "new_task", "new_world")}
    acc = {"registered": shares(by["registered"], t_route, t_gen)[0],
           "new_task": shares(by["new_task"], t_route, t_gen)[1],
           "new_world": shares(by["new_world"], t_route, t_gen)[2]}
    return sum(acc.values()) / 3, acc


def main(argv=None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20, help="test texts per task")
    ap.add_argument("--proto", type=int, default=128, help="training inputs per prototype")
    ap.add_argument("--score", choices=("raw", "calibrated"), default="calibrated",
                    help="raw: s1 itself; calibrated: the z-score against each adapter's own training inputs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "auto.json")
    a = ap.parse_args(argv)
    names, tasks, vecs, mu, sd = signatures(a.proto)
    rows = cases(names, tasks, vecs, a.queries, *((mu, sd) if a.score == "calibrated" else ()))
    n = {c: sum(r[c] is not None for r in rows) for c in ("registered", "new_task", "new_world")}
    print(f"== auto's decision ({a.score} score), fitted on {len(names)} library tasks, {a.queries} test queries each ==")
    print(f"requests per case: registered {n['registered']}, new task {n['new_task']}, new world {n['new_world']}")
    for c in ("registered", "new_task", "new_world"):
        v = np.array([r[c] for r in rows if r[c] is not None])
        print(f"  s1 in case {c:10s}: p10 {np.percentile(v, 10):.3f}  p50 {np.percentile(v, 50):.3f}  "
              f"p90 {np.percentile(v, 90):.3f}")
    lo, hi = np.percentile([r["new_world"] for r in rows], 1), np.percentile([r["registered"] for r in rows], 99)
    grid = np.round(np.linspace(lo, hi, 90), 3)
    best = max(((accuracy(rows, tr, tg)[0], tr, tg) for tr in grid for tg in grid if tg <= tr))
    bal, t_route, t_gen = best
    _, per = accuracy(rows, t_route, t_gen)
    print(f"\nfit: route_threshold {t_route:.2f}, generate_threshold {t_gen:.2f}: decision accuracy {100 * bal:.1f}% "
          f"(registered routed {100 * per['registered']:.1f}%, new task generated {100 * per['new_task']:.1f}%, "
          f"new world to the base {100 * per['new_world']:.1f}%)")
    reg_rows = [r for r in rows if r["registered"] >= t_route]
    print(f"registered requests routed: {100 * len(reg_rows) / n['registered']:.1f}%; of those, routed to their own "
          f"adapter or an equivalent {100 * sum(r['routed_right'] for r in reg_rows) / max(1, len(reg_rows)):.1f}% "
          f"(all registered requests: {100 * sum(r['routed_right'] for r in rows) / len(rows):.1f}%)")
    print(f"\ncurve (generate_threshold {t_gen:.2f}); shares routed / generated / base per case:")
    print(f"{'route thr':>9}  {'registered':>20}  {'new task':>20}  {'new world':>20}  {'decision acc':>12}")
    curve = []
    step = (hi - lo) / 30
    for tr in np.round(np.arange(max(t_gen, t_route - 5 * step), t_route + 5.5 * step, step), 3):
        cells = {c: shares([r[c] for r in rows if r[c] is not None], tr, t_gen)
                 for c in ("registered", "new_task", "new_world")}
        acc = accuracy(rows, tr, t_gen)[0]
        curve.append({"route_threshold": float(tr), **{c: [round(x, 3) for x in v] for c, v in cells.items()},
                      "decision_accuracy": round(acc, 3)})
        fmt = lambda v: "/".join(f"{100 * x:4.0f}" for x in v)  # noqa: E731
        print(f"{tr:>9.2f}  {fmt(cells['registered']):>20}  {fmt(cells['new_task']):>20}  {fmt(cells['new_world']):>20}"
              f"  {100 * acc:>11.1f}%")
    fams = sorted({r["family"] for r in rows})
    print("\nper family at the fit: registered routed / new task generated / new world to the base")
    per_family = {}
    for f in fams:
        fr = [r for r in rows if r["family"] == f]
        _, pf = accuracy(fr, t_route, t_gen) if all(any(r[c] is not None for r in fr) for c in
                                                     ("registered", "new_task", "new_world")) else (None, None)
        reg_s = shares([r["registered"] for r in fr], t_route, t_gen)[0]
        nt = [r["new_task"] for r in fr if r["new_task"] is not None]
        nt_s = shares(nt, t_route, t_gen)[1] if nt else None
        nw_s = shares([r["new_world"] for r in fr], t_route, t_gen)[2]
        per_family[f] = {"registered_routed": reg_s, "new_task_generated": nt_s, "new_world_base": nw_s}
        print(f"  {f:17s} {100 * reg_s:5.1f}%  {'   -  ' if nt_s is None else f'{100 * nt_s:5.1f}%'}  {100 * nw_s:5.1f}%")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"route_threshold": float(t_route), "generate_threshold": float(t_gen),
                                 "decision_accuracy": bal, "per_case": per, "curve": curve, "per_family": per_family,
                                 "queries_per_task": a.queries, "proto_inputs": a.proto}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
