#!/usr/bin/env bash
# flow_grpo's virtual environments and the tiny SD3 folder both sides load. Run from the repository root after
# diffalign's own .venv exists:
#   benchmarks/flow_grpo_vs/setup.sh            # WORK=/tmp/flow_grpo_vs by default (the model goes there)
# Two environments for flow_grpo, both git-ignored (the repository ignores every .venv/):
#   benchmarks/flow_grpo_vs/.venv             flow_grpo's pinned diffusers 0.33.1 / transformers 4.40.0 / peft
#                                             0.10.0 / accelerate 1.4.0 on torch 2.14.1 (what a flow_grpo user runs)
#   benchmarks/flow_grpo_vs/.venv/same-stack  diffalign's own .venv packages (a .pth file) + ml_collections and
#                                             wandb: the same libraries on both sides, only the training code differs
# Nothing of flow_grpo is installed from its checkout: the runner puts the checkout on sys.path instead, because its
# setup.py pins torch 2.6 and CUDA-only packages (deepspeed, bitsandbytes, xformers) that the script does not need.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-$HERE/.venv}
WORK=${WORK:-/tmp/flow_grpo_vs}
PYTHON=${PYTHON:-python3}
DA_PY=${DA_PY:-.venv/bin/python}

# flow_grpo's config/grpo.py imports `imp`, which Python 3.12 removed.
"$PYTHON" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 12) else 1)' || {
  echo "flow_grpo needs Python 3.10 or 3.11 (its config imports 'imp'); set PYTHON=python3.11" >&2; exit 1; }
mkdir -p "$WORK"
"$PYTHON" -m venv "$VENV"
# torch 2.14.1 is the wheel diffalign's venv uses (flow_grpo pins 2.6.0); diffusers, transformers, accelerate and
# peft are flow_grpo's setup.py pins; the rest are what its train_sd3.py imports (ml_collections, absl-py, wandb),
# at the versions this was measured with.
"$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1 diffusers==0.33.1 transformers==4.40.0 \
  tokenizers==0.19.1 accelerate==1.4.0 peft==0.10.0 huggingface_hub==0.36.2 ml_collections==1.1.0 \
  absl-py==2.5.1 wandb==0.31.0 tqdm pillow
"$VENV/bin/pip" freeze > "$WORK/flow_grpo_venv_freeze.txt"

SAME=${SAME:-$VENV/same-stack}
"$PYTHON" -m venv "$SAME"
SITE=$("$SAME/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DA_SITE=$("$DA_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DA_SITE" > "$SITE/diffalign_venv.pth"  # after the venv's own site-packages on sys.path
"$SAME/bin/pip" install ml_collections==1.1.0 wandb==0.31.0

# The shared model: diffalign's tiny SD3 pipeline with the trained shapes VAE (4 latent channels; a random VAE
# decodes every latent to nearly the same image, the JPEG rewards of a group would tie and flow_grpo's filter would
# drop every sample), random transformer and text encoders.
"$DA_PY" -c "from diffalign.testing import save_tiny_pipeline as save
save('sd3', '$WORK/tiny-sd3', vae='shapes')"
# transformers 4.40's CLIPTokenizer needs vocab.json and merges.txt, and its tokenizers 0.19 cannot read the newer
# tokenizer.json: write both from tokenizer.json's BPE model (same token ids; diffalign keeps using tokenizer.json).
"$PYTHON" - "$WORK/tiny-sd3" <<'PY'
import json, sys
root = sys.argv[1]
for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
    model = json.load(open(f"{root}/{sub}/tokenizer.json", encoding="utf-8"))["model"]
    with open(f"{root}/{sub}/vocab.json", "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(f"{root}/{sub}/merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines((" ".join(m) if isinstance(m, list) else m) + "\n" for m in model["merges"])
PY
echo "flow_grpo venvs: $VENV (pinned), $SAME (diffalign's libraries); model: $WORK/tiny-sd3"
