"""Fit `auto`'s thresholds (route / generate / fall back) on the embedded task library, and show the curve.

    python bench/auto.py [--queries 20] [--proto 128] [--form whole|short|both]
                         [--signature prototype|exemplars|twin|labels]
                         [--score raw|calibrated|ratio|ratio-len] [--out bench/results/auto.json]

`router/auto.py` decides from a request's best routing score s1 = max_i <q, c_i> over the registry
(c_i = 0.2 d_i + 0.8 p_i: description embedding and training-input prototype, minilm). This bench
builds every library task's signature as registration does, from `--proto` training inputs for the
prototype (128 by default, what the shipped thresholds were fitted on; registration uses up to 256,
registry/signatures.py `PROTOTYPE_LIMIT`), takes `--queries` test texts of every task, and scores each
query against three registries made by leaving tasks out of the library (signatures only: no model is
run):

  registered   every task is in the registry                       -> the right decision is route
  new task     every task whose texts overlap the query's task's     -> generate (its family is still
               (`overlap.text_pools`) is left out, while  others of      known: a generator fitted on the
               its family stay                                          registry covers it)
  new world    every task of the query's corpus is left out          -> base (no family fits)

The thresholds (route_threshold >= generate_threshold) are chosen on a grid to maximise the decision
accuracy averaged over the three cases (each case weighted alike). Printed: the fit, then the curve: for
route thresholds around the fit, the share of each case's requests routed / generated / passed to the
base, and how often routing in the registered case picked the query's own adapter or an equivalent
(`overlap.equivalents`). How good the generated and routed answers are is measured by the generator and
routing studies (bench/generators.py, bench/scale.py); this fits only the decision.

`--form short` asks with each test text's first sentence (at most 12 words), as a person types a request;
`--signature exemplars|twin` and `--score calibrated` measure three other scores (twin: the larger of the
prototype score and that of a second prototype built from the training inputs' short forms). One fit per
combination is in `bench/results/auto-forms.txt`: on whole texts no other score moves the decision
accuracy by more than 3 points (the best, calibrated exemplars, +2.7 over the raw prototype's 57.7%);
short queries and the mix of both lose 3 to 7.5 points against whole texts under the same score (on the
mix an alternative gains up to 3.4, calibrated exemplars' 57.1% against 53.7%, still below 57.7%), so
router/auto.py keeps the raw prototype score and the whole-text fit. `--score ratio|ratio-len` (the score over
the mean score of the adapter's own inputs, `calibration`) gains 2-4 points of two-way accuracy and 2-3 on the
handwritten queries, which the bench also scores (`handwritten`): not enough to ship (auto-forms.txt, 2026-12-08).
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
        self.cache: dict[str, "np.ndarray"] = {}  # sha1 of the text -> embedding
        self.dirty = False
        if CACHE.is_file():
            with np.load(CACHE, allow_pickle=False) as z:
                self.cache = dict(zip(z["keys"].tolist(), z["vecs"]))

    @staticmethod
    def _key(text: str) -> str:
        import hashlib

        return hashlib.sha1(text.encode()).hexdigest()

    def encode(self, texts):
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if self._key(t) not in self.cache]
        if todo:
            for t, v in zip(todo, self.emb.encode(todo)):
                self.cache[self._key(t)] = v
            self.dirty = True
        return np.stack([self.cache[self._key(t)] for t in texts]).astype(np.float32)

    def save(self) -> None:
        import numpy as np

        if self.dirty:
            keys = list(self.cache)
            np.savez(CACHE, keys=np.array(keys), vecs=np.stack([self.cache[k] for k in keys]))


_ENC: "_Encoder | None" = None


def encoder() -> _Encoder:
    global _ENC
    if _ENC is None:
        _ENC = _Encoder()
    return _ENC


def signatures(per_task: int, signature: str = "prototype", k: int = 5):
    """(names, tasks, description embeddings (N, D), a scorer `score(q (Q, D)) -> (Q, N)` routing scores,
    and the mean and std of each task's own training inputs' scores against it (N,), (N,)).

    prototype: <q, (1 - W) d + W p> with p the renormalised mean of the inputs (what retrieval stores);
    exemplars: (1 - W) <q, d> + W * the mean of q's k highest cosines to the task's inputs (a kNN score:
    a short query near a few of a task's inputs scores high even when it is far from their mean);
    labels: the largest of the task's per-label signatures, each with the renormalised mean of one label's inputs
    as its prototype (a task whose labels are far apart, as languages or news topics, is several points)."""
    import numpy as np

    from loraplex.data import load_task
    from loraplex.overlap import all_task_names

    emb = encoder()
    names = list(all_task_names())
    tasks = {n: load_task(n) for n in names}
    desc = emb.encode([tasks[n].description for n in names])
    inputs = [emb.encode([e.text for e in tasks[n].train[:per_task]]) for n in names]
    proto = np.stack([x.mean(0) for x in inputs])
    proto /= np.linalg.norm(proto, axis=1, keepdims=True)
    vecs = ((1 - W) * desc + W * proto).astype(np.float32)
    if signature == "prototype":
        def score(q):
            return q @ vecs.T
    elif signature == "labels":
        lvecs, owner = [], []
        for i, n in enumerate(names):
            y = np.array([e.label for e in tasks[n].train[:per_task]])
            for lab in dict.fromkeys(y.tolist()):
                p = inputs[i][y == lab].mean(0)
                lvecs.append((1 - W) * desc[i] + W * p / np.linalg.norm(p))
                owner.append(i)
        lv, owner = np.stack(lvecs).astype(np.float32), np.array(owner)

        def score(q):
            sims = q @ lv.T
            return np.stack([sims[:, owner == i].max(1) for i in range(len(names))], axis=1)
    elif signature == "twin":
        short = [emb.encode([short_form(e.text) for e in tasks[n].train[:per_task]]) for n in names]
        sp = np.stack([x.mean(0) for x in short])
        sp /= np.linalg.norm(sp, axis=1, keepdims=True)
        svecs = ((1 - W) * desc + W * sp).astype(np.float32)

        def score(q):
            return np.maximum(q @ vecs.T, q @ svecs.T)
    else:
        flat = np.concatenate(inputs)
        bounds = np.cumsum([0] + [len(x) for x in inputs])

        def score(q):
            sims = q @ flat.T
            top = np.stack([np.sort(sims[:, a:b], axis=1)[:, -min(k, b - a):].mean(1)
                            for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
            return (1 - W) * (q @ desc.T) + W * top
    own = [score(x)[:, i] for i, x in enumerate(inputs)]
    return names, tasks, desc, score, np.array([o.mean() for o in own]), np.array([o.std() + 1e-6 for o in own])


def short_form(text: str, words: int = 12) -> str:
    """A request as a person types it: the text's first sentence, at most `words` words."""
    import re

    first = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]
    return " ".join(first.split()[:words])


