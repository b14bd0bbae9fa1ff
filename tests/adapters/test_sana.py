"""SANA with the scheduler its checkpoints ship: flow DPM-Solver++ (the tiny pipeline steps with Euler)."""

import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from diffalign.adapters import load_adapter


PROMPTS = ["a red circle", "two blue squares"]


def _dpm_pipeline(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # SANA's released scheduler config: DPM-Solver++ on flow sigmas with flow_shift 3.
    pipe.scheduler = DPMSolverMultistepScheduler(
        flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True
    )
    return pipe


def test_dpm_solver_schedule_and_steps_reproduce_the_pipeline(tiny_pipeline_dir):
    folder = tiny_pipeline_dir("sana")
    expected = _dpm_pipeline(folder)(
        prompt=list(PROMPTS),
        num_inference_steps=6,
        guidance_scale=4.5,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        use_resolution_binning=False,
    ).images
    adapter = load_adapter(_dpm_pipeline(folder), height=32, width=32)
    schedule = adapter.set_timesteps(6)
    # Flow sigmas from ~1 down to a final 0, the timesteps on the 0..1000 scale the forward process reads.
    assert schedule.sigmas[-1] == 0 and (schedule.sigmas.diff() < 0).all()
    torch.testing.assert_close(schedule.timesteps.float(), (schedule.sigmas[:-1] * 1000).floor(), atol=1.0, rtol=0)
    cond = adapter.encode_prompt(PROMPTS)
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in schedule.timesteps:
            latents = adapter.scheduler.step(adapter.predict(latents, t, cond, 4.5), t, latents, return_dict=False)[0]
        images = adapter.decode(latents)
    assert (images - expected).abs().max().item() <= 1e-4


def test_a_fixed_shift_needs_a_scheduler_that_can_take_it(tiny_pipeline_dir):
    adapter = load_adapter(_dpm_pipeline(tiny_pipeline_dir("sana")), height=32, width=32)
    adapter.timestep_shift = 2.0
    with pytest.raises(ValueError, match="flow_shift"):
        adapter.set_timesteps(4)
