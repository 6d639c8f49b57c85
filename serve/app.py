"""The HTTP surface: FastAPI routes in OpenAI's shapes, plus loraplex's extensions.

Every answer that is not a success is OpenAI's error body with a 4xx (bad input never gives a 500 and
never changes the registry); every success carries a `routing` object next to the standard fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import AdapterNotFound, file_size_note, out_of_memory
from loraplex.serve import decode
from loraplex.serve.backend import HOP_HEADER, MAX_HOPS, Backend, hops_of, new_instance
from loraplex.serve.classify import check_answerable
from loraplex.serve.engine import Engine, LoraplexError, NotFound, UserInputError
from loraplex.serve.metrics import Metrics
from loraplex.serve.protocol import (
    APIError, ChatRequest, ClassifyRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest, parse, read_body)
from loraplex.serve.scheduler import Job, Scheduler
from loraplex.serve.targets import ModelUnknown, Target

log = logging.getLogger("loraplex.serve")
DEFAULT_MAX_TOKENS = 256
DISCONNECT_CHECK_S = 0.5
"""How often a request waiting for its answer looks whether its client is still there."""
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def api_error(exc: BaseException, home: str | None = None) -> APIError:
    """A library error as the HTTP error it is. `home`: the registry's folder, which the CLI's messages name
    ("no adapter named 'x' in the registry at /srv/...") and a client has no business seeing: it is left out."""
    if isinstance(exc, APIError):
        return exc
    msg = str(exc)
    if home:
        msg = msg.replace(f" at {home}", "").replace(home, "<registry>")
    if isinstance(exc, (ModelUnknown, NotFound)):
        return APIError(404, msg, param="model", code="model_not_found")
    if isinstance(exc, UserInputError):
        return APIError(400, msg, param=exc.field)
    if isinstance(exc, LoraplexError):
        return APIError(503, msg)
    if out_of_memory(exc):  # the server's state, not a bug: the next request may fit
        why = (msg.splitlines() or [type(exc).__name__])[0][:200]
        return APIError(503, f"the server ran out of memory for this request ({why})")
    if type(exc).__module__ == "sqlite3":  # the registry's database failed under the request (damaged since
        note = file_size_note(exc)  # start; under `ulimit -f`, the database is fine)
        return APIError(503, f"the registry database failed: {msg}{note or ' (run `loraplex registry check`)'}")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):  # the server's state, not a bug
        return APIError(503, "the server has run out of file descriptors (raise `ulimit -n` for loraplex serve)")
    return APIError(500, f"internal error: {type(exc).__name__}: {msg}")


def checked_api_key(key: str | None, option: str = "--api-key", env: str = "LORAPLEX_API_KEY") -> str | None:
    """`--api-key` as the Guard compares it (or `--backend-api-key` as the backend gets it): None (no key), or
    visible ASCII (what an HTTP header carries unchanged); an empty key would mean no authentication at all,
    so it is refused too."""
    if key is not None and (not key or not all("!" <= ch <= "~" for ch in key)):
        raise UserInputError(f"{option} (or {env}) must be non-empty visible ASCII characters "
                             "(letters, digits, punctuation; no spaces)")
    return key


def checked_backend_key(key: str | None, backend: str | None) -> str | None:
    """`--backend-api-key`: a key as `checked_api_key` reads one, and only with --backend (it would be dropped)."""
    if key is not None and backend is None:
        raise UserInputError("--backend-api-key (or LORAPLEX_BACKEND_API_KEY) is the key of a --backend server: "
                             "give --backend too")
    return checked_api_key(key, "--backend-api-key", "LORAPLEX_BACKEND_API_KEY")


def request_id(headers: dict[bytes, bytes]) -> bytes:
    """The request's id for its `x-request-id` answer header (OpenAI's; the openai client shows it as
    `_request_id`): the caller's own when it sent a plain one (as vLLM echoes it), else a new one."""
    own = headers.get(b"x-request-id", b"")
    if 0 < len(own) <= 128 and all(0x21 <= ch <= 0x7E for ch in own):
        return own
    return f"req-{uuid.uuid4().hex}".encode()


