"""Text-embedding cache: cached conditionings equal encoded ones, released encoders leave the pipeline, and a prompt
missing from the cache is a clear error (docs/performance.md#text-embedding-cache)."""

import pytest
import torch

from diffalign.adapters import load_adapter


PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _close(a, b):
    for key in a.embeds:
        torch.testing.assert_close(a.embeds[key], b.embeds[key], atol=1e-6, rtol=1e-6)
    assert (a.negative is None) == (b.negative is None)
    for key in a.negative or {}:
        torch.testing.assert_close(a.negative[key], b.negative[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl"])
def test_cached_prompts_equal_encoded_ones_and_survive_the_encoders(family, tiny_pipeline_dir):
    kwargs = {"max_sequence_length": 77} if family in ("sd3", "flux") else {}
    adapter = load_adapter(tiny_pipeline_dir(family), height=32, width=32, **kwargs)
    with_negative = family != "flux"
    expected = adapter.encode_prompt(["a green triangle", "a red circle"], with_negative=with_negative)
    assert adapter.precompute_text_embeddings(PROMPTS, with_negative=with_negative, batch_size=2) == 3
    assert adapter.precompute_text_embeddings(PROMPTS, with_negative=with_negative) == 0  # all cached already
    names = adapter.release_text_encoders("delete")
    assert names and all(getattr(adapter.pipe, name) is None for name in adapter.text_encoder_names)
    cached = adapter.encode_prompt(["a green triangle", "a red circle"], with_negative=with_negative)
    _close(cached, expected)  # encoded three at a time, two at a time: the same rows
    assert next(iter(cached.embeds.values())).device == adapter.device
    with pytest.raises(RuntimeError, match="'a blue star'"):
        adapter.encode_prompt(["a red circle", "a blue star"], with_negative=with_negative)
    if with_negative:  # the CFG branch is part of the key: without it, the prompt is another entry
        with pytest.raises(RuntimeError, match="not in the text-embedding cache"):
            adapter.encode_prompt(["a red circle"], with_negative=False)


def test_encoders_moved_to_the_cpu_are_not_used(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd15"), height=32, width=32)
    adapter.precompute_text_embeddings(PROMPTS, negative_prompt="blurry")
    assert adapter.release_text_encoders("cpu") == ["text_encoder"]
    assert adapter.pipe.text_encoder.device.type == "cpu"

    def fail(*args, **kwargs):
        raise AssertionError("a cached prompt reached the text encoder")

    adapter.pipe.text_encoder.forward = fail
    assert len(adapter.encode_prompt(PROMPTS, negative_prompt="blurry")) == 3
    with pytest.raises(AssertionError, match="reached the text encoder"):
        adapter.encode_prompt(PROMPTS)  # the pipeline's default negative is another key: encoded
    del adapter.pipe.text_encoder.forward
    assert len(adapter.encode_prompt(["a new prompt"])) == 1  # on the device for once
    assert adapter.pipe.text_encoder.device.type == "cpu" and adapter.text_cache.missing(["a new prompt"]) == []


def test_changed_text_settings_empty_the_cache(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("sd3"), height=32, width=32, max_sequence_length=16)
    adapter.precompute_text_embeddings(PROMPTS, with_negative=False)
    length = adapter.encode_prompt(PROMPTS[:1], with_negative=False).embeds["encoder_hidden_states"].shape[1]
    adapter.max_sequence_length = 8  # encoded anew, not answered from entries of another length
    shorter = adapter.encode_prompt(PROMPTS[:1], with_negative=False).embeds["encoder_hidden_states"].shape[1]
    assert shorter == length - 8 and len(adapter.text_cache) == 1
    adapter.release_text_encoders("delete")
    adapter.max_sequence_length = 16
    with pytest.raises(RuntimeError, match="text settings"):
        adapter.encode_prompt(PROMPTS[:1], with_negative=False)
