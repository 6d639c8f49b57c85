"""`loraplex serve`: load once, serve until Ctrl-C (uvicorn's graceful shutdown: the port stops taking
connections, in-flight requests finish, the batching thread drains, the port is freed)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from loraplex.errors import Terminated, UserInputError
from loraplex.serve.app import checked_api_key, checked_backend_key, create_app, loopback_address, request_id
from loraplex.serve.backend import IDLE_CONNECTIONS, backend_port, checked_url
from loraplex.serve.engine import Engine
from loraplex.serve.metrics import Metrics
from loraplex.serve.scheduler import Scheduler


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's line and headers. uvicorn has none: a client
    that sends part of a request and stalls (slowloris) held its connection open for ever, and enough of
    them exhaust the server's descriptors. A request's headers must be complete within `seconds` of the
    connection opening (its first request) or of the first byte after the previous response (a kept-alive
    connection; uvicorn's keep-alive timer covers the silence before it); otherwise the client gets 408 and
    the connection is closed. A stalled body is serve/protocol.py's `BODY_IDLE_S`."""

    seconds = 30.0

    @staticmethod
    def _refusal(status: str, message: str, code: str) -> bytes:
        """A whole HTTP answer in OpenAI's error body, with an `x-request-id` (the connection is closed after
        it): what the app's refusals look like, for those made before the app runs (sweep 45: plain text)."""
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
                f"x-request-id: {request_id({}).decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def send_400_response(self, msg: str) -> None:  # h11 could not read the request (its framing, a header)
        self.transport.write(self._refusal("400 Bad Request", f"the request is not valid HTTP: {msg}", "invalid_http"))
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._deadline = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # its headers arrived: the request runs

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.write(self._refusal("408 Request Timeout", "the request headers did not arrive in "
                                               f"{self.seconds:g} s", "request_timeout"))
            self.transport.close()


GRACE_S = 60
"""uvicorn's graceful shutdown: how long requests still running may go on after a stop signal."""


class Stopping(uvicorn.Server):
    """uvicorn's server, telling the app when a stop signal (Ctrl-C, SIGTERM, SIGHUP) arrives: requests still
    running 5 s before the grace period ends finish with a 503 (a stream: an error event and [DONE]),
    where uvicorn would cancel them, cutting a stream mid-answer and logging the cancellation's traceback."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app_stop_in = getattr(app, "stop_in", None)
        self.now_asked = False

    def handle_exit(self, sig, frame) -> None:
        if self.app_stop_in is not None:
            if not self.should_exit:
                self.app_stop_in(max(0.0, GRACE_S - 5.0))
            elif not self.now_asked:  # a second stop signal ("stop now"): uvicorn's force exit cut the running
                self.now_asked = True  # requests, a plain-text 500 or a stream with no end, and logged a traceback
                self.app_stop_in(0.0, "it was stopped at once (a second stop signal) before this request finished")
                self._captured_signals.append(sig)  # for each (sweep 56): they end now, each with its 503 (a
                # stream: an error event and [DONE]), and the server stops; a third signal forces it
                return
        super().handle_exit(sig, frame)


def build(settings=None, *, base: str | None = None, router: str | None = None, max_batch: int = 32,
          max_wait_ms: float = 10.0, max_loras: int = 16, host_loras: int = 256, api_key: str | None = None,
          backend: str | None = None, backend_key: str | None = None, auto: dict | None = None,
          lora_updates: bool = True, loopback_only: bool = False, own_name: str | None = None):
    """The ASGI app with its engine loaded (the slow part) and its scheduler ready to start
    (`loopback_only`: /v1 requests must name a loopback Host, serve/app.py's Guard)."""
    Scheduler.check(max_batch, max_wait_ms)  # before the base loads
    metrics = Metrics()
    engine = Engine(settings, base=base, router=router, max_loras=max_loras, host_loras=host_loras, events=metrics,
                    auto=auto, writes_adapters=lora_updates)
    scheduler = Scheduler(engine, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics)
    return create_app(engine, scheduler, metrics, api_key=api_key, backend=backend, backend_key=backend_key,
                      lora_updates=lora_updates, loopback_only=loopback_only, own_name=own_name), engine


LISTEN_BACKLOG = 2048
"""Connections the kernel holds before they are accepted (uvicorn's own default backlog)."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), or UserInputError naming what is wrong; bound
    before the model loads, so a bad address or a taken port fails at once and nothing is announced. It is
    not listening yet (a connection during the load is refused, as a readiness probe should see it): `run`
    calls `listen` just before the banner."""
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


def not_itself(backend: str, sock: socket.socket) -> None:
    """UserInputError when `--backend` is this server's own address: every request would be forwarded to
    itself until the connection pool was full, and every later one hang (sweep 36). The backend's host is
    resolved only when its port is the one bound."""
    host, port = backend_port(checked_url(backend))
    bound, bound_port = sock.getsockname()[:2]
    if port != bound_port:
        return
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError, OSError):
        return  # not resolvable here: the requests will say the backend cannot be reached
    # what this socket accepts on: its own address, or, bound to every address (0.0.0.0, ::), any address of this
    # machine (another loopback address, 127.0.0.2, is another server's when this one is bound to 127.0.0.1)
    addrs = {_unmapped(a) for a in addrs}  # ::ffff:127.0.0.1 reaches the IPv4 socket of 127.0.0.1 (sweep 41)
    bound = _unmapped(bound)
    anywhere = bound in ("0.0.0.0", "::")
    if any(a == bound or (anywhere and (a in ("0.0.0.0", "::") or _local_address(a))) for a in addrs):
        raise UserInputError(f"--backend {backend!r} is this server's own address ({host}:{port}): it would forward "
                             "every request to itself")


