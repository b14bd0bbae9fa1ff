"""Early stopping on the periodic evaluation (eval.early_stopping_patience): the bookkeeping, the step loop ending
on it with the best evaluation's weights, resume, and the refusals."""

import pytest
import torch
from test_common import _fake_step, make_run

from diffalign.config import ConfigError, TrainerConfig, load_config
from diffalign.trainers.early_stopping import EarlyStopping


def test_bookkeeping_counts_evaluations_since_the_best():
    stopping = EarlyStopping(patience=2, min_delta=0.05)
    assert stopping.update(0, 0.50) and stopping.best_step == 0
    assert not stopping.update(1, 0.54)  # within min_delta: no improvement
    assert stopping.update(2, 0.60) and (stopping.best_step, stopping.evals_since_best) == (2, 0)
    assert not stopping.update(3, 0.40) and not stopping.should_stop
    assert not stopping.update(4, 0.59) and stopping.should_stop
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopping.state_dict())
    assert restored.state_dict() == {"best_value": 0.60, "best_step": 2, "evals_since_best": 2}
    with pytest.raises(ValueError, match="step 5 is nan"):
        stopping.update(5, float("nan"))


# The evaluation scores of a scripted run: best at step 2, then two worse ones -> stop after step 4 (patience 2).
CURVE = {0: 0.1, 1: 0.3, 2: 0.5, 3: 0.4, 4: 0.45, 5: 0.9, 6: 0.9}
EVAL = {"every": 1, "prompts": ["a red circle"], "early_stopping_patience": 2, "metric": "strict"}


def _drive(run, weights_at):
    """Run the loop with weight-changing steps; ``weights_at[step]`` records the trained weights when evaluated."""

    def evaluate(step):
        weights_at[step] = [p.detach().clone() for p in run.params]
        return {"eval/reward_mean": 0.0, "eval/strict_mean": CURVE[step]}

    return run.run_steps(lambda step: _fake_step(run) or {"loss": 0.0}, dict, evaluate, desc="t", postfix=())


def test_the_run_stops_and_ends_with_the_best_evaluations_weights(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path / "run", eval=EVAL, checkpoint={"every": 1})
    weights_at = {}
    _drive(run, weights_at)
    assert sorted(weights_at) == [0, 1, 2, 3, 4]  # stopped after the second evaluation without improvement
    assert all(torch.equal(p, best) for p, best in zip(run.params, weights_at[2]))
    assert not torch.equal(weights_at[4][0], weights_at[2][0])  # training had moved on
    # The last checkpoint holds the training state of step 4 and, beside it, the best weights (for a resume); the
    # LoRA exported at the end was taken from the restored (best) weights.
    from safetensors.torch import load_file

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    names = run.trainable_names()
    trained, best = (
        load_file(str(checkpoint / "trainable.safetensors")),
        load_file(str(checkpoint / "best_eval.safetensors")),
    )
    assert all(torch.equal(trained[name], at_4) for name, at_4 in zip(names, weights_at[4]))
    assert all(torch.equal(best[name], at_2) for name, at_2 in zip(names, weights_at[2]))
    assert (tmp_path / "run" / "lora").is_dir()
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"early_stopping/best_step": 2.0' in records


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_resumed_run_keeps_its_best_and_its_count(tiny_pipeline_dir, tmp_path):
    """Resumed from checkpoint-3 (best at 2, one evaluation since): step 4 is the second without improvement, so the
    resumed run stops there too and ends with step 2's weights, read from the checkpoint."""
    folder = tiny_pipeline_dir("sd3")
    first = make_run(folder, tmp_path / "run", eval=EVAL, checkpoint={"every": 1})
    weights_at = {}
    _drive(first, weights_at)
    resumed = make_run(
        folder,
        tmp_path / "run",
        resume=str(tmp_path / "run" / "checkpoints" / "checkpoint-3"),
        eval=EVAL,
        checkpoint={"every": 1},
    )
    again = {}
    _drive(resumed, again)
    assert sorted(again) == [4]
    assert all(torch.equal(p, best) for p, best in zip(resumed.params, weights_at[2]))


def test_an_unknown_metric_lists_what_the_evaluation_reports(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path / "run", eval={**EVAL, "metric": "strictness"})
    with pytest.raises(
        ConfigError, match=r"eval.metric: the evaluation reports no 'strictness'.*\['reward', 'strict'\]"
    ):
        _drive(run, {})


def test_early_stopping_needs_evaluations_and_no_ema(tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.early_stopping_patience.*set every > 0"):
        load_config(TrainerConfig, {"model": {"path": "x"}, "eval": {"early_stopping_patience": 2}})
    with pytest.raises(ConfigError, match="eval.early_stopping_patience: early stopping with an EMA"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path / "run", eval=EVAL, ema={"enabled": True})
