#!/usr/bin/env bash
# The loraplex demo (`make demo`): train adapters for three embedded tasks on the embedded MiniLM,
# register them, show and search the registry, and compare each adapter with the bare base.
# Then the later parts (routing, continual learning, generators, serving) run from their own scripts.
# About 10 minutes on 2 CPU cores (all parts). Uses its own registry under .demo/ (removed and rebuilt each run).
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORAPLEX_HOME="${LORAPLEX_DEMO_HOME:-$PWD/.demo/home}"
STEPS="${LORAPLEX_DEMO_STEPS:-80}"
rm -rf "$LORAPLEX_HOME"
mkdir -p "$LORAPLEX_HOME"

if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi  # bold on a terminal only, not in a log
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }

step "The embedded tasks and base models"
loraplex tasks list
loraplex models list

for task in airline apple bbc; do
  step "Training a rank-8 LoRA on '$task' ($STEPS steps, Lightning)"
  loraplex train "$task" --name "$task-lora" --base minilm --rank 8 --steps "$STEPS"
done

step "The registry"
loraplex adapters list
loraplex adapters show airline-lora

step "Searching the registry by description"
loraplex adapters search "customers complaining about delayed flights and lost bags" -k 3
loraplex adapters search "which news section does this article belong to" -k 3

step "Each adapter against the bare base on its own task's test set"
for task in airline apple bbc; do
  loraplex eval "$task-lora" --task "$task" --vs-base
done

step "Export to PEFT's format and check the registry"
loraplex adapters export airline-lora "$LORAPLEX_HOME/../exported/airline-lora" --overwrite
ls -l "$LORAPLEX_HOME/../exported/airline-lora"
loraplex adapters graph
loraplex registry check

for part in routing continual generators serve; do
  script="examples/demo_${part}.sh"
  if [ -f "$script" ]; then
    bash "$script"
  fi
done

step "Done. The demo registry is in $LORAPLEX_HOME"
