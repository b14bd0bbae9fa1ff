"""Text-embedding cache: each prompt is encoded once, so the text encoders (T5-XXL is ~9 GB in bf16) can leave the GPU.

See docs/performance.md#text-embedding-cache. An adapter with a :class:`TextEmbeddingCache` (``adapter.text_cache``)
answers :meth:`~diffalign.adapters.base.DiffusionAdapter.encode_prompt` from it and stores what it had to encode;
:meth:`~diffalign.adapters.base.DiffusionAdapter.precompute_text_embeddings` fills it for a known prompt set (a
trainer's training and evaluation prompts), after which
:meth:`~diffalign.adapters.base.DiffusionAdapter.release_text_encoders` moves the encoders to the CPU or deletes them.

Entries are kept per prompt on the CPU (one ``[1, ...]`` conditioning each) and moved to the adapter's device per
batch; a prompt's entry depends on the unconditional text and on whether the CFG branch was built, which are part of
its key.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffalign.adapters.base import Conditioning


__all__ = ["CacheKey", "TextEmbeddingCache"]

CacheKey = tuple[str, str | None, bool]
"""``(prompt, negative prompt or None for the pipeline's default, with the CFG branch)``."""


def _keys(prompts: Sequence[str], negative_prompt: str | Sequence[str] | None, with_negative: bool) -> list[CacheKey]:
    if negative_prompt is None or isinstance(negative_prompt, str):
        negatives: Sequence[str | None] = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
    return [(prompt, negative, with_negative) for prompt, negative in zip(prompts, negatives)]


class TextEmbeddingCache:
    """Per-prompt text conditionings, kept on the CPU.

    Example:
        >>> adapter.text_cache = TextEmbeddingCache()
        >>> adapter.precompute_text_embeddings(prompts, with_negative=True)
        >>> adapter.release_text_encoders("delete")   # encode_prompt now answers from the cache only
    """

    def __init__(self) -> None:
        self._entries: dict[CacheKey, Conditioning] = {}
        self.signature: tuple | None = None
        """The adapter's text settings the entries were encoded with (T5 length, image size for SDXL's size
        conditioning); the adapter empties the cache when they change."""

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def missing(
        self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None, with_negative: bool = True
    ) -> list[str]:
        """The prompts (in order, without repeats) that have no entry for these settings."""
        absent = [key[0] for key in _keys(prompts, negative_prompt, with_negative) if key not in self._entries]
        return list(dict.fromkeys(absent))

    def lookup(
        self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None, with_negative: bool = True
    ) -> Conditioning | None:
        """The ``[B]`` conditioning of ``prompts`` (on the CPU), or ``None`` if any of them is missing."""
        keys = _keys(prompts, negative_prompt, with_negative)
        if any(key not in self._entries for key in keys):
            return None
        return Conditioning.cat([self._entries[key] for key in keys])

    def store(
        self,
        prompts: Sequence[str],
        cond: Conditioning,
        negative_prompt: str | Sequence[str] | None = None,
        with_negative: bool = True,
    ) -> None:
        """Keep row ``i`` of ``cond`` (``[B]``, as ``encode_prompt`` returned it) as the entry of ``prompts[i]``."""
        if len(cond) != len(prompts):
            raise ValueError(f"conditioning has batch {len(cond)} for {len(prompts)} prompts")
        on_cpu = cond.to("cpu")
        for row, key in enumerate(_keys(prompts, negative_prompt, with_negative)):
            self._entries[key] = on_cpu[row]
