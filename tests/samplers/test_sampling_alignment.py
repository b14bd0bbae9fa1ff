"""Alignment at sampling time (docs/methods/sampling-alignment.md): RL guidance (``adapter.alignment_scale``) and the
reward-guided search over starting noise (``diffalign.eval.search``)."""

import json

import pytest
import torch
from families import FAMILIES_SD3_FAST

from diffalign.adapters import load_adapter
from diffalign.eval.grid import make_eval_grid
from diffalign.eval.search import NoiseSearch, search_initial_noise
from diffalign.rewarding import build_reward
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import make_generators, rollout
from diffalign.seeding import derive_seed
from diffalign.testing import random_lora_adapter, redness


STEPS = 3


def images(adapter, seeds=(7,)):
    with torch.no_grad():
        plan, seeds = ode_plan(STEPS), list(seeds)
        return rollout(
            adapter, ["a red circle"], plan, num_images_per_prompt=len(seeds), guidance_scale=2.0, seeds=seeds
        ).images


@pytest.mark.parametrize("family", FAMILIES_SD3_FAST)
def test_alignment_scale_0_is_the_base_model_and_1_the_lora_model_bit_for_bit(tiny_pipeline_dir, family):
    adapter = random_lora_adapter(tiny_pipeline_dir(family))
    lora = images(adapter)
    with adapter.lora_disabled():
        base = images(adapter)
    assert (lora - base).abs().max() > 1e-3  # the LoRA matters, so the two ends are distinct
    mixed = {}
    for scale in (0.0, 0.5, 1.0):
        adapter.alignment_scale = scale
        mixed[scale] = images(adapter)
    assert torch.equal(mixed[0.0], base) and torch.equal(mixed[1.0], lora)
    assert (mixed[0.5] - base).abs().max() > 1e-4 and (mixed[0.5] - lora).abs().max() > 1e-4


def test_the_guided_prediction_mixes_the_two_cfg_outputs_linearly_with_one_more_call(tiny_pipeline_dir):
    adapter = random_lora_adapter(tiny_pipeline_dir("sd3"))
    cond = adapter.encode_prompt(["a red circle", "a blue square"], with_negative=True)
    latents = torch.randn(2, *adapter.prepare_latents(1).shape[1:], generator=torch.Generator().manual_seed(1))
    calls = []
    hook = adapter.denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        with adapter.lora_disabled():
            base = adapter.predict(latents, 500.0, cond, guidance_scale=3.0)
        aligned = adapter.predict(latents, 500.0, cond, guidance_scale=3.0)
        assert len(calls) == 2  # CFG's two halves in one batched call each
        adapter.alignment_scale = 1.5
        extrapolated = adapter.predict(latents, 500.0, cond, guidance_scale=3.0)
    hook.remove()
    assert len(calls) == 4  # RL guidance: the base model's CFG call and the LoRA model's
    expected = base + 1.5 * (aligned - base)  # Jin et al.: v_base + w (v_RL - v_base), both guided with the same g
    torch.testing.assert_close(extrapolated, expected, rtol=0, atol=1e-5)
    with torch.no_grad(), adapter.lora_disabled():  # the base model stays the base model inside lora_disabled
        torch.testing.assert_close(adapter.predict(latents, 500.0, cond, guidance_scale=3.0), base, rtol=0, atol=0)