CASES = ("registered", "new_task", "new_world")


def calibration(kind: str, names, tasks, score, mu, sd, per_task: int):
    """The score a fit reads, from the raw routing scores S (Q, N) of the query texts: None for raw; else
    `f(S, texts) -> S'`. calibrated: the z-score against each adapter's own training inputs' scores; ratio:
    S / that mean (an adapter whose own inputs sit far from their prototype, a diverse family as news or chat,
    is not held to the bar of a tight one); ratio-len: the same, with the mean of the inputs' short forms
    (`short_form`) as the divisor for a query of at most 12 words (a short text sits farther from a prototype
    of whole texts than the texts themselves)."""
    import numpy as np

    if kind == "raw":
        return None
    if kind == "calibrated":
        return lambda S, texts: (S - mu[None, :]) / sd[None, :]
    if kind == "ratio":
        return lambda S, texts: S / mu[None, :]
    emb = encoder()
    mu_s = np.array([score(emb.encode([short_form(e.text) for e in tasks[n].train[:per_task]]))[:, i].mean()
                     for i, n in enumerate(names)])

    def by_length(S, texts):
        short = np.array([len(t.split()) <= 12 for t in texts])
        return S / np.where(short[:, None], mu_s[None, :], mu[None, :])
    return by_length


def handwritten(names, score, calibrate, threshold: float):
    """The two-way decision (route at `threshold`, else base) on bench/data/handwritten.tsv, signatures only:
    (queries of a library family routed, their count, out-of-family queries left to the base, their count, and
    queries of a library family whose best-scoring adapter is of their family (`in_family`), routed or not)."""
    import numpy as np

    from bench.handwritten import OUTSIDE, family_of, in_family, queries

    rows = queries()
    texts = [r[3] for r in rows]
    S = score(encoder().encode(texts))
    if calibrate is not None:
        S = calibrate(S, texts)
    routed = S.max(1) >= threshold
    out = np.array([r[0] in OUTSIDE for r in rows])
    right = np.array([in_family(r[0], family_of(names[int(j)])) for r, j in zip(rows, S.argmax(1))])
    return (int(routed[~out].sum()), int((~out).sum()), int((~routed[out]).sum()), int(out.sum()),
            int(right[~out].sum()))


