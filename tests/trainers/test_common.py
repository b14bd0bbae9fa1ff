"""The shared training runtime: checkpoints (atomic, keep-last, resume), EMA, divergence, resolved config."""

import json

import pytest
import torch
import yaml

from diffalign.config import TrainerConfig, load_config
from diffalign.trainers.common import (
    EMA,
    TrainingDivergedError,
    TrainingRun,
    list_checkpoints,
    resolve_checkpoint,
)


def make_run(folder, output_dir, resume=None, overwrite=False, allow_config_change=False, **extra):
    """A LoRA run on a tiny pipeline; ``extra`` are top-level config groups, the flags go into ``checkpoint``."""
    raw = {
        "model": {"path": str(folder), "lora": {"rank": 2}},
        "output_dir": str(output_dir),
        "max_steps": 10,
        "logging": {"log_with": "none"},
        "optim": {"lr": 1e-2},
        **extra,
    }
    flags = {"resume_from": resume, "overwrite": overwrite, "allow_config_change": allow_config_change}
    raw["checkpoint"] = {**raw.get("checkpoint", {}), **{key: value for key, value in flags.items() if value}}
    return TrainingRun(load_config(TrainerConfig, raw))


def _fake_step(run):
    loss = sum((p.float() ** 2).sum() for p in run.params) + sum(p.sum() for p in run.params)
    run.backward(loss)
    run.optimizer_step()


def test_resolved_config_is_written_and_loads_back(tiny_pipeline_dir, tmp_path):
    make_run(tiny_pipeline_dir("sd3"), tmp_path, seed=7)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["model"]["lora"]["rank"] == 2
    assert load_config(TrainerConfig, tmp_path / "config.yaml").seed == 7


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_checkpoints_are_atomic_pruned_and_resumable(tiny_pipeline_dir, tmp_path):
    run = make_run(
        tiny_pipeline_dir("sd3"),
        tmp_path,
        checkpoint={"every": 1, "keep_last": 2},
        ema={"enabled": True, "decay": 0.5},
    )
    for step in range(1, 4):
        _fake_step(run)
        run.maybe_save(step, {"position": step * 10})
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoints" / "checkpoint-3" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # A save killed before its marker was written leaves only a temporary folder: never picked as "latest".
    (tmp_path / "checkpoints" / ".tmp-checkpoint-4").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir()  # incomplete (no trainer_state.json)
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-3"
    with pytest.raises(FileNotFoundError, match="not a complete diffalign checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoints" / "checkpoint-5", tmp_path)

    expected = {n: v.clone() for n, v in run.trainable_state_dict().items()}
    expected_shadow = [s.clone() for s in run.ema.shadow]
    _fake_step(run)  # diverge from the checkpoint, then resume into a fresh run
    fresh = make_run(
        tiny_pipeline_dir("sd3"),
        tmp_path,
        ema={"enabled": True, "decay": 0.5},
        checkpoint={"resume_from": "latest", "keep_last": 2},
    )
    state = fresh.resume("latest")
    assert state["step"] == 3 and state["position"] == 30 and fresh.optimizer_steps == 3
    for name, value in fresh.trainable_state_dict().items():
        assert torch.equal(value, expected[name])
    for shadow, saved in zip(fresh.ema.shadow, expected_shadow):
        assert torch.equal(shadow, saved)
    assert fresh.optimizer.state_dict()["state"], "optimizer moments restored"


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_resume_refuses_a_mismatched_lora(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _fake_step(run)
    run.save(1, {})
    other = make_run(
        tiny_pipeline_dir("sd3"),
        tmp_path,
        model={"path": str(tiny_pipeline_dir("sd3")), "lora": {"rank": 2, "target_modules": ["attn.to_q"]}},
        checkpoint={"resume_from": "latest", "allow_config_change": True},
    )
    with pytest.raises(ValueError, match="does not match this model/LoRA setup"):
        other.resume("latest")


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    _fake_step(run)
    run.save(1, {})
    with pytest.raises(TrainingDivergedError, match="checkpoint-1"):
        run.backward(torch.tensor(float("nan"), requires_grad=True), step=2)


def test_ema_decay_warmup_and_swap():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.9, update_every=1)
    with torch.no_grad():
        param.fill_(1.0)
    ema.step(1)  # decay min(0.9, 1/10) = 0.1 -> shadow = 0.9
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9))
    ema.step(2)  # decay min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), d * 0.9 + (1 - d)))
    with ema.swapped_in():
        torch.testing.assert_close(param.data, ema.shadow[0])
    assert torch.equal(param.data, torch.ones(3))