def test_best_of_one_is_plain_sampling_and_every_candidate_is_reported(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=16, width=16)
    plain = images(adapter, seeds=(3, 4))
    one = search_initial_noise(
        adapter, ["a red circle"], [3, 4], redness, NoiseSearch(candidates=1), num_steps=STEPS, guidance_scale=2.0
    )
    assert torch.equal(one.images, plain)
    assert [c[0]["chosen"] for c in one.candidates] == [True, True]

    four = search_initial_noise(
        adapter, ["a red circle"], [3, 4], redness, NoiseSearch(candidates=4), num_steps=STEPS, guidance_scale=2.0
    )
    for cell, image in zip(four.candidates, four.images):
        assert [c["index"] for c in cell] == [0, 1, 2, 3]
        rewards = [c["reward"] for c in cell]
        chosen = [c for c in cell if c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["reward"] == max(rewards)
        assert redness(image[None]).item() == pytest.approx(chosen[0]["reward"], abs=1e-6)  # the image kept is it
    assert cell[0]["reward"] == pytest.approx(redness(plain[1:2]).item(), abs=1e-6)  # candidate 0 = the seed itself
    assert min(four.best_rewards[i] - redness(plain[i : i + 1]).item() for i in range(2)) >= 0


def test_zero_order_rounds_never_lose_reward_and_search_around_the_pivot(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=16, width=16)
    settings = {"num_steps": STEPS, "guidance_scale": 2.0}
    search = NoiseSearch(candidates=3, rounds=3, radius=0.3)
    result = search_initial_noise(adapter, ["a red circle"], [5], redness, search, **settings)
    (cell,) = result.candidates
    assert len(cell) == search.samples_per_cell == 3 + 2 * 2
    assert [c["round"] for c in cell] == [0, 0, 0, 1, 1, 2, 2]
    best_after_round = [max(c["reward"] for c in cell if c["round"] <= r) for r in range(3)]
    assert result.best_rewards[0] == best_after_round[-1]
    assert best_after_round == sorted(best_after_round)
    # round 0 alone is best-of-3, with the same candidates
    first = search_initial_noise(adapter, ["a red circle"], [5], redness, NoiseSearch(candidates=3), **settings)
    assert [c["reward"] for c in first.candidates[0]] == [c["reward"] for c in cell[:3]]
    # round 1 samples (pivot + r xi_k) / sqrt(1 + r^2) around round 0's best noise, xi_k from the derived seeds
    xi = adapter.prepare_latents(2, make_generators([derive_seed(5, "noise-search", 1, k) for k in (1, 2)]))
    neighbours = (first.noise[0] + 0.3 * xi) / (1 + 0.3**2) ** 0.5
    with torch.no_grad():
        plan = ode_plan(STEPS)
        expected = rollout(adapter, ["a red circle"] * 2, plan, guidance_scale=2.0, start_latents=neighbours).images
    assert [c["reward"] for c in cell[3:5]] == pytest.approx(redness(expected).tolist(), abs=1e-6)


def test_search_settings_are_checked():
    with pytest.raises(ValueError, match="N >= 1"):
        NoiseSearch(candidates=0)
    with pytest.raises(ValueError, match="candidates >= 2"):
        NoiseSearch(candidates=1, rounds=2)
    with pytest.raises(ValueError, match="radius"):
        NoiseSearch(radius=0)


def test_a_reward_returning_nan_is_named(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=16, width=16)

    def broken(images, prompts):
        return torch.full((images.shape[0],), float("nan"))

    with pytest.raises(ValueError, match="NaN or inf"):
        search_initial_noise(adapter, ["a red circle"], [0], broken, NoiseSearch(candidates=2), num_steps=2)


def test_grid_columns_per_alignment_scale_and_candidates_in_the_json(tiny_pipeline_dir, tmp_path):
    adapter = random_lora_adapter(tiny_pipeline_dir("sd3"))
    lora = adapter.save_lora(tmp_path / "aligned")
    grid = make_eval_grid(
        adapter,
        ["a red circle"],
        [1],
        loras=[lora],
        rewards={"red": build_reward(redness)},
        num_steps=STEPS,
        guidance_scale=2.0,
        alignment_scales=[0, 1],
        search=NoiseSearch(candidates=2),
    )
    assert grid.columns == ["base", "aligned w=0", "aligned w=1"]
    by_column = {r["column"]: r for r in grid.records}
    assert by_column["aligned w=0"]["scores"] == by_column["base"]["scores"]  # w = 0 is the base model
    assert all(len(r["candidates"]) == 2 for r in grid.records)
    assert adapter.alignment_scale is None  # put back after the grid
    _, path = grid.save(tmp_path / "grid.png")
    saved = json.loads(path.read_text())
    assert saved["settings"]["search"] == {"candidates": 2, "rounds": 1, "radius": 0.5, "reward": "red"}
    with pytest.raises(ValueError, match="needs a reward"):
        make_eval_grid(adapter, ["a"], [0], num_steps=2, search=NoiseSearch(candidates=2))
