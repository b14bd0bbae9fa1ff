"""examples/custom_reward.py runs end to end and prints what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # an example subprocess

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_reward.py"


def test_custom_reward_example_runs():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "custom_reward.py:saturation: [" in out
    assert "total: [" in out and "jpeg_compressibility: [" in out
    assert "combined differentiable: False" in out
    assert "[0, 255] images: reward" in out and "rank 4" in out
    before = [float(x) for x in out.split("custom_reward.py:saturation: [", 1)[1].split("]", 1)[0].split(",")]
    after = [float(x) for x in out.split("after one ascent step: [", 1)[1].split("]", 1)[0].split(",")]
    assert all(a > b for a, b in zip(after, before)), "gradient ascent on saturation should raise it"
