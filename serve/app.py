"""The HTTP surface: FastAPI routes in OpenAI's shapes, plus loraplex's extensions.

Every answer that is not a success is OpenAI's error body with a 4xx (bad input never gives a 500 and
never changes the registry); every success carries a `routing` object next to the standard fields.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.serve import decode
from loraplex.serve.backend import Backend
from loraplex.serve.engine import Engine, LoraplexError, ModelUnknown, NotFound, Target, UserInputError
from loraplex.serve.metrics import Metrics
from loraplex.serve.protocol import (
    APIError, ChatRequest, ClassifyRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest, parse)
from loraplex.serve.scheduler import Job, Scheduler

log = logging.getLogger("loraplex.serve")
DEFAULT_MAX_TOKENS = 256
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def api_error(exc: BaseException) -> APIError:
    """A library error as the HTTP error it is."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ModelUnknown, NotFound)):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, UserInputError):
        return APIError(400, str(exc))
    if isinstance(exc, LoraplexError):
        return APIError(503, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


class Guard:
    """ASGI middleware: the API key on /v1, and each request's status and time in the metrics."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        t0, status = time.perf_counter(), [500]
        if self.key and path.startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.key}".encode()):
                err = APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
                resp = JSONResponse(err.body(), status_code=401)
                self.metrics.answered(endpoint, 401, time.perf_counter() - t0)
                return await resp(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.metrics.answered(endpoint, status[0], time.perf_counter() - t0)

        await self.app(scope, receive, watch)


def create_app(engine: Engine, scheduler: Scheduler, metrics: Metrics, *, api_key: str | None = None,
               backend: str | None = None) -> Any:
    fwd = Backend(backend) if backend else None

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)
            if fwd is not None:
                await fwd.close()

    app = FastAPI(title="loraplex serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("internal error")
        err = api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    def resolve(model: str) -> Target:
        try:
            return engine.resolve(model)
        except LoraplexError as exc:
            raise api_error(exc) from None

    async def decided(target: Target, texts: list[str]):
        """auto's routes, decided in this request's worker thread (never on the batching thread); None for
        the other kinds of model."""
        if target.kind != "auto":
            return None
        try:
            return await run_in_threadpool(engine.auto, texts, forwarded=fwd is not None)
        except LoraplexError as exc:
            raise api_error(exc) from None

    async def wait(job: Job, request: Request) -> tuple[Any, list[dict]]:
        """The job's result and its token trace; a client that went away cancels it."""
        tokens: list[dict] = []
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise APIError(499, "the client closed the connection")
                continue
            if ev[0] == "token":
                tokens.append(ev[1])
            elif ev[0] == "done":
                return ev[1], tokens
            elif ev[0] == "error":
                raise api_error(ev[1])

    def routing(model: str, target: Target, summary: dict, tokens: list[dict] | None) -> dict[str, Any]:
        out = {"model": model, "kind": target.kind, "level": "token" if target.kind == "router" else "request",
               **summary}
        if tokens is not None:
            out["tokens"] = tokens
        return out

    # ---- plain endpoints ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "base": engine.base_name, "family": engine.family}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        try:
            items = await run_in_threadpool(engine.models)
        except LoraplexError as exc:
            raise api_error(exc) from None
        now = int(time.time())
        data = [{"id": m["id"], "object": "model", "created": now, "owned_by": "loraplex",
                 "root": engine.base_name, "parent": None if m["kind"] == "base" else engine.base_name,
                 "loraplex": {k: v for k, v in m.items() if k != "id"}} for m in items]
        return {"object": "list", "data": data}

    # ---- generation ------------------------------------------------------------------------------
    async def generate(request: Request, chat: bool):
        req = parse(await request.body(), ChatRequest if chat else CompletionRequest)
        target = resolve(req.model)
        if engine.family != "causal":
            raise APIError(400, f"the base {engine.base_name!r} is an encoder: it does not generate text "
                                "(use /v1/classify)", param="model")
        if chat:
            ids, text = engine.chat_prompt([m.model_dump(include={"role", "content"}) for m in req.messages])
        else:
            text = req.text()
            ids = engine.encode_prompt(text)
        room = engine.context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {engine.context} tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        want = req.wanted_tokens()
        if want is not None and want > room:
            raise APIError(400, f"max_tokens is {want}, over the limit of {room} for this prompt ({len(ids)} "
                                f"prompt tokens, context {engine.context})", param="max_tokens",
                           code="context_length_exceeded")
        sampling = decode.Sampling(want or min(DEFAULT_MAX_TOKENS, room), req.temperature, req.top_p, req.stops(),
                                   req.seed)
        loop = asyncio.get_running_loop()
        routes = await decided(target, [text])
        if fwd is not None:
            if routes is not None:
                route = engine.top(routes[0])
            else:
                job = Job("route", target, [text], loop)
                scheduler.submit(job)
                route, _ = await wait(job, request)
            summary = {"adapters": [{"name": a, "weight": round(w, 4)} for a, w in route.adapters]}
            if route.decision is not None:
                summary.update(decision=route.decision, reason=route.reason, nearest=route.nearest)
            body = json.loads(await request.body())
            body.pop("trace", None)
            body["model"] = route.adapters[0][0] if route.adapters else engine.base_name
            return await fwd.forward(request.url.path, body, routing(req.model, target, summary, None))
        job = Job("generate", target, [text], loop, prompt_ids=ids, sampling=sampling, trace=req.trace, routes=routes)
        scheduler.submit(job)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": req.model}
        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}  # noqa: E731

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if req.stream:
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}

        if not req.stream:
            res, tokens = await wait(job, request)
            return {**head, "object": kind, "choices": [choice(res["text"], res["finish_reason"])],
                    "usage": usage(res["completion_tokens"]),
                    "routing": routing(req.model, target, res["routing"], tokens if req.trace else None)}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        with_usage = bool((req.stream_options or {}).get("include_usage"))

        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            tokens: list[dict] = []
            try:
                if chat:
                    yield sse({**head, "object": chunk_kind, "choices": [choice("", None, first=True)]})
                while True:
                    ev = await job.events.get()
                    if ev[0] == "delta" and ev[1]:
                        yield sse({**head, "object": chunk_kind, "choices": [choice(ev[1], None)]})
                    elif ev[0] == "token":
                        tokens.append(ev[1])
                    elif ev[0] == "done":
                        res = ev[1]
                        last = {**head, "object": chunk_kind, "choices": [choice(None, res["finish_reason"])],
                                "routing": routing(req.model, target, res["routing"], tokens if req.trace else None)}
                        if with_usage:
                            last["usage"] = usage(res["completion_tokens"])
                        yield sse(last)
                        break
                    elif ev[0] == "error":
                        yield sse(api_error(ev[1]).body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client gone mid-stream frees its row at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    # ---- loraplex extensions ----------------------------------------------------------------------
    @app.post("/v1/classify")
    async def classify(request: Request):
        req = parse(await request.body(), ClassifyRequest)
        target = resolve(req.model)
        texts = req.texts()
        for i, t in enumerate(texts):
            n = engine.n_tokens(t)
            if n > engine.context:
                raise APIError(400, f"input {i} is {n} tokens; this model's context is {engine.context} tokens",
                               param="input", code="context_length_exceeded")
        job = Job("classify", target, texts, asyncio.get_running_loop(), routes=await decided(target, texts))
        scheduler.submit(job)
        res, _ = await wait(job, request)
        data = [{"index": i, "object": "classification", "input": t, **r} for i, (t, r) in enumerate(zip(texts, res))]
        per = [d.pop("routing") for d in data]
        return {"object": "list", "model": req.model, "data": data,
                "routing": {"model": req.model, "kind": target.kind,
                            "level": "token" if target.kind == "router" else "request", "inputs": per}}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        req = parse(await request.body(), LoadLoraRequest)
        try:
            await run_in_threadpool(engine.register, req.lora_name, req.lora_path, req.description, req.task)
        except LoraplexError as exc:
            raise api_error(exc) from None
        return {"object": "lora_adapter", "lora_name": req.lora_name, "status": "registered",
                "message": f"Success: LoRA adapter {req.lora_name!r} added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        req = parse(await request.body(), UnloadLoraRequest)
        try:
            await run_in_threadpool(engine.unregister, req.lora_name)
        except LoraplexError as exc:
            raise api_error(exc) from None
        return {"object": "lora_adapter", "lora_name": req.lora_name, "status": "removed",
                "message": f"Success: LoRA adapter {req.lora_name!r} removed successfully."}

    return Guard(app, metrics, api_key)
