"""Shared benchmark helpers: a benchmark registry with one trained minilm adapter per embedded task.

`ensure_task_adapters()` trains (once) and registers `<task>-lora` for each embedded task in the bench
home (default `.bench/home` in the repository; `LORAPLEX_BENCH_HOME` overrides it). Later benchmark
runs reuse them, so routing, continual and generator benchmarks measure against the same experts.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TASKS = ("airline", "deflategate", "apple", "coachella", "driverless", "bbc")
STEPS = 200


def bench_home() -> Path:
    return Path(os.environ.get("LORAPLEX_BENCH_HOME") or REPO / ".bench" / "home")


def bench_settings(**overrides):
    from loraplex.settings import Settings

    return Settings.load(home=bench_home(), **overrides)


def adapter_name(task: str) -> str:
    return f"{task}-lora"


def ensure_task_adapters(tasks=TASKS, *, steps: int = STEPS, settings=None, log=print) -> dict[str, str]:
    """task -> registered adapter name, training the ones that are missing (minilm, rank 8)."""
    from loraplex import api

    s = settings or bench_settings()
    reg = api.open_registry(s)
    out = {}
    for t in tasks:
        name = adapter_name(t)
        if not reg.has_adapter(name):
            t0 = time.perf_counter()
            res = api.train(t, name=name, base="minilm", steps=steps, progress=False, settings=s)
            log(f"trained {name}: accuracy {res.metrics['accuracy']:.3f} (base {res.metrics['base_accuracy']:.3f}) "
                f"in {time.perf_counter() - t0:.0f}s")
        out[t] = name
    return out


def timeit(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_seconds(task_name: str, steps: int, settings) -> float:
    """Seconds to train one minilm rank-8 adapter on a task (`fit_adapter`, `steps` steps), in this process."""
    import tempfile

    from loraplex.continual.fit import TrainConfig, fit_adapter
    from loraplex.data import load_task
    from loraplex.experts.spec import LoraSpec
    from loraplex.models import load_base

    task = load_task(task_name)
    lb = load_base("minilm", settings)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        fit_adapter(lb, task, LoraSpec(r=8, alpha=16.0), TrainConfig(steps=steps, progress=False), Path(d))
        return time.perf_counter() - t0


if __name__ == "__main__":
    ensure_task_adapters()
