"""`--backend URL`: loraplex chooses the adapter, another OpenAI-compatible server generates.

The request goes on unchanged but for `model` (the chosen adapter, or the base's name), and the
answer comes back with loraplex's `routing` object added (to the body, or to the last chunk of a
stream). vLLM serves the adapters by name with `--enable-lora --lora-modules NAME=DIR ...` and the
base under the same name with `--served-model-name` (see the README).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.errors import UserInputError
from loraplex.serve.protocol import APIError


def checked_url(url: str) -> str:
    """`--backend`'s URL without a trailing `/v1`: http(s) with a host, or UserInputError naming it."""
    try:
        parsed = httpx.URL(url.strip())
        ok = parsed.scheme in ("http", "https") and bool(parsed.host) and (parsed.port or 1) <= 65535
    except (httpx.InvalidURL, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserInputError(f"--backend {url!r}: expected the URL of an OpenAI-compatible server, "
                             "like http://127.0.0.1:8001/v1")
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class Backend:
    def __init__(self, url: str, timeout: float = 600.0):
        self.url = checked_url(url)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(self, path: str, body: dict[str, Any], routing: dict[str, Any]):
        try:
            if not body.get("stream"):
                r = await self.client.post(self.url + path, json=body)
                try:
                    data = r.json()
                except ValueError:
                    raise APIError(502, f"the backend answered {r.status_code} without JSON") from None
                if r.status_code == 200 and isinstance(data, dict):
                    data["routing"] = routing
                return JSONResponse(data, status_code=r.status_code)
            req = self.client.build_request("POST", self.url + path, json=body)
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise APIError(502, f"the backend {self.url} cannot be reached: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raw = await resp.aread()
            await resp.aclose()
            try:
                return JSONResponse(json.loads(raw), status_code=resp.status_code)
            except ValueError:
                raise APIError(502, f"the backend answered {resp.status_code}") from None
        return StreamingResponse(self._relay(resp, routing), media_type="text/event-stream")

    async def _relay(self, resp: httpx.Response, routing: dict[str, Any]):
        """The backend's events as they come, one chunk held back so the last one carries the routing."""
        held: dict | None = None
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    continue
                if held is not None:
                    yield f"data: {json.dumps(held)}\n\n"
                held = chunk
            if held is not None:
                held["routing"] = routing
                yield f"data: {json.dumps(held)}\n\n"
            yield "data: [DONE]\n\n"
        except httpx.HTTPError as exc:
            yield f"data: {json.dumps(APIError(502, f'the backend stream broke: {exc}').body())}\n\n"
        finally:
            await resp.aclose()
