"""Tiny random Qwen2-VL / Qwen2.5-VL models with an offline tokenizer and processor, for the VLM reward tests.

Nothing is downloaded. The tokenizer is a byte-level BPE over the 256 ``ByteLevel`` symbols (one token per byte)
plus merges that make ``Yes``/``No``/``yes``/``no`` single tokens (as in the real vocabulary), the Qwen special
tokens (``<|im_start|>``, ``<|image_pad|>``...) and a Qwen2-VL-like chat template (default system turn, an image item
rendered as ``<|vision_start|><|image_pad|><|vision_end|>``). The models have the real classes and state-dict layout
with hidden sizes of 32, so a forward pass over a 448x448 image and a 3000-token prompt takes tens of milliseconds.
"""

from __future__ import annotations


QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Whole words that must be single tokens: the judge's answer words, as in the real Qwen vocabulary.
SINGLE_TOKEN_WORDS = ("Yes", "yes", "No", "no")

# A Qwen2-VL-style chat template without Jinja whitespace control, so that every newline is explicit.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the Qwen special tokens and chat template, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = []
    for word in SINGLE_TOKEN_WORDS:
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    """The ids a Qwen-VL config needs, read from the tokenizer."""
    convert = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": convert("<|image_pad|>"),
        "video_token_id": convert("<|video_pad|>"),
        "vision_start_token_id": convert("<|vision_start|>"),
        "vision_end_token_id": convert("<|vision_end|>"),
    }


def _text_config(vocab_size: int, tokenizer) -> dict:
    # head_dim = 32 / 2 = 16, so the three M-RoPE sections must sum to head_dim / 2 = 8.
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )


def tiny_qwen2_vl_config(tokenizer, vocab_size: int | None = None):
    """A 2-layer Qwen2-VL (hidden 32) with a 1-block vision tower (embed 32), ids taken from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14)
    vision.update(spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(
        text_config=_text_config(vocab_size or len(tokenizer), tokenizer), vision_config=vision, **token_ids(tokenizer)
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def tiny_qwen2_5_vl_config(tokenizer):
    """A 2-layer Qwen2.5-VL (hidden 32) with a 1-block, full-attention vision tower."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14)
    vision.update(spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=112)
    config = Qwen2_5_VLConfig(
        text_config=_text_config(len(tokenizer), tokenizer), vision_config=vision, **token_ids(tokenizer)
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_qwen_processor(tokenizer, min_pixels: int, max_pixels: int, cls_name: str = "Qwen2VLProcessor"):
    """A Qwen2-VL (or Qwen2.5-VL) processor around ``tokenizer``; transformers 5 requires the video processor."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor_cls = getattr(transformers, cls_name)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
