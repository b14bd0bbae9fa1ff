"""`diffalign demo` end to end on a stand-in model (the shipped model is exercised by the learning benchmark)."""

import json

import pytest
from PIL import Image

from diffalign.cli import main as cli_main
from diffalign.config import load_config
from diffalign.seeding import USER_SEED_LIMIT, is_user_seed
from diffalign.shapes.demo import (
    BASE_MODEL,
    DECAY_FROM_MINUTES,
    EVAL_SEEDS,
    compositional,
    demo_config,
    demo_prompts,
    format_summary,
    run_demo,
)
from diffalign.shapes.scenes import heldout_prompts, parse_caption
from diffalign.trainers.grpo import GRPOConfig, epoch_image_seeds


def test_demo_trains_on_held_out_compositions_and_keeps_an_unseen_set():
    aligned, unseen = demo_prompts(8, 32)
    assert len(aligned) == 8 and len(unseen) == 32 and not set(aligned) & set(unseen)
    assert set(aligned + unseen) <= set(heldout_prompts())
    assert all(parse_caption(p).kind != "single" for p in aligned + unseen)
    assert demo_prompts() == (aligned, unseen)  # a fixed draw, the default sizes


def test_demo_config_is_a_valid_grpo_config(tmp_path):
    raw = demo_config(BASE_MODEL, tmp_path / "out", 1.0, 0, ["a red circle above a blue square"])
    config = load_config(GRPOConfig, raw)
    assert config.sampling.prompts == ["a red circle above a blue square"]
    assert config.reward == "shapes" and config.max_minutes == 1.0
    # SDE on the first two steps, with one initial noise per group (the module docstring says why).
    assert config.sampling.same_noise_per_prompt and config.sampling.window_range == (0, 2)
    assert config.sampling.window_size == 2
    assert config.sampling.lora_in_window_only  # the base model takes the steps after the window
    assert config.optim.lr_scheduler == "constant"  # a 1-minute budget ends before the constant-lr peak
    for minutes, schedule in ((DECAY_FROM_MINUTES + 1, "linear"), (None, "constant")):
        optim = demo_config(BASE_MODEL, tmp_path, minutes, 0, [])["optim"]
        budget = load_config(GRPOConfig, {**raw, "max_minutes": minutes, "optim": optim})
        assert budget.optim.lr_scheduler == schedule  # long budgets decay with the clock; epoch-bound runs do not


def test_evaluation_seeds_are_never_training_seeds():
    eval_seeds = set(EVAL_SEEDS)
    assert all(is_user_seed(seed) for seed in eval_seeds)
    for run_seed in (0, 1, 42):
        for epoch in range(50):
            trained = epoch_image_seeds(run_seed, epoch, 4 * 8)
            assert len(set(trained)) == len(trained) and not eval_seeds & set(trained)
            # torch's CPU generator reads the low 32 bits of a seed: those must miss the evaluation seeds too.
            assert min(seed % 2**32 for seed in trained) >= USER_SEED_LIMIT


@pytest.mark.slow  # the demo end to end: two runs with before/after evaluations
def test_demo_writes_its_outputs(tiny_pipeline_dir, tmp_path):
    model = tiny_pipeline_dir("sd3", vae="shapes")
    output = tmp_path / "demo"
    sizes = {"num_prompts": 4, "num_unseen": 3, "eval_seeds": (0, 1), "unseen_seeds": (0,)}
    metrics = run_demo(minutes=0.01, output=output, model=model, **sizes)
    for name in ("before_after.png", "reward_curve.png", "metrics.json", "config.yaml", "lora"):
        assert (output / name).exists(), name
    assert "min_timestep" in json.loads((output / "lora" / "diffalign_lora.json").read_text())
    assert json.loads((output / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["epochs"] >= 1 and metrics["method"] == "grpo"
    assert metrics["denoiser_rows_per_epoch"] > 0
    assert metrics["eval"]["prompts"] == 4 and metrics["eval"]["unseen_prompts"] == 3
    for scores in (metrics, metrics["unseen"]):
        for phase in ("before", "after"):
            assert 0 <= scores[phase]["strict_accuracy"] <= 1 and 0 <= scores[phase]["mean_reward"] <= 1
        assert scores["gain"]["mean_reward"] == scores["after"]["mean_reward"] - scores["before"]["mean_reward"]
    epochs = metrics["epochs"]
    again = run_demo(minutes=0.01, output=output, model=model, **sizes)
    assert again["epochs"] == epochs  # a re-run replaces the previous one's log instead of appending to it
    grid = Image.open(output / "before_after.png")
    assert grid.width > 2 * 96  # before and after columns
    assert "strict accuracy" in format_summary(metrics, output)


def test_demo_without_a_model_says_how_to_get_one(tmp_path, capsys):
    code = cli_main(["demo", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert code != 0
    assert "train_base" in capsys.readouterr().err


def test_compositional_filter():
    assert compositional(["a red circle", "two blue squares"]) == ["two blue squares"]


@pytest.mark.parametrize("method", ["grpo", "flow_grpo", "mixgrpo", "tempflow", "branchgrpo"])
def test_every_grpo_benchmark_variant_is_a_valid_demo_config(method, tmp_path):
    """``diffalign bench learn --method M`` runs the demo's config with M's keys replaced: each must validate (a
    tree's leaves are its group, a branching plan needs group advantages summed over steps, ...)."""
    from diffalign.bench import GRPO_VARIANTS

    assert set(GRPO_VARIANTS) == {"grpo", "flow_grpo", "mixgrpo", "tempflow", "branchgrpo"}
    raw = demo_config(BASE_MODEL, tmp_path, None, 0, ["a red circle"])
    for group, keys in GRPO_VARIANTS[method].items():
        raw[group].update(keys)
    config = load_config(GRPOConfig, raw)
    assert config.sampling.plan == GRPO_VARIANTS[method].get("sampling", {}).get("plan", "window")
