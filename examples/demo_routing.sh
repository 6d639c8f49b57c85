#!/usr/bin/env bash
# Routing demo, run after examples/demo.sh: $LORAPLEX_HOME already holds the minilm adapters
# airline-lora, apple-lora and bbc-lora. It routes by retrieval (no training), fits a MeteoRA
# token-gate router over the three adapters, answers a few queries (one joins two tasks in one
# prompt) with the trace of which adapter took each token, and prints the routing accuracy.
# A few minutes on 2 CPU cores.
set -euo pipefail
: "${LORAPLEX_HOME:?set LORAPLEX_HOME to the registry examples/demo.sh filled}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LORAPLEX=${LORAPLEX:-loraplex}
ADAPTERS=airline-lora,apple-lora,bbc-lora
ROUTER=${DEMO_ROUTER:-demo-token-gate}

for a in ${ADAPTERS//,/ }; do
  if ! $LORAPLEX adapters show "$a" --json > /dev/null 2>&1; then
    echo "adapter $a is not in $LORAPLEX_HOME: run examples/demo.sh first" >&2
    exit 1
  fi
done

echo "== 1. retrieval routing: nearest adapter by signature, nothing trained =="
$LORAPLEX query "my flight was delayed three hours and nobody at the gate could tell us why" \
  --router retrieval --adapters "$ADAPTERS"

echo
echo "== 2. fit a MeteoRA token-gate router over $ADAPTERS (adapters frozen, gates trained) =="
if $LORAPLEX router show "$ROUTER" --json > /dev/null 2>&1; then
  $LORAPLEX router remove "$ROUTER"   # a rerun fits it again
fi
$LORAPLEX router fit "$ROUTER" --router token-gate --adapters "$ADAPTERS" \
  --steps "${DEMO_ROUTER_STEPS:-100}" --train-limit 600 --val-limit 60 --eval-limit 60

echo
echo "== 3. a handful of queries, batched from stdin =="
$LORAPLEX query --router "$ROUTER" <<'QUERIES'
@united thanks for the upgrade, the crew on my flight to Denver was wonderful
@AmericanAir lost my bag again and nobody answers the phone
the new iPhone battery dies before lunch, really disappointed with @apple
Apple shares rose after the company reported record iPhone sales
The chancellor's budget promised lower taxes for small businesses ahead of the election
QUERIES

echo
echo "== 4. one prompt joining two tasks: the trace shows each part routed to its own adapter =="
$LORAPLEX query "my flight was cancelled and the airline lost my luggage. Shares of Apple fell after the iPhone launch." \
  --router "$ROUTER" --trace

echo
echo "== 5. routing accuracy on held-out examples, next to each adapter alone =="
$LORAPLEX router eval "$ROUTER" --limit 100
