"""The one rollout loop: parity with pipe(), on-policy ratio 1, stored steps, seeds and chunking, grad steps."""

import pytest
import torch
from diffusers import DiffusionPipeline
from families import FAMILIES_FIRST_FIVE_FAST, pipeline_guidance

from diffalign.adapters import load_adapter
from diffalign.samplers.plan import ode_plan, random_window_plan, sde_plan, sliding_window_plan
from diffalign.samplers.rollout import GradientPath, InitialNoise, rollout, transition_log_probs
from diffalign.samplers.steps import gaussian_log_prob


PROMPTS = ["a red circle", "two blue squares"]
SIZE = 32


def _kwargs(family):
    return {"max_sequence_length": 77} if family in ("sd3", "flux", "flux_kontext") else {}


def _kernel(adapter):
    return "sde" if adapter.prediction_type == "flow" else "ddim"


@pytest.fixture(scope="module", params=FAMILIES_FIRST_FIVE_FAST)
def family_adapter(request, tiny_pipeline_dir):
    family = request.param
    return family, load_adapter(tiny_pipeline_dir(family), height=SIZE, width=SIZE, **_kwargs(family))


def test_ode_rollout_reproduces_pipeline(family_adapter, tiny_pipeline_dir):
    family, adapter = family_adapter
    guidance = 3.0
    seeds = [11, 12, 13, 14]
    traj = rollout(
        adapter,
        PROMPTS,
        ode_plan(6, kernel=_kernel(adapter)),
        num_images_per_prompt=2,
        guidance_scale=guidance,
        seeds=seeds,
    )
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    # Each prompt repeated rather than num_images_per_prompt=2, which QwenImagePipeline's encode_prompt breaks (it
    # repeats a 2-D text mask as if it were 3-D); for the other pipelines the two are the same call.
    expected = pipe(
        prompt=[prompt for prompt in PROMPTS for _ in range(2)],  # by name: Flux2Pipeline takes an image first
        num_inference_steps=6,
        **pipeline_guidance(family, guidance),
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
        **_kwargs(family),
    ).images
    assert traj.images.shape == (4, 3, SIZE, SIZE)
    assert traj.prompts == ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    assert traj.prompt_ids.tolist() == [0, 0, 1, 1]
    assert (traj.images - expected).abs().max().item() <= 1e-4
    assert traj.log_probs.shape == (4, 0)


def test_on_policy_ratio_is_one(family_adapter):
    _, adapter = family_adapter
    plan = sde_plan(4, 0.7 if adapter.prediction_type == "flow" else 1.0, kernel=_kernel(adapter))
    traj = rollout(adapter, PROMPTS, plan, num_images_per_prompt=2, guidance_scale=3.0, seeds=0, decode=False)
    assert traj.log_probs.shape == (4, len(plan.stored))
    assert torch.isfinite(traj.log_probs).all()
    with torch.no_grad():
        new, _, _ = transition_log_probs(adapter, traj, list(range(len(plan.stored))))
    ratio = torch.exp(new - traj.log_probs)
    assert (ratio - 1).abs().max().item() <= 1e-5


