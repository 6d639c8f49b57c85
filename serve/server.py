"""`loraplex serve`: load once, serve until Ctrl-C (uvicorn's graceful shutdown: the port stops taking
connections, in-flight requests finish, the batching thread drains, the port is freed)."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from loraplex.errors import UserInputError
from loraplex.serve.app import checked_api_key, create_app, loopback_name
from loraplex.serve.backend import checked_url
from loraplex.serve.engine import Engine
from loraplex.serve.metrics import Metrics
from loraplex.serve.scheduler import Scheduler


def build(settings=None, *, base: str | None = None, router: str | None = None, max_batch: int = 32,
          max_wait_ms: float = 10.0, max_loras: int = 16, host_loras: int = 256, api_key: str | None = None,
          backend: str | None = None, auto: dict | None = None, lora_updates: bool = True,
          loopback_only: bool = False):
    """The ASGI app with its engine loaded (the slow part) and its scheduler ready to start
    (`loopback_only`: /v1 requests must name a loopback Host, serve/app.py's Guard)."""
    metrics = Metrics()
    engine = Engine(settings, base=base, router=router, max_loras=max_loras, host_loras=host_loras, events=metrics,
                    auto=auto)
    scheduler = Scheduler(engine, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics)
    return create_app(engine, scheduler, metrics, api_key=api_key, backend=backend,
                      lora_updates=lora_updates, loopback_only=loopback_only), engine


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), or UserInputError naming what is wrong; bound
    before the model loads, so a bad address or a taken port fails at once and nothing is announced."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserInputError(f"--host {host!r}: not an address this machine can listen on "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(settings=None, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if options.get("backend"):
        checked_url(options["backend"])
    checked_api_key(options.get("api_key"))
    sock = listening_socket(host, port)
    try:
        app, engine = build(settings, loopback_only=loopback_name(host), **options)
    except BaseException:
        sock.close()
        raise
    n = len(engine.models()) - 2
    port = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    print(f"loraplex serve: {engine.base_name} ({engine.family}) with {n} adapters and routers, "
          f"on http://{where}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    if options.get("lora_updates", True) and not options.get("api_key") and not loopback_name(host):
        print(f"loraplex serve: warning: anyone who reaches {where}:{port} can register adapters from this machine's "
              "files and remove them (/v1/load_lora_adapter); set --api-key, or --no-lora-updates",
              file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=60, access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught, once it has shut down cleanly
        pass
    if not server.started:
        raise SystemExit(1)
    print("loraplex serve: stopped", file=sys.stderr, flush=True)
