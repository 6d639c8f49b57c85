"""`--backend URL`: loraplex chooses the adapter, another OpenAI-compatible server generates.

The request goes on unchanged but for `model` (the chosen adapter, or the base's name), and the
answer comes back in the shape the server gives without a backend: `model` the name the client asked for
(`routing["model"]`), and loraplex's `routing` object on the body, or on a stream's chunk that carries the
finish reason (the backend's own `routing`, a loraplex backend's, replaced). vLLM serves the adapters by name with `--enable-lora --lora-modules NAME=DIR ...` and the
base under the same name with `--served-model-name` (see the README).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.errors import UserInputError
from loraplex.serve.protocol import APIError


def checked_url(url: str) -> str:
    """`--backend`'s URL without a trailing `/v1`: http(s) with a host and no credentials, or UserInputError
    naming it. Credentials in the URL are refused: httpx would send them as Basic authentication and every
    502 that names the backend would show them to clients (sweep 36); `--backend-api-key` is the way."""
    try:
        parsed = httpx.URL(url.strip())
        ok = parsed.scheme in ("http", "https") and bool(parsed.host) and (parsed.port or 1) <= 65535
    except (httpx.InvalidURL, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserInputError(f"--backend {url!r}: expected the URL of an OpenAI-compatible server, "
                             "like http://127.0.0.1:8001/v1")
    if parsed.userinfo:
        raise UserInputError("--backend: credentials in the URL are not supported (they would be shown in the errors "
                             "that name the backend); give the backend's key with --backend-api-key or "
                             "LORAPLEX_BACKEND_API_KEY")
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url



def _completions(choices: Any, delta: bool = False) -> list:
    """The choices of a backend's answer that hold a completion: a dict with a `text` (completions) or a
    `message` (chat), or in a stream's chunk a `delta` or a `text`. An answer of `choices: []`, or of choices
    with neither, was relayed as a success (the openai client then failed on `choices[0]`; sweep 27)."""
    keys = ("text", "delta", "message") if delta else ("text", "message")
    return [c for c in choices if isinstance(c, dict) and any(k in c for k in keys)] if isinstance(choices, list) else []

class Backend:
    def __init__(self, url: str, timeout: float = 600.0, key: str | None = None):
        """`key`: sent to the backend as `Authorization: Bearer KEY` (vLLM's --api-key); loraplex's own
        --api-key is never passed on."""
        self.url = checked_url(url)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers)

    async def close(self) -> None:
        await self.client.aclose()

    def _failed(self, status: int, data: Any) -> APIError:
        """A backend's refusal as loraplex answers it. A 400, 404 or 422 is about the request loraplex passed
        on (a sampling value the backend refuses, an adapter it does not serve): its status and message stay.
        Anything else (its own authentication, its overload, its crash) is the backend's failure, not the
        client's: a 502 naming the backend and what it said."""
        err = data.get("error") if isinstance(data, dict) else None
        said = (err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None) or ""
        if status in (400, 404, 422) and said:
            return APIError(status, f"the backend refused the request: {said}",
                            param=err.get("param") if isinstance(err, dict) else None)
        return APIError(502, f"the backend {self.url} answered {status}" + (f": {said}" if said else ""))

    async def forward(self, path: str, body: dict[str, Any], routing: dict[str, Any], *,
                      gone: Callable[[], Awaitable[bool]] | None = None, every: float = 0.5):
        """The backend's answer to the request, relayed. `gone`: whether the client went away, asked every
        `every` seconds while a whole answer, or a stream's headers, are awaited; then the backend's request is
        cancelled (its connection closed, so the backend frees the row) and this is a 499. A stream under way
        is cancelled when the client stops reading it."""
        try:
            if not body.get("stream"):
                r = await self._post(path, body, gone, every)
                try:
                    data = r.json()
                except ValueError:
                    raise APIError(502, f"the backend answered {r.status_code} without JSON") from None
                if r.status_code != 200:
                    raise self._failed(r.status_code, data)
                if not isinstance(data, dict) or not _completions(data.get("choices")):
                    raise APIError(502, f"the backend answered 200 with no completion (no choice with a 'text' or a "
                                        f"'message'): {json.dumps(data)[:120]}")
                data.pop("routing", None)
                if "model" in data:
                    data["model"] = routing["model"]
                data["routing"] = routing
                return JSONResponse(data)
            req = self.client.build_request("POST", self.url + path, json=body)
            # the stream's headers are awaited the same way (a client gone before them held the backend's row
            # for its whole answer and counted as a 200; sweep 36)
            resp = await self._watched(self.client.send(req, stream=True), gone, every)
        except httpx.HTTPError as exc:
            raise APIError(502, f"the backend {self.url} cannot be reached: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raw = await resp.aread()
            await resp.aclose()
            try:
                data = json.loads(raw)
            except ValueError:
                raise APIError(502, f"the backend answered {resp.status_code}") from None
            raise self._failed(resp.status_code, data)
        return StreamingResponse(self._relay(resp, routing), media_type="text/event-stream")

    async def _post(self, path: str, body: dict[str, Any], gone: Callable[[], Awaitable[bool]] | None,
                    every: float) -> httpx.Response:
        return await self._watched(self.client.post(self.url + path, json=body), gone, every)

    @staticmethod
    async def _watched(call: Awaitable[httpx.Response], gone: Callable[[], Awaitable[bool]] | None,
                       every: float) -> httpx.Response:
        """The backend's response to `call`, asking `gone` every `every` seconds while it is awaited: a client
        that left cancels the call (its connection closed, so the backend stops) and this is a 499."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    return task.result()
                if gone is not None and await gone():
                    raise APIError(499, "the client closed the connection")
        finally:
            if not task.done():  # the client left (or this request was cancelled): the backend stops too
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    @staticmethod
    async def _events(resp: httpx.Response):
        """The data of each server-sent event: consecutive `data:` lines joined by newlines up to the blank
        line that ends the event (an event's JSON may span several lines); other fields are skipped."""
        data: list[str] = []
        async for line in resp.aiter_lines():
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:][1:] if line[5:].startswith(" ") else line[5:])
        if data:
            yield "\n".join(data)

    async def _relay(self, resp: httpx.Response, routing: dict[str, Any]):
        """The backend's events as they come, named by the model asked for, the routing on the chunk with the
        finish reason; one chunk is held back, so a stream without one gets the routing on its last. An event
        that is not a chunk (not JSON, or the backend's own error) ends the stream with an error event naming
        the backend, as its failures are 502s elsewhere."""
        held: dict | None = None
        done = routed = carried = False
        failed: str | None = None
        try:
            async for payload in self._events(resp):
                if payload.strip() == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    chunk = None
                if (not isinstance(chunk, dict) or chunk.get("error") is not None  # `"error": null` is no error
                        or not isinstance(chunk.get("choices", []), list)):  # `"choices": 5` broke the relay (sweep 36)
                    err = chunk.get("error") if isinstance(chunk, dict) else None
                    said = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
                    failed = (f"the backend {self.url} failed mid-stream: {said}" if said else
                              f"the backend {self.url} sent an event that is not a completion chunk: {payload[:120]!r}")
                    break
                carried = carried or bool(_completions(chunk.get("choices"), delta=True))
                chunk.pop("routing", None)
                if "model" in chunk:
                    chunk["model"] = routing["model"]
                if any(isinstance(c, dict) and c.get("finish_reason") for c in chunk.get("choices") or ()):
                    chunk["routing"], routed = routing, True
                if held is not None:
                    yield f"data: {json.dumps(held)}\n\n"
                held = chunk
            if done and not carried and failed is None:  # `choices: []` throughout: a success with no answer
                failed = f"the backend {self.url} ended its stream without a completion (no chunk carried a choice)"
            if held is not None:
                if not routed and failed is None:
                    held["routing"] = routing
                yield f"data: {json.dumps(held)}\n\n"
            if failed is not None:
                yield f"data: {json.dumps(APIError(502, failed).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if not done:  # the backend closed without its [DONE]: the answer may be cut, so it ends in an error
                yield f"data: {json.dumps(APIError(502, f'the backend {self.url} ended its stream without [DONE]: the answer may be incomplete').body())}\n\n"
                return
            yield "data: [DONE]\n\n"
        except httpx.HTTPError as exc:
            yield f"data: {json.dumps(APIError(502, f'the backend stream broke: {exc}').body())}\n\n"
        finally:
            await resp.aclose()
