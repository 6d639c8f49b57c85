"""`--backend URL`: loraplex chooses the adapter, another OpenAI-compatible server generates.

The request goes on unchanged but for `model` (the chosen adapter, or the base's name), and the
answer comes back in the shape the server gives without a backend: `model` the name the client asked for
(`routing["model"]`), an `id` and `object` where the backend gave none, and loraplex's `routing` object on
the body, or on a stream's chunk that carries the finish reason (the backend's own `routing`, a loraplex
backend's, replaced). vLLM serves the adapters by name with `--enable-lora --lora-modules NAME=DIR ...` and
the base under the same name with `--served-model-name` (see the README).

What the backend sends back is checked as a client's request is: an answer over MAX_ANSWER bytes, JSON
with NaN or text that is not Unicode, a redirect, an answer or event that is not a completion, are the
backend's failures (a 502 naming it; in a stream, an error event), never an internal error.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from fastapi.responses import Response, StreamingResponse

from loraplex.errors import UserInputError
from loraplex.serve.protocol import APIError

MAX_ANSWER = 32 << 20
"""Bytes of a backend's whole answer, or of one event of its stream, read at most (the requests this server
takes are capped at the same size); a backend that sends more (300 MiB to `max_tokens: 3` raised the
server's memory by 1.5 GB; sweep 36) is failing."""

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # as this server's own streams
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9_.-]+)?")  # a name, or an IPv6 address
_ENDPOINTS = {"completions", "chat", "models", "embeddings", "classify"}


