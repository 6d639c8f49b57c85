"""Helpers for the server tests: a free port on loopback, an in-process server that always stops, and a
tiny Llama registry (three real-peft adapters with tasks, one token-gate router)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import make_peft_adapter
from tests.router.conftest import write_task

ADAPTERS = ("flights", "sports", "phones")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(settings, *, timeout: float = 30.0, port: int | None = None, **options):
    """A loraplex server on 127.0.0.1 in this process (uvicorn in a thread; on `port`, or a free one); yields
    its base URL."""
    import uvicorn

    from loraplex.serve.server import build

    # The hash embedder's scores lie on another scale than minilm's, for which auto's thresholds are
    # fitted: these tests exercise serving, so auto routes every request unless a test says otherwise
    # (test_serve_auto.py tests the decision).
    options.setdefault("auto", {"route_threshold": -1.0, "generate_threshold": -1.0})
    app, _ = build(settings, **options)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        while not server.started:
            if not th.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout)


def llama_registry(settings, llama: Path, root: Path) -> None:
    """flights-lora, sports-lora, phones-lora (ranks 2, 4, 6 on q_proj/v_proj) and router `ctg`."""
    from loraplex import api

    for i, name in enumerate(ADAPTERS):
        task = write_task(root, name)
        d = make_peft_adapter(llama, root / name, r=2 + 2 * i, targets=("q_proj", "v_proj"), causal=True, seed=20 + i)
        api.register(d, name=f"{name}-lora", description=f"{name} messages", task=str(task), base=str(llama),
                     settings=settings)
    api.fit_router("ctg", router="token-gate", adapters=["flights-lora", "sports-lora"], settings=settings, steps=3,
                   batch_size=4, eval_limit=2, val_limit=4, progress=False)


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples named `name` (any labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def llama_home(tmp_path_factory, tiny_llama):
    """(settings, root) of a tiny Llama registry shared by the server tests (see llama_registry)."""
    from loraplex.settings import Settings

    root = tmp_path_factory.mktemp("serve")
    s = Settings.load(home=root / "home", embedder="hash", device="cpu", dtype="float32", cache_dir=root / "cache")
    llama_registry(s, tiny_llama, root)
    return s, root
