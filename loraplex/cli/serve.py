"""`loraplex serve`: the routed model behind an OpenAI-compatible HTTP server (loraplex.serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from loraplex.cli._options import Base, Home, parse_sets, settings


def serve(
    base: Base = None,
    router: Annotated[Optional[str], typer.Option("--router", help="A stored router to load at start (its base is served).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LORAPLEX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.", show_default=False)] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests gathered into one batch at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="How long a batch waits for more requests (at most 10,000).")] = 10.0,
    max_loras: Annotated[int, typer.Option("--max-loras", help="Adapters resident at once (the rest load on demand, LRU).")] = 16,
    host_loras: Annotated[int, typer.Option("--host-loras", help="Adapters kept in host memory once read (LRU).")] = 256,
    backend: Annotated[Optional[str], typer.Option("--backend", help="An OpenAI-compatible server that generates; loraplex chooses the adapter.")] = None,
    backend_key: Annotated[Optional[str], typer.Option("--backend-api-key", envvar="LORAPLEX_BACKEND_API_KEY", help="Sent to the --backend server as 'Authorization: Bearer KEY' (loraplex's own --api-key never is).", show_default=False)] = None,
    lora_updates: Annotated[bool, typer.Option("--lora-updates/--no-lora-updates", help="Allow /v1/load_lora_adapter and /v1/unload_lora_adapter to change the registry (vLLM keeps them behind VLLM_ALLOW_RUNTIME_LORA_UPDATING), and `auto` to register the adapters it generates (off: it routes those requests).")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="An option of `auto` KEY=VALUE (repeatable), e.g. route_threshold=0.4.")] = None,
    home: Home = None,
) -> None:
    """Serve the base, its adapters, its routers and `auto` over an OpenAI-compatible HTTP API."""
    import os

    from loraplex.serve.server import run

    if api_key is None and "LORAPLEX_API_KEY" in os.environ:  # set but empty reads as unset: an open server
        api_key = os.environ["LORAPLEX_API_KEY"]  # refused by the key's one check, as `--api-key ""` is
    if backend_key is None and "LORAPLEX_BACKEND_API_KEY" in os.environ:
        backend_key = os.environ["LORAPLEX_BACKEND_API_KEY"]

    run(settings(home), host=host, port=port, base=base, router=router, max_batch=max_batch,
        max_wait_ms=max_wait_ms, max_loras=max_loras, host_loras=host_loras, api_key=api_key, backend=backend,
        backend_key=backend_key,
        lora_updates=lora_updates, auto=parse_sets(set_) or None)
