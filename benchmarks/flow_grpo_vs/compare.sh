#!/usr/bin/env bash
# Alternate flow_grpo and diffalign ROUNDS times (one process each, flow_grpo first), record the load average before
# each run, then print the table (summarize.py). Run from the repository root after setup.sh:
#   benchmarks/flow_grpo_vs/compare.sh --flow-grpo /path/to/flow_grpo [--rounds 3] [--epochs 4] [--beta 0.04]
#       [--stack pinned|same] [--results DIR] [--model DIR] [--threads 2] [-- extra run_diffalign.py arguments]
# --stack same runs flow_grpo on diffalign's library versions (setup.sh's .venv/same-stack), not its pinned ones.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FLOW_GRPO="" ROUNDS=3 EPOCHS=4 BETA=0.04 THREADS=2
WORK=${WORK:-/tmp/flow_grpo_vs}
MODEL=$WORK/tiny-sd3 RESULTS=$WORK/results
STACK=pinned
DA_PY=${DA_PY:-.venv/bin/python}
while [ $# -gt 0 ]; do
  case $1 in
    --flow-grpo) FLOW_GRPO=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --beta) BETA=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --stack) STACK=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -n "$FLOW_GRPO" ] || { echo "--flow-grpo DIR (a flow_grpo checkout) is required" >&2; exit 2; }
case $STACK in
  pinned) FG_PY=${FG_PY:-$HERE/.venv/bin/python} ;;
  same) FG_PY=${FG_PY:-$HERE/.venv/same-stack/bin/python} ;;
  *) echo "--stack is pinned or same, got $STACK" >&2; exit 2 ;;
esac
[ -x "$FG_PY" ] && [ -d "$MODEL" ] || { echo "run benchmarks/flow_grpo_vs/setup.sh first" >&2; exit 2; }
mkdir -p "$RESULTS"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
for round in $(seq 1 "$ROUNDS"); do
  cut -d' ' -f1-3 /proc/loadavg > "$RESULTS/flow_grpo_$round.load"
  echo "round $round flow_grpo: $(uptime)"
  "$FG_PY" "$HERE/run_flow_grpo.py" --flow-grpo "$FLOW_GRPO" --model "$MODEL" --epochs "$EPOCHS" \
    --threads "$THREADS" --beta "$BETA" --out "$RESULTS/flow_grpo_$round.json" \
    2>"$RESULTS/flow_grpo_$round.log" | grep '^flow_grpo epoch'
  cut -d' ' -f1-3 /proc/loadavg > "$RESULTS/diffalign_$round.load"
  echo "round $round diffalign: $(uptime)"
  "$DA_PY" "$HERE/run_diffalign.py" --model "$MODEL" --epochs "$EPOCHS" --threads "$THREADS" --beta "$BETA" \
    --out "$RESULTS/diffalign_$round.json" "$@" 2>"$RESULTS/diffalign_$round.log" | grep '^diffalign epoch'
done
echo "done: $(uptime)"
"$DA_PY" "$HERE/summarize.py" "$RESULTS"