def test_ema_warmup_counts_optimizer_steps_not_updates():
    """Flow-GRPO's EMA updates every 8 optimizer steps and warms up on the optimizer step count."""
    param = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([param], decay=0.9, update_every=8)
    with torch.no_grad():
        param.fill_(1.0)
    for step in range(1, 8):
        ema.step(step)
    assert torch.equal(ema.shadow[0], torch.zeros(2)) and ema.num_updates == 0  # no update before step 8
    ema.step(8)  # 7 optimizer steps before it: decay min(0.9, 8/17); counting updates would give 1/10
    d = 8 / 17
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 1 - d))
    for step in range(9, 17):
        ema.step(step)
    d2 = 16 / 25  # step 16: 15 optimizer steps before it
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), (1 - d) * d2 + (1 - d2)))


def test_metrics_are_logged_as_json_lines(tiny_pipeline_dir, tmp_path):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path)
    run.log(3, {"loss": torch.tensor(0.5), "lr": 1e-3})
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record == {"step": 3, "loss": 0.5, "lr": 1e-3}


def test_full_finetuning_reference_is_a_frozen_copy(tiny_pipeline_dir, tmp_path):
    run = make_run(
        tiny_pipeline_dir("sd3"), tmp_path, model={"path": str(tiny_pipeline_dir("sd3")), "lora": {"rank": 0}}
    )
    assert len(run.params) == sum(1 for _ in run.adapter.denoiser.parameters())
    run.snapshot_reference()
    latents = run.adapter.prepare_latents(1, torch.Generator().manual_seed(0))
    cond = run.adapter.encode_prompt(["a red circle"], with_negative=False)
    before = run.adapter.predict(latents, 500.0, cond).detach()
    _fake_step(run)
    after = run.adapter.predict(latents, 500.0, cond).detach()
    assert not torch.equal(before, after)
    with run.reference():
        torch.testing.assert_close(run.adapter.predict(latents, 500.0, cond), before)


