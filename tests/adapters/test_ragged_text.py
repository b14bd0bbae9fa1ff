"""What the families that encode each prompt to its own length (Qwen-Image, Z-Image) add: ragged text conditionings,
padded with masked zeros, that change no prediction; and Qwen-Image's true CFG with its per-token norm rescale. The
shared battery (parity with the pipeline, LoRA, trainers) runs them with the other families."""

import math

import pytest
import torch

from diffalign.adapters import Conditioning, load_adapter
from diffalign.adapters.text_cache import TextEmbeddingCache


SIZE = 32
SHORT, LONG = "a red circle", "two blue squares to the left of a green triangle below a yellow star"


@pytest.fixture(scope="module", params=["qwenimage", "zimage"])
def adapter(request, tiny_pipeline_dir):
    return load_adapter(tiny_pipeline_dir(request.param), height=SIZE, width=SIZE)


def _ragged(length: int, value: float) -> Conditioning:
    states = torch.full((1, length, 2), value)
    mask = torch.ones(1, length, dtype=torch.long)
    keys = frozenset({"encoder_hidden_states", "encoder_hidden_states_mask"})
    return Conditioning({"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}, ragged=keys)


def test_ragged_keys_are_right_padded_with_zeros_when_batched():
    joined = Conditioning.cat([_ragged(3, 1.0), _ragged(5, 2.0)])
    states, mask = joined.embeds["encoder_hidden_states"], joined.embeds["encoder_hidden_states_mask"]
    assert states.shape == (2, 5, 2) and mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert states[0, 3:].abs().sum() == 0 and (states[0, :3] == 1).all() and (states[1] == 2).all()
    assert joined.ragged == _ragged(1, 0.0).ragged  # kept through cat, and through slicing
    assert joined[1].ragged == joined.ragged

    guided = _ragged(5, 2.0)
    guided.negative = _ragged(2, -1.0).embeds
    inputs = guided.guided_inputs()  # the CFG batch: the short negative padded to the prompt's length
    assert inputs["encoder_hidden_states_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(RuntimeError):  # a key that is not ragged keeps torch.cat's shape check
        Conditioning.cat([Conditioning({"x": torch.zeros(1, 3)}), Conditioning({"x": torch.zeros(1, 5)})])


def test_true_cfg_rescales_each_token_to_the_conditional_norm(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("qwenimage"), height=SIZE, width=SIZE)
    uncond = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # [B=1, L=2 tokens, C=2]
    text = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])
    guided = adapter.combine_guidance(uncond, text, 2.0)
    # token 0: 1 + 2 (0 - 1) = -1 and 0 + 2 (1 - 0) = 2, norm sqrt(5), rescaled to the conditional norm 1
    expected0 = torch.tensor([-1.0, 2.0]) / math.sqrt(5)
    # token 1: (-2, 6), norm sqrt(40), rescaled to 3
    expected1 = torch.tensor([-2.0, 6.0]) * 3 / math.sqrt(40)
    torch.testing.assert_close(guided[0], torch.stack([expected0, expected1]))


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_a_prompt_predicts_the_same_alone_and_padded_beside_a_longer_one(adapter, guidance_scale):
    both = adapter.encode_prompt([SHORT, LONG], with_negative=True)
    alone = adapter.encode_prompt([SHORT], with_negative=True)
    states = sorted(both.ragged)[0]  # encoder_hidden_states (Qwen-Image) or cap_feats (Z-Image)
    assert both.embeds[states].shape[1] > alone.embeds[states].shape[1]
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = adapter.predict(latents, 600.0, both, guidance_scale)
        single = adapter.predict(latents[:1], 600.0, alone, guidance_scale)
    torch.testing.assert_close(batched[:1], single, atol=1e-5, rtol=1e-5)


def test_cached_rows_from_other_batches_and_a_saved_cache_predict_as_a_fresh_encode(adapter, tmp_path):
    prompts = [SHORT, LONG, "a purple star"]
    expected = adapter.encode_prompt(prompts[:2][::-1], with_negative=True)
    cache = TextEmbeddingCache()
    adapter.text_cache = cache
    try:
        adapter.precompute_text_embeddings(prompts, with_negative=True, batch_size=3)  # one padded batch
        (entry,) = cache.entries([SHORT]).values()
        adapter.text_cache = None
        alone = adapter.encode_prompt([SHORT], with_negative=True)
        adapter.text_cache = cache
        for key in entry.ragged:  # the short prompt's entry keeps its own tokens, not the batch's padding
            assert entry.embeds[key].shape == alone.embeds[key].shape
        path = cache.save(tmp_path / "text.safetensors", identity={"model": adapter.family})
        reloaded = TextEmbeddingCache()
        assert reloaded.load(path, identity={"model": adapter.family}) == 3
        adapter.text_cache = reloaded
        cached = adapter.encode_prompt(prompts[:2][::-1], with_negative=True)
    finally:
        adapter.text_cache = None
    assert cached.ragged == expected.ragged
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.predict(latents, 300.0, cached, 4.0), adapter.predict(latents, 300.0, expected, 4.0)
        )
