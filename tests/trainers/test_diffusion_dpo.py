"""Diffusion-DPO trainer on tiny pipelines: first loss, parameter updates, LoRA export, resume, broken data, configs,
and learning from AI-feedback pairs (docs/methods/dpo.md)."""

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from families import FAMILIES_FIRST_FIVE_FAST
from peft.utils import get_peft_model_state_dict

from diffalign.config import ConfigError, load_config
from diffalign.data.preference import write_preference_dataset
from diffalign.testing import cpu_launch_command
from diffalign.trainers import get_trainer
from diffalign.trainers.common import TrainingRun
from diffalign.trainers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "dpo"
SIZE = 32
CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a cat"]


def _adapter_kwargs(family):
    return {"max_sequence_length": 77} if family in ("sd3", "flux", "flux_kontext") else {}


def _write_pairs(folder, num_pairs=4, size=(SIZE, SIZE), seed=0, data_format="jsonl", rows_per_group=256):
    generator = torch.Generator().manual_seed(seed)
    records = [
        (
            CAPTIONS[i % len(CAPTIONS)],
            torch.rand(3, *size, generator=generator),
            torch.rand(3, *size, generator=generator),
            float(i % 2),
        )
        for i in range(num_pairs)
    ]
    write_preference_dataset(records, folder, data_format, rows_per_group=rows_per_group)
    return folder


def _config(tmp_path, model_dir, data_dir, overrides=(), name="run"):
    raw = {
        "model": {"path": str(model_dir), "lora": {"rank": 4}},
        # 32 px: every tiny pipeline's default size, given for those whose pipeline defaults to 1024 (Z-Image).
        "data": {"source": str(data_dir), "batch_size": 2, "resolution": 32},
        "output_dir": str(tmp_path / name),
        "max_steps": 2,
        "seed": 0,
        "optim": {"lr": 1e-3},
        "logging": {"log_with": "none", "log_every": 1},
        "checkpoint": {"every": 0},
    }
    return load_config(DiffusionDPOConfig, raw, list(overrides))


def _trainer(config, family="sd15"):
    size = config.data.resolution
    run = TrainingRun(config, adapter_kwargs={**_adapter_kwargs(family), "height": size, "width": size})
    return DiffusionDPOTrainer(config, run=run)