def checked_url(url: str) -> str:
    """`--backend`'s URL without a trailing `/v1`, or UserInputError naming what is wrong: http(s), a host
    name or address, a port from 1 to 65535, no query or fragment, a base path (not an endpoint such as
    /v1/chat/completions, which the request's own path would be appended to), and no credentials (httpx
    would send them as Basic authentication and every 502 that names the backend would show them to
    clients; `--backend-api-key` is the way)."""
    raw = url.strip()
    try:
        parsed = httpx.URL(raw)
        port = parsed.port
        ok = (bool(raw) and parsed.scheme in ("http", "https") and bool(parsed.host)
              and _HOST.fullmatch(parsed.host) is not None and (port is None or 1 <= port <= 65535))
    except (httpx.InvalidURL, TypeError, AttributeError, ValueError):
        ok = False
    if not ok:
        raise UserInputError(f"--backend {url!r}: expected the URL of an OpenAI-compatible server, "
                             "like http://127.0.0.1:8001/v1")
    if parsed.userinfo:
        raise UserInputError("--backend: credentials in the URL are not supported (they would be shown in the errors "
                             "that name the backend); give the backend's key with --backend-api-key or "
                             "LORAPLEX_BACKEND_API_KEY")
    if parsed.query or parsed.fragment or "?" in raw or "#" in raw:
        raise UserInputError(f"--backend {url!r}: a query or fragment has no place in a server's base URL "
                             "(the request's path is appended to it), like http://127.0.0.1:8001/v1")
    path = parsed.path.rstrip("/")
    base = path[: -len("/v1")] if path.endswith("/v1") else path
    if "v1" in base.split("/") or _ENDPOINTS & set(base.split("/")):
        raise UserInputError(f"--backend {url!r}: give the server's base URL (ending in /v1), not an endpoint: "
                             "the request's own path (/v1/chat/completions, ...) is appended to it")
    url = raw.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def backend_port(url: str) -> tuple[str, int]:
    """The host and port a checked `--backend` URL connects to (80 or 443 when it names none)."""
    parsed = httpx.URL(url)
    return parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def _completions(choices: Any, delta: bool = False) -> list:
    """The choices of a backend's answer that hold a completion: a dict with a `text` (completions) or a
    `message` (chat), or in a stream's chunk a `delta` or a `text`. An answer of `choices: []`, or of choices
    with neither, was relayed as a success (the openai client then failed on `choices[0]`; sweep 27), and so
    was `"message": null` (sweep 36): a `text` is a string, a `message` or `delta` an object."""
    kinds = {"text": str, "message": dict, "delta": dict}
    keys = ("text", "delta", "message") if delta else ("text", "message")
    return [c for c in choices if isinstance(c, dict) and any(isinstance(c.get(k), kinds[k]) for k in keys)] \
        if isinstance(choices, list) else []


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str | bytes) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity (which Python's json reads, and a JSON body cannot carry) refused;
    JSON nested deeper than Python's recursion limit is a ValueError too (a RecursionError was an internal error
    wherever a backend's answer was read: sweep 41)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _dumps(obj: Any) -> bytes:
    """JSON bytes to send on; ValueError for text that is not Unicode (a lone surrogate escape) or a non-finite
    number."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text that is not Unicode (a lone surrogate)") from exc


def _said(data: Any) -> str:
    """What a backend's error body says: OpenAI's {"error": {"message"}} or {"error": "..."}, vLLM's older
    top-level {"message"}, FastAPI's {"detail": "..."} or its 422 list of {"loc", "msg"}; "" if none."""
    if not isinstance(data, dict):
        return ""
    err = data.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    if isinstance(err, str):
        return err
    if isinstance(data.get("message"), str):
        return data["message"]
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for d in detail[:50]:
            if not isinstance(d, dict):
                continue
            loc = d.get("loc")  # FastAPI's is a list; anything else (a number, null: sweep 41) read as one part
            loc = loc if isinstance(loc, list) else [] if loc is None else [loc]
            parts.append(f"{'.'.join(str(p)[:100] for p in loc[:20] if p != 'body')}: {str(d.get('msg'))[:200]}".lstrip(": "))
        return "; ".join(parts)[:500]
    return ""


# Every request a server sends on to its --backend carries the ids of the loraplex servers it went through
# (its own last; an id per app, so two in one process differ); a server that finds its own id among them
# answers 508 instead of forwarding again. The start-up check (`server.not_itself`) refuses this server's own
# address, but not every name that leads back (an IPv4 address mapped into IPv6, a second server that
# forwards to the first: sweep 41).
HOP_HEADER = "x-loraplex-hops"
MAX_HOPS = 8


def new_instance() -> str:
    """A server's id in HOP_HEADER."""
    return uuid.uuid4().hex[:16]


def hops_of(value: str | None) -> list[str]:
    """The server ids a request's HOP_HEADER names (the header as received; empty when absent). Only ids as
    `new_instance` makes them are kept: anything else a client put there (a byte that is not ASCII was a 500
    when the header was sent on: sweep 43) names no loraplex server."""
    return [h.strip() for h in (value or "").split(",") if _HOP_ID.fullmatch(h.strip())][:64]


_HOP_ID = re.compile(r"[0-9a-f]{16}")


IDLE_CONNECTIONS = 100
"""Idle connections to the backend kept open for the next requests."""


class Backend:
    def __init__(self, url: str, timeout: float = 600.0, key: str | None = None, instance: str | None = None):
        """`key`: sent to the backend as `Authorization: Bearer KEY` (vLLM's --api-key); loraplex's own
        --api-key is never passed on. `instance`: this server's id in HOP_HEADER."""
        self.url = checked_url(url)
        self.instance = instance or new_instance()
        self.timeout = float(timeout)  # a whole answer's bound too, not only each read's (sweep 41: one trickling
        # a byte every 5 s held a request without end)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        # no cap on connections: the backend queues what it cannot run yet (vLLM batches hundreds of sequences);
        # httpx's default of 100 held the rest here, silently, and failed them as "cannot be reached" (sweep 36)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=IDLE_CONNECTIONS))

    async def close(self) -> None:
        await self.client.aclose()

    def _named(self, what: str) -> str:
        return f"the backend {self.url} {what}"

    def _failed(self, resp: httpx.Response, raw: bytes) -> APIError:
        """A backend's non-200 answer as loraplex answers it. A 400, 404 or 422 is about the request loraplex
        passed on (a sampling value the backend refuses, an adapter it does not serve): its status and what it
        said stay. A redirect is named with where it points. Anything else (its own authentication, its
        overload, its crash) is the backend's failure, not the client's: a 502 naming the backend."""
        status = resp.status_code
        try:
            data = _loads(raw)
        except ValueError:
            data = None
        said = _said(data)
        if status in (400, 404, 422):
            err = data.get("error") if isinstance(data, dict) else None
            return APIError(status, f"the backend refused the request: {said}" if said else
                            f"the backend refused the request ({status})",
                            param=err.get("param") if isinstance(err, dict) else None)
        if 300 <= status < 400:
            where = resp.headers.get("location", "")[:200]
            return APIError(502, self._named(f"redirected ({status}) to {where!r}: loraplex does not follow "
                                             "redirects; give --backend the URL it points to"))
        if data is None:
            return APIError(502, self._named(f"answered {status} without JSON"))
        return APIError(502, self._named(f"answered {status}" + (f": {said}" if said else "")))

    async def forward(self, path: str, body: dict[str, Any], routing: dict[str, Any], *,
                      gone: Callable[[], Awaitable[bool]] | None = None,
                      stopped: Callable[[], APIError | None] | None = None, every: float = 0.5,
                      hops: str | None = None):
        """The backend's answer to the request, relayed. `gone`: whether the client went away, and `stopped`:
        the error the server's stop ends requests with once it has come (serve/app.py's `_Context.stopped`),
        asked every `every` seconds while the backend's answer, or a stream's next event, is awaited; then the
        backend's request is cancelled (its connection closed, so the backend frees the row) and the request
        is a 499 (the client left) or that error (a stream ends with it as an event). A stream is also
        cancelled when the client stops reading it. `hops`: the request's own HOP_HEADER, passed on with
        this server's id added."""
        shape = _Shape(path, routing)
        req = self.client.build_request("POST", self.url + path, json=body,
                                        headers={HOP_HEADER: ",".join([*hops_of(hops), self.instance])})
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            resp = await self._watched(self.client.send(req, stream=True), gone, stopped, every, deadline)
        except httpx.TimeoutException as exc:  # connected, or not: said which (it read "cannot be reached" alike)
            raise self._late(exc) from None
        except httpx.HTTPError as exc:
            raise APIError(502, self._named(f"cannot be reached: {type(exc).__name__}: {exc}")) from None
        if not body.get("stream") or resp.status_code != 200:
            try:
                raw = await self._watched(self._read(resp), gone, stopped, every, deadline)
            except httpx.TimeoutException as exc:
                raise self._late(exc) from None
            except httpx.HTTPError as exc:
                raise APIError(502, self._named(f"broke off its answer: {type(exc).__name__}: {exc}")) from None
            finally:
                await resp.aclose()
            if resp.status_code != 200:
                raise self._failed(resp, raw)
            return Response(self._whole(raw, shape), media_type="application/json")
        return StreamingResponse(self._relay(resp, shape, stopped), media_type="text/event-stream",
                                 headers=STREAM_HEADERS)

    async def lora_update(self, path: str, body: dict[str, Any], hops: str | None = None,
                          stopped: Callable[[], APIError | None] | None = None, every: float = 0.5) -> APIError | None:
        """vLLM's /v1/load_lora_adapter or /v1/unload_lora_adapter sent on to the backend (`body` its fields,
        `lora_name` and `lora_path`): None when it took it, else the error to answer (its 400, 404 or 422 as it
        is, anything else a 502 naming it). An adapter registered here that the backend was not given would be
        routed to by name and fail there (sweep 36). `stopped`: as `forward`'s, asked while the backend is
        awaited (a slow backend outlived the server's grace period: sweep 41)."""

        async def call() -> tuple[httpx.Response, bytes]:
            async with self.client.stream("POST", self.url + path, json=body, timeout=120.0,
                                          headers={HOP_HEADER: ",".join([*hops_of(hops), self.instance])}) as resp:
                return resp, await self._read(resp)

        try:  # bounded as a whole, as `forward` is (sweep 43: a trickling backend held a load for ever)
            resp, raw = await self._watched(call(), None, stopped, every,
                                            asyncio.get_running_loop().time() + min(self.timeout, 120.0))
        except httpx.TimeoutException as exc:
            return self._late(exc, min(self.timeout, 120.0))
        except httpx.HTTPError as exc:
            return APIError(502, self._named(f"cannot be reached: {type(exc).__name__}: {exc}"))
        except APIError as exc:  # an answer over MAX_ANSWER, or the server's stop
            return exc
        return None if resp.status_code == 200 else self._failed(resp, raw)

    async def _read(self, resp: httpx.Response) -> bytes:
        """The answer's body, at most MAX_ANSWER bytes (502 past it)."""
        parts, n = [], 0
        async for part in resp.aiter_bytes():
            n += len(part)
            if n > MAX_ANSWER:
                raise APIError(502, self._named(f"answered more than {MAX_ANSWER >> 20} MiB"))
            parts.append(part)
        return b"".join(parts)

    def _whole(self, raw: bytes, shape: "_Shape") -> bytes:
        """A whole answer's body as this server gives it, or a 502 naming what is wrong with it."""
        try:
            data = _loads(raw)
        except ValueError as exc:
            raise APIError(502, self._named(f"answered 200 without valid JSON ({exc})"[:300])) from None
        if not isinstance(data, dict) or not _completions(data.get("choices")):
            raise APIError(502, self._named(f"answered 200 with no completion (no choice with a 'text' or a "
                                            f"'message'): {raw[:120].decode('utf-8', 'replace')}"))
        shape.name(data, whole=True)
        data["routing"] = shape.routing
        try:
            return _dumps(data)
        except ValueError as exc:
            raise APIError(502, self._named(f"answered JSON with {exc}")) from None

    def _late(self, exc: httpx.TimeoutException, within: float | None = None) -> APIError:
        """A 504 for a backend that did not answer in time (it connected, or it did not)."""
        if isinstance(exc, httpx.ConnectTimeout):
            return APIError(504, self._named("did not accept the connection within 10 s"))
        return APIError(504, self._named(f"did not answer within {within or self.timeout:.0f} s"))

    @staticmethod
    async def _watched(call: Awaitable[Any], gone: Callable[[], Awaitable[bool]] | None,
                       stopped: Callable[[], APIError | None] | None, every: float,
                       deadline: float | None = None) -> Any:
        """`call`'s result, asking `gone` and `stopped` every `every` seconds while it is awaited: a client that
        left (499) or the server's stop (its error) cancels the call, so the backend's request is closed.
        `deadline` (the loop's clock): past it, the call is cancelled as a read timeout."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    return task.result()
                if gone is not None and await gone():
                    raise APIError(499, "the client closed the connection")
                err = stopped() if stopped is not None else None
                if err is not None:
                    raise err
                if deadline is not None and asyncio.get_running_loop().time() > deadline:
                    raise httpx.ReadTimeout("the whole answer took too long")
        finally:
            if not task.done():  # the client left (or this request was cancelled): the backend stops too
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _events(self, resp: httpx.Response, stopped: Callable[[], APIError | None] | None) -> AsyncIterator[str]:
        """The data of each server-sent event: consecutive `data:` lines joined by newlines up to the blank
        line that ends the event (an event's JSON may span several lines); other fields are skipped. An event
        over MAX_ANSWER bytes is the backend's failure; the server's stop ends the stream at the next line. No
        event within the timeout (the whole answer's bound: bytes trickled that never end one, comments only)
        is a 504 (sweep 43: such a stream stayed open until the client left; a token a while is an event)."""
        data: list[str] = []
        size = 0
        loop = asyncio.get_running_loop()
        last = [loop.time()]  # when the last event came (the stream's start before the first)
        # read in the relay's own task: a read parked in a task of its own (a timed wait per line) kept the
        # backend's connection open after the client left, and tripled the CPU a chunk costs (sweep 38); the
        # server's stop is asked between lines
        async for line in self._lines(resp, last):
            err = stopped() if stopped is not None else None
            if err is not None:
                raise err
            if not line:
                if data:
                    last[0] = loop.time()
                    yield "\n".join(data)
                    data, size = [], 0
            elif line.startswith("data:"):
                data.append(line[5:][1:] if line[5:].startswith(" ") else line[5:])
                size += len(line)
                if size > MAX_ANSWER:
                    raise APIError(502, self._named(f"sent a stream event of more than {MAX_ANSWER >> 20} MiB"))
        if data:
            yield "\n".join(data)

    async def _lines(self, resp: httpx.Response, last: list[float]) -> AsyncIterator[str]:
        """The stream's lines (LF or CRLF ended) as its bytes arrive, a line of more than MAX_ANSWER bytes (a
        comment included) failing before more of it is kept: httpx's `aiter_lines` held a whole line however
        long (600 MiB of one comment line took 1.2 GB; sweep 38). `last[0]`: when the last event came (the
        loop's clock); bytes arriving past the timeout after it end the stream (504)."""
        pending = bytearray()  # the line under way: only the new bytes are searched (linear in the stream)
        loop = asyncio.get_running_loop()
        async for part in resp.aiter_bytes():
            if loop.time() - last[0] > self.timeout:
                raise APIError(504, self._named(f"sent no stream event within {self.timeout:g} s"))
            start = 0
            while (end := part.find(b"\n", start)) >= 0:
                pending += part[start:end]
                if len(pending) > MAX_ANSWER:
                    raise APIError(502, self._named(f"sent a stream line of more than {MAX_ANSWER >> 20} MiB"))
                line = bytes(pending).removesuffix(b"\r").decode("utf-8", "replace")
                pending.clear()
                start = end + 1
                yield line
            pending += part[start:]
            if len(pending) > MAX_ANSWER:
                raise APIError(502, self._named(f"sent a stream line of more than {MAX_ANSWER >> 20} MiB"))
        if pending:
            yield bytes(pending).removesuffix(b"\r").decode("utf-8", "replace")

    async def _relay(self, resp: httpx.Response, shape: "_Shape", stopped: Callable[[], APIError | None] | None):
        """The backend's events as they come, named by the model asked for, the routing on the chunk with the
        finish reason; one chunk is held back, so a stream without one gets the routing on its last. An event
        that is not a chunk (not JSON, the backend's own error, choices that are not a list, numbers or text
        JSON cannot carry) ends the stream with an error event naming the backend, as its failures are 502s
        elsewhere; the server's stop ends it with its 503 event."""
        held: bytes | None = None
        done = routed = carried = False
        failed: APIError | None = None
        watch = asyncio.ensure_future(self._close_at_stop(resp, stopped)) if stopped is not None else None
        try:
            async for payload in self._events(resp, stopped):
                if payload.strip() == "[DONE]":
                    done = True
                    break
                try:
                    chunk = _loads(payload)
                except ValueError:
                    chunk = None
                # vLLM's older error event is {"object": "error", "message": ...}: relayed as a chunk (sweep 38)
                error = isinstance(chunk, dict) and (chunk.get("error") is not None  # `"error": null` is no error
                                                     or chunk.get("object") == "error")
                if (not isinstance(chunk, dict) or error
                        or not isinstance(chunk.get("choices", []), list)):  # `"choices": 5` broke the relay (sweep 36)
                    said = _said(chunk) if error else ""
                    failed = APIError(502, self._named(f"failed mid-stream: {said}") if said else
                                      self._named(f"sent an event that is not a completion chunk: {payload[:120]!r}"))
                    break
                carried = carried or bool(_completions(chunk.get("choices"), delta=True))
                shape.name(chunk, whole=False)
                if any(isinstance(c, dict) and c.get("finish_reason") for c in chunk.get("choices", [])):
                    chunk["routing"], routed = shape.routing, True
                try:
                    out = _dumps(chunk)
                except ValueError as exc:
                    failed = APIError(502, self._named(f"sent a chunk with {exc}"))
                    break
                if held is not None:
                    yield b"data: " + held + b"\n\n"
                held = out
            if done and not carried and failed is None:  # `choices: []` throughout: a success with no answer
                failed = APIError(502, self._named("ended its stream without a completion (no chunk carried a choice)"))
            if held is not None:
                if not routed and failed is None:
                    last = json.loads(held)
                    last["routing"] = shape.routing
                    held = _dumps(last)
                yield b"data: " + held + b"\n\n"
                held = None
            if failed is not None:
                yield f"data: {json.dumps(failed.body())}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            if not done:  # the backend closed without its [DONE]: the answer may be cut, so it ends in an error
                cut = APIError(502, self._named("ended its stream without [DONE]: the answer may be incomplete"))
                yield f"data: {json.dumps(cut.body())}\n\n".encode()
                return
            yield b"data: [DONE]\n\n"
        except APIError as exc:  # an oversized event, or the server's stop
            if held is not None:  # what the backend sent before it (it was dropped: sweep 41)
                yield b"data: " + held + b"\n\n"
            yield f"data: {json.dumps(exc.body())}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except (httpx.HTTPError, httpx.StreamError) as exc:
            err = stopped() if stopped is not None else None  # closed by the watch at the server's stop
            if held is not None:
                yield b"data: " + held + b"\n\n"
            yield f"data: {json.dumps((err or APIError(502, self._named(f'broke off its stream: {exc}'))).body())}\n\n".encode()
            if err is not None:
                yield b"data: [DONE]\n\n"
        finally:
            if watch is not None:
                watch.cancel()
            await resp.aclose()

    @staticmethod
    async def _close_at_stop(resp: httpx.Response, stopped: Callable[[], APIError | None], every: float = 0.5) -> None:
        """Close a relayed stream's backend response once the server's stop has come: a backend that sends no
        line (a long prefill, a stuck device) left the read parked until uvicorn cancelled the request, and
        the client got an empty 200 (sweep 41). The stop is asked twice a second by this one sleeping task, not
        by a timed wait per line (which cost a chunk three times the CPU: sweep 38)."""
        while stopped() is None:
            await asyncio.sleep(every)
        await resp.aclose()


class _Shape:
    """Names a backend's answer as this server names its own: `model` the name the client asked for, and the
    `id` (one per request, every chunk of a stream the same) and `object` of OpenAI's shape where the backend
    sent none (sweep 36: an answer without them was relayed without them)."""

    def __init__(self, path: str, routing: dict[str, Any]):
        self.routing = routing
        self.chat = path.endswith("/chat/completions")
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def name(self, data: dict[str, Any], whole: bool) -> None:
        data.pop("routing", None)
        data["model"] = self.routing["model"]
        data.setdefault("id", self.id)
        data.setdefault("object", ("chat.completion" if whole else "chat.completion.chunk") if self.chat
                        else "text_completion")
