#!/usr/bin/env bash
# Continual-learning demo: a short stream on minilm (O-LoRA + replay over three embedded tasks, then a
# GS-LoRA forgetting request), printing the accuracy matrix as it grows and AA / BWT / FWT / forgetting
# at the end. Uses $LORAPLEX_HOME (set by examples/demo.sh); a few minutes on 2 CPU cores.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: "${LORAPLEX_HOME:=$here/../.demo/home}"
export LORAPLEX_HOME
out="$LORAPLEX_HOME/runs/continual-demo-$(date +%Y%m%d-%H%M%S)"

echo "== continual: learn airline, bbc, apple with O-LoRA + replay, then forget bbc (GS-LoRA) =="
loraplex stream run "$here/streams/demo.yaml" --out "$out"
echo
echo "== the run directory: spec, matrix.json, metrics.json, heatmap.png, Lightning logs and checkpoints =="
ls "$out"
echo
echo "== lineage of the forgetting adapter =="
loraplex adapters list | grep -E "forget|origin|demo-" || true