def _metrics(output_dir):
    """The last logged metrics of every step (a resumed run logs some steps twice)."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot to oversubscription
    # (a 4-step run measured 6 s with one thread, 110 s with two, under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


# --- the loss at step 0 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES_FIRST_FIVE_FAST)
def test_first_loss_is_ln2_with_tied_accuracy(family, tiny_pipeline_dir, pairs_dir, tmp_path):
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir(family), pairs_dir), family)
    _, _, batch = next(trainer.batch_stream(0, 0))
    loss, metrics = trainer.loss(batch, torch.Generator().manual_seed(0))
    # LoRA starts with B = 0: policy == reference exactly, so inside = 0 for every pair.
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["reward_margin"].item() == 0.0
    assert metrics["mse_w"].item() == metrics["ref_mse_w"].item() > 0
    assert trainer.beta == {"sd15": 5000.0, "sd2v": 5000.0, "sdxl": 5000.0}.get(family, 100.0)  # flows: 100


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_winner_and_loser_share_noise_and_timestep(family, tiny_pipeline_dir, pairs_dir, tmp_path, monkeypatch):
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir(family), pairs_dir), family)
    seen = {}
    add_noise = trainer.adapter.add_noise

    def record(x0, noise, timesteps):
        seen.update(noise=noise, timesteps=timesteps)
        return add_noise(x0, noise, timesteps)

    monkeypatch.setattr(trainer.adapter, "add_noise", record)
    _, _, batch = next(trainer.batch_stream(0, 0))
    trainer.loss(batch, torch.Generator().manual_seed(0))
    noise, timesteps = seen["noise"], seen["timesteps"]
    assert noise.shape[0] == timesteps.shape[0] == 4
    assert torch.equal(noise[:2], noise[2:]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(timesteps[:2], timesteps[2:])
    assert ((timesteps >= 0) & (timesteps < 1000)).all()
    if family == "sd15":  # uniform integer train timesteps; flow: sigma * 1000 (docs/methods/dpo.md#timestep-sampling)
        assert timesteps.dtype == torch.long
    else:
        assert timesteps.is_floating_point() and (timesteps != timesteps.round()).any()


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_sdxl_micro_conditioning_uses_true_size_and_crop(tiny_pipeline_dir, tmp_path):
    data = _write_pairs(tmp_path / "pairs", num_pairs=2, size=(40, 48))
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("sdxl"), data, ["data.random_flip=false"]), "sdxl")
    _, _, batch = next(trainer.batch_stream(0, 0))
    cond = trainer.conditioning(batch)
    # 40x48 -> shorter side 32: 32x38, center crop left (38 - 32) / 2 = 3 (transform of diffalign.data.preference).
    expected = torch.tensor([[40.0, 48.0, 0.0, 3.0, 32.0, 32.0]] * 2)
    assert torch.equal(cond.embeds["time_ids"].float().cpu(), expected)
    # DiffusionDPO's constant: the training size and no crop for every pair, whatever the image was.
    constant = _config(tmp_path, tiny_pipeline_dir("sdxl"), data, ["dpo.micro_conditioning=constant"], name="const")
    cond = _trainer(constant, "sdxl").conditioning(batch)
    assert torch.equal(cond.embeds["time_ids"].float().cpu(), torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2))
    with pytest.raises(ConfigError, match="only SDXL"):
        _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), data, ["dpo.micro_conditioning=constant"], name="x"))


# --- updates and export ----------------------------------------------------------------------------------------------


def test_two_steps_change_lora_and_the_export_loads(tiny_pipeline_dir, pairs_dir, tmp_path):
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), pairs_dir))
    before = {k: v.clone() for k, v in trainer.run.trainable_state_dict().items()}
    metrics = trainer.train()
    after = trainer.run.trainable_state_dict()
    assert all("lora" in name for name in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert metrics["loss"] != pytest.approx(math.log(2), abs=1e-7)

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sd15"))
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    (name,) = pipe.unet.active_adapters()
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    trained = trainer.adapter.lora_state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k].cpu()) for k in trained)


def test_full_finetuning_changes_weights_and_keeps_the_reference(tiny_pipeline_dir, pairs_dir, tmp_path):
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), pairs_dir, ["model.lora.rank=0", "optim.lr=1e-4"]))
    initial = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.adapter.denoiser.named_parameters() if not torch.equal(initial[n], p)]
    assert len(changed) > len(initial) // 2
    reference = dict(trainer.run._reference_denoiser.named_parameters())
    assert all(torch.equal(initial[n], reference[n]) for n in initial)


# --- resume and data -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_kill_and_resume_gives_the_same_losses(tiny_pipeline_dir, tmp_path):
    # 6 pairs, batches of 2, 2 micro-batches per step: steps straddle epoch ends, so the resume restores the data
    # position mid-epoch; crops, flips and caption dropout are on.
    data = _write_pairs(tmp_path / "pairs", num_pairs=6)
    overrides = [
        "max_steps=4",
        "checkpoint.every=2",
        "optim.gradient_accumulation_steps=2",
        "data.random_crop=true",
        "data.empty_caption_prob=0.5",
    ]
    model = tiny_pipeline_dir("sd15")
    _trainer(_config(tmp_path, model, data, overrides, name="straight")).train()

    crashing = _trainer(_config(tmp_path, model, data, overrides, name="resumed"))
    real_step = crashing.run.optimizer_step

    def optimizer_step(step=None):
        if step == 2:  # the third optimizer step: killed after its backward, before the update
            raise KeyboardInterrupt
        return real_step(step=step)

    crashing.run.optimizer_step = optimizer_step
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    _trainer(_config(tmp_path, model, data, [*overrides, "checkpoint.resume_from=latest"], name="resumed")).train()

    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step_number in (3, 4):
        assert resumed[step_number]["loss"] == pytest.approx(straight[step_number]["loss"], rel=1e-5, abs=1e-7)
        assert resumed[step_number]["data/epoch"] == straight[step_number]["data/epoch"]
    assert straight[3]["loss"] != pytest.approx(straight[4]["loss"], abs=1e-9)


def _break_images(folder, rows, side=1):
    """Overwrite image ``side`` of the pairs written at ``rows`` with bytes no decoder reads (found at train time)."""
    for row in rows:
        (folder / "images" / f"{row:06d}_{side}.png").write_bytes(b"not a png")
    return folder


def _trainer_state(output_dir, step):
    path = Path(output_dir) / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
    return json.loads(path.read_text())


def _data_state(output_dir, step):
    """The DPO trainer's own part of a checkpoint's trainer state."""
    state = _trainer_state(output_dir, step)
    return {key: state[key] for key in ("epoch", "batch", "num_skipped", "num_seen", "bad_examples")}


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_broken_images_are_skipped_counted_and_resumed_exactly(tiny_pipeline_dir, tmp_path):
    # 1 broken pair of 4, one pair per micro-batch, 2 micro-batches per step: every step keeps a readable pair.
    data = _break_images(_write_pairs(tmp_path / "pairs", num_pairs=4), [2])
    overrides = [
        "data.batch_size=1",
        "optim.gradient_accumulation_steps=2",
        "max_steps=4",
        "checkpoint.every=1",
        "data.max_bad_fraction=0.5",
    ]
    model = tiny_pipeline_dir("sd15")
    _trainer(_config(tmp_path, model, data, overrides, name="straight")).train()
    metrics = _metrics(tmp_path / "straight")
    assert sorted(metrics) == [1, 2, 3, 4] and all("loss" in m for m in metrics.values())
    assert metrics[4]["data/num_skipped"] == 2  # the broken pair, once per epoch
    state = _trainer_state(tmp_path / "straight", 4)
    assert (state["num_skipped"], state["num_seen"], state["epoch"], state["batch"]) == (2, 8, 2, 0)
    (note,) = state["bad_examples"]  # named once, though skipped in both epochs
    assert "line 3 (row 2), image_1 'images/000002_1.png': UnidentifiedImageError" in note, note

    crashing = _trainer(_config(tmp_path, model, data, overrides, name="resumed"))
    real_step = crashing.run.optimizer_step

    def optimizer_step(step=None):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step=step)

    crashing.run.optimizer_step = optimizer_step
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = [*overrides, "checkpoint.resume_from=latest"]
    _trainer(_config(tmp_path, model, data, resumed, name="resumed")).train()
    for step in (3, 4):  # the data position, the skip counters and the named bad records continue exactly
        assert _data_state(tmp_path / "resumed", step) == _data_state(tmp_path / "straight", step)


def test_unreadable_data_set_stops_at_the_first_step_and_exports_nothing(tiny_pipeline_dir, tmp_path):
    data = _break_images(_write_pairs(tmp_path / "pairs", num_pairs=4), range(4))
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), data, ["checkpoint.every=1"]))
    before = {k: v.clone() for k, v in trainer.run.trainable_state_dict().items()}
    with pytest.raises(ValueError, match=r"optimizer step 1 .*no readable pair") as info:
        trainer.train()
    message = str(info.value)
    named = set(re.findall(r"00000[0-3]_1\.png", message))
    assert len(named) == 2, message  # the step's two pairs, by file
    assert "UnidentifiedImageError" in message and "row " in message
    assert not (tmp_path / "run" / "lora").exists() and not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))
    after = trainer.run.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_too_many_unreadable_pairs_stop_the_run_unless_allowed(tiny_pipeline_dir, tmp_path):
    # 3 broken pairs of 10; 4 pairs per step (never all broken); the share is judged once an epoch (10 pairs) is seen.
    data = _break_images(_write_pairs(tmp_path / "pairs", num_pairs=10), [0, 3, 6])
    overrides = ["optim.gradient_accumulation_steps=2", "max_steps=3"]
    model = tiny_pipeline_dir("sd15")
    with pytest.raises(ValueError, match=r"data\.max_bad_fraction = 0\.1") as info:
        _trainer(_config(tmp_path, model, data, overrides, name="strict")).train()
    message = str(info.value)
    # Epoch 0 (10 pairs, 3 broken) and 2 pairs of epoch 1 were drawn by the end of step 3.
    assert re.search(r"\b[345] of the 12 pairs", message) and "optimizer step 3" in message, message
    assert set(re.findall(r"00000\d_1\.png", message)) == {"000000_1.png", "000003_1.png", "000006_1.png"}
    assert not (tmp_path / "strict" / "lora").exists()

    _trainer(_config(tmp_path, model, data, [*overrides, "data.max_bad_fraction=0.5"], name="lenient")).train()
    assert (tmp_path / "lenient" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert _metrics(tmp_path / "lenient")[3]["data/num_skipped"] >= 3


# --- configs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    config = load_config(DiffusionDPOConfig, path)
    assert config.method == "diffusion_dpo"
    assert get_trainer(config.method) == (DiffusionDPOConfig, DiffusionDPOTrainer)


def test_published_hyperparameters():
    sd15 = load_config(DiffusionDPOConfig, CONFIG_DIR / "sd15_pickapic.yaml")
    assert (sd15.dpo.beta, sd15.optim.lr, sd15.max_steps, sd15.data.resolution) == (5000.0, 2.048e-5, 2000, 512)
    assert sd15.data.batch_size * sd15.optim.gradient_accumulation_steps * 16 == 2048
    sdxl = load_config(DiffusionDPOConfig, CONFIG_DIR / "sdxl_pickapic.yaml")
    assert (sdxl.optim.warmup_steps, sdxl.data.resolution) == (200, 1024)
    assert load_config(DiffusionDPOConfig, CONFIG_DIR / "sd3_pickapic.yaml").dpo.beta == 100.0


def test_tiny_cpu_config_runs(tiny_pipeline_dir, pairs_dir, tmp_path):
    overrides = [
        f"model.path={tiny_pipeline_dir('sd15')}",
        f"data.source={pairs_dir}",
        f"output_dir={tmp_path / 'tiny'}",
        "max_steps=2",
    ]
    config = load_config(DiffusionDPOConfig, CONFIG_DIR / "tiny_cpu.yaml", overrides)
    DiffusionDPOTrainer(config).train()
    assert (tmp_path / "tiny" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_config_errors_name_their_keys(tmp_path):
    base = {"model": {"path": "m"}, "data": {"source": "d"}}
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(DiffusionDPOConfig, {**base, "dpo": {"beta": -1.0}})
    with pytest.raises(ConfigError, match="data.empty_caption_prob"):
        load_config(DiffusionDPOConfig, {**base, "data": {"source": "d", "empty_caption_prob": 1.5}})
    with pytest.raises(ConfigError, match="reward"):
        load_config(DiffusionDPOConfig, {**base, "eval": {"every": 10, "prompts": ["a cat"]}})
    assert load_config(DiffusionDPOConfig, base).data.empty_caption_prob == 0.2


def test_max_bad_fraction_is_validated():
    base = {"model": {"path": "m"}}
    assert load_config(DiffusionDPOConfig, {**base, "data": {"source": "d"}}).data.max_bad_fraction == 0.1
    for value in (0.0, 1.0):
        config = load_config(DiffusionDPOConfig, {**base, "data": {"source": "d", "max_bad_fraction": value}})
        assert config.data.max_bad_fraction == value
    for value in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"data\.max_bad_fraction.*must be in \[0, 1\]"):
            load_config(DiffusionDPOConfig, {**base, "data": {"source": "d", "max_bad_fraction": value}})


# --- learning --------------------------------------------------------------------------------------------------------


TRAIN_PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle",
    "a cat",
    "a yellow star",
    "three circles",
    "a dog",
    "a house",
]
HELD_OUT_PROMPTS = ["a purple star", "three blue squares", "a cat", "an empty room"]


def _held_out_redness(adapter):
    """Redness of 16 fixed-seed ODE samples (Euler) of prompts not in the training pairs, paired before/after.

    Same prompts, seeds and sampler as ``_held_out_redness`` in test_grpo.py; "a cat" is kept there as well."""
    from diffalign.samplers import ode_plan, rollout
    from diffalign.testing import redness

    trajectory = rollout(adapter, HELD_OUT_PROMPTS, ode_plan(6, kernel="sde"), num_images_per_prompt=4, seeds=10_000)
    return redness(trajectory.images)


@pytest.mark.slow  # a learning run
def test_learning_from_ai_feedback_pairs_raises_redness(tiny_pipeline_dir, tmp_path):
    """AI feedback + Diffusion-DPO learns (docs/methods/dpo.md#ai-feedback-pairs): pairs made by
    ``make_preference_pairs`` (the function behind ``diffalign pairs``) with the colour reward (mean red minus mean
    green and blue), then 40 DPO steps of a rank-8 LoRA, raise the held-out redness.

    Setup: tiny SD3 with the trained shapes-world VAE (colours follow the latents; a random VAE flattens them) and a
    random denoiser; 8 prompts x 8 ODE candidates, ``pairing="all"`` (224 pairs); beta = the flow default (100: the
    loss starts at ln 2 and falls to ~0.4, no saturation), lr 1e-2, 4 pairs per step, the data defaults otherwise.
    The held-out images use fixed seeds and the ODE sampler, so an unchanged model gives exactly the same images and
    the paired difference is a systematic change.

    Calibration (held-out redness 0.0819 before; seed = pair seed and run seed): seeds 0-4 gained +0.033, +0.035,
    +0.027, +0.029, +0.027 with every one of the 16 held-out images redder (smallest single-image gain +0.017); with
    the default caption dropout (this test) seeds 0-2 gained +0.033, +0.036, +0.028. Pairs made with the reversed
    reward (winner = the least red) lowered it instead (-0.060, -0.047): the change follows the preferences, it is
    not a drift of the LoRA. The margin, 0.01, is about a third of the smallest calibrated gain and about the
    seed-to-seed std of the reward (~0.01); the test also asks that at least 12 of the 16 images get redder
    (calibration: 16 of 16).
    """
    from diffalign.adapters import load_adapter
    from diffalign.data.ai_feedback import make_preference_pairs

    folder = tiny_pipeline_dir("sd3", vae="shapes")
    kwargs = _adapter_kwargs("sd3")
    pairs = tmp_path / "pairs"
    make_preference_pairs(
        load_adapter(folder, **kwargs),
        TRAIN_PROMPTS,
        "diffalign.testing:redness",
        8,
        pairs,
        pairing="all",
        num_steps=6,
        guidance_scale=1.0,
        seed=0,
        batch_size=16,
    )
    config = load_config(
        DiffusionDPOConfig,
        {
            "model": {"path": str(folder), "lora": {"rank": 8}},
            "data": {"source": str(pairs), "batch_size": 4, "resolution": SIZE},
            "output_dir": str(tmp_path / "run"),
            "max_steps": 40,
            "seed": 0,
            "optim": {"lr": 1e-2},
            "logging": {"log_with": "none"},
            "checkpoint": {"every": 0},
        },
    )
    trainer = _trainer(config, "sd3")
    assert trainer.beta == 100.0 and len(trainer.dataset) == 8 * 8 * 7 // 2
    before = _held_out_redness(trainer.adapter)
    trainer.train()
    after = _held_out_redness(trainer.adapter)
    gain = after - before
    message = f"held-out redness {before.mean():.4f} -> {after.mean():.4f}, per image {gain.tolist()}"
    assert gain.mean().item() > 0.01, message
    assert (gain > 0).sum().item() >= 12, message


@pytest.mark.parametrize(
    ("family", "option", "median"),
    [("sd3", "scheduler", 0.75), ("sd3", "none", 0.5), ("flux", "scheduler", 0.5)],
)
def test_flow_sigmas_follow_the_shifted_training_schedule(tiny_pipeline_dir, tmp_path, family, option, median):
    """SD3 (static shift 3): median sigma 3 * 0.5 / (1 + 2 * 0.5) = 0.75, as diffusers' SD3 scripts draw it;
    FLUX shifts with the resolution at sampling only, and its training density is not shifted."""
    data = _write_pairs(tmp_path / "pairs")
    config = _config(tmp_path, tiny_pipeline_dir(family), data, [f"dpo.sigma_shift={option}"])
    trainer = _trainer(config, family)
    sigmas = trainer.sample_timesteps(10_000, torch.Generator().manual_seed(0)) / 1000
    assert abs(sigmas.median().item() - median) < 0.02
    assert 0 < sigmas.min().item() and sigmas.max().item() < 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), 3.5),
        pytest.param(("eval.guidance_scale=2.5",), 2.5, marks=pytest.mark.slow),
        pytest.param(("dpo.flux_guidance=1.0",), 1.0, marks=pytest.mark.slow),
    ],
)
def test_flux_dpo_trains_at_the_guidance_it_samples_with(
    overrides, expected, tiny_pipeline_dir, pairs_dir, tmp_path, monkeypatch
):
    """FLUX.1-dev's guidance embedding sees the sampling guidance in training (3.5 by default), not 1."""
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("flux"), pairs_dir, overrides), "flux")
    seen = []
    predict = trainer.adapter.predict

    def record(latents, timesteps, cond, guidance_scale=1.0):
        seen.append(guidance_scale)
        return predict(latents, timesteps, cond, guidance_scale)

    monkeypatch.setattr(trainer.adapter, "predict", record)
    _, _, batch = next(trainer.batch_stream(0, 0))
    trainer.loss(batch, torch.Generator().manual_seed(0))
    assert seen and set(seen) == {expected}