def test_stored_log_prob_is_the_gaussian_density_of_the_transition(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=SIZE, width=SIZE, max_sequence_length=77)
    traj = rollout(adapter, PROMPTS, sde_plan(3, 0.7), seeds=0, decode=False)
    _, means, _ = transition_log_probs(adapter, traj, [0])
    sigma, sigma_next = traj.schedule.sigmas[0].item(), traj.schedule.sigmas[1].item()
    std = (
        0.7 * (sigma / (1 - traj.schedule.sigmas[1].item())) ** 0.5
        if sigma == 1
        else 0.7 * (sigma / (1 - sigma)) ** 0.5
    )
    step_std = std * (sigma - sigma_next) ** 0.5
    x = traj.next_latents[:, 0]
    expected = (
        (
            -((x - means[:, 0]) ** 2) / (2 * step_std**2)
            - torch.log(torch.tensor(step_std))
            - 0.5 * torch.log(torch.tensor(2 * torch.pi))
        )
        .flatten(1)
        .mean(1)
    )
    torch.testing.assert_close(traj.log_probs[:, 0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussian_log_prob(x, means[:, 0], torch.tensor(step_std)), expected)


def test_window_plan_stores_only_the_window(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=SIZE, width=SIZE, max_sequence_length=77)
    plan = random_window_plan(8, 0.8, window_size=2, window_range=(0, 4), generator=torch.Generator().manual_seed(3))
    traj = rollout(adapter, PROMPTS, plan, seeds=0, decode=False)
    assert traj.step_indices == plan.stored and len(plan.stored) == 2
    assert traj.latents.shape[1] == 2 and traj.log_probs.shape == (2, 2)
    assert torch.equal(traj.timesteps, traj.schedule.timesteps[list(plan.stored)])
    # The stored pairs are consecutive: step i's output enters step i + 1.
    assert torch.equal(traj.next_latents[:, 0], traj.latents[:, 1])
    assert traj.trained_positions == [0, 1]


def test_sliding_window_rollout_stores_the_current_window(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("flux"), height=SIZE, width=SIZE, max_sequence_length=77)
    early = sliding_window_plan(8, 0.9, iteration=0, window_size=2, shift_every=5)
    later = sliding_window_plan(8, 0.9, iteration=10, window_size=2, shift_every=5, ode_solver="dpm_solver_2m")
    assert early.stored != later.stored
    for plan in (early, later):
        traj = rollout(adapter, PROMPTS, plan, seeds=0, decode=True)
        assert traj.step_indices == plan.stored
        assert torch.isfinite(traj.images).all()


def test_results_do_not_depend_on_chunk_size(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    plan = sde_plan(4, 1.0, kernel="ddim")
    whole = rollout(adapter, PROMPTS, plan, num_images_per_prompt=3, guidance_scale=2.0, seeds=5)
    chunked = rollout(adapter, PROMPTS, plan, num_images_per_prompt=3, guidance_scale=2.0, seeds=5, chunk_size=2)
    torch.testing.assert_close(whole.images, chunked.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.log_probs, chunked.log_probs, atol=1e-4, rtol=0)


def test_same_noise_per_prompt_shares_initial_noise_only(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=SIZE, width=SIZE, max_sequence_length=77)
    shared = rollout(
        adapter,
        PROMPTS,
        sde_plan(3, 0.7),
        num_images_per_prompt=2,
        seeds=0,
        initial_noise=InitialNoise(same_per_prompt=True),
    )
    assert torch.equal(shared.latents[0, 0], shared.latents[1, 0])
    assert not torch.equal(shared.latents[0, 0], shared.latents[2, 0])
    assert not torch.equal(shared.next_latents[0, 0], shared.next_latents[1, 0])  # SDE noise differs
    independent = rollout(adapter, PROMPTS, sde_plan(3, 0.7), num_images_per_prompt=2, seeds=0)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])


def test_seeds_reproduce_and_differ(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=SIZE, width=SIZE, max_sequence_length=77)
    a = rollout(adapter, PROMPTS, sde_plan(3, 0.7), seeds=[1, 2])
    b = rollout(adapter, PROMPTS, sde_plan(3, 0.7), seeds=[1, 2])
    c = rollout(adapter, PROMPTS, sde_plan(3, 0.7), seeds=[1, 3])
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.images[0], c.images[0]) and not torch.equal(a.images[1], c.images[1])
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        rollout(adapter, PROMPTS, sde_plan(3, 0.7), seeds=[1, 2, 3])


