"""Request bodies (pydantic, strict types, unknown fields refused) and OpenAI's error body.

Fields of OpenAI's API that loraplex does not implement are known by name and refused with a 400
that names them, instead of being silently ignored.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraplex.errors import UserInputError
from loraplex.tasks import checked_labels, lone_surrogate, printable, visible


# an error's `code` when its raiser gives no more precise one (a client branches on `code`, so it is never null)
DEFAULT_CODES = {400: "invalid_value", 401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                 408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type", 499: "client_closed_request",
                 500: "internal_error", 502: "backend_error", 503: "unavailable"}


class APIError(Exception):
    """An error answered in OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or DEFAULT_CODES.get(status, "invalid_request" if 400 <= status < 500 else "server_error")
        self.type = type or {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 502: "backend_error",
                             503: "unavailable_error"}.get(
            status, "invalid_request_error" if 400 <= status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """OpenAI's error body; a message or param past MAX_MESSAGE / MAX_PARAM characters is cut (a client's
        1 MB field name or model name came back whole, twice: sweep 45)."""
        return {"error": {"message": clipped(self.message, MAX_MESSAGE), "type": self.type,
                          "param": None if self.param is None else clipped(self.param, MAX_PARAM), "code": self.code}}


MAX_MESSAGE = 4000
MAX_PARAM = 200


def clipped(text: str, limit: int) -> str:
    """`text`, or its start and how long it was when it is longer than `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN passed every bound


# name -> the values (besides null) that mean "not asked for", of those exact JSON types; anything else is
# refused by name (so `n: true` or `n: 1.0` are refused like `n: 2`)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # an empty tool list and tool_choice "none" ask for no tool call, which is all loraplex makes
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "logit_bias": ({},), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "best_of": (1,), "echo": (False,), "suffix": (), "parallel_tool_calls": (),
    "audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (),
    "service_tier": ("auto", "default"),  # OpenAI's default tier: nothing asked of a server that has one
    # OpenAI's default "text" asks for nothing; "store: false" and empty metadata neither (nothing is stored)
    "store": (False,), "metadata": ({},), "web_search_options": (), "verbosity": (), "prompt_cache_key": (),
    "safety_identifier": (), "moderation": (), "prompt_cache_options": (), "prompt_cache_retention": (),
}
# fields of an assistant message that the openai client sends back as null/empty (`messages.append(msg)`
# after `msg.model_dump()`): those values ask nothing; any other value is refused by name
MESSAGE_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "refusal": (), "tool_calls": ([],), "function_call": (), "audio": (), "annotations": ([],), "tool_call_id": (),
}


NULLABLE = ("temperature", "top_p", "stream", "trace")
"""Generation fields OpenAI's API takes as null (meaning its default), and loraplex's own `trace` alike;
the others with a default of None (max_tokens, seed, stop, user) take null as they are."""


def _not_asked(value: Any, defaults: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(d) and value == d for d in defaults)


class StreamOptions(_Body):
    include_usage: bool = False
    """A last chunk, before [DONE], with the usage and no choices; every other chunk has `usage: null`."""
    include_obfuscation: Optional[bool] = None
    """OpenAI's random padding of stream chunks: not implemented, so only false (or null) is taken."""

    @model_validator(mode="after")
    def _no_obfuscation(self) -> "StreamOptions":
        if self.include_obfuscation:
            raise APIError(400, "'stream_options.include_obfuscation' is not supported by loraplex serve (send false)",
                           param="stream_options.include_obfuscation", code="unsupported")
        return self


class _Generate(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    """Tokens to generate at most (default: 256, or what the context leaves)."""
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    trace: bool = False
    """loraplex: the routing of every token in the response's `routing.tokens`."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for k, defaults in UNSUPPORTED.items():
                if k in data and not _not_asked(data[k], defaults):
                    raise APIError(400, f"{k!r} is not supported by loraplex serve", param=k, code="unsupported")
            data = {k: v for k, v in data.items() if k not in UNSUPPORTED}
            for k in NULLABLE:  # OpenAI's schema takes null for these: their default (the openai client sends it)
                if k in data and data[k] is None:
                    del data[k]
            if data.get("stream_options") is not None and data.get("stream") is not True:
                raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        return data

    def stops(self) -> tuple[str, ...]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4 or any(not x for x in s):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return tuple(s)

    def wanted_tokens(self) -> Optional[int]:
        return self.max_tokens

    def with_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    """A text, or OpenAI's content parts (text parts only: they are joined by newlines, as vLLM does)."""
    name: None = None
    """Refused when set (ChatRequest): the engine's prompt has no place for a participant's name."""

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatRequest(_Generate):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    """OpenAI's newer name for max_tokens (chat only, as in OpenAI's API)."""

    @model_validator(mode="after")
    def _one_max(self) -> "ChatRequest":
        """Both spellings of the limit may be sent, but not two limits: which one would hold?"""
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                f"({self.max_completion_tokens}) disagree: give one of them",
                           param="max_completion_tokens")
        return self

    def wanted_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        """A content part that is not text (an image, audio, a file) is refused by name, not dropped; so is
        a message's `name` (the prompt the engine builds has no place for it)."""
        msgs = data.get("messages") if isinstance(data, dict) else None
        for i, m in enumerate(msgs if isinstance(msgs, list) else []):
            if isinstance(m, dict):
                for k, defaults in MESSAGE_UNSUPPORTED.items():
                    if k in m and not _not_asked(m[k], defaults):
                        raise APIError(400, f"a message's {k!r} is not supported by loraplex serve",
                                       param=f"messages.{i}.{k}", code="unsupported")
                msgs[i] = m = {k: v for k, v in m.items() if k not in MESSAGE_UNSUPPORTED}
            if isinstance(m, dict) and m.get("name") is not None:
                raise APIError(400, "a message's 'name' is not supported by loraplex serve (the prompt would not "
                                    "carry it)", param=f"messages.{i}.name", code="unsupported")
            parts = m.get("content") if isinstance(m, dict) else None
            for j, part in enumerate(parts if isinstance(parts, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise APIError(400, f"content parts of type {kind!r} are not supported by loraplex serve "
                                        "(text only)", param=f"messages.{i}.content.{j}.type", code="unsupported")
        return data


class CompletionRequest(_Generate):
    prompt: Union[str, list[str]]

    @model_validator(mode="before")
    @classmethod
    def _token_ids(cls, data: Any) -> Any:
        """OpenAI's prompt of token ids (a list of ints, or of lists of ints): refused by name, not as a
        prompt that is not a string."""
        p = data.get("prompt") if isinstance(data, dict) else None
        if isinstance(p, list) and p and all(isinstance(x, int) or (isinstance(x, list) and all(isinstance(y, int)
                                                                                              for y in x)) for x in p):
            raise APIError(400, "a prompt of token ids is not supported by loraplex serve: send the prompt as text",
                           param="prompt", code="unsupported")
        return data

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise APIError(400, "the prompt list is empty: send one prompt", param="prompt")
            if len(self.prompt) != 1:
                raise APIError(400, "a list of prompts is not supported: send one prompt per request",
                               param="prompt", code="unsupported")
            return self.prompt[0]
        return self.prompt


MAX_INPUTS = 2048
"""Texts one /v1/classify request may carry (OpenAI's embeddings endpoint takes as many)."""


class ClassifyRequest(_Body):
    model: str
    input: Union[str, list[str]]
    labels: Optional[list[str]] = None
    """loraplex: answer with one of these (at least two distinct names); retrieval and `auto` then prefer
    adapters trained on them, and the bare base can answer too (loraplex.tasks.checked_labels)."""
    user: Optional[str] = None

    def texts(self) -> list[str]:
        xs = [self.input] if isinstance(self.input, str) else list(self.input)
        if not xs:
            raise APIError(400, "input must be a text or a non-empty list of non-empty texts", param="input")
        blank = next((i for i, x in enumerate(xs) if not visible(x)), None)
        if blank is not None:
            raise APIError(400, f"input {blank} has no visible character", param="input")
        if len(xs) > MAX_INPUTS:
            raise APIError(400, f"input has {len(xs):,} texts; one request takes at most {MAX_INPUTS:,}",
                           param="input", code="too_many_inputs")
        return xs

    def label_set(self) -> tuple[str, ...] | None:
        if self.labels is None:
            return None
        try:
            return checked_labels(self.labels)
        except UserInputError as exc:
            raise APIError(400, str(exc), param="labels") from None


class LoadLoraRequest(_Body):
    lora_name: str
    lora_path: str
    description: Optional[str] = None
    """loraplex: what the adapter does (how `auto` finds it); default: a line naming the directory."""
    task: Optional[str] = None
    """loraplex: the task it was trained on (its label set answers /v1/classify)."""


class UnloadLoraRequest(_Body):
    lora_name: str  # vLLM's lora_int_id is refused as an unknown field: loraplex has no adapter ids (sweep 27:
    # it was accepted and ignored, so an id that named nothing still removed the adapter `lora_name` names)


def _union_tag(part: Any) -> bool:
    """pydantic names the member of a Union it tried in the error's location (`str`, `list[str]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part)


def _where(err: dict[str, Any]) -> str | None:
    """An error's location as `messages.0.content`: the Union members pydantic names dropped, except the last
    part of an unknown field's location, which is the field's own name (`logit_bias[50256]`, `list`), and
    written with escapes where a part holds characters that would not show as themselves."""
    loc = list(err["loc"])
    keep_last = err["type"] == "extra_forbidden"
    parts = [p for i, p in enumerate(loc) if not _union_tag(p) or (keep_last and i == len(loc) - 1)]
    return ".".join(printable(clipped(p, 100)) for p in parts) or None



MAX_BODY = 32 << 20
"""Bytes a request body may have (2,048 inputs of a 512-token context take about 5 MB)."""
BODY_IDLE_S = 30.0
"""Seconds a request body may stall between two of its pieces before the request is dropped (408)."""
BODY_POLL_S = 0.5
"""How often a body still arriving looks at the clock and at the server's stop."""
BODY_TOTAL_S = 120.0
"""Seconds a whole request body may take (408 past them: a byte now and then held a connection for ever;
sweep 45). MAX_BODY in that time is 280 KB/s."""


async def read_body(request: Any, stopping: Any = None) -> bytes:
    """The request's body, read up to MAX_BODY bytes; past that a 413 (the rest is not read). A body that
    stalls BODY_IDLE_S or takes more than BODY_TOTAL_S in all is a 408; `stopping()` (the server's stop
    signalled: its 503, else None) ends a body still arriving at once (sweep 45: it held the stop's whole grace,
    then was cut with a plain-text 500)."""
    def too_large() -> APIError:
        return APIError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="request_too_large")

    if len(request.headers.getlist("content-type")) > 1:  # the first was read, the others dropped (sweep 56)
        raise APIError(400, "the request has more than one Content-Type header: send one, application/json")
    ctype = request.headers.get("content-type")
    if ctype is None:  # a browser sends a typeless body (a Blob) cross-site as a "simple" request, unasked
        raise APIError(415, "the request names no Content-Type: send the body as application/json (UTF-8)",
                       code="unsupported_media_type")
    # a browser's cross-site "simple" request is text/plain or a form: never JSON
    kind, _, params = ctype.partition(";")
    kind = kind.strip().lower()
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if not (kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))) \
            or charset not in ("utf-8", "utf8"):
        raise APIError(415, f"Content-Type {ctype.strip()[:100]!r} is not supported: send the body as "
                            "application/json (UTF-8)", code="unsupported_media_type")
    key = next(iter(request.query_params), None)
    if key is not None:  # openai's extra_query: options belong in the body
        raise APIError(400, f"query parameter {printable(key[:100])!r} is not supported: send options in the JSON body",
                       param=key[:100], code="unsupported")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large()
    from starlette.requests import ClientDisconnect

    import asyncio

    chunks, size = [], 0
    stream = request.stream()
    start = last = time.monotonic()
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            # one read awaited across the checks (a read cancelled by a timed wait would close the stream)
            done, _ = await asyncio.wait({pending}, timeout=BODY_POLL_S)
            now = time.monotonic()
            if now - start > BODY_TOTAL_S:
                raise APIError(408, f"the request body took more than {BODY_TOTAL_S:g} s to arrive",
                               code="request_timeout")
            if not done:  # a client that stops sending mid-body would hold its connection and handler for ever
                if stopping is not None and (err := stopping()) is not None:
                    raise err
                if now - last > BODY_IDLE_S:
                    raise APIError(408, f"the request body stopped arriving (nothing for {BODY_IDLE_S:g} s)",
                                   code="request_timeout")
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                break
            pending, last = None, now
            size += len(chunk)
            if size > MAX_BODY:
                raise too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection before its body was sent") from None
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
    return b"".join(chunks)


