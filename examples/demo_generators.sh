#!/usr/bin/env bash
# Generators demo (runs after examples/demo.sh): fit SG-LoRA on the registered minilm adapters, then write
# an adapter for a task the demo held out (driverless cars) from its description alone, and compare its
# accuracy with the bare base and with the nearest registered adapter. Ends with an honest refusal.
#
#   LORAPLEX_HOME=... bash examples/demo_generators.sh
#
# Needs the adapters airline-lora, apple-lora and bbc-lora (minilm) that the foundation demo registers;
# any that are missing are trained briefly first. A few minutes on 2 CPU cores.
set -euo pipefail
: "${LORAPLEX_HOME:?set LORAPLEX_HOME to the demo registry}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

HELD_OUT=driverless
GEN=demo-sg
NEW=driverless-generated

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
json_get() { python -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

for t in airline apple bbc; do
  if ! loraplex adapters show "$t-lora" --json >/dev/null 2>&1; then
    step "training a short $t-lora (missing from the registry)"
    loraplex train "$t" --name "$t-lora" --steps 60 --quiet
  fi
done
# A second run of the demo starts clean (only this demo's own records).
loraplex adapters remove "$NEW" >/dev/null 2>&1 || true
loraplex generate remove "$GEN" >/dev/null 2>&1 || true

DESC=$(loraplex tasks list --json | json_get "next(t['description'] for t in d if t['name'] == '$HELD_OUT')")
step "held-out task: $HELD_OUT (no adapter trained on it, no data of it used)"
echo "description: $DESC"

step "the nearest registered adapter by description (what retrieval would pick)"
loraplex adapters search "$DESC" -k 3
NEAREST=$(loraplex adapters search "$DESC" -k 1 --json | json_get "d[0]['name']")

step "fit SG-LoRA on the registered adapters and their training snapshots"
loraplex generate fit "$GEN" --method sg-lora --adapters airline-lora,apple-lora,bbc-lora

step "generate an adapter for $HELD_OUT from its description"
loraplex generate adapter "$DESC" --generator "$GEN" --name "$NEW"
loraplex adapters show "$NEW"

step "accuracy on the $HELD_OUT test split"
ACC="f\"{d['accuracy']:.3f} ({d['correct']}/{d['n']})\""
BASE=$(loraplex eval --task "$HELD_OUT" --base minilm --json | json_get "$ACC")
NEAR=$(loraplex eval "$NEAREST" --task "$HELD_OUT" --json | json_get "$ACC")
GENACC=$(loraplex eval "$NEW" --task "$HELD_OUT" --json | json_get "$ACC")
printf '%-44s %s\n' "bare base (minilm)" "$BASE" "nearest registered adapter ($NEAREST)" "$NEAR" \
  "generated from the description ($NEW)" "$GENACC"

step "a description far from every known task is refused, not answered with a random adapter"
loraplex generate adapter "Translate German legal contracts into Japanese." --generator "$GEN" --name nonsense-lora \
  || echo "(refused as expected; nothing was registered)"
loraplex registry check
