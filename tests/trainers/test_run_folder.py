"""One run per output folder: no new run mixed into an old one, resumes that say so and keep to their config, a
metrics log without repeated steps."""

import json

import pytest
import torch
import yaml
from test_cli import _grpo_yaml
from test_common import make_run

from diffalign.cli import main
from diffalign.testing import cpu_launch_command
from diffalign.trainers.common import RunFolderError, list_checkpoints


def _step(run):
    loss = sum((p.float() ** 2).sum() for p in run.params) + sum(p.sum() for p in run.params)
    run.backward(loss)
    run.optimizer_step()


def _old_run(folder, output, steps=3, **extra):
    run = make_run(folder, output, **extra)
    for step in range(1, steps + 1):
        _step(run)
        run.log(step, {"loss": float(step)})
        run.save(step, {})
    return run


def _logged_steps(output):
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


# --- a new run into an old output_dir --------------------------------------------------------------------------------


def test_a_new_run_into_an_old_run_folder_is_refused(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, seed=1)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(RunFolderError, match=r"already holds a run.*--resume.*--overwrite"):
        make_run(folder, tmp_path, seed=2)
    assert (tmp_path / "config.yaml").read_text() == before, "the old run's config was overwritten"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_folder_without_a_run_is_fine(tiny_pipeline_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    make_run(tiny_pipeline_dir("sd3"), tmp_path)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "notes.txt").is_file()


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_overwrite_replaces_the_old_run(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, seed=1)
    (tmp_path / "lora").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    run = make_run(folder, tmp_path, overwrite=True, seed=2, checkpoint={"keep_last": 1})
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "lora").exists()
    assert not (tmp_path / "eval").exists()
    assert (tmp_path / "notes.txt").is_file(), "files diffalign did not write stay"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 2
    _step(run)
    run.save(1, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]


# --- resume: loud, strict about the folder, and about the config -----------------------------------------------------


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_resume_says_where_it_resumed_from(tiny_pipeline_dir, tmp_path, capsys):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, steps=2)
    make_run(folder, tmp_path, resume="latest").resume()
    assert f"resumed from {tmp_path / 'checkpoints' / 'checkpoint-2'} (step 2)" in capsys.readouterr().err


def test_resume_latest_without_a_checkpoint_is_an_error(tiny_pipeline_dir, tmp_path):
    with pytest.raises(RunFolderError, match=r"no checkpoint to resume from.*--resume auto"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path, resume="latest").resume()


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_resume_auto_starts_fresh_and_says_so(tiny_pipeline_dir, tmp_path, capsys):
    folder = tiny_pipeline_dir("sd3")
    assert make_run(folder, tmp_path, resume="auto").resume() == {"step": 0}
    assert "starting fresh" in capsys.readouterr().err
    _old_run(folder, tmp_path / "old", steps=2)
    assert make_run(folder, tmp_path / "old", resume="auto").resume()["step"] == 2


def test_resume_refuses_a_config_that_changes_the_run(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, steps=1, seed=1)
    with pytest.raises(RunFolderError, match=r"(?s)seed: 1 -> 2.*--allow-config-change"):
        make_run(folder, tmp_path, resume="latest", seed=2)
    with pytest.raises(RunFolderError, match=r"optim.lr: 0.01 -> 0.02"):
        make_run(folder, tmp_path, resume="latest", seed=1, optim={"lr": 2e-2})


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_resume_accepts_bookkeeping_changes_and_allowed_ones(tiny_pipeline_dir, tmp_path, capsys):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, steps=1, seed=1)
    make_run(folder, tmp_path, resume="latest", seed=1, max_steps=20, checkpoint={"every": 7})
    assert "config changes" in capsys.readouterr().err  # printed, not refused
    run = make_run(folder, tmp_path, resume="latest", allow_config_change=True, seed=3)
    assert "seed: 1 -> 3" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 3
    assert run.resume()["step"] == 1


# --- metrics.jsonl after a crash -------------------------------------------------------------------------------------


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    run = _old_run(folder, tmp_path, steps=2)
    for step in (3, 4):  # logged, then the run died before its next checkpoint
        _step(run)
        run.log(step, {"loss": float(step)})
    resumed = make_run(folder, tmp_path, resume="latest")
    resumed.resume()
    assert _logged_steps(tmp_path) == [1, 2]
    resumed.log(3, {"loss": 3.0})
    assert _logged_steps(tmp_path) == [1, 2, 3]