class _Twice(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose member names are each given once: `{"n": 2, "n": 1}` was read as its last value,
    so a refused field given first was dropped silently, and a proxy reading the first `model` saw another
    request than the one served (sweep 27)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Twice(key)
        out[key] = value
    return out


def parse(raw: bytes, model: type[BaseModel]) -> Any:
    """The body as `model`, or an APIError (400) naming what is wrong."""
    try:  # JSON is exchanged as UTF-8 (RFC 8259 8.1): never UTF-16
        data = json.loads((raw or b"").decode("utf-8"), object_pairs_hook=_once)
    except _Twice as exc:
        raise APIError(400, f"the request body names {exc.key[:80]!r} twice: give each field once",
                       param=exc.key[:80], code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if "int_max_str_digits" in str(exc) or "Exceeds the limit" in str(exc):
            raise APIError(400, "the request body holds a number of more than 4,300 digits",
                           code="invalid_value") from None
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if b"\\u" in raw:  # only an escape can make a lone surrogate (the raw bytes were valid UTF-8)
        at = lone_surrogate(data)
        if at is not None:
            where = ".".join(str(p) for p in at) or None
            raise APIError(400, f"{where or 'body'}: a lone UTF-16 surrogate escape is not Unicode text",
                           param=where, code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # a value that fits no member of a Union gets one error per member: the deepest says the most
        # (`messages.0.content.0.text: Field required`, not `messages.0.content: Input should be a valid string`)
        errs = exc.errors()
        err = max(errs, key=lambda e: (e["loc"][:1] == errs[0]["loc"][:1], len(e["loc"])))
        where = _where(err)
        raise APIError(400, f"{where or 'body'}: {err['msg']}", param=where, code="invalid_value") from None
