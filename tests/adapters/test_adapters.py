"""Adapters reproduce the diffusers pipelines exactly, for every family, and LoRA round-trips through diffusers."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from families import FAMILIES_FIRST_FIVE_FAST, pipeline_guidance

from diffalign.adapters import Conditioning, UnsupportedPipelineError, load_adapter
from diffalign.testing import FAMILIES


PROMPTS = ["a red circle", "two blue squares to the left of a green triangle"]
STEPS = 8
SIZE = 32


def _family_kwargs(family):
    # T5 slots: a shorter sequence than the pipelines' default keeps the tiny tests fast; both sides use it.
    return {"max_sequence_length": 77} if family in ("sd3", "flux", "flux_kontext") else {}


def _pipe_images(pipe, family, guidance_scale, seed=0, **kwargs):
    return pipe(
        prompt=list(PROMPTS),  # a copy: ZImagePipeline writes its chat template into the caller's list
        num_inference_steps=STEPS,
        **pipeline_guidance(family, guidance_scale),
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **_family_kwargs(family),
        **kwargs,
    ).images


def _adapter_images(adapter, guidance_scale, seed=0):
    """A plain loop: adapter.prepare_latents + adapter.predict + the pipeline's own scheduler step + decode."""
    cond = adapter.encode_prompt(PROMPTS, with_negative=guidance_scale > 1)
    schedule = adapter.set_timesteps(STEPS)
    latents = adapter.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in schedule.timesteps:
            output = adapter.predict(latents, t, cond, guidance_scale)
            latents = adapter.scheduler.step(output, t, latents, return_dict=False)[0]
        return adapter.decode(latents)


@pytest.fixture(scope="module", params=FAMILIES_FIRST_FIVE_FAST)
def family_setup(request, tiny_pipeline_dir):
    family = request.param
    folder = tiny_pipeline_dir(family)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(folder, height=SIZE, width=SIZE, **_family_kwargs(family))
    return family, pipe, adapter


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_adapter_loop_reproduces_pipeline(family_setup, guidance_scale):
    family, pipe, adapter = family_setup
    expected = _pipe_images(pipe, family, guidance_scale)
    images = _adapter_images(adapter, guidance_scale)
    assert images.shape == (len(PROMPTS), 3, SIZE, SIZE)
    assert images.dtype == torch.float32
    assert (images - expected).abs().max().item() <= 1e-4


def test_guidance_changes_the_output(family_setup):
    """Guards the parity test against a silently ignored guidance scale (CFG batch or FLUX guidance embedding)."""
    _, _, adapter = family_setup
    diff = (_adapter_images(adapter, 1.0) - _adapter_images(adapter, 5.0)).abs().max().item()
    assert diff > 1e-4


def test_family_and_prediction_type(family_setup):
    family, _, adapter = family_setup
    expected = {"sd15": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon"}.get(family, "flow")
    assert adapter.prediction_type == expected
    assert adapter.family == {"sd15": "sd", "sd2v": "sd"}.get(family, family)


def test_decode_is_differentiable_and_encode_inverts_shape(family_setup):
    _, _, adapter = family_setup
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(1)).requires_grad_(True)
    images = adapter.decode(latents)
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    encoded = adapter.encode_images(images.detach(), generator=torch.Generator().manual_seed(0))
    assert encoded.shape == latents.shape


def test_conditioning_slicing_and_cat(family_setup):
    _, _, adapter = family_setup
    cond = adapter.encode_prompt(PROMPTS, with_negative=True)
    assert len(cond) == 2
    first, second = cond[0], cond[1]
    joined = Conditioning.cat([first, second])
    for key, value in cond.embeds.items():
        assert torch.equal(joined.embeds[key], value)
    repeated = cond.repeat_interleave(3)
    assert len(repeated) == 6
    for key, value in cond.embeds.items():
        assert torch.equal(repeated.embeds[key][3], value[1])


