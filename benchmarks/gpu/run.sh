#!/usr/bin/env bash
# GPU benchmark of issue 21 (item 7): SD3.5-Medium and FLUX.1-dev at full size with random weights, bf16, one GPU.
# One sampling pass and one GRPO step per model through diffalign's rollout and trainer: seconds, peak GB, MFU.
# Target: under 8 minutes on one H100 80 GB. See benchmarks/gpu/README.md.
#
#   benchmarks/gpu/run.sh                                  # both models, JSON to runs/gpu_bench/results.json
#   benchmarks/gpu/run.sh --out "$OUT/gpu_bench.json"      # anything after run.sh goes to bench.py
#   benchmarks/gpu/run.sh --models flux --peak-tflops 989.4
#
# The Python that runs it: $PYTHON, else .venv/bin/python, else python3; it needs torch with CUDA, diffusers,
# transformers, accelerate and peft (`pip install -e .` of this repository). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1
# Sampling and re-scoring change tensor shapes from call to call: expandable segments keep the caching allocator
# from fragmenting (it changes what is reserved, not max_memory_allocated, which is what the table reports).
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

exec "$PYTHON" benchmarks/gpu/bench.py "$@"
