"""HPSv3 on a tiny random Qwen2-VL saved in the published layout (docs/rewards.md#hpsv3).

The base folder holds a tiny ``Qwen2VLConfig`` and an offline processor (tokenizer without ``<|Reward|>``, as the
base model's); ``HPSv3.safetensors`` holds a backbone with one more token embedding (the reward token) and a random
``rm_head``, with the transformers 4.45 key names that the published file uses.
"""

import hashlib

import pytest
import torch
from qwen_testing import build_qwen_processor, build_qwen_tokenizer, tiny_qwen2_vl_config
from rewards_testing import smooth_images, to_pil

from rewards.hpsv3 import (
    HPSV3_INSTRUCTION,
    HPSV3_PIXELS,
    HPSV3_PROMPT_SUFFIX,
    REWARD_TOKEN,
    HPSv3,
    HPSv3Network,
    RewardHead,
    remap_hpsv3_keys,
)
from rewards.qwen_vl import QwenVisionSpec, qwen_pixel_values, smart_resize


PROMPTS = ["a red fox in the snow", "two cups of tea on a table"]


def _old_layout(network: HPSv3Network) -> dict[str, torch.Tensor]:
    """The state dict as transformers 4.45's ``Qwen2VLRewardModelBT`` names it, ``lm_head`` included."""
    state = {}
    for key, value in network.state_dict().items():
        if key.startswith("model.visual."):
            key = key.removeprefix("model.")
        elif key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        state[key] = value.clone().contiguous()
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = torch.randn_like(embed)
    return state


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    """``(base_dir, weights_file, network)``: the base model folder, the checkpoint (old names) and the network."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLModel

    folder = tmp_path_factory.mktemp("hpsv3")
    tokenizer = build_qwen_tokenizer()
    processor = build_qwen_processor(tokenizer, HPSV3_PIXELS, HPSV3_PIXELS)
    base = folder / "base"
    tiny_qwen2_vl_config(tokenizer).save_pretrained(base)
    processor.save_pretrained(base)
    torch.manual_seed(0)
    # one more embedding row than the base tokenizer: hpsv3/train.py adds <|Reward|> and resizes the embeddings
    network = HPSv3Network(Qwen2VLModel(tiny_qwen2_vl_config(tokenizer, len(tokenizer) + 1)), RewardHead(32)).eval()
    with torch.no_grad():  # a head whose output depends visibly on its input (the default init is tiny)
        for layer in network.rm_head:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(8.0)
    weights = folder / "HPSv3.safetensors"
    save_file(_old_layout(network), weights)
    return base, weights, network


@pytest.fixture(scope="module")
def reward(tiny_hpsv3):
    base, weights, _ = tiny_hpsv3
    return HPSv3(path=weights, base_path=base).load_weights("cpu")


def test_prompt_is_the_published_one():
    """SHA-256 of INSTRUCTION and prompt_with_special_token in hpsv3/dataset/data_collator_qwen.py, hpsv3 1.0.0."""
    assert hashlib.sha256(HPSV3_INSTRUCTION.encode()).hexdigest() == (
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    )
    assert hashlib.sha256(HPSV3_PROMPT_SUFFIX.encode()).hexdigest() == (
        "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
    )
    assert HPSV3_INSTRUCTION.format(text_prompt="{x}").endswith("Textual prompt - {x}\n\n\n")


@pytest.mark.parametrize(
    ("size", "bounds", "batch"),
    [((448, 448), (HPSV3_PIXELS, HPSV3_PIXELS), 1), ((56, 84), (56 * 56, 28 * 28 * 1280), 2)],
)
def test_pixel_values_match_the_image_processor(size, bounds, batch):
    """Images already at the target size: our tensor path equals Qwen2VLImageProcessor's output."""
    from transformers import Qwen2VLImageProcessor

    images = smooth_images(batch, *size, seed=3)
    processor = Qwen2VLImageProcessor(min_pixels=bounds[0], max_pixels=bounds[1])
    expected = processor(images=to_pil(images), return_tensors="pt")
    spec = QwenVisionSpec.from_image_processor(processor)
    pixel_values, grid = qwen_pixel_values(images, spec)
    assert torch.equal(grid, expected["image_grid_thw"])
    assert pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    for height, width in [(512, 512), (1024, 768), (333, 1000), (64, 2000), (720, 1280)]:
        for bounds in [(HPSV3_PIXELS, HPSV3_PIXELS), (56 * 56, 28 * 28 * 1280)]:
            assert smart_resize(height, width, 28, *bounds) == hf_smart_resize(height, width, 28, *bounds)
    assert smart_resize(1024, 1024, 28, HPSV3_PIXELS, HPSV3_PIXELS) == (448, 448)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 28 * 201, 28, HPSV3_PIXELS, HPSV3_PIXELS)


