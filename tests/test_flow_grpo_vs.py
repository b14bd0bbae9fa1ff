"""The flow_grpo speed benchmark (benchmarks/flow_grpo_vs): diffalign's side still loads as a GRPO config that mirrors
the shared workload, and the summary's ratio is the median over rounds of the two medians' quotient."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from diffalign.config import load_config
from diffalign.trainers.grpo import GRPOConfig, build_plan


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "flow_grpo_vs"


def _module(name: str):
    sys.path.insert(0, str(BENCH))  # the runners import common.py from their folder
    try:
        spec = importlib.util.spec_from_file_location(f"flow_grpo_vs_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_diffalign_config_mirrors_the_workload(tmp_path):
    runner = _module("run_diffalign")
    w = runner.WORKLOAD
    raw = runner.build_raw_config(str(tmp_path / "model"), 4, str(tmp_path / "out"), 0.04, "auto", False)
    config = load_config(GRPOConfig, raw)
    sampling, train = config.sampling, config.train
    # 2 groups of 8 images an epoch, sampled one group per call, trained in micro-batches of 8: flow_grpo's layout.
    assert sampling.prompts_per_epoch * sampling.images_per_prompt == 16
    assert sampling.batch_size == w["sample_batch_size"] == sampling.images_per_prompt
    assert train.batch_size == 8 and config.optim.gradient_accumulation_steps == 1
    # flow_grpo trains int(10 * 0.99) = 9 steps; the sde plan trains every step but the last: 9 of 10.
    plan = build_plan(sampling, "sde", epoch=0, seed=config.seed)
    assert len(plan.trained) == w["trained_steps"] == 9 and plan.num_steps == 10
    assert (config.model.lora.rank, config.model.lora.effective_alpha, config.model.lora.init) == (32, 64, "gaussian")
    assert config.model.lora.target_modules is None  # the SD3 default: flow_grpo's 8 projections
    assert config.model.max_sequence_length == 128 and sampling.negative_prompt == ""
    assert config.reward == {"jpeg_compressibility": pytest.approx(1 / 500)}
    assert (train.beta, train.kl_convention, train.cfg, sampling.guidance_scale) == (0.04, "flow_grpo", True, 4.5)
    assert train.cfg_uncond_grad is False  # flow_grpo detaches the unconditional branch in training
    assert (config.ema.enabled, config.ema.decay, config.ema.update_every) == (True, 0.9, 8)
    assert config.mixed_precision == "no"


def _result(folder: Path, lib: str, round_id: int, median: float, load: str) -> None:
    data = {"lib": lib, "epoch_s": [9.0, median, median], "median_after_warmup_s": median, "sample_s": [1.0, 0.5, 0.7]}
    (folder / f"{lib}_{round_id}.json").write_text(json.dumps(data))
    (folder / f"{lib}_{round_id}.load").write_text(load)


def test_summary_ratio_is_the_median_of_round_ratios(tmp_path):
    summarize = _module("summarize")
    for round_id, (theirs, ours) in enumerate([(10.0, 7.0), (8.0, 8.0), (12.0, 6.0)], start=1):
        _result(tmp_path, "flow_grpo", round_id, theirs, "1.5 1.2 1.0")
        _result(tmp_path, "diffalign", round_id, ours, "1.7 1.3 1.0")
    _result(tmp_path, "flow_grpo", 4, 5.0, "0.1 0.1 0.1")  # a round without diffalign's run is left out
    rows = summarize.rounds(tmp_path)
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    assert [row["ratio"] for row in rows] == pytest.approx([0.7, 1.0, 0.5])
    assert summarize.median_ratio(rows) == pytest.approx(0.7)
    assert rows[0]["flow_grpo"]["load"] == ["1.5", "1.2", "1.0"]
    assert rows[0]["diffalign"]["sample_median_s"] == pytest.approx(0.6)  # epochs after the first: 0.5 and 0.7
