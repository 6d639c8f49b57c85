"""loraplex serve: the routed model behind an OpenAI-compatible HTTP server.

Modules:
- engine.py     the main seam into the rest of loraplex (registry, models, routers, heads): router
                models, `auto`, generation steps, registering (registry.adapters.register_peft)
- classify.py   classification on the engine's models (rows of every request in shared forwards); it
                also imports router.model.labels_task and experts.layers.use_gates directly
- targets.py    Target, Route, Events and a route's summary: the data engine, scheduler and routes share
- gathered.py   concurrent calls gathered into one (`auto`'s embedding pass and search)
- slots.py      the slot bank (max_loras LoRA slots, LRU, adapters kept in host memory once read); it
                touches only experts.layers and experts.spec and gets adapters from the engine
- decode.py     continuous batching with the KV cache, per-row sampling / stop / max_tokens (torch only)
- scheduler.py  the batching thread: gathers requests (max_batch, max_wait_ms), runs classification at
                once and lets generation join the running batch of its lane (the slot bank, or one
                router's model), streaming events back to each request
- protocol.py   request bodies (pydantic, strict) and OpenAI's error body
- app.py        the FastAPI routes (one function per route group), the API key, metrics per request; backend.py (--backend forwarding);
                metrics.py (prometheus-client); server.py (uvicorn, Ctrl-C)

Why FastAPI + uvicorn and not LitServe: LitServe's dynamic batching hands `predict` a list of
requests from one endpoint and runs workers in separate processes fed through queues. Our batch is
heterogeneous across endpoints' shapes (named adapters, `auto`, the base and routers share lanes), its
rows join and leave a running generation at token granularity, a client that disconnects must
leave it at the next token; the worker is also where the slot bank's LRU lives. Those need the loop to be ours,
and FastAPI's StreamingResponse plus one batching thread gives it with no second process; LitServe
would add its process and queue layer around the same loop. /v1/models read from the registry on
every call, vLLM's load/unload bodies and OpenAI's error body are plain routes either way.

Generation is continuously batched: requests join their lane's running batch between two decode
steps (prefilled together, their KV cache rows merged into the running cache, each row keeping its own
positions, the padding that aligns them masked out and trimmed once no row needs it) and leave at their
own end. Where a model's cache is not transformers' DynamicCache of plain layers (sliding windows,
other cache classes), rows wait for the running batch to end instead (per-request batching).
"""