def test_offloaded_frozen_modules_give_the_same_loss(tiny_pipeline_dir, pairs_dir, tmp_path):
    """dpo.offload_frozen keeps text encoders, VAE and the reference copy off the device between their forwards
    (their parameters are placeholders outside a forward) and changes nothing in the result."""
    losses = []
    for offload in (False, True):
        overrides = ["model.lora.rank=0", f"dpo.offload_frozen={str(offload).lower()}"]
        trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), pairs_dir, overrides, name=str(offload)))
        _, _, batch = next(trainer.batch_stream(0, 0))
        losses.append(trainer.loss(batch, torch.Generator().manual_seed(0))[0].detach())
        if offload:
            reference = trainer.run._reference_denoiser
            for module in (trainer.adapter.pipe.text_encoder, trainer.adapter.vae, reference):
                assert next(module.parameters()).device.type == "meta"  # the weights live in the hook's CPU copy
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.slow  # a whole run and an export, loaded back
def test_full_finetuning_writes_a_loadable_model_folder(tiny_pipeline_dir, pairs_dir, tmp_path):
    """A full fine-tune ends with <output_dir>/model, a diffusers pipeline holding the trained UNet (also with the
    frozen modules offloaded during training), which diffalign sample takes as --model."""
    from diffalign.cli import main

    overrides = ["model.lora.rank=0", "dpo.offload_frozen=true", "max_steps=1"]
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), pairs_dir, overrides))
    trainer.train()
    folder = trainer.run.output_dir / "model"
    assert not (trainer.run.output_dir / "lora").exists()
    loaded = DiffusionPipeline.from_pretrained(folder)
    trained = trainer.adapter.denoiser.state_dict()
    base = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sd15"))
    assert any(not torch.equal(trained[name], base.unet.state_dict()[name]) for name in trained)  # the step moved it
    for name, value in loaded.unet.state_dict().items():
        torch.testing.assert_close(value, trained[name].cpu())
    base_encoder = base.text_encoder.state_dict()
    for name, value in loaded.text_encoder.state_dict().items():  # the offloaded encoder came back whole
        torch.testing.assert_close(value, base_encoder[name])
    out = tmp_path / "sample.png"
    args = ["sample", "--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
    assert main([*args, "--height", "32", "--width", "32"]) == 0 and out.is_file()


# --- streamed parquet data, the caption cache, metrics over processes ------------------------------------------------


@pytest.mark.slow  # two runs and a resume
def test_streamed_parquet_run_resumes_with_the_same_losses(tiny_pipeline_dir, tmp_path):
    """Parquet is streamed (docs/methods/dpo.md#streaming): 12 pairs in row groups of 2, two streams in one process
    (one pair of each per batch), 2 micro-batches a step, killed in step 3 and resumed mid-epoch."""
    data = _write_pairs(tmp_path / "pairs", num_pairs=12, data_format="parquet", rows_per_group=2)
    overrides = [
        "max_steps=4",
        "checkpoint.every=2",
        "optim.gradient_accumulation_steps=2",
        "data.num_streams=2",
        "data.shuffle_buffer=3",
        "data.random_crop=true",
    ]
    model = tiny_pipeline_dir("sd15")
    straight = _trainer(_config(tmp_path, model, data, overrides, name="straight"))
    assert sorted(sum(straight.epoch_batches(0), [])) == list(range(12)) and straight.num_batches == 6
    straight.train()

    crashing = _trainer(_config(tmp_path, model, data, overrides, name="resumed"))
    real_step = crashing.run.optimizer_step

    def optimizer_step(step=None):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step=step)

    crashing.run.optimizer_step = optimizer_step
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    _trainer(_config(tmp_path, model, data, [*overrides, "checkpoint.resume_from=latest"], name="resumed")).train()
    straight_metrics, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert _data_state(tmp_path / "straight", 2)["batch"] == 4  # the checkpoint resumed from is mid-epoch
    for step_number in (3, 4):
        assert resumed[step_number]["loss"] == pytest.approx(straight_metrics[step_number]["loss"], rel=1e-5, abs=1e-7)
        assert resumed[step_number]["num_train_pairs"] == 4.0


