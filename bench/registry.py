"""Registry benchmark: each figure is a ratio against a peer measured in the same run.

1. register 1,000 minilm-shaped adapters (rank 8, q/k/v/o of 6 layers) through `api.register` (PEFT dir
   read, fingerprint check, description embedding with minilm, blob write with fsync, SQLite commit)
   -- peer: writing the same adapter as a PEFT directory (safetensors + JSON), i.e. a plain file save.
2. `adapters search` latency (p50, p95) over 100,000 indexed descriptions (synthetic task descriptions
   embedded with minilm): the registry's index (IVF above 10k vectors) -- peer: exact flat search over
   the same vectors, with recall@5 of the IVF answer against the exact one. Also end-to-end
   `api.search` (query embedding + index + records) on the 10,000-record registry.
3. `adapters list` with 10,000 records: `Registry.list_adapters()` and the CLI (`adapters list --json`, a
   fresh process) -- peer: the raw SQLite SELECT of the same rows, and a bare `python -c pass`.
4. CLI start-up: `loraplex --help` -- peer: `python -c pass`. Goal < 0.5 s.

Usage: python bench/registry.py [--quick]   (--quick: 200 registrations, 20k vectors; for a smoke run)
Writes the figures to .bench/registry.json as well.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO  # noqa: E402  (sets the offline environment)

import numpy as np  # noqa: E402


def synthetic_descriptions(n: int, seed: int = 0) -> list[str]:
    """n distinct task descriptions from combinatorial templates (diverse, realistic wording)."""
    verbs = ["Classify", "Detect", "Label", "Identify", "Rate", "Tag", "Predict", "Categorise"]
    what = ["the sentiment of", "the topic of", "the intent behind", "the urgency of", "the language of",
            "toxic content in", "sarcasm in", "the emotion in", "spam among", "complaints in", "the stance of",
            "product defects mentioned in"]
    sources = ["tweets", "customer emails", "news articles", "support tickets", "product reviews", "forum posts",
               "chat messages", "legal clauses", "medical notes", "restaurant reviews", "app store reviews", "headlines"]
    topics = ["airlines", "banking", "football", "elections", "smartphones", "electric cars", "music festivals",
              "video games", "hotels", "insurance", "climate policy", "cryptocurrency", "healthcare", "movies",
              "online shopping", "public transport", "universities", "real estate", "food delivery", "telecoms"]
    extras = ["", " written in informal English", " from the last decade", " by verified customers",
              " in a short answer", " with three labels", " for a moderation team", " for market research",
              " during product launches", " from several countries"]
    combos = list(itertools.product(verbs, what, sources, topics, extras))
    rnd = random.Random(seed)
    rnd.shuffle(combos)
    if n > len(combos):
        raise ValueError(f"only {len(combos)} distinct descriptions available")
    return [f"{v} {w} {s} about {t}{e}." for v, w, s, t, e in combos[:n]]


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def bench_register(n: int, work: Path) -> dict:
    import torch

    from loraplex import api
    from loraplex.experts.peft_io import peft_config, write_peft_dir
    from loraplex.experts.spec import Adapter, LoraSpec
    from loraplex.models import fingerprint, resolve_base
    from loraplex.settings import Settings

    s = Settings.load(home=work / "reg-home", embedder="minilm", device="cpu", dtype="float32")
    ref = resolve_base("minilm")
    fp = fingerprint(ref, s)
    spec = LoraSpec(r=8, alpha=16)
    modules = spec.resolve_targets(fp.linear_names(), fp.model_type)
    descs = synthetic_descriptions(n, seed=1)
    g = torch.Generator().manual_seed(0)
    dirs, save_times = [], []
    for i in range(n):
        ad = Adapter(spec, {m: (torch.randn(8, fp.modules[m][0], generator=g) * 0.02,
                                torch.randn(fp.modules[m][1], 8, generator=g) * 0.02) for m in modules})
        d = work / "peft" / f"a{i}"
        cfg = peft_config(ad, base_model_name_or_path=ref.peft_name, all_linear=fp.linear_names(), fan_in_fan_out=False)
        t0 = time.perf_counter()
        write_peft_dir(ad, d, cfg)  # the peer: a plain save of the adapter
        save_times.append(time.perf_counter() - t0)
        dirs.append(d)
    api.register(dirs[0], name="warmup", description="warm up the embedder", settings=s)
    reg_times = []
    t_all = time.perf_counter()
    for i, d in enumerate(dirs):
        t0 = time.perf_counter()
        api.register(d, name=f"a{i}", description=descs[i], settings=s)
        reg_times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    shutil.rmtree(work / "peft", ignore_errors=True)
    return {
        "adapters": n,
        "params_per_adapter": int(sum(fp.modules[m][0] * 8 + fp.modules[m][1] * 8 for m in modules)),
        "register_total_s": round(total, 2),
        "register_ms_p50": round(_pct(reg_times, 50), 2),
        "peer_peft_save_ms_p50": round(_pct(save_times, 50), 2),
        "ratio_register_vs_peft_save": round(statistics.median(reg_times) / statistics.median(save_times), 2),
    }


def bench_search(n: int, work: Path) -> dict:
    from loraplex.embedders import get_embedder
    from loraplex.registry.index import SignatureIndex

    emb = get_embedder("minilm")
    descs = synthetic_descriptions(n, seed=2)
    t0 = time.perf_counter()
    vecs = emb.encode(descs)
    embed_s = time.perf_counter() - t0
    ids = np.arange(1, n + 1, dtype=np.int64)
    t0 = time.perf_counter()
    idx = SignatureIndex.build(vecs.shape[1], ids, vecs, generation=1)
    build_s = time.perf_counter() - t0
    import faiss

    flat_index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    flat_index.add_with_ids(vecs, ids)
    queries = emb.encode(synthetic_descriptions(n + 300, seed=3)[-300:])  # unseen phrasings
    lat, lat_flat, recall = [], [], []
    for q in queries:
        t0 = time.perf_counter()
        _, got = idx.search(q, 5)
        lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, exact = flat_index.search(q[None, :], 5)
        lat_flat.append(time.perf_counter() - t0)
        recall.append(len(set(got[0]) & set(exact[0])) / 5)
    return {
        "vectors": n,
        "index": idx.kind,
        "embed_descriptions_s": round(embed_s, 1),
        "index_build_s": round(build_s, 2),
        "search_ms_p50": round(_pct(lat, 50), 3),
        "search_ms_p95": round(_pct(lat, 95), 3),
        "peer_exact_flat_ms_p50": round(_pct(lat_flat, 50), 3),
        "ratio_flat_vs_index": round(statistics.median(lat_flat) / statistics.median(lat), 1),
        "recall_at_5_vs_exact": round(float(np.mean(recall)), 3),
    }


def bench_list_and_search_e2e(n: int, work: Path) -> dict:
    """A registry of n records (one shared blob: this measures records, not tensor I/O)."""
    import torch

    from loraplex import api
    from loraplex.embedders import get_embedder
    from loraplex.experts.spec import Adapter, LoraSpec
    from loraplex.models import current_sha
    from loraplex.registry.record import AdapterDraft, Edge
    from loraplex.registry.store import Registry
    from loraplex.settings import Settings

    sha = current_sha("minilm")  # the base as it is: adapters of another fingerprint are no candidates
    home = work / "list-home"
    reg = Registry(home, embedder="minilm")
    spec = LoraSpec(r=8, alpha=16)
    ad = Adapter(spec, {"encoder.layer.0.attention.self.query": (torch.zeros(8, 384), torch.zeros(384, 8))})
    descs = synthetic_descriptions(n, seed=4)
    vecs = get_embedder("minilm").encode(descs)
    t0 = time.perf_counter()
    for i in range(n):
        d = AdapterDraft(name=f"r{i}", base="minilm", base_sha=sha, family="encoder", description=descs[i],
                         task="airline", spec=spec, metrics={"accuracy": 0.8}, edges=(Edge.to_task("airline", "trained-on"),))
        reg.add_adapter(d, ad, embedding=vecs[i], embedder="minilm")
    insert_s = time.perf_counter() - t0
    reg.close()
    reg = Registry(home)
    t_list = statistics.median([_timed(reg.list_adapters) for _ in range(3)])
    conn = sqlite3.connect(home / "registry.db")
    t_raw = statistics.median([_timed(lambda: conn.execute("SELECT * FROM adapters").fetchall()) for _ in range(3)])
    env = dict(os.environ, LORAPLEX_HOME=str(home))
    exe = [sys.executable, "-m", "loraplex"]
    t_cli = statistics.median([_timed(lambda: subprocess.run(exe + ["adapters", "list", "--json"], env=env, check=True,
                                                             stdout=subprocess.DEVNULL)) for _ in range(3)])
    t_py = statistics.median([_timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in range(5)])
    s = Settings.load(home=home, embedder="minilm")
    api.search("warm up", settings=s)  # builds and saves the index, loads the embedder
    e2e = [_timed(lambda: api.search("tweets complaining about lost luggage", k=5, settings=s)) for _ in range(30)]
    return {
        "records": n,
        "insert_s": round(insert_s, 1),
        "list_api_s": round(t_list, 3),
        "peer_raw_select_s": round(t_raw, 3),
        "ratio_list_vs_raw_select": round(t_list / t_raw, 1),
        "list_cli_process_s": round(t_cli, 2),
        "peer_python_start_s": round(t_py, 3),
        "search_e2e_ms_p50": round(_pct(e2e, 50), 2),
    }


def bench_help() -> dict:
    exe = [sys.executable, "-m", "loraplex", "--help"]
    t_help = statistics.median([_timed(lambda: subprocess.run(exe, check=True, stdout=subprocess.DEVNULL)) for _ in range(7)])
    t_py = statistics.median([_timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in range(7)])
    return {"help_s": round(t_help, 3), "peer_python_start_s": round(t_py, 3), "ratio_help_vs_python": round(t_help / t_py, 1)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    n_reg, n_vec, n_list = (200, 20_000, 2_000) if args.quick else (1_000, 100_000, 10_000)
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    results = {}
    try:
        results["help"] = bench_help()
        print("help:", results["help"], flush=True)
        results["register"] = bench_register(n_reg, work)
        print("register:", results["register"], flush=True)
        results["list"] = bench_list_and_search_e2e(n_list, work)
        print("list:", results["list"], flush=True)
        results["search"] = bench_search(n_vec, work)
        print("search:", results["search"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = REPO / ".bench" / "registry.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"goals: search p50 < 2 ms -> {results['search']['search_ms_p50']} ms; --help < 0.5 s -> {results['help']['help_s']} s")


if __name__ == "__main__":
    main()
