"""Reward terms: ``{name: {weight, scale, shift, device, dtype, <factory options>}}`` mappings, checked before anything
loads, combined as ``weight * scale * (r - shift)``, with each reward's options reaching its factory."""

import pytest
import torch

import rewards
from rewards import Reward, RewardSpecError, Term, WeightedSum, parse_term


def flat_images(*levels: float) -> torch.Tensor:
    """``[B, 3, 4, 4]`` images, image ``i`` filled with ``levels[i]`` (so its mean pixel is exactly that)."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


class MeanPixel(Reward):
    """Prompt-agnostic, differentiable: each image's mean pixel value, times ``gain``; records how it was built."""

    name = "mean_pixel"
    differentiable = True
    needs_prompts = False
    built_with: list[dict] = []

    def __init__(self, device=None, dtype=None, path: str = "default", revision: str | None = None, gain=1.0):
        self.device, self.dtype, self.path, self.revision, self.gain = device, dtype, path, revision, gain
        MeanPixel.built_with.append({"device": device, "dtype": dtype, "path": path, "revision": revision})

    def _score(self, images, prompts):
        return self.gain * images.mean(dim=(1, 2, 3))


class Constant(Reward):
    """Scores every image ``value`` (a stand-in for a second reward in a sum)."""

    name = "constant"
    needs_prompts = False

    def __init__(self, device=None, dtype=None, value: float = 3.0):
        self.value = value

    def _score(self, images, prompts):
        return torch.full((images.shape[0],), self.value)


@pytest.fixture
def registered():
    MeanPixel.built_with = []
    rewards.register("test_mean_pixel")(MeanPixel)
    rewards.register("test_constant")(Constant)
    yield
    rewards.unregister("test_mean_pixel")
    rewards.unregister("test_constant")


# --- parse_term ------------------------------------------------------------------------------------------------------


def test_a_number_is_a_weight_and_a_mapping_splits_term_keys_from_factory_options(registered):
    assert parse_term("test_mean_pixel", 2) == Term(weight=2.0)
    term = parse_term(
        "test_mean_pixel",
        {
            "weight": 0.5,
            "scale": 4,
            "shift": 1,
            "device": "cpu",
            "dtype": "bf16",
            "path": "/p",
            "options": {"gain": 2},
        },
    )
    assert term == Term(
        weight=0.5, scale=4.0, shift=1.0, device="cpu", dtype="bf16", options={"path": "/p", "gain": 2}
    )


@pytest.mark.parametrize(
    ("value", "key", "message"),
    [
        ({"weight": "1"}, ("test_mean_pixel", "weight"), "must be a finite number, got '1'"),
        ({"scale": 0.0}, ("test_mean_pixel", "scale"), "must not be 0"),
        ({"gian": 2}, ("test_mean_pixel", "gian"), "does not take option 'gian'. Did you mean 'gain'?"),
        ({"options": {"paht": "/p"}}, ("test_mean_pixel", "options", "paht"), "Did you mean 'path'?"),
        ({"device": "npu:x"}, ("test_mean_pixel", "device"), "is not a device"),
        ([1.0], ("test_mean_pixel",), "must be a weight (a number) or a mapping"),
        (float("nan"), ("test_mean_pixel",), "weight must be a finite number, got nan"),
    ],
)
def test_bad_terms_name_their_key(registered, value, key, message):
    with pytest.raises(RewardSpecError) as info:
        parse_term("test_mean_pixel", value)
    assert info.value.key == key and message in info.value.message
    assert str(info.value).startswith(".".join(key) + ": ")
    assert isinstance(info.value, ValueError)


def test_options_of_custom_specs_and_kwargs_factories_are_left_to_the_loader(registered):
    assert parse_term("my_module:fn", {"anything": 1}).options == {"anything": 1}
    rewards.register("test_any_options")(lambda device=None, dtype=None, **options: Constant())
    try:
        assert parse_term("test_any_options", {"whatever": 1}).options == {"whatever": 1}
    finally:
        rewards.unregister("test_any_options")
    assert rewards.factory_options("test_mean_pixel") == ["path", "revision", "gain"]
    assert rewards.factory_options("not_registered") is None and rewards.factory_options("m:fn") is None


# --- WeightedSum with terms ------------------------------------------------------------------------------------------


def test_weight_scale_and_shift_combine_as_weight_times_scale_times_score_minus_shift(registered):
    images = flat_images(0.75, 0.25, 0.5)
    reward = WeightedSum(
        {"test_mean_pixel": {"weight": 2.0, "scale": 0.5, "shift": 0.25}, "test_constant": {"scale": -1.0}}
    )
    total, parts = reward.score_parts(images)
    # mean pixel: 2 * 0.5 * (0.75 - 0.25) = 0.5, 2 * 0.5 * (0.25 - 0.25) = 0, 2 * 0.5 * (0.5 - 0.25) = 0.25;
    # constant 3 with scale -1: -3.
    torch.testing.assert_close(total, torch.tensor([0.5 - 3.0, 0.0 - 3.0, 0.25 - 3.0]))
    torch.testing.assert_close(parts["test_mean_pixel"], torch.tensor([0.75, 0.25, 0.5]))  # raw
    torch.testing.assert_close(parts["test_constant"], torch.full((3,), 3.0))


