"""One way to derive every seed a run draws from: :func:`derive_seed`.

A trainer never invents its own arithmetic for seeds. Each random draw -- the epoch's prompts, an image's noise, a
micro-batch's order, a truncation step -- gets a generator seeded with ``derive_seed(config.seed, "purpose", ...)``:
the run seed, a name saying what the draw is for, and the integers that place it (epoch, image, process, ...).
The result depends on nothing else (not on chunk sizes, not on Python's salted ``hash``), so a resumed run and
an uninterrupted one draw the same numbers, and two purposes never share a stream by accident.

Derived seeds lie in ``[DERIVED_SEED_MIN, 2**63)``, above every seed a person writes down: evaluation seeds (a
config's ``eval.seeds``, the demo's ``EVAL_SEEDS``) are below :data:`DERIVED_SEED_MIN`
(:func:`is_user_seed`), so an evaluation image is never one a trainer trained on.
"""

from __future__ import annotations

import hashlib


__all__ = ["DERIVED_SEED_MIN", "derive_seed", "is_user_seed"]

DERIVED_SEED_MIN = 2**32
"""Every derived seed is at least this; seeds people choose (evaluation seeds) stay below it."""
_SPAN = 2**63 - DERIVED_SEED_MIN


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[DERIVED_SEED_MIN, 2**63)`` determined by ``parts`` alone.

    Args:
        *parts: the run seed first, then what the draw is for and where it sits, e.g.
            ``derive_seed(seed, "grpo/image", epoch, index)``. Integers and strings; ``(1, 2)`` and ``(12,)``
            differ, and so do ``1`` and ``"1"``.

    Returns:
        An int usable by ``torch.Generator.manual_seed`` and ``random.Random``.
    """
    if not parts:
        raise ValueError("derive_seed needs at least one part (the run seed)")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"seed parts are ints or strings, got {part!r} ({type(part).__name__})")
    # repr keeps the types and the boundaries between parts; blake2b is the same on every platform and process.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return DERIVED_SEED_MIN + int.from_bytes(digest, "little") % _SPAN


def is_user_seed(seed: int) -> bool:
    """Whether ``seed`` is in the range kept for seeds people choose (``0 <= seed < DERIVED_SEED_MIN``)."""
    return 0 <= seed < DERIVED_SEED_MIN
