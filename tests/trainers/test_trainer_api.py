"""What every trainer shares at its surface: a reward passed as an object or function, evaluation defaults."""

from types import SimpleNamespace

import pytest
import torch

from diffalign.adapters import load_adapter
from diffalign.config import EvalConfig, load_config
from diffalign.eval.evaluator import Evaluator
from diffalign.testing import redness
from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer


def grpo_config(folder, output_dir, **extra):
    raw = {
        "model": {"path": str(folder), "lora": {"rank": 4}},
        "reward": "jpeg_compressibility",  # what the trainer must NOT use when given a reward
        "output_dir": str(output_dir),
        "seed": 0,
        "max_steps": 1,
        "logging": {"log_with": "none"},
        "checkpoint": {"every": 0},
        "sampling": {
            "prompts": ["a red circle", "a blue square"],
            "num_steps": 3,
            "images_per_prompt": 2,
            "prompts_per_epoch": 2,
            "batch_size": 4,
            "guidance_scale": 2.0,
            "resolution": 32,
        },
        "train": {"batch_size": 4},
        **extra,
    }
    return load_config(GRPOConfig, raw)


def test_grpo_trains_on_a_reward_function_passed_directly(tiny_pipeline_dir, tmp_path):
    calls: list[torch.Tensor] = []

    def my_reward(images, prompts):
        scores = redness(images)
        calls.append(scores.detach().clone())
        return scores

    config = grpo_config(tiny_pipeline_dir("sd3"), tmp_path)
    trainer = GRPOTrainer(config, reward=my_reward)
    metrics = trainer.train()
    scored = torch.cat(calls)
    assert scored.shape == (4,)  # the epoch's 2 prompts x 2 images, scored by the function, nothing else
    assert metrics["reward_mean"] == pytest.approx(scored.mean().item(), rel=1e-5)
    assert metrics[f"reward/{trainer.reward.name}"] == pytest.approx(scored.mean().item(), rel=1e-5)


def test_evaluation_defaults_follow_the_sampler_or_else_the_family(tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir("sd3"))
    evaluation = EvalConfig(every=1, prompts=["a red circle"])
    reward = object()
    # An offline trainer (no sampling group, e.g. Diffusion-DPO): the family's steps and CFG, not 1.0.
    offline = Evaluator.from_config(SimpleNamespace(eval=evaluation), adapter, reward, tmp_path)
    assert (offline.num_steps, offline.guidance_scale) == (adapter.default_num_steps, adapter.default_guidance_scale)
    assert offline.guidance_scale == 4.5 and offline.num_steps == 28
    # A sampling trainer: its training sampler's settings.
    sampling = SimpleNamespace(num_steps=7, guidance_scale=3.0)
    online = Evaluator.from_config(SimpleNamespace(eval=evaluation, sampling=sampling), adapter, reward, tmp_path)
    assert (online.num_steps, online.guidance_scale) == (7, 3.0)
    # Set values win.
    explicit = EvalConfig(every=1, prompts=["a red circle"], num_steps=5, guidance_scale=1.5)
    chosen = Evaluator.from_config(SimpleNamespace(eval=explicit, sampling=sampling), adapter, reward, tmp_path)
    assert (chosen.num_steps, chosen.guidance_scale) == (5, 1.5)
