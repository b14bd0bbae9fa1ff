#!/usr/bin/env bash
# Alternate the sides ROUNDS times (TRL first, then diffalign), one process each, recording the load average.
# COMPILE=default (or max-autotune-no-cudagraphs) adds a third run per round: diffalign with model.compile.
# Usage: benchmarks/ddpo_vs_trl/compare.sh [ROUNDS] [EPOCHS]   (from the repo root; see README.md)
set -euo pipefail
ROUNDS=${1:-3}
EPOCHS=${2:-4}
MODEL=${MODEL:-/tmp/trl021/tiny-sd15}
TRL_PY=${TRL_PY:-/tmp/trl021/.venv/bin/python}
DA_PY=${DA_PY:-.venv/bin/python}
RESULTS=${RESULTS:-/tmp/trl021/results}
THREADS=${THREADS:-2}
COMPILE=${COMPILE:-}
mkdir -p "$RESULTS"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round trl: $(uptime)"
  "$TRL_PY" benchmarks/ddpo_vs_trl/run_trl.py --model "$MODEL" --epochs "$EPOCHS" --threads "$THREADS" \
    --out "$RESULTS/trl_$round.json" 2>/dev/null | grep '^trl epoch'
  echo "round $round diffalign: $(uptime)"
  "$DA_PY" benchmarks/ddpo_vs_trl/run_diffalign.py --model "$MODEL" --epochs "$EPOCHS" --threads "$THREADS" \
    --out "$RESULTS/diffalign_$round.json" 2>/dev/null | grep '^diffalign epoch'
  if [[ -n "$COMPILE" ]]; then
    echo "round $round diffalign --compile $COMPILE: $(uptime)"
    "$DA_PY" benchmarks/ddpo_vs_trl/run_diffalign.py --model "$MODEL" --epochs "$EPOCHS" --threads "$THREADS" \
      --compile "$COMPILE" --out "$RESULTS/diffalign_compile_$round.json" 2>/dev/null | grep '^diffalign epoch'
  fi
done
echo "done: $(uptime)"