def _endpoint(path: str) -> str:
    """The metrics label of a path: one of ENDPOINTS, `/v1/models/{id}`, or `other`."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def loopback_address(addr: str) -> bool:
    """Whether an IP address (as a socket names it, or bracketed) is a loopback one: 127.0.0.0/8, ::1, and
    127.x mapped into IPv6 (::ffff:127.0.0.1, which Python 3.11's `is_loopback` does not count)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(addr.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def loopback_name(name: str) -> bool:
    """Whether `name` names this machine only (localhost, 127.0.0.0/8, ::1, bracketed or not)."""
    name = name.strip().lower()
    return name in ("localhost", "localhost.") or loopback_address(name)


def host_name(host: bytes) -> str:
    """The name of a Host header (`name`, `name:port`, `[::1]:port`), lowercased; "" when malformed."""
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):
        if "]" not in name:
            return ""
        return name[:name.find("]") + 1]
    return name.rsplit(":", 1)[0] if name.count(":") == 1 else name


def loopback_host(host: bytes) -> bool:
    """Whether a Host header (`name`, `name:port`, `[::1]:port`) names this machine's loopback."""
    name = host_name(host)
    return bool(name) and loopback_name(name)


def origin_form(scope: dict) -> dict:
    """A request whose target is in absolute form (`POST http://host:port/v1/completions HTTP/1.1`, what a
    client configured with a proxy sends; RFC 9112 3.2.2 says a server MUST accept it) as the same request in
    origin form: the URL's path, and its authority as the one Host (the RFC: the target's host wins over a Host
    header). It was a 404 for the path "http://..." (sweep 56 F4). Other scopes are returned as they are."""
    path = scope.get("path", "")
    if not path[:8].lower().startswith(("http://", "https://")):
        return scope
    from urllib.parse import urlsplit

    u = urlsplit(path)
    raw = (scope.get("raw_path") or b"").decode("latin-1")
    raw_path = (urlsplit(raw).path if raw else u.path).encode("latin-1", "replace") or b"/"
    host = u.netloc.rpartition("@")[2]  # user:password@ is not echoed as a Host (sweep 58): refused by the Guard
    headers = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host.encode("latin-1", "replace"))]
    return {**scope, "path": u.path or "/", "raw_path": raw_path, "headers": headers,
            "loraplex.target_userinfo": "@" in u.netloc}


