"""loraplex serve: the routed model behind an OpenAI-compatible HTTP server.

Modules:
- engine.py     the one seam into the rest of loraplex (registry, models, routers, heads): the slot
                bank (max_loras LoRA slots, LRU, adapters kept in host memory once read), router
                models, `auto`, classification, registering through the CLI's own command
- decode.py     batched generation with the KV cache, per-row sampling / stop / max_tokens (torch only)
- scheduler.py  the batching thread: gathers up to max_batch requests for max_wait_ms, runs them lane by
                lane (the slot bank, or one router's model) and streams events back to each request
- protocol.py   request bodies (pydantic, strict) and OpenAI's error body
- app.py        the FastAPI routes, the API key, metrics per request; backend.py (--backend forwarding);
                metrics.py (prometheus-client); server.py (uvicorn, Ctrl-C)

Why FastAPI + uvicorn and not LitServe: LitServe's dynamic batching hands `predict` a list of
requests from one endpoint and runs workers in separate processes fed through queues. Our batch is
heterogeneous across endpoints' shapes (named adapters, `auto`, the base and routers share lanes), its
rows leave at their own stop token and a client that disconnects must leave the running batch at
the next token; the worker is also where the slot bank's LRU lives. Those need the loop to be ours,
and FastAPI's StreamingResponse plus one batching thread gives it with no second process; LitServe
would add its process and queue layer around the same loop. /v1/models read from the registry on
every call, vLLM's load/unload bodies and OpenAI's error body are plain routes either way.

Why per-request batching for generation (not continuous batching): a gathered batch is prefilled
together and decoded with the KV cache; rows leave at their own end (their cache rows are dropped, so
the rest compute only for themselves) but new rows wait for the batch to end. Joining a running batch
needs the cache of rows of different lengths merged at every join (left-padding the cache or paged
attention); on CPU, with 32-token answers, a batch is a few seconds and the gain is the wait of a
request that arrives mid-batch. It is the next step (see the issue note).
"""