@pytest.mark.slow  # two runs (about 9 s on 2 loaded cores)
def test_caption_cache_gives_the_same_losses_and_frees_the_text_encoders(tiny_pipeline_dir, tmp_path):
    """data.precompute_text_embeddings with model.offload_text_encoders: delete: every caption of the data (read from
    the caption column) and "" (caption dropout) are encoded once, the text encoders leave the pipeline, and the
    conditioning, the losses and a training step are those without the cache (same seed, same batches)."""
    data = _write_pairs(tmp_path / "pairs", num_pairs=8, data_format="parquet", rows_per_group=2)
    model, dropout = tiny_pipeline_dir("sd15"), ["data.empty_caption_prob=0.5"]
    cache = [*dropout, "data.precompute_text_embeddings=true", "model.offload_text_encoders=delete"]
    plain = _trainer(_config(tmp_path, model, data, dropout, name="plain"))
    cached = _trainer(_config(tmp_path, model, data, cache, name="cached"))
    assert plain.adapter.text_cache is None and plain.adapter.pipe.text_encoder is not None
    adapter = cached.adapter
    assert adapter.pipe.text_encoder is None and adapter.text_encoders_released == "delete"
    assert len(adapter.text_cache) == len(CAPTIONS) + 1
    assert not adapter.text_cache.missing(["", *CAPTIONS], None, False)

    streams = [trainer.batch_stream(0, 0) for trainer in (plain, cached)]
    batches = [(a, b) for (_, _, a), (_, _, b) in itertools.islice(zip(*streams), 4)]
    assert "" in {caption for batch, _ in batches for caption in batch["captions"]}  # dropout shows up
    for i, (batch, same) in enumerate(batches):
        assert batch["captions"] == same["captions"]
        torch.testing.assert_close(cached.conditioning(same).embeds, plain.conditioning(batch).embeds)
        expected = plain.loss(batch, torch.Generator().manual_seed(i))[1]
        got = cached.loss(same, torch.Generator().manual_seed(i))[1]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)
    steps = [trainer.train_step(trainer.batch_stream(1, 0), 0) for trainer in (plain, cached)]
    assert steps[1]["num_train_pairs"] == 2.0  # one micro-batch of 2 pairs
    assert steps[1]["loss"] == pytest.approx(steps[0]["loss"], rel=1e-5)
    with pytest.raises(RuntimeError, match="not in the text-embedding cache, e.g. 'an unseen caption'"):
        adapter.encode_prompt(["an unseen caption"], with_negative=False)
    with pytest.raises(ConfigError, match="data.precompute_text_embeddings"):
        _config(tmp_path, model, data, ["model.offload_text_encoders=delete"])


