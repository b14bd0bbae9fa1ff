"""Editing families (FLUX.1 Kontext): the source image rides in the conditioning and steers every denoiser call."""

import pytest
import torch
from diffusers import DiffusionPipeline

from diffalign.adapters import load_adapter


PROMPTS = ["make it red", "add a blue square"]
SIZE, STEPS = 32, 6


def _sources(seed: int) -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _edit(adapter, sources, guidance_scale=3.0, seed=0):
    cond = adapter.encode_prompt(PROMPTS, with_negative=False)
    if sources is not None:
        cond = adapter.with_source_images(cond, sources)
    schedule = adapter.set_timesteps(STEPS)
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in schedule.timesteps:
            velocity = adapter.predict(latents, t, cond, guidance_scale)
            latents = adapter.scheduler.step(velocity, t, latents, return_dict=False)[0]
        return adapter.decode(latents)


@pytest.fixture(scope="module")
def kontext(tiny_pipeline_dir):
    return load_adapter(tiny_pipeline_dir("flux_kontext"), height=SIZE, width=SIZE, max_sequence_length=77)


def test_an_edit_reproduces_the_pipeline_given_the_same_source(kontext, tiny_pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("flux_kontext"))
    pipe.set_progress_bar_config(disable=True)
    sources = _sources(1)
    expected = pipe(
        image=sources,
        prompt=list(PROMPTS),
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,  # keep the source at the working size (Kontext's preferred sizes start at 672 px)
        max_sequence_length=77,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert (_edit(kontext, sources) - expected).abs().max().item() <= 1e-4


def test_the_source_image_changes_the_edit(kontext):
    plain, first, second = _edit(kontext, None), _edit(kontext, _sources(1)), _edit(kontext, _sources(2))
    assert (first - plain).abs().max() > 1e-3
    assert (first - second).abs().max() > 1e-3


def test_source_latents_follow_the_conditioning_through_repeats_and_slices(kontext):
    cond = kontext.with_source_images(kontext.encode_prompt(PROMPTS, with_negative=False), _sources(1))
    grouped = cond.repeat_interleave(3)  # a GRPO group of 3 images per prompt
    assert grouped.embeds["image_latents"].shape == (6, 16 * 16 // 4, 4 * 16)
    torch.testing.assert_close(grouped[4].embeds["image_latents"], cond[1].embeds["image_latents"])
    with pytest.raises(ValueError, match="3 source images for 2 prompts"):
        kontext.with_source_images(cond, _sources(1)[[0, 1, 1]])


def test_a_family_that_does_not_edit_says_which_do(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd15"), height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="FluxKontextPipeline"):
        adapter.with_source_images(adapter.encode_prompt(PROMPTS), _sources(1))