def test_grad_steps_reach_only_the_chosen_denoiser_calls(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=SIZE, width=SIZE, max_sequence_length=77)
    adapter.add_lora(rank=2)
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(torch.is_grad_enabled() and output[0].requires_grad)

    handle = adapter.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        traj = rollout(adapter, PROMPTS, ode_plan(5), seeds=0, grad=GradientPath({3, 4}))
    finally:
        handle.remove()
    assert calls == [False, False, False, True, True]
    traj.images.mean().backward()
    grads = [p.grad for p in adapter.denoiser.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    params = adapter.add_lora(rank=2)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    grads = []
    for use_checkpoint in (False, True):
        for p in params:
            p.grad = None
        traj = rollout(
            adapter,
            PROMPTS,
            ode_plan(4, kernel="ddim"),
            seeds=0,
            grad=GradientPath({2, 3}, checkpointing=use_checkpoint),
        )
        traj.images.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_plan_must_fit_the_model(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    with pytest.raises(ValueError, match="use 'ddim'"):
        rollout(adapter, PROMPTS, sde_plan(3, 0.7, kernel="sde"))


def test_stop_after_returns_intermediate_latents(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=SIZE, width=SIZE, max_sequence_length=77)
    full = rollout(adapter, PROMPTS, ode_plan(6), seeds=0, decode=False)
    partial = rollout(adapter, PROMPTS, ode_plan(6), seeds=0, decode=False, stop_after=3)
    assert not torch.equal(full.final_latents, partial.final_latents)
    again = rollout(adapter, PROMPTS, ode_plan(6), seeds=0, decode=False, stop_after=6)
    assert torch.equal(full.final_latents, again.final_latents)


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_a_rollout_continued_from_its_own_latents_ends_where_the_full_one_does(family, tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir(family), height=SIZE, width=SIZE, **_kwargs(family))
    plan = ode_plan(6, kernel=_kernel(adapter))
    full = rollout(adapter, PROMPTS, plan, seeds=0, decode=False)
    first_half = rollout(adapter, PROMPTS, plan, seeds=0, decode=False, stop_after=3)
    second_half = rollout(
        adapter, PROMPTS, plan, seeds=0, decode=False, start_step=3, start_latents=first_half.final_latents
    )
    assert torch.equal(second_half.final_latents, full.final_latents)
    with pytest.raises(ValueError, match="needs the latents there"):
        rollout(adapter, PROMPTS, plan, start_step=3)
    with pytest.raises(ValueError, match="starts at step 3"):
        rollout(
            adapter, PROMPTS, sde_plan(6, 0.7, kernel=_kernel(adapter)), start_step=3, start_latents=full.final_latents
        )


def _with_scheduler(tiny_pipeline_dir, folder, family="sd15", **scheduler_options):
    """A copy of a tiny DDIM pipeline whose scheduler config has ``scheduler_options``."""
    import json
    import shutil

    shutil.copytree(tiny_pipeline_dir(family), folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler_options}))
    return folder


def _ode_matches_pipe(folder):
    adapter = load_adapter(folder, height=SIZE, width=SIZE)
    seeds = [3, 4]
    traj = rollout(adapter, PROMPTS, ode_plan(4, kernel="ddim"), guidance_scale=3.0, seeds=seeds)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    expected = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        height=SIZE,
        width=SIZE,
        generator=generators,
        output_type="pt",
    ).images
    return traj.images, expected, adapter


def test_ddim_with_set_alpha_to_one_keeps_noise_in_its_stochastic_last_step(tiny_pipeline_dir, tmp_path):
    """DDPO noises and trains the last DDIM step; into alpha_bar = 1 it would have no noise and no log-prob."""
    folder = _with_scheduler(tiny_pipeline_dir, tmp_path / "sd15", set_alpha_to_one=True)
    images, expected, adapter = _ode_matches_pipe(folder)  # the ODE keeps diffusers' final_alpha_cumprod = 1
    assert (images - expected).abs().max().item() <= 1e-4
    plan = sde_plan(4, 1.0, kernel="ddim", include_last=True)
    traj = rollout(adapter, PROMPTS, plan, guidance_scale=3.0, seeds=[1, 2])
    assert traj.log_probs.shape == (2, 4) and bool(traj.log_probs.isfinite().all())
    schedule = adapter.set_timesteps(4)
    assert schedule.alphas_cumprod_prev[-1].item() == 1.0
    assert schedule.stochastic_alphas_cumprod_prev[-1].item() == adapter.scheduler.alphas_cumprod[0].item()
    torch.testing.assert_close(schedule.stochastic_alphas_cumprod_prev[:-1], schedule.alphas_cumprod_prev[:-1])


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_ddim_applies_the_schedulers_clip_sample(tiny_pipeline_dir, tmp_path):
    """SDXL keeps the scheduler's clip_sample (the SD1.x pipeline switches it off when it loads)."""
    options = {"clip_sample": True, "clip_sample_range": 0.05}
    folder = _with_scheduler(tiny_pipeline_dir, tmp_path / "clip", "sdxl", **options)
    images, expected, adapter = _ode_matches_pipe(folder)
    assert adapter.clip_sample_range == 0.05
    assert (images - expected).abs().max().item() <= 1e-4
    plain = _with_scheduler(tiny_pipeline_dir, tmp_path / "plain", "sdxl", clip_sample=False)
    unclipped, _, _ = _ode_matches_pipe(plain)
    assert (images - unclipped).abs().max().item() > 1e-2, "the clamp must have acted"


def test_ddim_refuses_dynamic_thresholding(tiny_pipeline_dir, tmp_path):
    folder = _with_scheduler(tiny_pipeline_dir, tmp_path / "thr", thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        load_adapter(folder, height=SIZE, width=SIZE)