def _unmapped(addr: str) -> str:
    """An IPv4 address mapped into IPv6 (::ffff:a.b.c.d) as the IPv4 address; any other address as given."""
    import ipaddress

    try:
        mapped = getattr(ipaddress.ip_address(addr.split("%", 1)[0]), "ipv4_mapped", None)
    except ValueError:
        return addr
    return str(mapped) if mapped is not None else addr


def _local_address(addr: str) -> bool:
    """Whether `addr` is an address of this machine (a socket can be bound to it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((addr, 0))
        return True
    except OSError:
        return False


def more_file_descriptors(want: int = 4096) -> int:
    """Raise this process's soft limit on open files toward its hard limit (a server holds a socket per
    client, the registry's files and the models'; at `ulimit -n 24` requests failed as internal errors and
    asyncio's accept loop filled the log). Returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(fds: int, backend: bool = False) -> int:
    """The connections (and requests) uvicorn serves at once with `fds` open files allowed: the rest of the
    files kept for the registry and the models (an eighth, at least 64). Past it a request is a 503 and its
    connection closed at once (sweep 45: 4,200 slow bodies used every descriptor, every client timed out, and
    asyncio's failing accept loop wrote 231 MB of log in 95 s). With a `backend`, each request holds a
    connection to it too, and its idle pool some more (sweep 46: requests failed as "the backend cannot be
    reached" when the server had run out of descriptors)."""
    usable = fds - max(64, fds // 8) - (IDLE_CONNECTIONS if backend else 0)
    return max(16, usable // 2 if backend else usable)


class _OncePerMinute(logging.Filter):
    """uvicorn's "Exceeded concurrency limit." once a minute with how many more there were, not once per
    refused request (a flood of connections would write the log full)."""

    def __init__(self):
        super().__init__()
        self.last, self.quiet = -60.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "Exceeded concurrency limit.":
            return True
        now = time.monotonic()
        if now - self.last < 60:
            self.quiet += 1
            return False
        record.msg = (f"Exceeded the concurrency limit (a 503 to each request past it; {self.quiet:,} more since "
                      "the last note)") if self.quiet else "Exceeded the concurrency limit (a 503 to each request past it)"
        record.args = ()
        self.last, self.quiet = now, 0
        return True


def server_config(app, fds: int, backend: bool = False, **kw) -> uvicorn.Config:
    """uvicorn's configuration for the app: request headers under a deadline (HeaderDeadline), at most
    `connection_limit(fds)` connections served at once, the stop's grace period."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
        logger.addFilter(_OncePerMinute())
    kw = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": GRACE_S, "access_log": False, **kw}
    return uvicorn.Config(app, http=HeaderDeadline, limit_concurrency=connection_limit(fds, backend), **kw)


def run(settings=None, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if more_file_descriptors() < 256:
        print(f"loraplex serve: warning: only {more_file_descriptors()} open files allowed (ulimit -n): requests will "
              "fail when clients, adapters and the registry need more", file=sys.stderr, flush=True)
    if options.get("backend") is not None:  # `--backend ""` served without one, silently (sweep 36)
        checked_url(options["backend"])
    checked_api_key(options.get("api_key"))
    checked_backend_key(options.get("backend_key"), options.get("backend"))
    sock = listening_socket(host, port)
    # loopback or not is what the socket was bound to, not how --host is spelled: `--host vm` (a name for
    # 127.0.0.1 in /etc/hosts), 127.1 or ::ffff:127.0.0.1 listened on loopback with the Host check off and a
    # warning that anyone could reach it (sweep 35)
    loopback = loopback_address(sock.getsockname()[0])
    try:
        if options.get("backend") is not None:
            not_itself(options["backend"], sock)
    except BaseException:
        sock.close()
        raise
    try:
        app, engine = build(settings, loopback_only=loopback, own_name=host, **options)
    except BaseException:
        sock.close()
        raise
    n = len(engine.models()) - 2
    port = sock.getsockname()[1]
    # listening from the banner on: a client that connects on reading it (the one way to learn a `--port 0`'s
    # port) was refused for the ~50 ms before uvicorn's loop began to listen (sweep 68); the kernel holds such a
    # connection until the server accepts it, and refuses any during the load (sweep 70)
    sock.listen(LISTEN_BACKLOG)
    where = f"[{host}]" if ":" in host else host
    print(f"loraplex serve: {engine.base_name} ({engine.family}) with {n} adapters and routers, "
          f"on http://{where}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    if options.get("lora_updates", True) and not options.get("api_key") and not loopback:
        print(f"loraplex serve: warning: anyone who reaches {where}:{port} can register adapters from this machine's "
              "files and remove them (/v1/load_lora_adapter); set --api-key, or --no-lora-updates",
              file=sys.stderr, flush=True)
    config = server_config(app, more_file_descriptors(), backend=options.get("backend") is not None)
    server = Stopping(config, app)
    hup = getattr(signal, "SIGHUP", None)  # a closed terminal or SSH session: a graceful stop, as SIGTERM is
    before = signal.getsignal(hup) if hup is not None else None  # (uvicorn takes SIGINT and SIGTERM only; the
    if hup is not None and before is not signal.SIG_IGN:          # CLI's own handler would raise wherever the
        signal.signal(hup, server.handle_exit)                    # event loop happened to be); nohup: ignored
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, Terminated):  # uvicorn re-raises the Ctrl-C or SIGTERM it caught, once it has
        pass                                  # shut down cleanly: a service manager's stop is a normal end
    finally:
        if hup is not None and before is not signal.SIG_IGN:
            signal.signal(hup, before)
    if not server.started:
        raise SystemExit(1)
    print("loraplex serve: stopped", file=sys.stderr, flush=True)