def test_forward_process_targets(family_setup):
    """add_noise / training_target follow the family's parameterisation (closed forms)."""
    _, _, adapter = family_setup
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    noisy = adapter.add_noise(x0, noise, t)
    target = adapter.training_target(x0, noise, t)
    if adapter.prediction_type == "flow":
        sigma = (t.float() / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
        torch.testing.assert_close(target, noise - x0)
    else:
        abar = adapter.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
        expected = noise if adapter.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        torch.testing.assert_close(target, expected)


# --- LoRA ---------------------------------------------------------------------------------------------------------


def _perturb_lora(adapter, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_saved_by_diffalign_loads_into_a_fresh_pipeline(family, tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir(family)
    adapter = load_adapter(folder, height=SIZE, width=SIZE, **_family_kwargs(family))
    base_images = _adapter_images(adapter, 3.0)

    params = adapter.add_lora(rank=4, alpha=8)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert sum(p.requires_grad for p in adapter.denoiser.parameters()) == len(params)
    # A fresh LoRA (B = 0) leaves the model unchanged.
    assert torch.equal(_adapter_images(adapter, 3.0), base_images)

    _perturb_lora(adapter)
    lora_images = _adapter_images(adapter, 3.0)
    assert (lora_images - base_images).abs().max() > 1e-3

    with adapter.lora_disabled():
        assert torch.equal(_adapter_images(adapter, 3.0), base_images)
    assert torch.equal(_adapter_images(adapter, 3.0), lora_images)

    lora_dir = adapter.save_lora(tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    fresh = DiffusionPipeline.from_pretrained(folder)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(lora_dir)
    expected = _pipe_images(fresh, family, 3.0)
    assert (lora_images - expected).abs().max().item() <= 1e-4

    # And diffalign loads its own LoRA back as a trainable adapter.
    other = load_adapter(folder, height=SIZE, width=SIZE, **_family_kwargs(family))
    loaded = other.load_lora(lora_dir)
    assert loaded and all(p.requires_grad for p in loaded)
    assert (_adapter_images(other, 3.0) - lora_images).abs().max().item() <= 1e-5


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_min_timestep_switches_the_lora_off_at_and_below_it(family, tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir(family), height=SIZE, width=SIZE, **_family_kwargs(family))
    adapter.add_lora(rank=4)
    _perturb_lora(adapter)
    cond = adapter.encode_prompt(["a red circle", "a blue square"])
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700.0, 500.0])

    def outputs():
        with torch.no_grad():
            return adapter.predict(latents, timesteps, cond, 2.0)

    lora = outputs()
    with adapter.lora_disabled():
        base = outputs()
    assert (lora - base).abs().flatten(1).amax(1).min() > 1e-3  # the LoRA changes both samples

    adapter.lora_min_timestep = 500.0
    gated = outputs()  # one sample on each side of the limit: the LoRA acts above it only
    torch.testing.assert_close(gated[0], lora[0])
    torch.testing.assert_close(gated[1], base[1])
    with adapter.lora_disabled():  # the gate's own switch nests inside the caller's: still off after it
        torch.testing.assert_close(outputs(), base)
        torch.testing.assert_close(outputs(), base)
    torch.testing.assert_close(outputs(), gated)

    folder = adapter.save_lora(tmp_path / "lora")
    assert json.loads((folder / "diffalign_lora.json").read_text()) == {"min_timestep": 500.0}

    # diffusers: the LoRA loaded as usual, switched off by the step callback the scope file's docstring describes.
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder)

    def lora_above_limit(pipe, index, timestep, callback_kwargs):
        following = pipe.scheduler.timesteps[index + 1 :]
        if len(following) and following[0] <= 500.0:
            pipe.disable_lora()
        return callback_kwargs

    expected = _pipe_images(pipe, family, 3.0, callback_on_step_end=lora_above_limit)
    assert (_adapter_images(adapter, 3.0) - expected).abs().max().item() <= 1e-4
    pipe.enable_lora()
    assert (_pipe_images(pipe, family, 3.0) - expected).abs().max().item() > 1e-3  # the late steps need it
    other = load_adapter(tiny_pipeline_dir(family), height=SIZE, width=SIZE, **_family_kwargs(family))
    other.load_lora(folder)
    assert other.lora_min_timestep == 500.0
    adapter.lora_min_timestep = None  # a LoRA of every timestep leaves no scope file behind
    assert not (adapter.save_lora(folder) / "diffalign_lora.json").exists()
    other.load_lora(folder)
    assert other.lora_min_timestep is None


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_default_lora_targets_exist_in_each_denoiser(tiny_pipeline_dir):
    for family in FAMILIES:
        adapter = load_adapter(tiny_pipeline_dir(family), height=SIZE, width=SIZE, **_family_kwargs(family))
        names = [name for name, _ in adapter.denoiser.named_modules()]
        for target in adapter.default_lora_targets:
            assert any(name.endswith(target) for name in names), (family, target)


def test_full_finetuning_has_no_lora_and_disabling_is_a_no_op(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    assert not adapter.has_lora
    with adapter.lora_disabled():
        pass
    with pytest.raises(ValueError, match="rank"):
        adapter.add_lora(rank=0)


# --- errors -------------------------------------------------------------------------------------------------------


def test_unsupported_pipeline_object_names_class_and_families():
    class MyCustomPipeline:
        pass

    with pytest.raises(UnsupportedPipelineError) as err:
        load_adapter(MyCustomPipeline())
    message = str(err.value)
    assert "MyCustomPipeline" in message
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in message


def test_unsupported_pipeline_folder_fails_before_loading(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnsupportedPipelineError, match="KandinskyPipeline"):
        load_adapter(tmp_path)


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_adapter(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        load_adapter(tmp_path / "missing" / "model")


def test_resolution_must_match_the_latent_grid(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="multiple of 4"):
        load_adapter(tiny_pipeline_dir("flux"), height=34, width=32)


def test_xformers_missing_gives_a_clear_error(tiny_pipeline_dir):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed")
    except ImportError:
        pass
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    with pytest.raises(ImportError, match="diffalign\\[xformers\\]"):
        adapter.set_attention_backend("xformers")


def test_gradient_checkpointing_switch(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"))
    adapter.enable_gradient_checkpointing()
    assert adapter.denoiser.is_gradient_checkpointing
    adapter.enable_gradient_checkpointing(False)
    assert not adapter.denoiser.is_gradient_checkpointing


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fixed_timestep_shift_replaces_the_schedulers(family, tiny_pipeline_dir):
    """model.timestep_shift: the sampling sigmas are shift * s / (1 + (shift - 1) * s) of the unshifted schedule
    (MixGRPO's sd3_time_shift), for a dynamic (FLUX) and a static (SD3) scheduler alike."""
    from diffalign.adapters import load_adapter

    adapter = load_adapter(tiny_pipeline_dir(family), height=32, width=32)
    native = adapter.set_timesteps(8).sigmas.clone()
    if family == "flux":  # the pipeline's linear sigmas
        s = torch.linspace(1.0, 1 / 8, 8, dtype=torch.float64)
    else:  # diffusers spaces SD3's timesteps between the training schedule's ends
        scheduler = adapter.scheduler
        s = torch.linspace(scheduler.sigma_max, scheduler.sigma_min, 8, dtype=torch.float64)
    for shift in (2.0, 1.0):
        adapter.timestep_shift = shift
        sigmas = adapter.set_timesteps(8).sigmas
        torch.testing.assert_close(sigmas[:-1].double(), shift * s / (1 + (shift - 1) * s), atol=1e-6, rtol=0)
        assert sigmas[-1].item() == 0.0
        assert not torch.allclose(native, sigmas)  # neither FLUX's dynamic shift nor SD3's 3
    adapter.timestep_shift = None
    torch.testing.assert_close(adapter.set_timesteps(8).sigmas, native)  # the scheduler's own again


def test_saved_lora_records_the_schedule_shift_it_was_trained_on(tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir("flux"), height=SIZE, width=SIZE, **_family_kwargs("flux"))
    adapter.add_lora(rank=4)
    adapter.timestep_shift = 3.0
    folder = adapter.save_lora(tmp_path / "lora")
    assert json.loads((folder / "diffalign_lora.json").read_text()) == {"timestep_shift": 3.0}
    fresh = load_adapter(tiny_pipeline_dir("flux"), height=SIZE, width=SIZE, **_family_kwargs("flux"))
    fresh.load_lora(folder)
    assert fresh.timestep_shift == 3.0
    torch.testing.assert_close(fresh.set_timesteps(6).sigmas, adapter.set_timesteps(6).sigmas)
    adapter.timestep_shift = None
    assert not (adapter.save_lora(tmp_path / "plain") / "diffalign_lora.json").exists()