def cases(names, tasks, desc, score, n_queries: int, calibrate=None, form: str = "whole"):
    """Per query and case: s1 (the best routing score over the case's registry) and the generator's
    distance (1 - the best cosine of the query to a remaining task's description: what a generator
    fitted on that registry measures for a request), NaN where the case does not apply; and whether
    registered routing picked the query's own adapter or an equivalent."""
    import numpy as np

    from loraplex.data import EMBEDDED_TASKS
    from loraplex.overlap import equivalents, text_pools, text_source

    emb = encoder()
    fam = {n: EMBEDDED_TASKS[n]["family"] for n in names}
    out = {c: ([], []) for c in CASES}
    meta = {"task": [], "family": [], "routed_right": []}
    for t in names:
        texts = [e.text for e in tasks[t].test[:n_queries]]
        if form == "short":
            texts = [short_form(x) for x in texts]
        elif form == "both":
            texts = texts + [short_form(x) for x in texts]
        q = emb.encode(texts)
        S = score(q)  # (Q, N)
        if calibrate is not None:  # how typical the score is of each adapter's own inputs
            S = calibrate(S, texts)
        D = 1.0 - q @ desc.T  # (Q, N)
        pools, src = text_pools(t), text_source(t)
        overlap = np.array([bool(pools & text_pools(n)) for n in names])
        same_corpus = np.array([text_source(n) == src for n in names])
        fam_left = any(fam[n] == fam[t] and not overlap[j] for j, n in enumerate(names))
        keep = {"registered": np.ones(len(names), bool), "new_task": ~overlap if fam_left else None,
                "new_world": ~same_corpus}
        for c in CASES:
            if keep[c] is None:
                out[c][0].extend([np.nan] * len(q))
                out[c][1].extend([np.nan] * len(q))
            else:
                out[c][0].extend(S[:, keep[c]].max(1).tolist())
                out[c][1].extend(D[:, keep[c]].min(1).tolist())
        ok = {t} | equivalents(t)
        meta["task"] += [t] * len(q)
        meta["family"] += [fam[t]] * len(q)
        meta["routed_right"] += [names[int(i)] in ok for i in S.argmax(1)]
    arr = {c: (np.array(out[c][0]), np.array(out[c][1])) for c in CASES}
    return arr, {k: np.array(v) for k, v in meta.items()}


def shares(s1, dist, t_route: float, t_gen: float, bound: float):
    """(routed, generated, base) shares of the requests with scores s1 and generator distances dist."""
    import numpy as np

    ok = ~np.isnan(s1)
    s1, dist = s1[ok], dist[ok]
    if not len(s1):
        return None
    r = s1 >= t_route
    g = ~r & (s1 >= t_gen) & (dist <= bound)
    return float(r.mean()), float(g.mean()), float(1 - r.mean() - g.mean())


def accuracy(arr, t_route: float, t_gen: float, bound: float):
    """Decision accuracy averaged over the three cases (and per case): registered routed, new task
    generated, new world passed to the base."""
    want = {"registered": 0, "new_task": 1, "new_world": 2}
    per = {}
    for c in CASES:
        sh = shares(*arr[c], t_route, t_gen, bound)
        if sh is not None:
            per[c] = sh[want[c]]
    return sum(per.values()) / len(per), per


