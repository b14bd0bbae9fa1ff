"""One way to derive every seed a run draws from: :func:`derive_seed`.

A trainer never invents its own arithmetic for seeds. Each random draw -- the epoch's prompts, an image's noise, a
micro-batch's order, a truncation step -- gets a generator seeded with ``derive_seed(config.seed, "purpose", ...)``:
the run seed, a name saying what the draw is for, and the integers that place it (epoch, image, process, ...).
The result depends on nothing else (not on chunk sizes, not on Python's salted ``hash``), so a resumed run and
an uninterrupted one draw the same numbers, and two purposes never share a stream by accident.

Derived seeds never meet the seeds people write down. Those (a config's ``eval.seeds``, the demo's
``EVAL_SEEDS``) lie in ``[0, USER_SEED_LIMIT)`` (:func:`is_user_seed`); every derived seed has bit 31 set, so its
low 32 bits -- all that torch's CPU generator reads of a seed -- are at least ``USER_SEED_LIMIT`` too. An
evaluation image therefore never starts from noise a trainer trained on, on any device.
"""

from __future__ import annotations

import hashlib


__all__ = ["USER_SEED_LIMIT", "derive_seed", "is_user_seed"]

USER_SEED_LIMIT = 2**31
"""Seeds people choose (evaluation seeds) are below this; every derived seed is congruent to at least this modulo
``2**32`` (bit 31 set)."""


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[USER_SEED_LIMIT, 2**63)`` with bit 31 set, determined by ``parts`` alone.

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
    return (int.from_bytes(digest, "little") % 2**63) | USER_SEED_LIMIT


def is_user_seed(seed: int) -> bool:
    """Whether ``seed`` is in the range kept for seeds people choose (``0 <= seed < USER_SEED_LIMIT``)."""
    return 0 <= seed < USER_SEED_LIMIT