class Guard:
    """ASGI middleware: the API key on /v1, each request's status and time in the metrics, and its
    `x-request-id` header on every answer. With `loopback_only` (a server listening on loopback, the
    default), a /v1 request whose Host is another name is refused: a web page whose name an attacker
    points at 127.0.0.1 (DNS rebinding) could otherwise call the server as its own origin. `own_name`: the
    name the server was started on (`--host vm`, bound to loopback through /etc/hosts), allowed too.
    `instance`: this server's id; a /v1 request whose HOP_HEADER already names it (its --backend leads back
    to it) or names MAX_HOPS servers is a 508, not forwarded again."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, loopback_only: bool = False,
                 own_name: str | None = None, instance: str | None = None):
        self.app, self.metrics, self.key, self.loopback_only = app, metrics, api_key, loopback_only
        self.instance = instance  # this server's id: a request that already passed through it is a loop
        self.own_name = (own_name or "").strip().lower().strip("[]")

    def _refusal(self, path: str, headers: list[tuple[bytes, bytes]]) -> APIError | None:
        names = {k.lower() for k, _ in headers}
        if b"transfer-encoding" in names and b"content-length" in names:  # framed two ways: what a proxy in front
            # read as one request may hold a second (RFC 9112 6.1; sweep 45: the bytes past the chunked body ran as
            # another request): refused, and the connection closed after the answer
            return APIError(400, "the request has both Content-Length and Transfer-Encoding: send one",
                            code="invalid_framing")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):  # Starlette's `$` matches before a last "\n": a
            # path ending in %0A was served as the path without it (sweep 49), and no served path holds one
            return APIError(404, f"loraplex does not serve the path {path[:200]!r}: it holds a control character")
        if not path.startswith("/v1"):
            return None
        hops = hops_of(",".join(v.decode("latin-1") for k, v in headers if k == HOP_HEADER.encode()))
        if (self.instance and self.instance in hops) or len(hops) >= MAX_HOPS:
            return APIError(508, "--backend leads back to this server: a request it sent on came back to it "
                                 f"(through {len(hops)} loraplex server(s)); point --backend at the server that "
                                 "generates", code="loop_detected")
        if self.loopback_only:
            hosts = [v for k, v in headers if k == b"host"]
            if len(hosts) != 1 or not (loopback_host(hosts[0])
                                       or (self.own_name and host_name(hosts[0]).strip("[]") == self.own_name)):
                shown = hosts[0].decode("latin-1")[:100] if hosts else ""
                return APIError(403, f"Host {shown!r} is not a loopback name: this server listens on loopback only "
                                     "(start it with --host to serve other names)", code="host_not_allowed")
        if self.key:
            given = [v for k, v in headers if k == b"authorization"]
            if len(given) > 1:  # which one would count? (a proxy adding its own, a client's second)
                return APIError(401, "send one Authorization header, not several", code="invalid_api_key")
            scheme, _, token = (given[0] if given else b"").strip().partition(b" ")
            # the scheme is case-insensitive (RFC 9110 11.1), the key is not
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key.encode()):
                return APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = origin_form(scope)
        path = scope["path"]
        endpoint = _endpoint(path)
        t0, status, counted = time.perf_counter(), [500], [False]
        rid = request_id(dict(scope["headers"]))
        err = self._refusal(path, scope["headers"])
        if err is None and scope.get("loraplex.target_userinfo"):  # RFC 9110 4.2.4: user information in an http(s)
            # target is an error (after the framing check, whose refusal closes the connection: sweep 60)
            err = APIError(400, "the request target carries user information (user:password@): send the path only, "
                                "with the key in an Authorization header")
        if err is not None:
            extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
            if err.code == "invalid_framing":
                extra["Connection"] = "close"
            resp = JSONResponse(err.body(), status_code=err.status, headers={"x-request-id": rid.decode(), **extra})
            self.metrics.answered(endpoint, err.status, time.perf_counter() - t0)
            return await resp(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                counted[0] = True
                self.metrics.answered(endpoint, status[0], time.perf_counter() - t0)

        try:
            await self.app(scope, receive, watch)
        except BaseException as exc:
            if counted[0] and isinstance(exc, Exception):  # a bug answered in full as a 500 (logged with its
                return  # traceback by the app's handler), which Starlette raises again: uvicorn would log it twice
                        # and close a kept-alive connection
            if not counted[0]:  # the app failed mid-answer (a stream broken by the server)
                counted[0] = True
                self.metrics.answered(endpoint, 500, time.perf_counter() - t0)
            raise
        finally:
            if not counted[0]:  # the answer ended before its last part: the client went away (a stream it closed)
                self.metrics.answered(endpoint, 499, time.perf_counter() - t0)


def create_app(engine: Engine, scheduler: Scheduler, metrics: Metrics, *, api_key: str | None = None,
               backend: str | None = None, backend_key: str | None = None, lora_updates: bool = True,
               loopback_only: bool = False, own_name: str | None = None) -> Any:
    """The ASGI app: FastAPI's routes (one group per function below) inside the Guard (`loopback_only`:
    refuse /v1 requests whose Host is not a loopback name or `own_name`, see Guard)."""
    checked_api_key(api_key)
    checked_backend_key(backend_key, backend)
    instance = new_instance()
    cx = _Context(engine, scheduler, metrics,
                  Backend(backend, key=backend_key, instance=instance) if backend is not None else None,
                  lora_updates)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)
            if cx.fwd is not None:
                await cx.fwd.close()

    # no OpenAPI schema (it would be served without the key), and `/v1/classify/` is a 404, not a redirect
    app = FastAPI(title="loraplex serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    _error_handlers(app, cx)
    _plain_routes(app, cx)
    _generation_routes(app, cx)
    _extension_routes(app, cx)
    guard = Guard(app, metrics, api_key, loopback_only, own_name, instance=instance)
    guard.stop_in = cx.stop_in  # serve/server.py calls it when a stop signal arrives
    return guard


@dataclass
class _Context:
    """What the routes share: the engine, the batching thread, the metrics and the backend (--backend)."""

    engine: Engine
    scheduler: Scheduler
    metrics: Metrics
    fwd: Backend | None
    lora_updates: bool = True  # /v1/load_lora_adapter and /v1/unload_lora_adapter may change the registry
    stop_at: float | None = None  # time.monotonic() by which requests still running end (the server is stopping)
    stop_why: str = "this request did not finish in its grace period"

    def stop_in(self, seconds: float, why: str | None = None) -> None:
        """The server is stopping: requests still running past `seconds` from now end with a 503 (a stream:
        an error event, then [DONE]) instead of being cut when the server's own grace period runs out; `why`:
        what their message says happened (a second Ctrl-C's: stopped at once)."""
        self.stop_at = time.monotonic() + seconds
        if why:
            self.stop_why = why

    def stopped(self) -> APIError | None:
        """The error a running request ends with once the server's stop has come, or None."""
        if self.stop_at is None or time.monotonic() < self.stop_at:
            return None
        return APIError(503, f"the server is shutting down: {self.stop_why}")

    def stopping(self) -> APIError | None:
        """The error a request still reading its body ends with once the server's stop is signalled (it has
        not started: nothing of it is lost), or None."""
        if self.stop_at is None:
            return None
        return APIError(503, "the server is shutting down: this request was not read in full before the stop")

    def updating(self, endpoint: str) -> None:
        """Refuse a registry change over HTTP when the server was started with --no-lora-updates (403)."""
        if not self.lora_updates:
            raise APIError(403, f"{endpoint} is off on this server (it was started with --no-lora-updates)",
                           code="lora_updates_disabled")

    def error(self, exc: BaseException, target: Target | None = None) -> APIError:
        """`api_error` with this server's registry folder left out of the message. `target`: the model a job's
        error came from; for `auto`, an adapter it decided on and that was removed before the job ran is a 409
        (send it again: auto decides anew), not a 404 saying a model the client never named does not exist."""
        if target is not None and target.kind == "auto" and isinstance(exc, AdapterNotFound):
            return APIError(409, f"the adapter {target.name!r} chose for this request was removed before it ran; "
                                 "send it again", param="model", code="model_changed")
        return api_error(exc, str(self.engine.reg().home))

    def resolve(self, model: str) -> Target:
        try:
            return self.engine.resolve(model)
        except LoraplexError as exc:
            raise self.error(exc) from None

    @staticmethod
    async def gone(request: Request) -> None:
        """A 499 when the client has already closed the connection (uvicorn has seen it go: no wait)."""
        if await request.is_disconnected():
            raise APIError(499, "the client closed the connection")

    async def decided(self, target: Target, texts: list[str], labels: Sequence[str] | None = None,
                      classify: bool = False, request: Request | None = None):
        """auto's routes, decided in this request's worker thread (never on the batching thread); None for
        the other kinds of model. `labels`: the label set the texts are to be answered with (/v1/classify:
        `classify`, which refuses inputs decided for the bare base without labels before anything is written).
        `request`: a client already gone writes no adapter (sweep 45)."""
        if target.kind != "auto":
            return None
        if request is not None:
            await self.gone(request)
        try:
            return await self.unless_stopped(self.engine.auto, texts, forwarded=self.fwd is not None, labels=labels,
                                             for_classify=classify)
        except LoraplexError as exc:
            raise self.error(exc) from None

    async def unless_stopped(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` in a worker thread, or the stop's 503 as soon as the server's stop time comes (checked every
        DISCONNECT_CHECK_S): a request whose work was still in a thread (auto's embedding and decision) waited
        for it after a second Ctrl-C, where the requests in the batching thread ended at once (sweep 58). The
        thread itself runs on to its end (the process waits for it before it exits): a write it began finishes."""
        work = asyncio.ensure_future(run_in_threadpool(fn, *args, **kwargs))
        while True:
            done, _ = await asyncio.wait({work}, timeout=DISCONNECT_CHECK_S)
            if done:
                return work.result()
            if (stop := self.stopped()) is not None:
                work.add_done_callback(lambda w: w.cancelled() or w.exception())  # its outcome: nobody's now
                raise stop

    async def wait(self, job: Job, request: Request) -> tuple[Any, list[dict]]:
        """The job's result and its token trace; a client that went away cancels it (checked every
        DISCONNECT_CHECK_S, whether or not tokens are flowing: a row generating to max_tokens for nobody
        holds a batch slot)."""
        tokens: list[dict] = []
        checked = time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S or ev is None:
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancelled = True
                    raise APIError(499, "the client closed the connection")
            if (stop := self.stopped()) is not None:  # the server is stopping and this request's time is up
                job.cancelled = True
                raise stop
            if ev is None:
                continue
            if ev[0] == "token":
                tokens.append(ev[1])
            elif ev[0] == "done":  # an answer for a client gone meanwhile is a 499, not a 200 (sweep 45: one that
                await self.gone(request)  # ended within a disconnect check's interval was counted as answered)
                return ev[1], tokens
            elif ev[0] == "error":
                raise self.error(ev[1], job.target)

    async def threaded(self, fn, *args):
        """`fn(*args)` in a worker thread (`unless_stopped`), a library error as its HTTP error."""
        try:
            return await self.unless_stopped(fn, *args)
        except LoraplexError as exc:
            raise self.error(exc) from None


def _routing(model: str, target: Target, summary: dict, tokens: list[dict] | None) -> dict[str, Any]:
    out = {"model": model, "kind": target.kind, "level": "token" if target.kind == "router" else "request",
           **summary}
    if tokens is not None:
        out["tokens"] = tokens
    return out


def _error_handlers(app: FastAPI, cx: _Context) -> None:
    """Every error as OpenAI's error body: ours, Starlette's (404, 405), a bad body (400), a bug (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # its headers kept: a 405 carries Allow (RFC 9110 15.5.6)
        msg = str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":  # no route: say so by name, and what is served
            msg = (f"loraplex does not serve {request.method} {request.url.path[:200]}; it serves "
                   f"{', '.join(_served(request.app))}")
        elif exc.status_code == 405 and msg == "Method Not Allowed":  # a served path, another method (sweep 49:
            allow = (getattr(exc, "headers", None) or {}).get("Allow", "")  # `models.delete` read only this)
            msg = f"loraplex does not serve {request.method} {request.url.path[:200]}; that path takes {allow}"
        return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(LoraplexError)
    async def _library_error(request, exc: LoraplexError):  # as its HTTP error, with no traceback in the log
        err = cx.error(exc)                                  # (the Exception handler's errors are re-raised to it)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        err = cx.error(exc)
        if err.status == 500:  # a bug: its traceback
            log.exception("internal error")
        else:  # the server's state (the registry's database failed, memory or file descriptors ran out): what the
            # client was told, in one line; it was logged as an internal error with its traceback (sweep 67)
            log.error("%s %s: %s", request.method, request.url.path, err.message)
        return JSONResponse(err.body(), status_code=err.status)


def _served(app: FastAPI) -> list[str]:
    """Every route as "METHOD /path" (HEAD left out: it goes with GET), in the order they were added."""
    return [f"{m} {getattr(r, 'path_format', r.path)}" for r in app.routes if getattr(r, "methods", None)
            for m in sorted(r.methods - {"HEAD"})]


def _plain_routes(app: FastAPI, cx: _Context) -> None:
    """/health, /metrics and /v1/models (read from the registry on every call)."""
    engine = cx.engine

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if cx.scheduler.failed is not None:  # the batching thread died: requests would fail, so the server is not ok
            return JSONResponse({"status": "error", "reason": f"the batching thread has stopped ({cx.scheduler.failed})",
                                 "base": engine.base_name, "family": engine.family}, status_code=503)
        return {"status": "ok", "base": engine.base_name, "family": engine.family}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus():
        return Response(cx.metrics.text(), media_type=cx.metrics.content_type)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        items = await cx.threaded(engine.models)
        data = [{"id": m["id"], "object": "model", "created": m["created"] or engine.started, "owned_by": "loraplex",
                 "root": engine.base_name, "parent": None if m["kind"] == "base" else engine.base_name,
                 "loraplex": {k: v for k, v in m.items() if k not in ("id", "created")}} for m in items]
        return {"object": "list", "data": data}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str):
        """OpenAI's `models.retrieve`: one entry of /v1/models, or a 404 naming the model."""
        listed = (await models())["data"]
        found = next((m for m in listed if m["id"] == model), None)
        if found is None and model == "base":  # the alias requests may name for the served base (Engine.resolve)
            found = {**listed[0], "id": "base", "loraplex": {**listed[0]["loraplex"], "alias_of": listed[0]["id"]}}
        if found is None:
            await cx.threaded(cx.engine.resolve, model)  # a model left out of the list says why (damaged, forgetting)
            raise APIError(404, f"the model {model!r} does not exist (GET /v1/models lists the base, adapters, "
                                "routers and auto)", param="model", code="model_not_found")
        return found


# ---- generation ----------------------------------------------------------------------------------
def _generation_routes(app: FastAPI, cx: _Context) -> None:
    """/v1/chat/completions and /v1/completions."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(cx, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(cx, request, chat=False)


async def _generate(cx: _Context, request: Request, chat: bool):
    """A chat or text completion: forwarded to the backend (--backend), or a job of the batching thread
    answered whole or streamed."""
    raw = await read_body(request, cx.stopping)
    # parsing and tokenising a long body take seconds: in a worker thread, so other clients are not held up
    req = await run_in_threadpool(parse, raw, ChatRequest if chat else CompletionRequest)
    if cx.fwd is not None and req.trace:  # the backend generates: no token's routing is recorded here
        raise APIError(400, "trace is not available with --backend: the backend generates, so loraplex records "
                            "no per-token routing", param="trace", code="unsupported")
    target = cx.resolve(req.model)
    ids, text, sampling = await cx.unless_stopped(_prompt, cx.engine, req, chat)
    loop = asyncio.get_running_loop()
    routes = await cx.decided(target, [text], request=request)
    if cx.fwd is not None:
        return await _forward(cx, request, raw, req.model, target, text, routes, sampling)
    await cx.gone(request)  # a client gone while its prompt was read takes no row in the batch
    job = Job("generate", target, [text], loop, prompt_ids=ids, sampling=sampling, trace=req.trace, routes=routes)
    cx.scheduler.submit(job)
    answer = _Answer(req, target, chat, len(ids), cx.error, cx.stopped)
    if not req.stream:
        res, tokens = await cx.wait(job, request)
        return answer.whole(res, tokens)
    return StreamingResponse(answer.events(job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _prompt(engine: Engine, req, chat: bool) -> tuple[list[int], str, decode.Sampling]:
    """The prompt's token ids, the text routing reads, and the sampling; a prompt or max_tokens over the
    context is refused (400)."""
    if engine.family != "causal":
        raise APIError(400, f"the base {engine.base_name!r} is an encoder: it does not generate text "
                            "(use /v1/classify)", param="model")
    if chat:
        # OpenAI's `developer` message is its newer name for the system message (a chat template knows "system")
        ids, n, text = engine.chat_prompt([{"role": "system" if m.role == "developer" else m.role,
                                            "content": m.text()} for m in req.messages])
    else:
        text = req.text()
        ids, n = engine.prompt_ids(text)  # a prompt over the context is not tokenized whole (a 32 MB one took 11 GB)
    if ids is None or n >= engine.context:
        raise APIError(400, f"the prompt is {'at least ' if ids is None else ''}{n} tokens; this model's context is "
                            f"{engine.context} tokens", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if not ids or (not chat and not text):
        raise APIError(400, "the prompt is empty: there is nothing to continue", param="messages" if chat else "prompt")
    room = engine.context - len(ids)
    want = req.wanted_tokens()
    if want is not None and want > room:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"  # the one sent
        raise APIError(400, f"{field} is {want}, over the limit of {room} for this prompt ({len(ids)} "
                            f"prompt tokens, context {engine.context})", param=field,
                       code="context_length_exceeded")
    sampling = decode.Sampling(want or min(DEFAULT_MAX_TOKENS, room), req.temperature, req.top_p, req.stops(),
                               req.seed)
    return ids, text, sampling


async def _forward(cx: _Context, request: Request, raw: bytes, model: str, target: Target, text: str, routes,
                   sampling: decode.Sampling):
    """The request sent on to the backend, naming the one adapter chosen here (auto's top, a router's), with
    the max_tokens and temperature this server would use where the request leaves them out (the README's
    defaults: 256 tokens or what the context leaves, temperature 1; forwarded without them, the backend's own
    applied: vLLM's 16 tokens on completions; sweep 27)."""
    if routes is not None:
        route = cx.engine.top(routes[0])
    else:
        job = Job("route", target, [text], asyncio.get_running_loop())
        cx.scheduler.submit(job)
        route, _ = await cx.wait(job, request)
    summary = {"adapters": [{"name": a, "weight": round(w, 4)} for a, w in route.adapters]}
    if route.decision is not None:
        summary.update(decision=route.decision, reason=route.reason, nearest=route.nearest)
    body = json.loads(raw)
    body.pop("trace", None)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = sampling.max_tokens
    if body.get("temperature") is None:
        body["temperature"] = sampling.temperature
    body["model"] = route.adapters[0][0] if route.adapters else cx.engine.base_name
    routing = {**_routing(model, target, summary, None), "level": "request"}  # one adapter forwarded per request
    return await cx.fwd.forward(request.url.path, body, routing, gone=request.is_disconnected, stopped=cx.stopped,
                                every=DISCONNECT_CHECK_S, hops=request.headers.get(HOP_HEADER))


class _Answer:
    """A generation's answer in OpenAI's shapes: whole (`whole`) or as server-sent events (`events`)."""

    def __init__(self, req, target: Target, chat: bool, n_prompt: int, error, stopped):
        self.req, self.target, self.chat, self.n_prompt = req, target, chat, n_prompt
        self.error = error  # a library error as its APIError (_Context.error)
        self.stopped = stopped  # the error a stream ends with once the server's stop has come (_Context.stopped)
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                     "model": req.model}

    def usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n, "total_tokens": self.n_prompt + n}

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if self.req.stream:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def routing(self, res: dict[str, Any], tokens: list[dict]) -> dict[str, Any]:
        return _routing(self.req.model, self.target, res["routing"], tokens if self.req.trace else None)

    def whole(self, res: dict[str, Any], tokens: list[dict]) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": [self.choice(res["text"], res["finish_reason"])],
                "usage": self.usage(res["completion_tokens"]), "routing": self.routing(res, tokens)}

    async def events(self, job: Job):
        """The stream: a role chunk (chat), a chunk per text delta, a chunk with the finish reason and the
        routing, then (when `stream_options.include_usage`, as OpenAI streams it) a chunk with no choices
        and the usage, every other chunk carrying `usage: null`, then [DONE]. A client gone mid-stream
        cancels the job."""
        with_usage = self.req.with_usage()
        chunk = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 **({"usage": None} if with_usage else {})}
        tokens: list[dict] = []
        try:
            if self.chat:
                yield _sse({**chunk, "choices": [self.choice("", None, first=True)]})
            while True:
                try:
                    ev = await asyncio.wait_for(job.events.get(), DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    ev = ("wait", None)
                if (stop := self.stopped()) is not None:  # the server is stopping: end it in words, not cut
                    yield _sse(stop.body())
                    break
                if ev[0] == "delta" and ev[1]:
                    yield _sse({**chunk, "choices": [self.choice(ev[1], None)]})
                elif ev[0] == "token":
                    tokens.append(ev[1])
                elif ev[0] == "done":
                    res = ev[1]
                    yield _sse({**chunk, "choices": [self.choice(None, res["finish_reason"])],
                                "routing": self.routing(res, tokens)})
                    if with_usage:
                        yield _sse({**chunk, "choices": [], "usage": self.usage(res["completion_tokens"])})
                    break
                elif ev[0] == "error":  # the stream has begun (200): the error is its last event
                    yield _sse(self.error(ev[1], job.target).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client gone mid-stream frees its row at the next token


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---- loraplex extensions ---------------------------------------------------------------------------
def _extension_routes(app: FastAPI, cx: _Context) -> None:
    """/v1/classify, and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (the registry's own
    register and remove)."""
    engine = cx.engine

    @app.post("/v1/classify")
    async def classify(request: Request):
        req = await run_in_threadpool(parse, await read_body(request, cx.stopping), ClassifyRequest)
        target = cx.resolve(req.model)
        texts, labels = req.texts(), req.label_set()
        await cx.unless_stopped(_within_context, engine, texts)
        routes = await cx.decided(target, texts, labels, classify=True, request=request)
        check_answerable(routes if target.kind == "auto" else None, labels)  # a generate decision that fell back
        # pieces of at most max_batch texts, one after another: a request of thousands of texts shares the
        # batching thread with the others, and stops at the next piece once its client has gone
        res: list[Any] = []
        step = cx.scheduler.max_batch
        several = len(texts) > step  # pieces one after another: the models they use must not change between them
        held = await cx.threaded(engine.versions, target, routes) if several else None
        for i in range(0, len(texts), step):
            if i and await request.is_disconnected():
                raise APIError(499, "the client closed the connection")
            job = Job("classify", target, texts[i:i + step], asyncio.get_running_loop(), labels=labels,
                      routes=routes[i:i + step] if routes is not None else None)
            cx.scheduler.submit(job)
            changed = APIError(409, f"{req.model!r} (or an adapter it routed to) was removed or registered anew "
                                    "while this request ran: its answers would mix two versions; send it again",
                               param="model", code="model_changed")
            try:
                res += (await cx.wait(job, request))[0]
            except APIError as err:  # removed after its first piece ran: changed, not unknown (sweep 33: a 404
                if i and err.status == 404:  # when the removal came between the check below and the next piece)
                    raise changed from None
                raise
            if several and await cx.threaded(engine.versions, target, routes) != held:
                raise changed
        data = [{"index": i, "object": "classification", "input": t, **r} for i, (t, r) in enumerate(zip(texts, res))]
        per = [d.pop("routing") for d in data]
        return {"object": "list", "model": req.model, "data": data,
                "routing": {"model": req.model, "kind": target.kind,
                            "level": "token" if target.kind == "router" else "request", "inputs": per}}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        cx.updating("/v1/load_lora_adapter")
        req = await run_in_threadpool(parse, await read_body(request, cx.stopping), LoadLoraRequest)
        try:
            await cx.unless_stopped(engine.register, req.lora_name, req.lora_path, req.description, req.task)
        except LoraplexError as exc:
            raise _naming(cx.error(exc), exc) from None
        if cx.fwd is not None:  # the backend generates: it is given the adapter too, or it is not registered here
            where = os.path.abspath(os.path.expanduser(req.lora_path))  # the backend's working directory is not ours
            try:
                err = await cx.fwd.lora_update("/v1/load_lora_adapter", {"lora_name": req.lora_name, "lora_path": where},
                                                hops=request.headers.get(HOP_HEADER), stopped=cx.stopped)
            except BaseException:  # any other end (a cancellation at the stop): not registered here either (sweep 41)
                with contextlib.suppress(Exception):
                    engine.unregister(req.lora_name)
                raise
            if err is not None:
                try:
                    await cx.unless_stopped(engine.unregister, req.lora_name)
                except LoraplexError as exc:  # it stays registered here: said, with the backend's refusal
                    err.message += f" (and it stays registered here: {exc})"
                err.message = f"{req.lora_name!r} was not registered: {err.message}"
                raise err
        return {"object": "lora_adapter", "lora_name": req.lora_name, "status": "registered",
                "message": f"Success: LoRA adapter {req.lora_name!r} added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        cx.updating("/v1/unload_lora_adapter")
        req = await run_in_threadpool(parse, await read_body(request, cx.stopping), UnloadLoraRequest)
        try:
            await cx.unless_stopped(engine.unregister, req.lora_name)
        except LoraplexError as exc:
            raise _naming(cx.error(exc), exc, "name") from None
        if cx.fwd is not None:  # the backend unloads it too; one it never had (404) is no failure
            err = await cx.fwd.lora_update("/v1/unload_lora_adapter", {"lora_name": req.lora_name},
                                            hops=request.headers.get(HOP_HEADER), stopped=cx.stopped)
            if err is not None and err.status != 404:
                raise APIError(502, f"{req.lora_name!r} was removed here, but not from the backend: {err.message}")
        return {"object": "lora_adapter", "lora_name": req.lora_name, "status": "removed",
                "message": f"Success: LoRA adapter {req.lora_name!r} removed successfully."}


# the request field of /v1/load_lora_adapter that each input of a registration (registry/adapters.py's
# `.about` marks) comes from; the base is the server's own, so a base refused is about the adapter's files
LOAD_PARAMS = {"name": "lora_name", "path": "lora_path", "base": "lora_path", "description": "description",
               "task": "task"}


def _naming(err: APIError, exc: LoraplexError, field: str = "path") -> APIError:
    """`err` with `param` naming the request's field it is about: the input the error marks itself as about,
    else `field`; a missing task or directory named in the body is a 400 about that field, not an unknown
    model."""
    if err.status >= 500:  # the server's state (a registry it cannot write), not an input of the request
        return err
    param = LOAD_PARAMS.get(exc.field or field, exc.field or field)
    if err.param == "model" and param != "lora_name":
        return APIError(400, err.message, param=param)
    err.param = param
    return err


def _within_context(engine: Engine, texts: Sequence[str]) -> None:
    """A 400 naming the first text longer than the base's context (counted in a worker thread)."""
    for i, t in enumerate(texts):
        ids, n = engine.prompt_ids(t)  # not tokenized whole when it is over the context
        if ids is None:
            raise APIError(400, f"input {i} is at least {n} tokens; this model's context is {engine.context} tokens",
                           param="input", code="context_length_exceeded")