def _subset(arr, mask):
    return {c: (v[0][mask], v[1][mask]) for c, v in arr.items()}


def main(argv=None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20, help="test texts per task")
    ap.add_argument("--proto", type=int, default=128, help="training inputs per prototype")
    ap.add_argument("--score", choices=("raw", "calibrated", "ratio", "ratio-len"), default="raw",
                    help="raw: s1 itself (what router/auto.py uses); ratio / ratio-len: the score over the mean of "
                         "the adapter's own inputs' scores (`calibration`); calibrated: the z-score against each "
                         "adapter's own training inputs (measured as an alternative)")
    ap.add_argument("--signature", choices=("prototype", "exemplars", "twin", "labels"), default="prototype",
                    help="prototype: the mean-embedding signature retrieval stores; exemplars: a kNN score over "
                         "the task's training inputs (measured as an alternative)")
    ap.add_argument("--exemplar-k", type=int, default=5, help="nearest inputs the exemplar score averages")
    ap.add_argument("--form", choices=("whole", "short", "both"), default="whole",
                    help="queries: whole test texts, their first sentence (at most 12 words), or both")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "auto.json")
    a = ap.parse_args(argv)
    names, tasks, desc, score, mu, sd = signatures(a.proto, a.signature, a.exemplar_k)
    calibrate = calibration(a.score, names, tasks, score, mu, sd, a.proto)
    arr, meta = cases(names, tasks, desc, score, a.queries, calibrate, form=a.form)
    encoder().save()
    n = {c: int((~np.isnan(arr[c][0])).sum()) for c in CASES}
    print(f"== auto's decision ({a.score} {a.signature} score, {a.form} queries), fitted on {len(names)} library tasks, {a.queries} test queries each ==")
    print(f"requests per case: registered {n['registered']}, new task {n['new_task']}, new world {n['new_world']}")
    for c in CASES:
        s1, d = (v[~np.isnan(v)] for v in arr[c])
        print(f"  case {c:10s}: s1 p10/p50/p90 {np.percentile(s1, 10):.3f} / {np.percentile(s1, 50):.3f} / "
              f"{np.percentile(s1, 90):.3f};  generator distance p10/p50/p90 {np.percentile(d, 10):.3f} / "
              f"{np.percentile(d, 50):.3f} / {np.percentile(d, 90):.3f}")
    allv = np.concatenate([arr[c][0][~np.isnan(arr[c][0])] for c in CASES])
    alld = np.concatenate([arr[c][1][~np.isnan(arr[c][1])] for c in CASES])
    grid = np.round(np.linspace(np.percentile(allv, 1), np.percentile(allv, 99), 60), 3)
    bounds = np.round(np.append(np.linspace(np.percentile(alld, 1), np.percentile(alld, 99), 24), 2.0), 3)
    best = max((accuracy(arr, tr, tg, b)[0], tr, tg, b) for tr in grid for tg in grid if tg <= tr for b in bounds)
    bal, t_route, t_gen, bound = best
    _, per = accuracy(arr, t_route, t_gen, bound)
    print(f"\nfit: route_threshold {t_route:.2f}, generate_threshold {t_gen:.2f}, generator_max_distance {bound:.2f}: "
          f"decision accuracy {100 * bal:.1f}% (registered routed {100 * per['registered']:.1f}%, new task generated "
          f"{100 * per['new_task']:.1f}%, new world to the base {100 * per['new_world']:.1f}%; chance 33.3%)")
    routed = arr["registered"][0] >= t_route
    print(f"registered requests routed: {100 * routed.mean():.1f}%; of those, routed to their own adapter or an "
          f"equivalent {100 * meta['routed_right'][routed].mean():.1f}% (all registered requests: "
          f"{100 * meta['routed_right'].mean():.1f}%)")
    no_gen = accuracy(arr, t_route, t_gen, -1.0)
    print(f"the same thresholds without the generator's distance check: {100 * accuracy(arr, t_route, t_gen, 2.0)[0]:.1f}%; "
          f"with no generate band at all (route or base): {100 * no_gen[0]:.1f}%")
    # with no generator stored the decision is two-way: route (registered requests) or base (new world);
    # a request of a known family but no registered task has no right answer there, so it is left out
    two = max(((float((arr["registered"][0] >= t).mean()) + float((arr["new_world"][0][~np.isnan(arr["new_world"][0])] < t).mean())) / 2, t)
              for t in grid)
    t_alone = two[1]
    nt = arr["new_task"][0][~np.isnan(arr["new_task"][0])]
    print(f"without a generator (route or base): no_generator_threshold {t_alone:.2f}: decision accuracy {100 * two[0]:.1f}% "
          f"(registered routed {100 * (arr['registered'][0] >= t_alone).mean():.1f}%, new world to the base "
          f"{100 * (arr['new_world'][0][~np.isnan(arr['new_world'][0])] < t_alone).mean():.1f}%; new task requests routed "
          f"to a neighbour {100 * (nt >= t_alone).mean():.1f}%); at route_threshold {t_route:.2f} instead: "
          f"{100 * ((routed.mean() + (arr['new_world'][0][~np.isnan(arr['new_world'][0])] < t_route).mean()) / 2):.1f}%")
    hw = handwritten(names, score, calibrate, t_alone)
    print(f"handwritten queries (bench/data/handwritten.tsv, not fitted on) at that threshold: of a library family routed "
          f"{hw[0]}/{hw[1]}, outside every family to the base {hw[2]}/{hw[3]}: {50 * (hw[0] / hw[1] + hw[2] / hw[3]):.1f}% "
          f"balanced; their best adapter of their family {hw[4]}/{hw[1]}")
    step = (grid[-1] - grid[0]) / 30
    print(f"\ncurve (generate_threshold {t_gen:.2f}, generator_max_distance {bound:.2f}); "
          "routed / generated / base, % of each case's requests:")
    print(f"{'route thr':>9}  {'registered':>16}  {'new task':>16}  {'new world':>16}  {'decision acc':>12}")
    curve = []
    for tr in np.round(np.arange(max(t_gen, t_route - 5 * step), t_route + 5.5 * step, step), 3):
        cells = {c: shares(*arr[c], tr, t_gen, bound) for c in CASES}
        acc = accuracy(arr, tr, t_gen, bound)[0]
        curve.append({"route_threshold": float(tr), **{c: [round(x, 3) for x in v] for c, v in cells.items()},
                      "decision_accuracy": round(acc, 3)})
        fmt = lambda v: "/".join(f"{100 * x:3.0f}" for x in v)  # noqa: E731
        print(f"{tr:>9.2f}  {fmt(cells['registered']):>16}  {fmt(cells['new_task']):>16}  {fmt(cells['new_world']):>16}"
              f"  {100 * acc:>11.1f}%")
    print("\nper family at the fit: registered routed / new task generated / new world to the base")
    per_family = {}
    for f in sorted(set(meta["family"].tolist())):
        sub = _subset(arr, meta["family"] == f)
        cells = {c: shares(*sub[c], t_route, t_gen, bound) for c in CASES}
        vals = {"registered": cells["registered"][0], "new_task": cells["new_task"][1] if cells["new_task"] else None,
                "new_world": cells["new_world"][2]}
        per_family[f] = vals
        show = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
        print(f"  {f:17s} {show(vals['registered'])}  {show(vals['new_task'])}  {show(vals['new_world'])}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"score": a.score, "route_threshold": float(t_route), "generate_threshold": float(t_gen),
                                 "generator_max_distance": float(bound), "decision_accuracy": bal, "per_case": per,
                                 "no_generator_threshold": float(t_alone), "no_generator_accuracy": two[0],
                                 "handwritten_two_way": {"family_routed": hw[0], "family": hw[1], "outside_to_base": hw[2],
                                                         "outside": hw[3], "family_right": hw[4]},
                                 "curve": curve, "per_family": per_family, "queries_per_task": a.queries,
                                 "proto_inputs": a.proto}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
