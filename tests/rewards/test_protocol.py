"""Registry, loader, custom rewards, input/output checks and WeightedSum, on cheap rewards (no model weights)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from rewards_testing import smooth_images

import rewards
from rewards import FunctionReward, Reward, RewardInputError, RewardOutputError, UnknownRewardError, WeightedSum


PROMPTS = ["a", "b", "c"]


class MeanPixel(Reward):
    """Differentiable, prompt-agnostic stand-in: the mean pixel value of each image."""

    name = "mean_pixel"
    differentiable = True
    needs_prompts = False

    def __init__(self, device=None, dtype=None, scale: float = 1.0):
        self.scale = scale

    def _score(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))


@pytest.fixture
def registered():
    """Register test rewards for one test and remove them afterwards."""
    names = []

    def add(name, factory):
        rewards.register(name)(factory)
        names.append(name)
        return factory

    yield add
    for name in names:
        rewards.unregister(name)


# --- registry --------------------------------------------------------------------------------------------------------


def test_builtin_rewards_are_available():
    assert {"pickscore", "hpsv2", "hpsv2.1", "clip_score", "aesthetic", "imagereward"} <= set(rewards.available())
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(rewards.available())
    assert rewards.available() == sorted(rewards.available())


def test_register_a_class_and_a_function_factory(registered):
    registered("test_mean_pixel", MeanPixel)
    registered("test_mean_pixel_x2", lambda device=None, dtype=None: MeanPixel(scale=2.0))
    images = smooth_images(3, 16, 16)
    one = rewards.load("test_mean_pixel").score(images)
    torch.testing.assert_close(rewards.load("test_mean_pixel_x2").score(images), 2 * one)
    torch.testing.assert_close(rewards.load("test_mean_pixel", scale=3.0).score(images), 3 * one)


def test_duplicate_names_are_refused(registered):
    registered("test_dup", MeanPixel)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("test_dup")(MeanPixel)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("pickscore")(MeanPixel)


@pytest.mark.parametrize("name", ["", " pad", "pkg.mod:fn", 3])
def test_malformed_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid reward name"):
        rewards.register(name)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownRewardError, match="Did you mean 'pickscore'") as info:
        rewards.load("pickscor")
    assert "hpsv2" in str(info.value) and "module:callable" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(TypeError, match="path"):
        rewards.load("pickscore", weights="/x")


def test_factory_must_return_a_reward(registered):
    registered("test_not_a_reward", lambda device=None, dtype=None: 3.0)
    with pytest.raises(TypeError, match="not a rewards.Reward"):
        rewards.load("test_not_a_reward")


def test_load_passes_built_rewards_through():
    reward = MeanPixel()
    assert rewards.load(reward) is reward


# --- custom rewards --------------------------------------------------------------------------------------------------

CUSTOM_SOURCE = textwrap.dedent(
    '''
    import torch

    from rewards import Reward


    def brightness(images, prompts):
        """Mean pixel value, as a tensor."""
        return images.mean(dim=(1, 2, 3))


    brightness.differentiable = True


    def prompt_length(images, prompts):
        """A list of floats, one per image."""
        return [float(len(p)) for p in prompts]


    def nan_scores(images, prompts):
        return torch.full((images.shape[0],), float("nan"))


    def column(images, prompts):
        return images.mean(dim=(1, 2, 3))[:, None]


    def with_info(images, prompts):
        return images.mean(dim=(1, 2, 3)), {"info": 1}


    class Redness(Reward):
        differentiable = True

        def __init__(self, device=None, dtype=None, channel=0):
            self.channel = channel

        def _score(self, images, prompts):
            return images[:, self.channel].mean(dim=(1, 2))
    '''
)


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """``my_custom_rewards.py`` importable as a module and addressable as a file."""
    path = tmp_path / "my_custom_rewards.py"
    path.write_text(CUSTOM_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_custom_function_from_module(custom_module):
    reward = rewards.load("my_custom_rewards:brightness")
    images = smooth_images(3, 16, 16).requires_grad_(True)
    scores = reward.score(images, PROMPTS)
    assert isinstance(reward, FunctionReward) and reward.name == "my_custom_rewards:brightness"
    assert reward.differentiable  # from the function's attribute
    torch.testing.assert_close(scores, images.detach().mean(dim=(1, 2, 3)))
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


def test_custom_function_from_file_returning_a_list(custom_module):
    reward = rewards.load(f"{custom_module}:prompt_length")
    scores = reward.score(smooth_images(3, 8, 8), ["a", "bb", "ccc"])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([1.0, 2.0, 3.0]))
    assert reward.differentiable is False  # plain functions are not assumed differentiable


def test_custom_reward_class_gets_options_and_its_spec_as_name(custom_module):
    reward = rewards.load(f"{custom_module}:Redness", channel=1)
    images = smooth_images(2, 8, 8)
    torch.testing.assert_close(reward.score(images, PROMPTS[:2]), images[:, 1].mean(dim=(1, 2)))
    assert reward.name.endswith(":Redness")


def test_custom_differentiable_flag_can_be_set_at_load(custom_module):
    assert rewards.load("my_custom_rewards:prompt_length", differentiable=True).differentiable


@pytest.mark.parametrize(
    "attr,match",
    [
        ("nan_scores", r"'my_custom_rewards:nan_scores' returned NaN or inf for images at positions \[0, 1\]"),
        ("column", r"'my_custom_rewards:column' returned shape \(2, 1\); expected \[2\]"),
        ("with_info", "'my_custom_rewards:with_info' returned tuple"),
    ],
)
def test_bad_custom_outputs_name_the_reward_and_the_problem(custom_module, attr, match):
    reward = rewards.load(f"my_custom_rewards:{attr}")
    with pytest.raises(RewardOutputError, match=match):
        reward.score(smooth_images(2, 8, 8), PROMPTS[:2])


def test_custom_spec_errors(custom_module, tmp_path):
    with pytest.raises(AttributeError, match="Did you mean 'brightness'"):
        rewards.load("my_custom_rewards:brightnes")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        rewards.load("no_such_module_xyz:fn")
    with pytest.raises(FileNotFoundError, match="not found"):
        rewards.load(f"{tmp_path}/missing.py:fn")


def test_a_file_is_imported_once(custom_module):
    first = rewards.load(f"{custom_module}:brightness")
    second = rewards.load(f"{custom_module}:brightness")
    assert first.fn is second.fn


# --- input checks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(3, 16, 16), r"rank 4 .* images\[None\]"),
        (torch.rand(2, 4, 16, 16), "3 channels"),
        (torch.rand(2, 16, 16, 3), "channels-last"),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), r"uint8 .* images.float\(\) / 255"),
        (torch.rand(2, 3, 8, 8) * 255, r"\[0, 255\]: divide by 255"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, r"\[-1, 1\]"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
        ([[0.5]], "torch.Tensor"),
    ],
)
def test_bad_images_are_refused(images, match):
    with pytest.raises(RewardInputError, match=match):
        MeanPixel().score(images, ["x", "y"])


def test_images_a_hair_outside_the_range_are_accepted():
    from rewards.base import RANGE_TOLERANCE

    hair, beyond = RANGE_TOLERANCE / 2, 2 * RANGE_TOLERANCE
    images = smooth_images(2, 8, 8)
    images[0, 0, 0, 0] = 1 + hair  # float error after a VAE decode: within the tolerance
    images[1, 2, 7, 7] = -hair
    scores = MeanPixel().score(images)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # Scored like the clamped images, up to the hair.
    torch.testing.assert_close(scores, MeanPixel().score(images.clamp(0, 1)), rtol=0, atol=RANGE_TOLERANCE)
    # Further out is a range mistake: refused, naming the range.
    for value in (1 + beyond, -beyond):
        bad = smooth_images(2, 8, 8)
        bad[1, 1, 3, 4] = value
        with pytest.raises(RewardInputError, match=r"'mean_pixel': images must lie in \[0, 1\]"):
            MeanPixel().score(bad)


@pytest.mark.parametrize(
    "prompts,match",
    [(["a"], "got 1 prompts for 2 images"), ("a cat", "single string"), (["a", 3], "item 1 is int")],
)
def test_bad_prompts_are_refused(prompts, match):
    with pytest.raises(RewardInputError, match=match):
        MeanPixel().score(smooth_images(2, 8, 8), prompts)


def test_missing_prompts_are_refused_when_needed(custom_module):
    reward = rewards.load("my_custom_rewards:prompt_length")
    with pytest.raises(RewardInputError, match="needs one prompt per image"):
        reward.score(smooth_images(2, 8, 8))


def test_empty_batch_gives_empty_scores():
    assert MeanPixel().score(torch.zeros(0, 3, 8, 8), []).shape == (0,)


def test_scores_are_float32_on_the_images_device():
    reward = FunctionReward(lambda images, prompts: images.double().mean(dim=(1, 2, 3)), name="f64")
    assert reward.score(smooth_images(2, 8, 8), ["x", "y"]).dtype == torch.float32


# --- WeightedSum -----------------------------------------------------------------------------------------------------


def test_weighted_sum_total_and_parts(custom_module):
    images = smooth_images(3, 32, 32).requires_grad_(True)
    reward = WeightedSum({"my_custom_rewards:brightness": 2.0, "my_custom_rewards:Redness": -0.5})
    total, parts = reward.score_parts(images, PROMPTS)
    brightness = images.detach().mean(dim=(1, 2, 3))
    redness = images.detach()[:, 0].mean(dim=(1, 2))
    torch.testing.assert_close(parts["my_custom_rewards:brightness"], brightness)
    torch.testing.assert_close(parts["my_custom_rewards:Redness"], redness)
    torch.testing.assert_close(total, 2.0 * brightness - 0.5 * redness)
    torch.testing.assert_close(reward.score(images, PROMPTS), total)
    assert reward.differentiable
    total.sum().backward()
    assert images.grad.abs().sum() > 0


def test_weighted_sum_normalisation_and_raw_parts():
    images = smooth_images(2, 32, 32)
    reward = WeightedSum(
        {MeanPixel(): 1.0, "jpeg_incompressibility": 0.5}, normalize={"jpeg_incompressibility": (1.0, 2.0)}
    )
    total, parts = reward.score_parts(images)
    assert set(parts) == {"mean_pixel", "jpeg_incompressibility"}
    expected = parts["mean_pixel"] + 0.5 * (parts["jpeg_incompressibility"] - 1.0) / 2.0
    torch.testing.assert_close(total, expected)
    assert not reward.differentiable  # JPEG is not: the sum is not either
    assert not reward.needs_prompts


def test_weighted_sum_from_a_mapping_with_options(registered):
    registered("test_scaled", MeanPixel)
    reward = rewards.load({"test_scaled": 1.0}, options={"test_scaled": {"scale": 4.0}})
    images = smooth_images(2, 8, 8)
    torch.testing.assert_close(reward.score(images), 4.0 * images.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weights": {}}, "at least one"),
        ({"weights": {"jpeg_compressibility": float("nan")}}, "finite number"),
        ({"weights": {"jpeg_compressibility": 1.0}, "normalize": {"pickscore": (0, 26)}}, "not in the sum"),
        ({"weights": {"jpeg_compressibility": 1.0}, "normalize": {"jpeg_compressibility": (0, 0)}}, "non-zero"),
        ({"weights": {"jpeg_compressibility": 1.0}, "options": {"aesthetic": {}}}, "not in the sum"),
    ],
)
def test_weighted_sum_refuses_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightedSum(**kwargs)


def test_weighted_sum_checks_inputs():
    reward = WeightedSum({MeanPixel(): 1.0})
    with pytest.raises(RewardInputError, match="weighted_sum"):
        reward.score_parts(torch.rand(2, 3, 8, 8) * 255)


def test_reward_repr_is_informative():
    assert "PickScore" in repr(rewards.load("pickscore", path="/nowhere"))
    assert "differentiable=False" in repr(WeightedSum({"jpeg_compressibility": 1.0}))


def test_load_wraps_a_bare_function():
    reward = rewards.load(lambda images, prompts: images.mean(dim=(1, 2, 3)), needs_prompts=False)
    assert isinstance(reward, FunctionReward) and reward.name == "<lambda>"
    assert reward.score(smooth_images(2, 8, 8)).shape == (2,)


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_importing_rewards_is_light_and_independent_of_diffalign():
    """``import rewards`` pulls in neither diffalign nor the model libraries (they load with the weights)."""
    code = (
        "import sys, rewards; rewards.available(); "
        "heavy = [m for m in ('diffalign', 'transformers', 'open_clip', 'huggingface_hub') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