def test_streams_that_do_not_fit_the_processes_are_refused(tiny_pipeline_dir, tmp_path):
    data = _write_pairs(tmp_path / "pairs", num_pairs=8, data_format="parquet", rows_per_group=2)
    with pytest.raises(ConfigError, match=r"data\.num_streams.*data\.batch_size") as info:
        _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), data, ["data.num_streams=3"]))
    assert "multiple of the streams per process" in str(info.value)


DISTRIBUTED_SCRIPT = """
import json, sys
from pathlib import Path
from diffalign.config import load_config
from diffalign.trainers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer

model, data, out, batch_size = sys.argv[1:5]
raw = {
    "model": {"path": model, "lora": {"rank": 4}},
    "data": {"source": data, "batch_size": int(batch_size), "num_streams": 2, "shuffle_buffer": 3},
    "output_dir": out, "seed": 0, "max_steps": 1, "optim": {"lr": 1e-3},
    "logging": {"log_with": "none"}, "checkpoint": {"every": 0},
}
trainer = DiffusionDPOTrainer(load_config(DiffusionDPOConfig, raw))
accelerator = trainer.run.accelerator
metrics = trainer.train_step(trainer.batch_stream(0, 0), 0)
record = {"world": accelerator.num_processes, "batches": trainer.epoch_batches(0), "metrics": metrics}
Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
"""


