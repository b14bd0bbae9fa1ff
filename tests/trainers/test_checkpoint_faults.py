"""Fault injection on the checkpoint life cycle: crafted pickles, NaN gradients and weights, saves cut at every step.

Each test reproduces a way a run could end with a checkpoint that runs code, holds NaN weights, or does not load.
"""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from test_common import make_run as common_make_run

from diffalign.trainers.common import CheckpointError, TrainingDivergedError, list_checkpoints


def make_run(folder, output_dir, resume=None, **extra):
    """test_common's run with an EMA (its file is part of every checkpoint here)."""
    extra.setdefault("ema", {"enabled": True, "decay": 0.5})
    return common_make_run(folder, output_dir, resume=resume, **extra)


def _backward(run):
    loss = sum((p.float() ** 2).sum() for p in run.params) + sum(p.sum() for p in run.params)
    run.backward(loss)


def _step(run, step=None):
    _backward(run)
    return run.optimizer_step(step)


def _weights(run):
    return {name: value.clone() for name, value in run.trainable_state_dict().items()}


def _assert_equal(found, expected):
    assert found.keys() == expected.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


# --- no code from a checkpoint ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that loading a checkpoint file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint_files(path):
    return sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())


def test_checkpoint_files_are_tensors_and_json_only(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    path = run.save(1, {"position": 3})
    top_level = {p.name for p in path.iterdir() if p.is_file()}
    assert top_level == {
        "trainable.safetensors",
        "optimizer.pt",
        "lr_scheduler.json",
        "ema.safetensors",
        "rng-0.json",
        "config.yaml",
        "trainer_state.json",
    }
    json.loads((path / "lr_scheduler.json").read_text())
    rng = json.loads((path / "rng-0.json").read_text())
    assert set(rng) >= {"python", "numpy", "torch"}
    torch.load(path / "optimizer.pt", weights_only=True)  # plain tensors and numbers


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.pt",
        "lr_scheduler.json",
        "ema.safetensors",
        "rng-0.json",
        "trainable.safetensors",
        "trainer_state.json",
    ],
)
@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_crafted_pickle_in_a_checkpoint_file_is_refused_without_running(tiny_pipeline_dir, tmp_path, name):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path / "run")
    _step(run)
    path = run.save(1, {})
    marker = tmp_path / "payload-ran"
    torch.save({"state": _Payload(marker)}, path / name)  # torch.save pickles
    with pytest.raises(CheckpointError, match=rf"checkpoint-1.*{name}"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path / "run", resume="latest").resume()
    assert not marker.exists(), "loading the checkpoint ran the payload"


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_checkpoint_written_with_pickles_is_refused_with_the_reason(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    path = run.save(1, {})
    (path / "lr_scheduler.json").unlink()
    torch.save(run.lr_scheduler.state_dict(), path / "lr_scheduler.pt")  # the old pickle layout
    with pytest.raises(CheckpointError, match="lr_scheduler.json.*pickle"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path, resume="latest").resume()


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_a_checkpoint_missing_a_file_names_it(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    path = run.save(1, {})
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-1 is missing optimizer.pt"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path, resume="latest").resume()


def test_rng_state_round_trips_through_json(tiny_pipeline_dir, tmp_path):
    import random

    import numpy as np

    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    run.save(1, {})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    make_run(tiny_pipeline_dir("sd3"), tmp_path, resume="latest").resume()
    found = (random.random(), np.random.rand(), torch.rand(3))
    assert found[:2] == expected[:2] and torch.equal(found[2], expected[2])


# --- no NaN saved as latest ------------------------------------------------------------------------------------------


def test_a_nan_gradient_without_clipping_stops_before_the_update(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path, optim={"lr": 1e-2, "max_grad_norm": None})
    _step(run)
    run.save(1, {})
    good = _weights(run)
    _backward(run)
    run.params[0].grad[0] = float("nan")  # the injected fault
    with pytest.raises(TrainingDivergedError, match=r"gradient norm became nan in step 2.*checkpoint-1"):
        run.optimizer_step(step=1)  # 0-based: the second step
    _assert_equal(_weights(run), good)  # the step was not kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_grad_norm_is_reported_without_clipping(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path, optim={"lr": 1e-2, "max_grad_norm": None})
    _backward(run)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.params])).item()
    metrics = run.optimizer_step()
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_an_update_that_overflows_the_weights_stops_the_run(tiny_pipeline_dir, tmp_path, monkeypatch):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path, optim={"lr": 1e-2, "max_grad_norm": None})
    real_step = run.optimizer.step

    def overflowing_step(*args, **kwargs):  # the injected fault: an update that leaves an inf in the weights
        result = real_step(*args, **kwargs)
        with torch.no_grad():
            run.params[1].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(run.optimizer, "step", overflowing_step)
    with pytest.raises(TrainingDivergedError, match=r"trained weights became inf in step 1.*no checkpoint"):
        _step(run, step=0)
    with pytest.raises(TrainingDivergedError, match="trained weights"):
        run.save(1, {})