# --- the command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_pipeline_dir):
    return str(tiny_pipeline_dir("sd3"))


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_train_flags(model, tmp_path, capsys):
    config = _grpo_yaml(tmp_path / "grpo.yaml", model, tmp_path / "run")
    assert main(["train", str(config), "--resume", "latest"]) == 1
    assert "--resume auto" in capsys.readouterr().err
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert main(["train", str(config), "seed=5"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(config), "seed=5", "max_steps=3", "--resume", "latest"]) == 1
    assert "seed: 42 -> 5" in capsys.readouterr().err
    assert main(["train", str(config), "seed=5", "max_steps=3", "--resume", "latest", "--allow-config-change"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert main(["train", str(config), "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2"]


# --- the review's cases ----------------------------------------------------------------------------------------------


def test_overwrite_and_resume_exclude_each_other(tiny_pipeline_dir, tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="cannot go with resume_from"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path, resume="latest", overwrite=True)


def test_the_saved_config_does_not_keep_the_launch_flags(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, steps=1)
    make_run(folder, tmp_path, overwrite=True)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["checkpoint"]
    assert saved["overwrite"] is False and saved["allow_config_change"] is False


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_a_folder_with_only_a_config_is_not_a_run(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    make_run(folder, tmp_path, seed=1)  # stopped before logging or saving anything
    make_run(folder, tmp_path, seed=2)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 2


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_resuming_an_older_checkpoint_drops_the_later_ones(tiny_pipeline_dir, tmp_path, capsys):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, steps=3)
    older = tmp_path / "checkpoints" / "checkpoint-1"
    run = make_run(folder, tmp_path, resume=str(older), checkpoint={"keep_last": 1})
    run.resume()
    assert "deleted the checkpoints after step 1: checkpoint-2, checkpoint-3" in capsys.readouterr().err
    _step(run)
    run.save(2, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert _logged_steps(tmp_path) == [1]


def test_a_longer_decaying_schedule_is_a_training_change(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    linear = {"lr": 1e-2, "lr_scheduler": "linear"}
    _old_run(folder, tmp_path, steps=1, optim=linear)
    with pytest.raises(RunFolderError, match=r"changes the training \(max_steps\)"):
        make_run(folder, tmp_path, resume="latest", optim=linear, max_steps=20)


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_resume_from_another_runs_checkpoint_into_a_used_folder_is_refused(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path / "a", steps=1)
    _old_run(folder, tmp_path / "b", steps=1)
    with pytest.raises(RunFolderError, match="already holds a run"):
        make_run(folder, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "checkpoint-1"))
    run = make_run(folder, tmp_path / "c", resume=str(tmp_path / "a" / "checkpoints" / "checkpoint-1"))
    assert run.resume()["step"] == 1  # a warm start into a fresh folder is fine


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_a_checkpoint_of_another_process_count_is_refused(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    _old_run(folder, tmp_path, steps=1)
    marker = tmp_path / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "num_processes": 2}))
    with pytest.raises(RunFolderError, match="saved by 2 process"):
        make_run(folder, tmp_path, resume="latest").resume()
    assert make_run(folder, tmp_path, resume="latest", allow_config_change=True).resume()["step"] == 1


@pytest.mark.slow  # three two-process launches
def test_two_processes_resume_bit_exactly_and_refuse_one(model, tmp_path):
    """accelerate's CPU mode with two processes: a run cut after step 2 and resumed ends where a straight run does."""
    import os
    import subprocess

    from safetensors.torch import load_file

    def launch(config, *extra):
        command = cpu_launch_command(2) + ["--multi_gpu"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["-m", "diffalign.cli", "train", str(config), *extra]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    straight = _grpo_yaml(tmp_path / "straight.yaml", model, tmp_path / "straight")
    cut = _grpo_yaml(tmp_path / "cut.yaml", model, tmp_path / "cut")
    launch(straight, "max_steps=3")
    launch(cut, "max_steps=2")
    log = launch(cut, "max_steps=3", "--resume", "latest")
    assert log.count("resumed from") == 1, "printed by the main process only"
    checkpoint = "checkpoints/checkpoint-3"
    a, b = (load_file(str(tmp_path / run / checkpoint / "trainable.safetensors")) for run in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / checkpoint / "rng-1.json").is_file()
    assert main(["train", str(cut), "max_steps=4", "--resume", "latest"]) == 1  # one process: refused
