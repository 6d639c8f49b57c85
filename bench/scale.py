"""loraplex at registry scale: retrieval routing among every adapter of the task library, and the latency
of the routing decision with 1,000 and 10,000 registered adapters.

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/scale.py --part routing [--limit 100] [--top-k 1,3]
    python bench/scale.py --part latency [--counts 1000,10000] [--queries 200]

1. routing: the library registry that `bench/library.py` builds (one minilm adapter `<task>-lora` per
   library task) is routed over as a whole: every test query (the first `--limit` of each task's test
   split) goes through faiss over the registry's routing vectors (description and prototype combined,
   c_i = (1 - w) d_i + w p_i: router/retrieval.py) and the gates over the candidates it returns, and the
   query is answered by the routed model on its own task's labels (as `RoutedModel.evaluate` scores).
   Reported per task and per family: routing accuracy, routed accuracy, and the oracle (the task's own
   adapter alone), with routed / oracle as the headline (goal: >= 95% on average).

   Routing accuracy counts the query's own adapter as right, and also an *equivalent*: an adapter
   trained on the same texts (same corpus and, for tweets, the same domain) whose label set covers the
   query's task's labels, e.g. the five-topic `bbc` adapter for a `bbc-politics-vs-sport` query or
   `airline` (negative / neutral / positive) for an `airline-polarity` one. A query's text alone cannot
   tell those tasks apart (the same article is a fair input to both), and either adapter answers the
   query's question. `loraplex.overlap.equivalents` defines it; both figures (own only, own or
   equivalent) are printed. The query's task is known (its labels score the answer), so retrieval is
   told its labels (`--label-weight`, the RetrievalConfig default 0.25; 0 routes on the text alone).

2. learned (`--part learned`): a token-gate router (MeteoRA, k=2, one gate per layer input) fitted
   over every library adapter on their tasks (stored in the bench home as `library-token-gate`, reused),
   then routed over all of them and over a shortlist retrieval draws per task's queries (`query
   --shortlist`: the router's gates restricted to the union of each query's `--shortlist` adapters
   whose signatures score best, the label term included), scored as in part 1.

3. latency: registries of N synthetic adapters whose signatures are real ones perturbed (the library
   tasks' description embeddings and training-input prototypes plus Gaussian noise, renormalised: real
   geometry, N distinct vectors; one shared weight blob, since the decision never reads weights), and
   real library test texts as queries. Timed per query, one at a time: the embedding of the query
   (minilm) and the decision itself (faiss over the registry's routing vectors, description and
   prototype combined, then the gates), against an exact numpy scan over all N signatures in the
   same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, adapter_name, bench_settings  # noqa: E402


def _pct(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------------------------------------
# 1. routing over the whole library


def bench_routing(limit: int, top_ks: list[int], label_weight: float = 0.25, log=print) -> dict:
    import torch

    from loraplex import api
    from loraplex.experts.layers import use_gates
    from loraplex.heads import accuracy
    from loraplex.data import EMBEDDED_TASKS
    from loraplex.overlap import all_task_names, equivalents
    from loraplex.router.model import routers_off

    s = bench_settings()
    reg = api.open_registry(s)
    tasks = [n for n in all_task_names() if reg.has_adapter(adapter_name(n))]
    missing = [n for n in all_task_names() if n not in tasks]
    if missing:
        log(f"note: {len(missing)} library tasks have no adapter yet (run bench/library.py): {', '.join(missing)}")
    names = [adapter_name(t) for t in tasks]
    log(f"== routing over {len(names)} library adapters (registry {s.home}), {limit} test queries per task ==")
    task_of = {adapter_name(t): t for t in tasks}
    out: dict = {"adapters": len(names), "limit": limit, "label_weight": label_weight, "runs": {}}
    oracle: dict[str, float] = {}
    for k in top_ks:
        t0 = time.perf_counter()
        config = {"top_k": k, "candidates": max(64, 4 * k), "label_weight": label_weight}
        rm = api.load_routed_model("retrieval", None, texts=["warm up"], config=config, settings=s)
        rows = []
        for t in tasks:
            task = reg.load_task(t)
            ex = list(task.split("test"))[:limit]
            texts = [e.text for e in ex]
            # retrieval over the whole registry: faiss candidates for these queries, then the bank
            rm = api.load_routed_model("retrieval", None, texts=texts, config=config, settings=s)
            scores, routes = rm.scores_and_routes(texts, task)
            pred = scores.argmax(-1).tolist()
            gold = [task.label_index(e.label) for e in ex]
            correct = sum(int(p == g) for p, g in zip(pred, gold))
            tops = [task_of.get(rm.experts[r.top]) for r in routes]
            ok_own = sum(int(x == t) for x in tops)
            eq = equivalents(t) | {t}
            ok_eq = sum(int(x in eq) for x in tops)
            if t not in oracle:
                own = rm.experts.index(adapter_name(t)) if adapter_name(t) in rm.experts else None
                if own is None:  # not among the candidates of these queries: load it alone
                    om = api.load_routed_model(None, [adapter_name(t)], settings=s)
                    own, model = 0, om
                else:
                    model = rm
                with torch.no_grad(), routers_off(model.model), use_gates(model.model, model.one_hot([own])):
                    oracle[t] = accuracy(model.head, model.model, model.tokenizer, task, "test", limit)["accuracy"]
            rows.append({"task": t, "family": EMBEDDED_TASKS[t]["family"], "n": len(ex), "routing_own": ok_own / len(ex),
                         "routing": ok_eq / len(ex), "accuracy": correct / len(ex), "oracle": oracle[t],
                         "top": max(set(tops), key=tops.count)})
        dt = time.perf_counter() - t0
        out["runs"][f"top{k}"] = {"rows": rows, "seconds": round(dt, 1)}
        _report_routing(k, label_weight, rows, dt, log)
    return out


def _report_routing(k: int, label_weight: float, rows: list[dict], seconds: float, log=print,
                    title: str | None = None) -> None:
    log(f"\n-- {title or f'retrieval, top_k={k}, label_weight={label_weight:g}'} ({seconds:.0f}s) --")
    log(f"{'task':32} {'family':17} {'n':>4} {'own':>6} {'equiv':>6} {'routed':>7} {'oracle':>7} {'share':>7}  most routed to")
    for r in rows:
        share = r["accuracy"] / r["oracle"] if r["oracle"] else float("nan")
        log(f"{r['task']:32} {r['family']:17} {r['n']:>4} {100 * r['routing_own']:>5.1f}% {100 * r['routing']:>5.1f}% "
            f"{100 * r['accuracy']:>6.1f}% {100 * r['oracle']:>6.1f}% {100 * share:>6.1f}%  {r['top']}")
    fam: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        fam[r["family"]].append(r)
    log(f"\n{'family':17} {'tasks':>5} {'own':>6} {'equiv':>6} {'routed':>7} {'oracle':>7} {'share':>7}")
    for f, rs in list(fam.items()) + [("all (task mean)", rows)]:
        m = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
        share = statistics.mean(r["accuracy"] / r["oracle"] for r in rs if r["oracle"])
        log(f"{f:17} {len(rs):>5} {100 * m('routing_own'):>5.1f}% {100 * m('routing'):>5.1f}% {100 * m('accuracy'):>6.1f}% "
            f"{100 * m('oracle'):>6.1f}% {100 * share:>6.1f}%")
    share = statistics.mean(r["accuracy"] / r["oracle"] for r in rows if r["oracle"])
    log(f"goal: routed >= 95% of the oracle on average: {'met' if share >= 0.95 else 'missed'} ({100 * share:.1f}%)")


# ---------------------------------------------------------------------------------------------
# 2. a learned router over the whole library, and over a retrieved shortlist

LEARNED = "library-token-gate"


def bench_learned(limit: int, shortlists: list[int], steps: int, log=print) -> dict:
    import torch

    from loraplex import api
    from loraplex.data import EMBEDDED_TASKS
    from loraplex.experts.layers import use_gates
    from loraplex.heads import accuracy
    from loraplex.overlap import all_task_names, equivalents
    from loraplex.router.model import routers_off

    s = bench_settings()
    reg = api.open_registry(s)
    tasks = [n for n in all_task_names() if reg.has_adapter(adapter_name(n))]
    names = [adapter_name(t) for t in tasks]
    task_of = {adapter_name(t): t for t in tasks}
    out: dict = {"adapters": len(names), "limit": limit, "steps": steps, "runs": {}}
    if not any(c.name == LEARNED for c in reg.list_components("router")):
        log(f"== fitting {LEARNED} over {len(names)} library adapters ({steps} steps) ==")
        t0 = time.perf_counter()
        api.fit_router(LEARNED, router="token-gate", adapters=names, steps=steps, batch_size=16, eval_limit=10,
                       config={"top_k": 2, "shared": True}, settings=s)
        out["fit_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"   fitted in {out['fit_seconds']:.0f}s")
    full = api.load_routed_model(LEARNED, settings=s)
    oracle: dict[str, float] = {}
    for size in [0] + shortlists:
        t0 = time.perf_counter()
        rows = []
        for t in tasks:
            task = reg.load_task(t)
            ex = list(task.split("test"))[:limit]
            texts = [e.text for e in ex]
            if size:  # the router's gates restricted to the adapters retrieval ranks first for these queries
                rm = api.load_routed_model(LEARNED, texts=texts, shortlist=size, labels=task.labels, settings=s)
            else:
                rm = full
            scores, routes = rm.scores_and_routes(texts, task)
            pred = scores.argmax(-1).tolist()
            gold = [task.label_index(e.label) for e in ex]
            tops = [task_of.get(rm.experts[r.top]) for r in routes]
            eq = equivalents(t) | {t}
            if t not in oracle:
                own = full.experts.index(adapter_name(t))
                with torch.no_grad(), routers_off(full.model), use_gates(full.model, full.one_hot([own])):
                    oracle[t] = accuracy(full.head, full.model, full.tokenizer, task, "test", limit)["accuracy"]
            rows.append({"task": t, "family": EMBEDDED_TASKS[t]["family"], "n": len(ex),
                         "routing_own": sum(int(x == t) for x in tops) / len(ex),
                         "routing": sum(int(x in eq) for x in tops) / len(ex),
                         "accuracy": sum(int(p == g) for p, g in zip(pred, gold)) / len(ex), "oracle": oracle[t],
                         "top": max(set(tops), key=tops.count)})
        dt = time.perf_counter() - t0
        key = f"shortlist{size}" if size else "all"
        out["runs"][key] = {"rows": rows, "seconds": round(dt, 1)}
        where = f"a retrieved shortlist of {size}" if size else f"all {len(names)} adapters"
        _report_routing(2, 0.25, rows, dt, log, title=f"{LEARNED} (k=2) over {where}")
    return out


# ---------------------------------------------------------------------------------------------
# 3. latency of the routing decision at 1,000 and 10,000 adapters


def library_signatures(per_task: int = 64):
    """(names, description embeddings, prototypes) of every library task (minilm; `per_task` inputs each)."""
    import numpy as np

    from loraplex.data import load_task
    from loraplex.embedders import get_embedder
    from loraplex.overlap import all_task_names

    emb = get_embedder("minilm")
    names = list(all_task_names())
    tasks = [load_task(n) for n in names]
    desc = emb.encode([t.description for t in tasks])
    protos = []
    for t in tasks:
        texts = [e.text for e in t.train[:per_task]]
        p = emb.encode(texts).mean(0)
        protos.append(p / np.linalg.norm(p))
    return names, desc, np.stack(protos).astype(np.float32)


def synthetic_registry(home: Path, n: int, names, desc, proto, *, noise: float = 0.5, seed: int = 0):
    """A registry of n adapters with perturbed real signatures and one shared weight blob."""
    import numpy as np
    import torch

    from loraplex.experts.spec import Adapter, LoraSpec
    from loraplex.models import current_sha
    from loraplex.registry.record import AdapterDraft, Edge
    from loraplex.registry.store import Registry

    sha = current_sha("minilm")  # the base as it is: adapters of another fingerprint are no candidates
    rng = np.random.default_rng(seed)
    reg = Registry(home, embedder="minilm")
    spec = LoraSpec(r=8, alpha=16)
    ad = Adapter(spec, {"encoder.layer.0.attention.self.query": (torch.zeros(8, 384), torch.zeros(384, 8))})
    d = desc.shape[1]

    def perturb(v):
        w = v + noise * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
        return (w / np.linalg.norm(w)).astype(np.float32)

    for i in range(n):
        j = i % len(names)
        task = names[j]
        dr = AdapterDraft(name=f"syn{i:05d}-{task}"[:100], base="minilm", base_sha=sha, family="encoder",
                          description=f"synthetic adapter {i} near task {task}", task=task, spec=spec,
                          metrics={}, edges=(Edge.to_task(task, "trained-on"),))
        reg.add_adapter(dr, ad, embedding=perturb(desc[j]), prototype=perturb(proto[j]), embedder="minilm")
    return reg


def bench_latency(counts: list[int], n_queries: int, work: Path, log=print) -> dict:
    import numpy as np

    from loraplex.data import load_task
    from loraplex.embedders import get_embedder
    from loraplex.registry.index import SignatureIndex
    from loraplex.router.retrieval import RetrievalConfig, RetrievalRouter, Signatures

    names, desc, proto = library_signatures()
    rng = np.random.default_rng(1)
    pool = [(n, e.text) for n in names for e in load_task(n).test[:20]]
    queries = [pool[i] for i in rng.choice(len(pool), size=min(n_queries, len(pool)), replace=False)]
    emb = get_embedder("minilm")
    emb.encode(["warm up"])
    ret = RetrievalRouter(RetrievalConfig())
    t_embed = []
    qv = []
    for _, text in queries:
        t0 = time.perf_counter()
        qv.append(emb.encode([text])[0])
        t_embed.append(time.perf_counter() - t0)
    out: dict = {"queries": len(queries), "embed_ms_p50": round(1e3 * _pct(t_embed, 50), 2),
                 "embed_ms_p95": round(1e3 * _pct(t_embed, 95), 2), "counts": {}}
    log(f"== routing decision latency, {len(queries)} single queries (library test texts) ==")
    log(f"query embedding (minilm, one text): p50 {out['embed_ms_p50']} ms, p95 {out['embed_ms_p95']} ms")
    for n in counts:
        home = work / f"syn-{n}"
        t0 = time.perf_counter()
        reg = synthetic_registry(home, n, names, desc, proto)
        build_s = time.perf_counter() - t0
        idx = SignatureIndex.sync(reg)
        _, all_names, all_desc, all_proto = reg.signatures()
        all_sig = Signatures(all_names, all_desc, all_proto)

        def decide(q):
            cands = ret.candidates(reg, q[None, :], base="minilm")
            sig = Signatures.of(reg, cands)
            sc = ret.scores(q[None, :], sig)
            g = ret.gates(sc)
            return sig.names[int(np.argmax(g[0]))]

        def exact(q):
            sc = ret.scores(q[None, :], all_sig)
            return all_sig.names[int(np.argmax(sc[0]))]

        for q in qv[:5]:
            decide(q), exact(q)
        t_dec, t_ex, agree = [], [], 0
        for q in qv:  # interleaved, so machine load hits both alike
            t0 = time.perf_counter()
            a = decide(q)
            t_dec.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = exact(q)
            t_ex.append(time.perf_counter() - t0)
            agree += int(a == b)
        row = {"adapters": n, "index": idx.kind, "registry_build_s": round(build_s, 1),
               "decision_ms_p50": round(1e3 * _pct(t_dec, 50), 2), "decision_ms_p95": round(1e3 * _pct(t_dec, 95), 2),
               "peer_exact_scan_ms_p50": round(1e3 * _pct(t_ex, 50), 2),
               "agreement_with_exact": round(agree / len(qv), 3),
               "with_embedding_ms_p50": round(1e3 * (_pct(t_dec, 50) + _pct(t_embed, 50)), 2)}
        out["counts"][str(n)] = row
        log(json.dumps(row))
        reg.close()
    ten = out["counts"].get("10000")
    if ten:
        log(f"goal: decision p50 < 5 ms at 10,000 adapters on CPU: {'met' if ten['decision_ms_p50'] < 5 else 'missed'} "
            f"({ten['decision_ms_p50']} ms; with the query's embedding {ten['with_embedding_ms_p50']} ms)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("routing", "learned", "latency", "all"), default="all")
    ap.add_argument("--limit", type=int, default=100, help="test queries per task (routing)")
    ap.add_argument("--top-k", default="1,3", help="retrieval top_k values (routing)")
    ap.add_argument("--label-weight", type=float, default=0.25,
                    help="retrieval label_weight (routing; the query's task's labels are known: 0 routes on text alone)")
    ap.add_argument("--shortlist", default="8", help="shortlist sizes for the learned router (learned)")
    ap.add_argument("--router-steps", type=int, default=400, help="steps of the learned router's fit (learned)")
    ap.add_argument("--counts", default="1000,10000", help="registry sizes (latency)")
    ap.add_argument("--queries", type=int, default=300, help="single queries timed per size (latency)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    a = ap.parse_args(argv)
    results = json.loads(a.out.read_text()) if a.out.is_file() else {}
    if a.part in ("latency", "all"):
        with tempfile.TemporaryDirectory(prefix="loraplex-scale-") as work:
            results["latency"] = bench_latency([int(c) for c in a.counts.split(",")], a.queries, Path(work))
    if a.part in ("routing", "all"):
        results["routing"] = bench_routing(a.limit, [int(k) for k in a.top_k.split(",")], a.label_weight)
    if a.part in ("learned", "all"):
        results["learned"] = bench_learned(a.limit, [int(k) for k in a.shortlist.split(",")], a.router_steps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
