"""Writes are atomic: a writer killed with SIGKILL at any moment leaves a consistent registry, and
concurrent writers from several processes all land."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from loraplex import api

WRITER = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from loraplex.experts.spec import Adapter, LoraSpec
    from loraplex.registry.record import AdapterDraft, Edge
    from loraplex.registry.store import Registry
    from loraplex.registry.index import SignatureIndex
    from loraplex.registry.lineage import graph_json

    home, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reg = Registry(home, embedder="hash")
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    spec = LoraSpec(r=4, alpha=8)
    def adapter():
        return Adapter(spec, {f"layer.{i}.q": (torch.from_numpy(rng.normal(size=(4, 64)).astype("float32")),
                                               torch.from_numpy(rng.normal(size=(64, 4)).astype("float32"))) for i in range(4)})
    print("ready", flush=True)
    prev = None
    for i in range(n):
        name = f"{prefix}{i}"
        v = rng.normal(size=16).astype("float32"); v /= np.linalg.norm(v)
        edges = (Edge.to_adapter(prev, "trained-from"),) if prev else ()
        d = AdapterDraft(name=name, base="toy", base_sha="0" * 64, family="encoder", description=name, spec=spec, edges=edges)
        reg.add_adapter(d, adapter(), embedding=v, snapshots=[(1, adapter()), (2, adapter())], embedder="hash",
                        fingerprint_json='{"label": "toy", "architecture": "Toy", "model_type": "toy", "family": "encoder", '
                                         '"hidden_size": 64, "modules": {"layer.0.q": [64, 64], "layer.1.q": [64, 64], '
                                         '"layer.2.q": [64, 64], "layer.3.q": [64, 64]}}')
        prev = name
        if i % 3 == 0:
            SignatureIndex.sync(reg)
        if i % 5 == 0:
            graph_json(reg)
    print("done", flush=True)
    """
)


def _spawn(home, prefix, n):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", WRITER, str(home), prefix, str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_ready(p):
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()


def test_sigkill_at_random_moments_leaves_a_consistent_registry(tmp_path, settings):
    home = settings.home
    rnd = random.Random(0)
    killed_mid_way = 0
    for round_ in range(4):
        p = _spawn(home, f"r{round_}-", 400)
        _wait_ready(p)
        time.sleep(rnd.uniform(0.3, 1.5))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed_mid_way += 1
        p.wait()
        rep = api.check(settings=settings)
        assert rep.ok, rep.problems
        reg = api.open_registry(settings)
        for rec in reg.list_adapters():  # every committed record is whole
            reg.load_adapter(rec)
            assert len(rec.snapshots) == 2
    assert killed_mid_way >= 3, "the writer finished too quickly to be killed mid-way"
    assert api.open_registry(settings).count() > 0
    rep = api.check(repair=True, settings=settings)
    assert rep.ok and not any("no record points at" in n for n in rep.notes)


def test_concurrent_writers_all_land(tmp_path, settings):
    procs = [_spawn(settings.home, f"w{k}-", 8) for k in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    reg = api.open_registry(settings)
    assert reg.count() == 32
    assert {r.name for r in reg.list_adapters()} == {f"w{k}-{i}" for k in range(4) for i in range(8)}
    assert api.check(settings=settings).ok


@pytest.mark.slow
def test_concurrent_cli_register_processes_all_land(tmp_path, tiny_bert):
    from tests.conftest import make_peft_adapter

    make_peft_adapter(tiny_bert, tmp_path / "p")
    home = tmp_path / "cli-home"
    env = dict(os.environ, LORAPLEX_HOME=str(home), LORAPLEX_EMBEDDER="hash")
    procs = [subprocess.Popen([sys.executable, "-m", "loraplex", "adapters", "register", str(tmp_path / "p"),
                               "--name", f"c{k}", "--description", f"concurrent {k}", "--base", str(tiny_bert)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    from loraplex.registry.store import Registry

    assert sorted(r.name for r in Registry(home).list_adapters()) == ["c0", "c1", "c2"]
