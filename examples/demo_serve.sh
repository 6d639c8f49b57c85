#!/usr/bin/env bash
# Serving demo, run at the end of examples/demo.sh: starts `loraplex serve` on the demo registry (the
# minilm adapters), asks it three questions through the `openai` client with model="auto" (per question:
# route to the registered adapters, generate one, or fall back to the base), prints each answer and the adapter it went
# to, and stops the server with Ctrl-C (SIGINT). About half a minute on 2 CPU cores.
set -euo pipefail
: "${LORAPLEX_HOME:?set LORAPLEX_HOME to the registry examples/demo.sh filled}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LORAPLEX=${LORAPLEX:-loraplex}
PY=${PYTHON:-python}
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

$LORAPLEX serve --base minilm --port "$PORT" &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

$PY - "$PORT" <<'PYEOF'
import sys, time
import httpx
import openai
from openai import OpenAI

url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):  # the server loads its models first
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.2)
client = OpenAI(base_url=url + "/v1", api_key="unused")
print("models:", ", ".join(m.id for m in client.models.list().data))
for q in ("my flight was delayed for three hours and they lost my bag",
          "the new iphone battery dies before lunch",
          "the prime minister called an early election"):
    try:
        r = client.post("/classify", body={"model": "auto", "input": q}, cast_to=object)
    except openai.BadRequestError as exc:  # auto passed it to the bare base, which has no label set
        print(f"Q: {q}\n   no answer: {exc.body['message'] if isinstance(exc.body, dict) else exc}")
        continue
    item, routing = r["data"][0], r["routing"]["inputs"][0]
    route = routing["adapters"][0]
    print(f"Q: {q}\n   answer: {item['label']} (task {item['task']}), adapter {route['name']} "
          f"({route['weight']:.2f}); {routing['decision']}: {routing['reason']}")
PYEOF

kill -INT $SERVER
wait $SERVER
trap - EXIT
echo "the server stopped (Ctrl-C)"
