"""Text-embedding cache: each prompt is encoded once, so the text encoders (T5-XXL is ~9 GB in bf16) can leave the GPU.

See docs/performance.md#text-embedding-cache. An adapter with a :class:`TextEmbeddingCache` (``adapter.text_cache``)
answers :meth:`~diffalign.adapters.base.DiffusionAdapter.encode_prompt` from it and stores what it had to encode;
:meth:`~diffalign.adapters.base.DiffusionAdapter.precompute_text_embeddings` fills it for a known prompt set (a
trainer's training and evaluation prompts), after which
:meth:`~diffalign.adapters.base.DiffusionAdapter.release_text_encoders` moves the encoders to the CPU or deletes them.

Entries are kept per prompt on the CPU (one ``[1, ...]`` conditioning each) and moved to the adapter's device per
batch; a prompt's entry depends on the unconditional text and on whether the CFG branch was built, which are part of
its key. :meth:`TextEmbeddingCache.save` writes them to a safetensors file with what they were encoded with, and
:meth:`TextEmbeddingCache.load` reads them back only for the same model and settings (a resumed run re-encodes
nothing).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

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


def _owned(cond: Conditioning) -> Conditioning:
    """A copy whose tensors own their memory: a row of a batch would keep the whole batch alive, and safetensors
    refuses tensors that share memory."""

    def clone(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: tensor.clone() for name, tensor in values.items()}

    negative = None if cond.negative is None else clone(cond.negative)
    return Conditioning(clone(cond.embeds), negative, clone(cond.extras), cond.ragged)


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

    def entries(
        self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None, with_negative: bool = True
    ) -> dict[CacheKey, Conditioning]:
        """The entries held for ``prompts`` (those present), by key: what :meth:`update` adds to another cache."""
        keys = _keys(prompts, negative_prompt, with_negative)
        return {key: self._entries[key] for key in keys if key in self._entries}

    def update(self, entries: Mapping[CacheKey, Conditioning], signature: tuple) -> None:
        """Add entries another cache encoded under ``signature`` (another process's share of the prompts)."""
        if self.signature not in (None, signature):
            raise ValueError(f"entries encoded with text settings {signature}, this cache holds {self.signature}")
        self.signature = signature
        self._entries.update(entries)

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
            self._entries[key] = _owned(on_cpu[row].without_padding())  # not the batch's padding, ragged text

    def save(self, path: str | os.PathLike, identity: Mapping[str, str]) -> Path:
        """Write every entry to a safetensors file, atomically (a temporary name, then renamed).

        Tensors are named ``<entry>.<embeds|negative|extras>.<name>``; the metadata holds the keys, :attr:`signature`
        and ``identity``, what the caller says the entries were encoded with (model, revision, dtype...), which
        :meth:`load` compares.
        """
        tensors, keys, negatives, ragged = {}, [], [], []
        for index, (key, cond) in enumerate(self._entries.items()):
            keys.append(list(key))
            negatives.append(cond.negative is not None)
            ragged.append(sorted(cond.ragged))
            for part, values in (("embeds", cond.embeds), ("negative", cond.negative or {}), ("extras", cond.extras)):
                tensors.update({f"{index}.{part}.{name}": tensor for name, tensor in values.items()})
        metadata = {
            "keys": json.dumps(keys),
            "negative": json.dumps(negatives),
            "ragged": json.dumps(ragged),
            "signature": json.dumps(self.signature),
            "identity": json.dumps(dict(identity), sort_keys=True),
        }
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
        return path

    def load(self, path: str | os.PathLike, identity: Mapping[str, str]) -> int:
        """Add the entries of a file :meth:`save` wrote for the same ``identity``, and take its :attr:`signature`
        (the adapter empties the cache at its next encode if its text settings differ). Returns how many entries
        were read: 0 when the file is absent, was written for another identity, or holds another signature than
        entries already here."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            return 0
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        signature = json.loads(metadata.get("signature", "null"))
        signature = tuple(signature) if signature is not None else None
        same = json.loads(metadata.get("identity", "null")) == dict(identity)
        if not same or (len(self) and signature != self.signature):
            return 0
        parts: dict[int, dict[str, dict[str, Tensor]]] = defaultdict(lambda: defaultdict(dict))
        for full_name, tensor in load_file(path).items():
            index, part, name = full_name.split(".", 2)
            parts[int(index)][part][name] = tensor
        keys, negatives = json.loads(metadata["keys"]), json.loads(metadata["negative"])
        ragged = json.loads(metadata.get("ragged", "null")) or [[] for _ in keys]  # files from before ragged keys
        for index, (key, has_negative, ragged_keys) in enumerate(zip(keys, negatives, ragged)):
            entry = parts[index]
            negative = dict(entry["negative"]) if has_negative else None
            embeds, extras = dict(entry["embeds"]), dict(entry["extras"])
            self._entries[tuple(key)] = Conditioning(embeds, negative, extras, frozenset(ragged_keys))
        self.signature = signature
        return len(keys)
