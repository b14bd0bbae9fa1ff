"""The shapes learning benchmark (``diffalign bench learn``): tiny runs of the DPO and reward-backprop runners on the
shipped base model; the calibrated learning itself is measured by the benchmark (Flow-GRPO's is also asserted by
test_grpo_learns.py)."""

import json

import pytest
from safetensors.torch import load_file

import rewards
from diffalign.cli import main as cli_main
from diffalign.shapes.demo import demo_prompts
from diffalign.shapes.learn import _Bench, evaluate_heldout, format_summary, learn_backprop, learn_dpo, learn_self_play


ALIGNED, UNSEEN = demo_prompts()
TINY_EVAL = {"prompts": ALIGNED[:2], "unseen_prompts": UNSEEN[:1], "eval_seeds": (0,), "unseen_seeds": (1,)}


def _lora_moved(output) -> bool:
    """Whether the saved LoRA's B matrices (zero at the start) are non-zero, i.e. training changed the model."""
    weights = load_file(str(output / "lora" / "pytorch_lora_weights.safetensors"))
    ups = [value for name, value in weights.items() if "lora_B" in name or "lora_up" in name]
    return bool(ups) and any(value.abs().sum() > 0 for value in ups)


def _check_metrics(output, metrics, method):
    assert json.loads((output / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["method"] == method
    for scores in (metrics, metrics["unseen"]):  # the demo's layout: aligned prompts, then the unseen ones
        for phase in ("before", "after", "gain"):
            assert set(scores[phase]) == {"mean_reward", "strict_accuracy"}
        for phase in ("before", "after"):
            assert 0 <= scores[phase]["strict_accuracy"] <= 1 and 0 <= scores[phase]["mean_reward"] <= 1
        assert scores["gain"]["mean_reward"] == pytest.approx(
            scores["after"]["mean_reward"] - scores["before"]["mean_reward"]
        )
    evaluation = metrics["eval"]
    assert evaluation["prompts"] == 2 and evaluation["seeds"] == [0]
    assert evaluation["unseen_prompts"] == 1 and evaluation["unseen_seeds"] == [1]
    assert (output / "config.yaml").is_file()
    assert _lora_moved(output)
    assert "strict accuracy" in format_summary(metrics, output)


def test_benchmark_measures_the_demos_prompts_by_default(tmp_path):
    bench = _Bench("dpo", 10.0, tmp_path)
    assert (bench.prompts, bench.unseen_prompts) == (ALIGNED, UNSEEN)


def test_learn_dpo_tiny_run(tmp_path):
    output = tmp_path / "dpo"
    metrics = learn_dpo(
        minutes=5.0,
        output=output,
        num_candidates=3,
        pair_steps=4,
        max_steps=3,
        batch_size=2,
        lr=1e-2,
        **TINY_EVAL,
    )
    _check_metrics(output, metrics, "dpo")
    assert metrics["pairs"]["prompts"] == 2 and 1 <= metrics["pairs"]["pairs"] <= 2 * 3  # 'all' pairs of 3
    assert (output / "pairs" / "data.jsonl").is_file()
    assert metrics["train"]["steps"] == 3
    captions = [json.loads(line)["caption"] for line in (output / "pairs" / "data.jsonl").read_text().splitlines()]
    assert set(captions) <= set(ALIGNED[:2])  # pairs of the prompts being aligned


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_learn_dpo_stops_at_its_time_budget(tmp_path):
    metrics = learn_dpo(
        minutes=1e-4,  # spent by the pairs: training runs its one step and stops
        output=tmp_path / "dpo",
        num_candidates=6,  # enough candidates that some prompt gets two different verifier scores
        pair_steps=2,
        batch_size=1,
        **TINY_EVAL,
    )
    assert metrics["train"]["steps"] == 1


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_learn_backprop_tiny_run(tmp_path):
    output = tmp_path / "backprop"
    metrics = learn_backprop(
        minutes=5.0, output=output, max_steps=2, num_steps=3, k=2, batch_size=2, lr=1e-2, **TINY_EVAL
    )
    _check_metrics(output, metrics, "backprop")
    assert metrics["train"]["steps"] == 2 and metrics["train"]["reward"] == "shapes_clip"


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_learn_backprop_on_a_steps_budget_draws_the_heldout_curve(tmp_path):
    """minutes=None: max_steps alone ends training (the same work on any machine); eval_every=1 evaluates the
    held-out verifier before training and after each step: its ends are the before/after measurements (same
    prompts and seeds)."""
    output = tmp_path / "backprop"
    metrics = learn_backprop(
        minutes=None, output=output, max_steps=2, eval_every=1, num_steps=3, k=2, batch_size=2, lr=1e-2, **TINY_EVAL
    )
    assert metrics["train"]["steps"] == 2
    assert (metrics["budget_minutes"], metrics["budget_steps"]) == (None, 2)
    assert [point["step"] for point in metrics["curve"]] == [0, 1, 2]
    assert metrics["curve"][0]["strict_accuracy"] == metrics["before"]["strict_accuracy"]
    assert metrics["curve"][-1]["strict_accuracy"] == metrics["after"]["strict_accuracy"]
    assert metrics["curve"][-1]["mean_reward"] == pytest.approx(metrics["after"]["mean_reward"])
    assert "held-out strict accuracy during training" in format_summary(metrics)
    # Work per step, the periodic evaluation left out: 2 images x 2 CFG rows x (3 sampling steps + 2 grad steps
    # recomputed by gradient checkpointing).
    assert metrics["train"]["denoiser_rows_per_step"] == 2 * 2 * (3 + 2)


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_learn_backprop_stops_early_on_validation_seeds_and_keeps_the_best(tmp_path):
    """early_stopping=1: the run stops at the first periodic evaluation (validation seeds, apart from the final
    measurement's) that does not beat the best so far, and ends with the best one's weights."""
    metrics = learn_backprop(
        minutes=None,
        output=tmp_path / "backprop",
        max_steps=6,
        eval_every=1,
        early_stopping=1,
        num_steps=3,
        k=2,
        batch_size=2,
        lr=5e-2,
        validation_seeds=(5, 6),
        **TINY_EVAL,
    )
    assert metrics["eval"]["curve_seeds"] == [5, 6] and metrics["eval"]["seeds"] == [0]
    strict = [point["strict_accuracy"] for point in metrics["curve"]]
    stop = next((k for k in range(1, len(strict)) if strict[k] <= max(strict[:k])), 6)
    assert metrics["train"]["steps"] == stop == len(strict) - 1
    best = max(range(len(strict)), key=lambda k: (strict[k], -k))  # the first of the best
    assert metrics["train"]["early_stopping"] == {"patience": 1, "best_step": best}
    assert "ends with the weights of step" in format_summary(metrics)


def test_validation_seeds_must_differ_from_the_evaluation_seeds(tmp_path):
    with pytest.raises(ValueError, match="validation_seeds must differ from eval_seeds"):
        learn_backprop(output=tmp_path, eval_every=1, early_stopping=1, validation_seeds=(0,), **TINY_EVAL)
    with pytest.raises(ValueError, match="early_stopping follows the periodic evaluation"):
        learn_backprop(output=tmp_path, early_stopping=1, **TINY_EVAL)


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_learn_backprop_stops_at_its_time_budget(tmp_path):
    metrics = learn_backprop(minutes=1e-4, output=tmp_path / "backprop", num_steps=2, k=1, batch_size=1, **TINY_EVAL)
    assert metrics["train"]["steps"] == 1


def test_evaluate_heldout_is_deterministic():
    from diffalign.adapters import load_adapter
    from diffalign.shapes.demo import BASE_MODEL

    adapter = load_adapter(BASE_MODEL, height=32, width=32)
    verifier = rewards.load("shapes")
    prompts = ALIGNED[:2]
    first = evaluate_heldout(adapter, verifier, prompts, seeds=(0,))
    assert first == evaluate_heldout(adapter, verifier, prompts, seeds=(0,))


def test_shapes_clip_reward_is_differentiable_and_ranks_captions():
    from diffalign.shapes.scenes import render, sample_scene

    reward = rewards.load("shapes_clip")
    assert reward.name == "shapes_clip" and reward.differentiable
    scene, caption = sample_scene("binding", 0, "train")
    image = render(scene, 32)[None].requires_grad_(True)
    other = "a yellow square" if "yellow square" not in caption else "a red circle"
    scores = reward.score(image.expand(2, -1, -1, -1), [caption, other])
    assert scores[0] > scores[1]
    scores[0].backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_bench_learn_rejects_an_unknown_method(capsys):
    assert cli_main(["bench", "learn", "--method", "bogus"]) == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in error and "dpo" in error and "backprop" in error


def test_bench_learn_function_rejects_an_unknown_method():
    from diffalign.bench import bench_learn

    with pytest.raises(ValueError, match="unknown learning benchmark method 'bogus'"):
        bench_learn("bogus")


def test_bench_learn_cli_dispatches(monkeypatch, tmp_path):
    import diffalign.bench

    calls = []
    monkeypatch.setattr(diffalign.bench, "bench_learn", lambda **kwargs: calls.append(kwargs) or {})
    output = str(tmp_path / "out")
    argv = ["bench", "learn", "--method", "dpo", "--minutes", "2.5", "--output", output, "--seed", "3"]
    assert cli_main([*argv, "--threads", "1"]) == 0
    argv = ["bench", "learn", "--method", "backprop", "--steps", "40", "--eval-every", "10", "--early-stopping", "3"]
    assert cli_main(argv) == 0
    common = {"output": None, "seed": 0, "threads": None}
    assert calls == [
        {
            "method": "dpo",
            "minutes": 2.5,
            "steps": None,
            "eval_every": 0,
            "early_stopping": 0,
            **{**common, "output": output, "seed": 3},
            "threads": 1,
        },
        {"method": "backprop", "minutes": None, "steps": 40, "eval_every": 10, "early_stopping": 3, **common},
    ]
    assert cli_main(["bench", "learn", "--method", "dpo", "--minutes", "0"]) == 2
    assert cli_main(["bench", "learn", "--method", "dpo", "--steps", "0"]) == 2
    # GRPO methods take the held-out curve, but run their whole budget.
    assert cli_main(["bench", "learn", "--method", "grpo", "--eval-every", "5", "--early-stopping", "2"]) == 2
    assert cli_main(["bench", "learn", "--method", "dpo", "--early-stopping", "2"]) == 2  # needs --eval-every
    assert cli_main(["bench", "learn", "--method", "dpo", "--steps", "5", "--minutes", "1"]) == 2  # one budget


def test_bench_learn_defaults_to_a_steps_budget(monkeypatch):
    """No budget given: the method's LEARN_STEPS optimizer steps and no time limit; both budgets are refused."""
    import diffalign.shapes.learn
    from diffalign.bench import LEARN_STEPS, bench_learn

    calls = []
    monkeypatch.setattr(diffalign.shapes.learn, "learn_backprop", lambda **kwargs: calls.append(kwargs) or {})
    bench_learn("backprop", output="unused")
    assert calls[0]["minutes"] is None and calls[0]["max_steps"] == LEARN_STEPS["backprop"] == 450
    with pytest.raises(ValueError, match="give one budget"):
        bench_learn("backprop", minutes=1.0, steps=2)


def test_denoiser_rows_counts_forward_rows_and_not_the_evaluation():
    """Rows of every forward (positional or keyword latents), none while the wrapped evaluation runs, and the hook
    is gone after the block."""
    import torch

    from diffalign.shapes.learn import DenoiserRows

    class Denoiser(torch.nn.Module):
        def forward(self, hidden_states, timestep=None):
            return hidden_states

    denoiser = Denoiser()
    with DenoiserRows(denoiser) as counter:
        denoiser(torch.zeros(3, 4))
        denoiser(hidden_states=torch.zeros(5, 4), timestep=1)
        evaluate = counter.uncounted(lambda step: denoiser(torch.zeros(7, 4)).shape[0] + step)
        assert evaluate(1) == 8  # the evaluation's result passes through
        assert counter.uncounted(None) is None  # no periodic evaluation
    denoiser(torch.zeros(11, 4))
    assert counter.rows == 3 + 5


@pytest.mark.slow  # over 3 s: a shapes run of three steps and its evaluations
@pytest.mark.parametrize("method", ["raft", "spin"])
def test_learn_self_play_trains_rounds_and_reports_the_verifier(tmp_path, method):
    metrics = learn_self_play(
        None,
        tmp_path / method,
        method=method,
        max_steps=3,
        steps_per_round=2,
        samples_per_prompt=2,
        batch_size=2,
        real_images_per_prompt=2,
        **TINY_EVAL,
    )
    assert metrics["method"] == method and metrics["train"]["steps"] == 3
    assert _lora_moved(tmp_path / method)
    logged = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in logged if "round" in r] == [1.0]  # step 3 (logged as the last) is in round 1


@pytest.mark.slow  # over 3 s: 1,028 scenes rendered, two DPO steps and the evaluations
def test_learn_dpo_on_text_pairs_trains_on_other_captions_than_the_evaluated_ones(tmp_path):
    metrics = learn_dpo(None, tmp_path / "tpo", text_pairs=True, max_steps=2, batch_size=2, **TINY_EVAL)
    assert metrics["method"] == "tpo" and metrics["pairs"]["pairing"] == "text"
    records = [json.loads(line) for line in (tmp_path / "tpo" / "pairs" / "data.jsonl").read_text().splitlines()]
    assert len(records) == metrics["pairs"]["pairs"] == 1028
    assert not {r["caption"] for r in records} & set(TINY_EVAL["prompts"])  # the evaluated prompts are not trained
    assert all(r["caption_1"] != r["caption"] and r["image_0"] == r["image_1"] for r in records)
    assert _lora_moved(tmp_path / "tpo")