def test_lr_schedule_over_the_wall_clock_budget(tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffalign.trainers import common

    run = make_run(
        tiny_pipeline_dir("sd3"),
        tmp_path,
        max_minutes=1.0,
        optim={"lr": 1e-2, "lr_scheduler": "linear", "lr_horizon": "max_minutes"},
    )
    now = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    run.start_clock()
    lr = lambda: run.lr_scheduler.get_last_lr()[0]  # noqa: E731
    _fake_step(run)
    run.advance_schedule(1)  # no time spent: one step of ten
    assert run.schedule_steps == 1 and lr() == pytest.approx(9e-3)
    now[0] += 30  # half the budget: the schedule jumps to step 5 of 10
    run.advance_schedule(2)
    assert run.schedule_steps == 5 and lr() == pytest.approx(5e-3)
    now[0] += 15
    run.advance_schedule(3)
    assert run.schedule_steps == 8 and lr() == pytest.approx(2e-3)
    run.start_clock()  # a resumed run's fresh budget never moves the schedule back
    run.advance_schedule(4)
    assert run.schedule_steps == 8
    now[0] += 120  # past the budget: the decay ends at max_steps, not beyond
    run.advance_schedule(5)
    assert run.schedule_steps == 10 and lr() == 0


def test_lr_horizon_max_minutes_needs_a_budget(tiny_pipeline_dir, tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="lr_horizon = max_minutes needs a wall-clock budget"):
        make_run(tiny_pipeline_dir("sd3"), tmp_path, optim={"lr_horizon": "max_minutes"})


def test_a_step_without_an_update_still_advances_the_schedule_quietly(tiny_pipeline_dir, tmp_path, recwarn):
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path, optim={"lr": 1e-2, "lr_scheduler": "linear"})
    run.advance_schedule(1)  # e.g. a GRPO epoch whose groups all tied: no optimizer step, the step still counts
    assert run.schedule_steps == 1 and run.lr_scheduler.get_last_lr()[0] == pytest.approx(9e-3)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_model_variant_and_revision_reach_the_loader(tmp_path, monkeypatch):
    """model.variant loads the variant's weight files; model.revision is passed on for hub ids."""
    from diffusers import DiffusionPipeline

    from diffalign.adapters import load_adapter
    from diffalign.testing import build_tiny_pipeline

    folder = tmp_path / "fp16-only"
    build_tiny_pipeline("sd3").save_pretrained(folder, variant="fp16")  # only *.fp16.safetensors files
    with pytest.raises((OSError, ValueError)):
        make_run(folder, tmp_path / "plain")
    run = make_run(folder, tmp_path / "variant", model={"path": str(folder), "lora": {"rank": 2}, "variant": "fp16"})
    assert run.params

    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs, source=source)
        raise OSError("offline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fake_from_pretrained)
    with pytest.raises(OSError, match="offline"):
        load_adapter("org/model", revision="abc123", variant="fp16")
    assert seen["source"] == "org/model" and seen["revision"] == "abc123" and seen["variant"] == "fp16"


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_logging_run_name_names_the_wandb_run(tiny_pipeline_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, project, **kwargs: calls.append((project, kwargs)))
    folder = tiny_pipeline_dir("sd3")
    make_run(folder, tmp_path / "a", logging={"log_with": "tensorboard", "run_name": "lr-sweep-3"})
    make_run(folder, tmp_path / "run-b", logging={"log_with": "tensorboard"})
    assert [kwargs["init_kwargs"]["wandb"]["name"] for _, kwargs in calls] == ["lr-sweep-3", "run-b"]
    assert [project for project, _ in calls] == ["diffalign", "diffalign"]


def test_adafactor_as_diffusiondpo_configures_it(tiny_pipeline_dir, tmp_path):
    from transformers.optimization import Adafactor

    from diffalign.config import ConfigError

    run = make_run(tiny_pipeline_dir("sd15"), tmp_path, optim={"optimizer": "adafactor", "lr": 1e-3})
    optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
    assert isinstance(optimizer, Adafactor)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 1e-2 and group["clip_threshold"] == 1.0
    assert not group["relative_step"] and not group["scale_parameter"] and not group["warmup_init"]
    before = [p.detach().clone() for p in run.params]
    _fake_step(run)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, run.params))
    with pytest.raises(ConfigError, match=r"optim\.betas.*belong to AdamW"):
        make_run(tiny_pipeline_dir("sd15"), tmp_path / "x", optim={"optimizer": "adafactor", "betas": [0.9, 0.99]})


def test_vae_path_replaces_the_pipelines_vae(tiny_pipeline_dir, tmp_path):
    from diffusers import AutoencoderKL

    from diffalign.adapters import load_adapter

    folder = tiny_pipeline_dir("sdxl")
    own = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    other = AutoencoderKL.from_config(own.config)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.1)
    other.save_pretrained(tmp_path / "vae_fix")
    run = make_run(folder, tmp_path / "run", model={"path": str(folder), "vae_path": str(tmp_path / "vae_fix")})
    for name, param in run.adapter.vae.state_dict().items():
        torch.testing.assert_close(param, other.state_dict()[name])
    assert not torch.equal(
        run.adapter.vae.state_dict()["decoder.conv_out.bias"], own.state_dict()["decoder.conv_out.bias"]
    )
    from_pipeline = load_adapter(folder, vae_path=folder)  # a pipeline folder: its vae/ is taken
    torch.testing.assert_close(from_pipeline.vae.state_dict()["decoder.conv_out.bias"], own.decoder.conv_out.bias)
    with pytest.raises(FileNotFoundError, match="no VAE"):
        load_adapter(folder, vae_path=tmp_path)
