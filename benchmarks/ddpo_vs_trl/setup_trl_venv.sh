#!/usr/bin/env bash
# The TRL 0.21 side's virtual environment (outside the repo) and the shared tiny model, exactly as used for README.md.
set -euo pipefail
ROOT=${ROOT:-/tmp/trl021}
mkdir -p "$ROOT"
python3 -m venv "$ROOT/.venv"
"$ROOT/.venv/bin/pip" install --upgrade pip
# torch 2.14.1 is the same wheel as diffalign's venv; the rest are the releases current when trl 0.21 shipped
# (trl 0.21 needs transformers>=4.55, accelerate>=1.4; DDPO's extras: diffusers, peft).
# REUSE_TORCH=1: link diffalign's installed torch (the very same files) instead of installing the torch wheel again;
# only torch's own packages are linked, everything else (pip also adds torch's declared dependencies) is installed here.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
if [[ "${REUSE_TORCH:-0}" == 1 ]]; then
  SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$ROOT/torch-site"
  for name in torch torchgen functorch torchvision torchvision.libs nvidia triton \
    torch-2.14.1.dist-info torchvision-0.29.1.dist-info triton-*.dist-info; do
    for path in "$SITE"/$name; do ln -sfn "$path" "$ROOT/torch-site/"; done
  done
  OWN_SITE=$("$ROOT/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$ROOT/torch-site" > "$OWN_SITE/diffalign_torch.pth"
  TORCH_PINS=(sympy networkx jinja2 fsspec filelock typing_extensions)  # torch's own dependencies
fi
"$ROOT/.venv/bin/pip" install "${TORCH_PINS[@]}" "trl==0.21.*" "transformers==4.55.*" \
  "diffusers==0.35.*" "peft==0.17.*" "accelerate==1.10.*" datasets
"$ROOT/.venv/bin/pip" freeze > "$ROOT/freeze.txt"

# The shared model: diffalign's tiny SD1.5-style pipeline (random weights, DDIM scheduler, real CLIP tokenizer).
.venv/bin/python -c "from diffalign.testing import save_tiny_pipeline; save_tiny_pipeline('sd15', '$ROOT/tiny-sd15')"
# transformers 4.55's slow CLIPTokenizer needs vocab.json + merges.txt (the folder only has tokenizer.json; without
# them loading fails asking for protobuf). Derive them from tokenizer.json; diffalign's loader is unaffected.
"$ROOT/.venv/bin/python" - "$ROOT" <<'PY'
import shutil, sys, tempfile
from transformers import CLIPTokenizerFast
root = sys.argv[1]
tmp = tempfile.mkdtemp()
CLIPTokenizerFast.from_pretrained(f"{root}/tiny-sd15/tokenizer").save_pretrained(tmp, legacy_format=True)
for name in ("vocab.json", "merges.txt"):
    shutil.copy(f"{tmp}/{name}", f"{root}/tiny-sd15/tokenizer/{name}")
PY