def test_a_single_reward_with_a_scale_is_scaled_and_its_raw_score_is_a_part(registered):
    """flow_grpo's PickScore/26 on a one-entry mapping: 20.8 -> 0.8, 23.4 -> 0.9."""
    rewards.register("test_pick_like")(lambda device=None, dtype=None: Constant(value=20.8))
    try:
        reward = rewards.load({"test_pick_like": {"scale": 0.038461538461538464}})
        total, parts = reward.score_parts(flat_images(0.1, 0.2))
    finally:
        rewards.unregister("test_pick_like")
    torch.testing.assert_close(total, torch.tensor([0.8, 0.8]))
    torch.testing.assert_close(parts["test_pick_like"], torch.tensor([20.8, 20.8]))


def test_normalized_part_is_the_term_before_its_weight(registered):
    reward = WeightedSum({"test_mean_pixel": {"weight": 2.0, "scale": -4.0, "shift": 0.5}, "test_constant": 1.0})
    raw = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(reward.normalized_part("test_mean_pixel", raw), torch.tensor([-1.0, 1.0]))
    legacy = WeightedSum({"test_mean_pixel": 3.0}, normalize={"test_mean_pixel": (0.25, 0.5)})
    torch.testing.assert_close(legacy.normalized_part("test_mean_pixel", raw), torch.tensor([1.0, 0.0]))


def test_scaled_terms_keep_gradients(registered):
    images = flat_images(0.5, 0.25).requires_grad_(True)
    WeightedSum({"test_mean_pixel": {"weight": 3.0, "scale": 0.5, "shift": 7.0}}).score(images).sum().backward()
    # d/dx of 3 * 0.5 * (mean(x) - 7) is 1.5 / 48 per pixel (48 pixels per image)
    torch.testing.assert_close(images.grad, torch.full_like(images, 1.5 / 48))


def test_per_reward_options_device_and_dtype_reach_the_factory(registered):
    WeightedSum(
        {
            "test_mean_pixel": {"path": "/models/mine", "revision": "v2", "device": "cpu", "dtype": "bf16"},
            "test_constant": 1.0,
        },
        device="meta",
        dtype="fp16",
    )
    assert MeanPixel.built_with == [{"device": "cpu", "dtype": "bf16", "path": "/models/mine", "revision": "v2"}]
    WeightedSum({"test_mean_pixel": {"weight": 1.0}}, device="meta", dtype="fp16")  # the sum's defaults
    assert MeanPixel.built_with[-1] == {"device": "meta", "dtype": "fp16", "path": "default", "revision": None}


def test_options_beside_the_mapping_merge_with_the_terms_but_not_twice(registered):
    reward = WeightedSum({"test_mean_pixel": {"path": "/a"}}, options={"test_mean_pixel": {"gain": 2.0}})
    torch.testing.assert_close(reward.score(flat_images(0.5)), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="'path' of 'test_mean_pixel' is given both"):
        WeightedSum({"test_mean_pixel": {"path": "/a"}}, options={"test_mean_pixel": {"path": "/b"}})


def test_term_scale_and_legacy_normalize_do_not_mix(registered):
    with pytest.raises(ValueError, match="has a scale or shift in its term"):
        WeightedSum({"test_mean_pixel": {"scale": 2.0}}, normalize={"test_mean_pixel": (0.0, 26.0)})
    legacy = WeightedSum({"test_mean_pixel": 2.0}, normalize={"test_mean_pixel": (0.25, 0.5)})
    torch.testing.assert_close(legacy.score(flat_images(0.75)), torch.tensor([2.0]))  # 2 * (0.75 - 0.25) / 0.5


def test_a_built_reward_takes_weight_scale_and_shift_but_no_load_options():
    reward = WeightedSum({MeanPixel(): {"weight": 2.0, "shift": 0.5}})
    torch.testing.assert_close(reward.score(flat_images(1.0)), torch.tensor([1.0]))
    with pytest.raises(RewardSpecError, match="mean_pixel.path: cannot apply to an already built reward"):
        WeightedSum({MeanPixel(): {"path": "/x"}})


def test_an_option_a_custom_spec_does_not_take_fails_when_it_loads(tmp_path):
    module = tmp_path / "term_custom_rewards.py"
    module.write_text(
        "from rewards import Reward\n"
        "class Gain(Reward):\n"
        "    needs_prompts = False\n"
        "    def __init__(self, device=None, dtype=None, gain=1.0):\n"
        "        self.gain = gain\n"
        "    def _score(self, images, prompts):\n"
        "        return self.gain * images.mean(dim=(1, 2, 3))\n"
    )
    spec = f"{module}:Gain"
    torch.testing.assert_close(rewards.load({spec: {"gain": 4.0}}).score(flat_images(0.5)), torch.tensor([2.0]))
    with pytest.raises(TypeError, match="does not take option 'gian'. Did you mean 'gain'?"):
        rewards.load({spec: {"gian": 4.0}})


def test_repr_shows_scaled_terms(registered):
    text = repr(WeightedSum({"test_mean_pixel": {"scale": 0.5, "shift": 1}, "test_constant": 2}))
    assert "'test_mean_pixel': 1 * 0.5 * (r - 1)" in text and "'test_constant': 2" in text
