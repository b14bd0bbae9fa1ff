#!/usr/bin/env bash
# Parity of our scorers against the reference packages at full architecture size, random weights, fp32, CPU.
#
#   [PARITY_WORK=DIR] bash benchmarks/parity/run.sh [SCORER ...]     (default: hpsv2 aesthetic pickscore imagereward)
#
# 1. builds benchmarks/parity/.venv (once) with the reference packages (requirements.txt + hpsv2 1.1.0,
#    image-reward 1.5, openai-clip 1.0.1 without their dependency pins);
# 2. writes random full-size weights in the published formats and the test images (project venv, writers.py);
# 3. per scorer, one at a time: reference.py in the reference venv, ours.py in the project venv;
# 4. compare.py prints the table (exit 1 if a 224x224 row is above 1e-3).
# Needs ~10 GB of disk under PARITY_WORK (default ~/.cache/diffalign-parity, outside the repository); each step holds
# one full-size model in fp32 (ViT-H/14: ~4 GB), so the scorers run one at a time.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WORK="$(realpath -m "${PARITY_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/diffalign-parity}")"
if [[ $# -gt 0 ]]; then SCORERS=("$@"); else SCORERS=(hpsv2 aesthetic pickscore imagereward); fi
OURS_PY="${OURS_PY:-$ROOT/.venv/bin/python}"
REF_VENV="$HERE/.venv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore

if [[ ! -x "$REF_VENV/bin/python" ]]; then
  python3.11 -m venv "$REF_VENV"
  "$REF_VENV/bin/pip" install -q -r "$HERE/requirements.txt"
  "$REF_VENV/bin/pip" install -q --no-deps hpsv2==1.1.0 image-reward==1.5 openai-clip==1.0.1
fi
mkdir -p "$WORK/cwd"
for name in "${SCORERS[@]}"; do
  if [[ ! -f "$WORK/$name.written" ]]; then
    "$OURS_PY" "$HERE/writers.py" "$WORK" "$name" && touch "$WORK/$name.written"
  fi
  # hpsv2's modules create ./datasets etc. in the working directory: run the references in a scratch folder.
  (cd "$WORK/cwd" && "$REF_VENV/bin/python" "$HERE/reference.py" "$name" "$WORK" "$WORK/$name.reference.json")
  (cd "$ROOT" && "$OURS_PY" "$HERE/ours.py" "$name" "$WORK" "$WORK/$name.ours.json")
done
"$OURS_PY" "$HERE/compare.py" "$WORK" "${SCORERS[@]}"
