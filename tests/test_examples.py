"""examples/python_api.py, make_grid.py and train_from_yaml.sh run end to end on tiny pipelines (subprocesses with
this interpreter), and the shipped tiny config parses."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffalign.config import load_config
from diffalign.trainers.grpo import GRPOConfig


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _run(command: list[str], tmp_path: Path, **env: str) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error", **env}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment, check=False
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_python_api(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, str(EXAMPLES / "python_api.py"), "--epochs", "1", "--steps", "2"]
    out = _run([*command, "--output-dir", str(run)], tmp_path)
    assert "trained 1 epochs" in out
    assert re.search(r"redness before: -?\d\.\d{4}  after: -?\d\.\d{4}  gain: [+-]\d\.\d{4}", out), out
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    payload = json.loads((run / "before_after.json").read_text())
    assert payload["columns"] == ["base", "run"] and len(payload["records"]) == 4 * 2 * 2


@pytest.mark.slow
def test_make_grid(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "grid.png"
    command = [sys.executable, str(EXAMPLES / "make_grid.py"), "--model", str(tiny_pipeline_dir("sd15"))]
    command += ["--prompt", "a red circle", "--prompt", "a cat", "--seeds", "0", "--steps", "2", "--cell-size", "96"]
    command += ["--out", str(out)]
    printed = _run(command, tmp_path)
    # 240 px of row labels + 1 column x 96 px; a 14 px header + 2 rows x (96 px + a 14 px caption line)
    assert Image.open(out).size == (240 + 96, 14 + 2 * (96 + 14))
    assert f"grid {out}: 336x234" in printed
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    assert [r["prompt"] for r in records] == ["a red circle", "a cat"] and "redness" in records[0]["scores"]


@pytest.mark.slow
def test_train_from_yaml(tmp_path):
    work = tmp_path / "work"
    out = _run(
        ["bash", str(EXAMPLES / "train_from_yaml.sh"), str(work), "max_steps=1", "sampling.num_steps=2"],
        tmp_path,
        PYTHON=sys.executable,
    )
    assert "trained grpo for 1 steps" in out and "trained grpo for 2 steps" in out
    checkpoints = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert (work / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_tiny_config_parses():
    config = load_config(GRPOConfig, REPO / "configs" / "grpo" / "tiny_cpu.yaml", ["model.path=/somewhere"])
    assert config.method == "grpo" and config.model.path == "/somewhere" and config.sampling.resolution == 32