def test_non_finite_weights_are_never_written(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    run.save(1, {})
    with torch.no_grad():
        run.params[-1].view(-1)[0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"checkpoint-1"):
        run.save(2, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not any(p.name.endswith("checkpoint-2") for p in (tmp_path / "checkpoints").iterdir())


def test_a_nan_in_the_ema_is_never_written(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    run.ema.shadow[0].view(-1)[0] = float("inf")
    with pytest.raises(TrainingDivergedError, match="EMA weights"):
        run.save(1, {})
    assert list_checkpoints(tmp_path) == []


# --- saves cut short -------------------------------------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the cut runs, no ``except Exception`` catches it."""


def _count_save_operations(monkeypatch, cut_at=None):
    """Patch the file operations ``save`` uses so that the ``cut_at``-th one (0-based) raises :class:`_Killed`;
    returns the list the operations are recorded in. A cut ``shutil.rmtree`` first deletes one file, as a kill in
    the middle of a delete would."""
    import pathlib

    import safetensors.torch

    done = []

    def wrap(name, real):
        def operation(*args, **kwargs):
            if cut_at is not None and len(done) == cut_at:
                if name == "shutil.rmtree":  # the weights go first: a half folder must not pass as complete
                    (pathlib.Path(args[0]) / "trainable.safetensors").unlink(missing_ok=True)
                raise _Killed(name)
            done.append(name)
            return real(*args, **kwargs)

        return operation

    monkeypatch.setattr(safetensors.torch, "save_file", wrap("save_file", safetensors.torch.save_file))
    monkeypatch.setattr(torch, "save", wrap("torch.save", torch.save))
    monkeypatch.setattr(pathlib.Path, "write_text", wrap("write_text", pathlib.Path.write_text))
    monkeypatch.setattr(os, "replace", wrap("os.replace", os.replace))
    monkeypatch.setattr(os, "fsync", wrap("os.fsync", os.fsync))
    monkeypatch.setattr(shutil, "rmtree", wrap("shutil.rmtree", shutil.rmtree))
    return done


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_save_cut_at_any_file_operation_leaves_a_loadable_latest(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Re-saving an existing step (the final save after a periodic one) and pruning, cut after every operation."""
    folder = tiny_pipeline_dir("sd3")
    run = make_run(folder, tmp_path / "probe", checkpoint={"keep_last": 1})
    _step(run)
    run.save(1, {})
    _step(run)
    with monkeypatch.context() as patch:
        operations = _count_save_operations(patch)
        run.save(1, {})  # replaces an existing checkpoint
        run.save(2, {})  # prunes checkpoint-1
    assert len(operations) >= 10
    assert operations.index("os.fsync") < operations.index("os.replace"), "files are synced before the rename"

    base = tmp_path / "base"  # checkpoint-1 saved, as every cut starts
    run.output_dir = base
    run.save(1, {"saved": 1})
    resumed_from = []
    for cut in range(len(operations)):
        output = tmp_path / f"cut-{cut}"
        shutil.copytree(base, output)
        run.output_dir = output
        with monkeypatch.context() as patch:
            _count_save_operations(patch, cut_at=cut)
            with pytest.raises(_Killed):
                run.save(1, {"saved": 2})
                run.save(2, {"saved": 3})
        latest = list_checkpoints(output)[-1]
        resumed_from.append(run.resume(latest)["saved"])  # every file of it reads back
        # The next save cleans up whatever the cut left behind.
        run.save(3, {})
        leftovers = [p.name for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]
        assert leftovers == [], (cut, leftovers)
        assert [p.name for p in list_checkpoints(output)] == ["checkpoint-3"]
    # A later cut never resumes an older save, and each of the three saves becomes latest at some cut.
    assert resumed_from == sorted(resumed_from) and set(resumed_from) == {1, 2, 3}, resumed_from


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_nan_gradient_in_a_training_run_stops_it_with_the_last_good_checkpoint_intact(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    """Flow-GRPO without clipping, a checkpoint every step, and a NaN put into one gradient in the third step."""
    from test_grpo import make_config

    from diffalign.trainers.grpo import GRPOTrainer

    config = make_config(
        tiny_pipeline_dir("sd3"),
        tmp_path,
        max_steps=5,
        **{"optim.max_grad_norm": None, "checkpoint.every": 1, "ema.enabled": True},
    )
    trainer = GRPOTrainer(config)
    real_step = trainer.run.optimizer_step

    def poisoned_step(step=None):
        if step == 2:  # 0-based: the third step
            trainer.run.params[0].grad.view(-1)[0] = float("nan")
        return real_step(step)

    monkeypatch.setattr(trainer.run, "optimizer_step", poisoned_step)
    with pytest.raises(TrainingDivergedError, match=r"gradient norm became nan in step 3.*checkpoint-2"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "lora").exists(), "no final export of a diverged run"
    resume = dataclasses.replace(config.checkpoint, resume_from="latest")
    again = GRPOTrainer(dataclasses.replace(config, checkpoint=resume))
    state = again.run.resume()
    assert state["step"] == 2
    assert all(bool(p.isfinite().all()) for p in again.run.params)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("seed", range(4))
def test_kill_9_during_saves_never_leaves_a_latest_that_fails_to_load(tiny_pipeline_dir, tmp_path, seed):
    """SIGKILL a process that does nothing but save, at a random time; then resume from ``latest``."""
    import random
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder = tiny_pipeline_dir("sd3")
    script = Path(__file__).with_name("save_loop_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(folder), str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(random.Random(seed).uniform(0.2, 3.0))
    process.kill()
    process.wait()
    saved = len(list((tmp_path / "checkpoints").glob("*")))
    run = make_run(folder, tmp_path, resume="latest", checkpoint={"keep_last": 2})
    state = run.resume()
    assert state["saved"] == state["step"] >= 1, saved
    _step(run)
    run.save(state["step"] + 1, {})  # and the folder takes the next save
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # subprocesses, minutes
def test_soak_kill_and_resume_ends_bit_equal_to_an_uninterrupted_run(tmp_path):
    """scripts/soak.py for two minutes (the closing note's figures come from 30 minutes of it)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
    # Kills 12-36 s after each launch: a launch on a loaded 2-core machine takes up to ~15 s to its first checkpoint.
    command = [sys.executable, str(script), "--minutes", "2", "--kill-every", "24", "--every", "2"]
    result = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and summary["ok"], summary
    assert summary["kills"] >= 2 and summary["steps"] > 0, summary


def test_fp16_overflows_are_skipped_by_the_grad_scaler_until_a_streak(tiny_pipeline_dir, tmp_path, monkeypatch):
    """With a grad scaler an inf gradient skips the update (the scaler lowers its scale); a long streak diverges."""
    from diffalign.trainers.common import MAX_OVERFLOW_STREAK

    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    # fp16 on a GPU has an active scaler; a disabled one lets the CPU take the same path.
    monkeypatch.setattr(run.accelerator, "scaler", torch.amp.GradScaler("cpu", enabled=False))
    calls = []
    monkeypatch.setattr(run.optimizer, "step", lambda *a, **k: calls.append(1))  # the scaler would skip the update
    good = _weights(run)
    for streak in range(1, MAX_OVERFLOW_STREAK + 1):
        _backward(run)
        run.params[0].grad.view(-1)[0] = float("inf")
        metrics = run.optimizer_step()
        assert metrics["overflow_skipped"] == 1.0 and run.overflow_streak == streak
    assert len(calls) == MAX_OVERFLOW_STREAK and run.optimizer_steps == 0
    _assert_equal(_weights(run), good)
    _backward(run)
    run.params[0].grad.view(-1)[0] = float("inf")
    with pytest.raises(TrainingDivergedError, match="gradient norm became inf"):
        run.optimizer_step()


def test_with_several_processes_a_nan_loss_stops_the_run_at_the_update(tiny_pipeline_dir, tmp_path, monkeypatch):
    """One process raising in backward would leave the others waiting in the all-reduce: the backward goes on (the
    NaN reaches every process's gradients) and the update stops all of them with the loss message."""
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _step(run)
    run.save(1, {})
    good = _weights(run)
    monkeypatch.setattr(type(run.accelerator), "num_processes", property(lambda self: 2))
    loss = sum((p.float() ** 2).sum() for p in run.params) * float("nan")
    run.backward(loss, step=1)  # no raise here
    with pytest.raises(TrainingDivergedError, match=r"loss became nan in step 2.*checkpoint-1"):
        run.optimizer_step(step=1)
    _assert_equal(_weights(run), good)