def _hand_score(base, network, image, prompt, position_ids=True):
    """The reference recipe by hand: processor + Qwen2VLModel's own image merging + head at <|Reward|>."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as hpsv3/train.py
    text = HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_PROMPT_SUFFIX
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[chat], images=to_pil(image), padding=True, return_tensors="pt")
    length = batch["input_ids"].shape[1]
    kwargs = (
        {"position_ids": torch.arange(length)[None]}
        if position_ids
        else {"mm_token_type_ids": batch["mm_token_type_ids"]}
    )
    with torch.no_grad():
        hidden = network.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            **kwargs,
        ).last_hidden_state
    where = (batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)).nonzero().item()
    return network.rm_head(hidden[0, where]).float()[0]


def test_score_equals_hand_assembled_forward(tiny_hpsv3, reward):
    base, _, network = tiny_hpsv3
    image = smooth_images(1, 448, 448, seed=5)
    with torch.no_grad():
        score = reward.score(image, PROMPTS[:1])
    expected = _hand_score(base, network, image, PROMPTS[0])
    torch.testing.assert_close(score[0], expected, atol=1e-5, rtol=1e-5)
    # The reference gives every token a 1-D position; Qwen2-VL's own 3-D image positions give another score.
    assert abs(_hand_score(base, network, image, PROMPTS[0], position_ids=False) - expected) > 1e-4


def test_gradients_reach_images(reward):
    images = smooth_images(1, 448, 448, seed=6).requires_grad_(True)
    reward.score(images, PROMPTS[:1]).sum().backward()
    assert images.grad is not None
    assert bool((images.grad.abs().flatten(1).sum(1) > 0).all())


def test_batched_equals_one_by_one(reward):
    """Two images with prompts of different lengths (right padding) score as when scored alone."""
    images = smooth_images(2, 300, 400, seed=7)
    prompts = ["a cat", "a very long caption about a lighthouse on a cliff at sunset, oil painting"]
    with torch.no_grad():
        batched = reward.score(images, prompts)
        alone = torch.cat([reward.score(images[i : i + 1], prompts[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert abs(batched[0] - batched[1]) > 1e-4


def test_new_module_names_load_the_same(tiny_hpsv3, reward, tmp_path):
    from safetensors.torch import save_file

    base, _, network = tiny_hpsv3
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    state["lm_head.weight"] = torch.zeros(network.model.get_input_embeddings().weight.shape)
    save_file(state, tmp_path / "HPSv3.safetensors")
    other = HPSv3(path=tmp_path, base_path=base).load_weights("cpu")  # a folder holding the file
    images = smooth_images(1, 448, 448, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(other.score(images, PROMPTS[:1]), reward.score(images, PROMPTS[:1]))


def test_remap_keys():
    state = {name: torch.zeros(1) for name in ["visual.a", "model.layers.0.b", "lm_head.weight", "rm_head.0.bias"]}
    state["module.model.visual.c"] = torch.zeros(1)
    renamed, dropped = remap_hpsv3_keys(state)
    assert sorted(renamed) == [
        "model.language_model.layers.0.b",
        "model.visual.a",
        "model.visual.c",
        "rm_head.0.bias",
    ]
    assert dropped == ["lm_head.weight"]


def test_bad_checkpoints_give_clear_errors(tiny_hpsv3, tmp_path, fresh_reward_cache):
    from safetensors.torch import load_file, save_file

    base, weights, _ = tiny_hpsv3
    pickle = tmp_path / "HPSv3.pth"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(ValueError, match="only .safetensors"):
        HPSv3(path=pickle, base_path=base).load_weights("cpu")
    with pytest.raises(FileNotFoundError, match="no 'HPSv3.safetensors'"):
        HPSv3(path=tmp_path, base_path=base).load_weights("cpu")
    state = load_file(weights)
    del state["rm_head.5.weight"]
    state["rm_head.9.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "HPSv3.safetensors")
    with pytest.raises(ValueError, match=r"1 missing keys \['rm_head.5.weight'\], 1 unexpected keys"):
        HPSv3(path=tmp_path, base_path=base).load_weights("cpu")


def test_prompt_with_reward_token_text_is_refused(reward):
    with pytest.raises(ValueError, match="exactly one <\\|Reward\\|>"):
        reward.score(smooth_images(1, 448, 448), [f"a cat {REWARD_TOKEN}"])


def test_registered():
    import rewards

    made = rewards.load("hpsv3", path="/nonexistent/HPSv3.safetensors", resample="bilinear")
    assert isinstance(made, HPSv3) and made.resample == "bilinear" and made.differentiable
    with pytest.raises(ValueError, match="unknown resample"):
        HPSv3(resample="nearest")


def test_bf16_backbone_keeps_a_float32_head(tiny_hpsv3, reward):
    base, weights, _ = tiny_hpsv3
    half = HPSv3(path=weights, base_path=base, dtype="bf16").load_weights("cpu")
    network = half._bundle.network
    assert network.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert network.rm_head[0].weight.dtype == torch.float32
    images = smooth_images(2, 448, 448, seed=9)
    with torch.no_grad():
        low, full = half.score(images, PROMPTS), reward.score(images, PROMPTS)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.05 * full.abs().max().item(), rtol=0)