@pytest.mark.slow  # a 2-process accelerate launch
def test_two_processes_read_disjoint_streams_and_share_the_global_batch(tiny_pipeline_dir, tmp_path):
    """With data.num_streams: 2, one process with batches of 2 and two processes with batches of 1 train on the same
    global batches; the processes' pairs are disjoint and together the whole set, and logged metrics are over both
    processes (num_train_pairs summed, the same loss on each)."""
    data = _write_pairs(tmp_path / "pairs", num_pairs=12, data_format="parquet", rows_per_group=2)
    script = tmp_path / "dpo_script.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    model = str(tiny_pipeline_dir("sd15"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), model, str(data), str(tmp_path / "one"), "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launch = cpu_launch_command(2) + ["--multi_gpu"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    double = subprocess.run(
        [*launch, model, str(data), str(tmp_path / "two"), "1"], capture_output=True, text=True, timeout=600, env=env
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert (one["world"], two[0]["world"]) == (1, 2)
    assert one["batches"] == [a + b for a, b in zip(two[0]["batches"], two[1]["batches"])]
    rows = [{row for batch in record["batches"] for row in batch} for record in two]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(12))
    assert one["metrics"]["num_train_pairs"] == two[0]["metrics"]["num_train_pairs"] == 2.0
    assert two[0]["metrics"] == two[1]["metrics"]


@pytest.mark.slow  # two runs
def test_a_resumed_run_reads_the_saved_caption_cache_instead_of_encoding(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The caption cache is written to <output_dir>/text_cache/rank0.safetensors; a resume reads it back (the same
    tensors) and encodes nothing, and a file saved for another model is not used."""
    from diffalign.adapters.sd import StableDiffusionAdapter
    from diffalign.adapters.text_cache import TextEmbeddingCache

    calls = []
    encode = StableDiffusionAdapter._encode

    def counted(self, prompts, negative_prompt, with_negative):
        calls.append(list(prompts))
        return encode(self, prompts, negative_prompt, with_negative)

    monkeypatch.setattr(StableDiffusionAdapter, "_encode", counted)
    data = _write_pairs(tmp_path / "pairs", num_pairs=8, data_format="parquet", rows_per_group=2)
    cache = ["data.precompute_text_embeddings=true", "model.offload_text_encoders=delete"]
    first = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), data, cache))
    assert sorted(sum(calls, [])) == sorted(["", *CAPTIONS])  # each caption once, "" for caption dropout
    first.run.save(1, first.trainer_state())
    saved = tmp_path / "run" / "text_cache" / "rank0.safetensors"
    assert saved.is_file()

    calls.clear()
    resumed = _trainer(_config(tmp_path, tiny_pipeline_dir("sd15"), data, [*cache, "checkpoint.resume_from=latest"]))
    assert calls == [] and resumed.adapter.pipe.text_encoder is None
    for caption in ["", *CAPTIONS]:
        before = first.adapter.text_cache.lookup([caption], None, False)
        after = resumed.adapter.text_cache.lookup([caption], None, False)
        assert all(torch.equal(after.embeds[k], before.embeds[k]) for k in before.embeds)
    identity = resumed.run._text_identity()
    assert TextEmbeddingCache().load(saved, identity) == len(CAPTIONS) + 1
    assert TextEmbeddingCache().load(saved, {**identity, "model": "another/model"}) == 0


# --- InPO / SmPO: inversion noising and smoothed preferences ------------------------------------------------------


@pytest.mark.parametrize(("family", "noising"), [("sd15", "ddim_inversion"), ("sd3", "renoise_inversion")])
def test_inversion_noising_trains_on_the_noise_of_the_policys_own_inversion(
    family, noising, tiny_pipeline_dir, pairs_dir, tmp_path, monkeypatch
):
    from diffalign.samplers.inversion import forward_coefficients, implied_noise, invert

    overrides = [f"dpo.noising={noising}", "dpo.inversion_steps=4"]
    trainer = _trainer(_config(tmp_path, tiny_pipeline_dir(family), pairs_dir, overrides), family)
    adapter, seen = trainer.adapter, {}
    add_noise = adapter.add_noise

    def record(x0, noise, timesteps):
        seen.setdefault("calls", []).append((x0, noise, timesteps))
        return add_noise(x0, noise, timesteps)

    monkeypatch.setattr(adapter, "add_noise", record)
    _, _, batch = next(trainer.batch_stream(0, 0))
    loss, _ = trainer.loss(batch, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0, whatever the noise
    x0, noise, timesteps = seen["calls"][-1]  # the training call (the coefficient probes come before it)
    assert torch.equal(timesteps[:2], timesteps[2:])  # the level is still shared by a pair ...
    assert not torch.allclose(noise[:2], noise[2:])  # ... the noise is each image's own
    cond = trainer.conditioning(batch)
    cond = type(cond).cat([cond, cond])

    def predict(sample, levels):
        return adapter.predict(sample, levels, cond)

    assert trainer.inversion_level == ("source" if family == "sd3" else "destination")  # auto: explicit Euler for flow
    inverted = invert(
        predict, adapter, x0, timesteps, 4, renoise=noising == "renoise_inversion", at=trainer.inversion_level
    )
    expected = implied_noise(x0, inverted, forward_coefficients(adapter, timesteps, x0))
    torch.testing.assert_close(noise.float(), expected, atol=1e-5, rtol=1e-5)


def test_inversion_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="dpo.inversion_eta"):
        _config(tmp_path, tmp_path, tmp_path, ["dpo.inversion_eta=0.1"])
    with pytest.raises(ConfigError, match="dpo.inversion_steps"):
        _config(tmp_path, tmp_path, tmp_path, ["dpo.noising=ddim_inversion", "dpo.inversion_steps=0"])
    with pytest.raises(ConfigError, match="reward"):
        _config(tmp_path, tmp_path, tmp_path, ["dpo.smoothing=reward"])
    with pytest.raises(ConfigError, match="dpo.loss"):
        _config(tmp_path, tmp_path, tmp_path, ["dpo.smoothing=reward", "dpo.loss=sft", "reward=jpeg_compressibility"])


def test_smoothing_relabels_pairs_by_reward_and_gives_each_its_beta(tiny_pipeline_dir, tmp_path):
    from diffalign.testing import redness

    # Pair 0 labels the redder image the winner, pair 1 the less red one: the reward relabels pair 1 only.
    red, grey = torch.zeros(3, SIZE, SIZE), torch.full((3, SIZE, SIZE), 128 / 255)  # 8-bit exact: stored as PNG
    red[0] = 230 / 255
    records = [("a red circle", red, grey, 1.0), ("a red square", red, grey, 0.0)]
    data = write_preference_dataset(records, tmp_path / "pairs", "jsonl")
    overrides = ["reward=jpeg_compressibility", "dpo.smoothing=reward", "dpo.smoothing_temperature=0.5"]
    config = _config(tmp_path, tiny_pipeline_dir("sd15"), data, overrides)
    trainer = DiffusionDPOTrainer(config, run=TrainingRun(config), reward=redness)
    _, _, batch = next(trainer.batch_stream(0, 0))
    relabelled, beta, metrics = trainer.smoothed_pairs(batch)
    assert metrics["smoothing/relabelled"].item() == 0.5
    assert torch.allclose(relabelled["pixel_values_w"][:, 0].mean((1, 2)), torch.tensor(230 / 255))  # red wins
    gap = (redness(red[None]) - redness(grey[None])).item()
    expected = 5000.0 * 10 * (2 * torch.sigmoid(torch.tensor(gap / 0.5)) - 1)
    torch.testing.assert_close(beta, expected.expand(2), atol=1e-3, rtol=1e-5)
    assert metrics["smoothing/beta"].item() == pytest.approx(expected.item(), rel=1e-5)
    loss, logged = trainer.loss(batch, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and logged["smoothing/relabelled"].item() == 0.5
