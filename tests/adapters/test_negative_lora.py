"""A negative LoRA in CFG's unconditional branch (Self-NPO sampling, docs/methods/self-npo.md#sampling)."""

import pytest
import torch

from diffalign.adapters import load_adapter
from diffalign.testing import random_lora_adapter


GUIDANCE = 3.0


@pytest.fixture(scope="module")
def parts(tiny_pipeline_dir, tmp_path_factory):
    """A random LoRA saved once, the folder of the tiny SD3, and one batch of inputs."""
    folder = tiny_pipeline_dir("sd3")
    lora_dir = tmp_path_factory.mktemp("negative")
    random_lora_adapter(folder, seed=3).save_lora(lora_dir)
    latents = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    return folder, lora_dir, latents


def _adapter(folder):
    return load_adapter(folder, height=16, width=16)


def _predict(adapter, latents, cond, guidance=GUIDANCE):
    with torch.no_grad():
        return adapter.predict(latents, torch.tensor(600.0), cond, guidance)


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_the_unconditional_half_runs_the_negative_lora_and_the_text_half_the_base(parts):
    folder, lora_dir, latents = parts
    base, negative = _adapter(folder), _adapter(folder)
    negative.load_negative_lora(lora_dir)
    assert negative.negative_lora == "negative" and not negative.has_lora
    cond = base.encode_prompt(["a red circle", "two blue squares"])
    lora_model = _adapter(folder)
    lora_model.load_lora(lora_dir)
    uncond = _predict(lora_model, latents, cond.unconditional(), 1.0)  # the NPO model on the empty prompt
    text = _predict(base, latents, cond.without_negative(), 1.0)
    torch.testing.assert_close(_predict(negative, latents, cond), uncond + GUIDANCE * (text - uncond))
    assert (_predict(negative, latents, cond) - _predict(base, latents, cond)).abs().max() > 1e-4
    # Without CFG there is no unconditional half: the negative LoRA does nothing.
    torch.testing.assert_close(_predict(negative, latents, cond, 1.0), text, rtol=0, atol=0)


@pytest.mark.slow  # over 3 s: three adapters with two LoRAs
def test_with_an_aligned_lora_the_negative_branch_adds_to_it_and_never_trains(parts, tmp_path):
    folder, lora_dir, latents = parts
    aligned_dir = tmp_path / "aligned"
    random_lora_adapter(folder, seed=4).save_lora(aligned_dir)
    adapter = _adapter(folder)
    adapter.load_negative_lora(lora_dir)
    params = adapter.load_lora(aligned_dir)  # the trainable "default" adapter, loaded after the negative one
    names = {id(p): n for n, p in adapter.denoiser.named_parameters()}
    assert params and all(".default." in names[id(p)] for p in params)
    assert all(not p.requires_grad for n, p in adapter.denoiser.named_parameters() if ".negative." in n)
    cond = adapter.encode_prompt(["a red circle", "two blue squares"])
    aligned = _adapter(folder)
    aligned.load_lora(aligned_dir)
    text = _predict(aligned, latents, cond.without_negative(), 1.0)  # the text half: the aligned model alone
    guided = _predict(adapter, latents, cond)
    plain_cfg = _predict(aligned, latents, cond)
    uncond_aligned = _predict(aligned, latents, cond.unconditional(), 1.0)
    # The unconditional half differs from the aligned model's (the negative LoRA adds to it) ...
    uncond = (guided - GUIDANCE * text) / (1 - GUIDANCE)
    assert (uncond - uncond_aligned).abs().max() > 1e-4
    torch.testing.assert_close(plain_cfg, uncond_aligned + GUIDANCE * (text - uncond_aligned))
    # ... and outside CFG the adapter is the aligned model (the negative adapter inactive).
    torch.testing.assert_close(_predict(adapter, latents, cond, 1.0), text, rtol=0, atol=0)
    with adapter.lora_disabled():  # the base text half; the negative branch still on the unconditional half
        base_guided = _predict(adapter, latents, cond)
    assert (base_guided - guided).abs().max() > 1e-4


def test_a_run_can_use_its_own_lora_as_the_negative_branch(parts):
    """Self-NPO evaluates as it trains: negative_lora = "default" puts the trained LoRA on the unconditional half and
    the base model on the text half."""
    folder, lora_dir, latents = parts
    adapter = _adapter(folder)
    adapter.load_lora(lora_dir)
    cond = adapter.encode_prompt(["a red circle", "two blue squares"])
    uncond = _predict(adapter, latents, cond.unconditional(), 1.0)
    with adapter.lora_disabled():
        text = _predict(adapter, latents, cond.without_negative(), 1.0)
    adapter.negative_lora = "default"
    torch.testing.assert_close(_predict(adapter, latents, cond), uncond + GUIDANCE * (text - uncond))
    assert all(p.requires_grad for n, p in adapter.denoiser.named_parameters() if "lora_" in n)


def test_a_missing_negative_lora_is_named(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        _adapter(parts[0]).load_negative_lora(tmp_path)


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_inside_lora_disabled_a_runs_own_negative_lora_is_off_too(parts):
    """With negative_lora = "default", lora_disabled() still means the base model on both halves (the reference,
    RL guidance and LoRA scopes rely on it)."""
    folder, lora_dir, latents = parts
    adapter, base = _adapter(folder), _adapter(folder)
    adapter.load_lora(lora_dir)
    adapter.negative_lora = "default"
    cond = adapter.encode_prompt(["a red circle", "two blue squares"])
    with adapter.lora_disabled():  # two calls against base's one batched call: equal up to float rounding
        torch.testing.assert_close(_predict(adapter, latents, cond), _predict(base, latents, cond), rtol=0, atol=1e-5)
    assert (_predict(adapter, latents, cond) - _predict(base, latents, cond)).abs().max() > 1e-3


def test_a_lora_added_after_a_negative_one_is_active(parts):
    folder, lora_dir, latents = parts
    adapter = _adapter(folder)
    adapter.load_negative_lora(lora_dir)
    cond = adapter.encode_prompt(["a red circle", "two blue squares"])
    before = _predict(adapter, latents, cond, 1.0)
    params = adapter.add_lora(rank=2)
    with torch.no_grad():
        for p in params:
            p.add_(0.3)
    assert adapter.has_lora and (_predict(adapter, latents, cond, 1.0) - before).abs().max() > 1e-4
