"""Weighted sums of rewards (flow_grpo's ``multi_score`` semantics, docs/rewards.md#weighted-sums).

Each reward enters the total as a :class:`Term`: ``total = sum_k weight_k * scale_k * (r_k - shift_k)``, with
``(weight, scale, shift) = (1, 1, 0)`` unless given. ``scale`` multiplies and ``shift`` is subtracted first, so
flow_grpo's PickScore/26 is ``{"pickscore": {"scale": 1 / 26}}``. The parts are reported raw, in each reward's own
units, so logs stay comparable across weightings. (The older ``normalize={name: (shift, divisor)}`` argument divides
instead, ``(r - shift) / divisor``, and is kept as it was.)

A term is given as a number (its weight) or as a mapping that may also say how to load the reward: ``device``,
``dtype`` and the reward factory's own options (``path``, ``revision``, ...), checked against the factory's
signature before anything loads (:func:`parse_term`).

The sum is differentiable only if every part is. A non-differentiable part (JPEG, a verifier) still adds its value
to the total, as a constant with respect to the images, so trainers that backpropagate through the reward check
``differentiable`` and refuse such a sum rather than silently ignoring a part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, check_images, check_metadata, check_prompts, check_scores, metadata_kwargs


TERM_KEYS = ("weight", "scale", "shift", "device", "dtype", "options")
"""Keys of a term mapping that are not the factory's own; every other key is passed to the factory.
A factory option whose name is one of these (clip_score's ``scale``) goes under ``options``."""


class RewardSpecError(ValueError):
    """A reward term is malformed; ``key`` is the path to the bad value, e.g. ``("pickscore", "weight")``.

    Attributes:
        key: the path inside the ``{name: term}`` mapping.
        message: what is wrong and how to fix it, without the key.
    """

    def __init__(self, key: Sequence[str], message: str) -> None:
        self.key, self.message = tuple(key), message
        super().__init__(f"{'.'.join(self.key)}: {message}")


@dataclasses.dataclass(frozen=True)
class Term:
    """One reward of a weighted sum: how its raw score ``r`` enters the total and how it is loaded.

    Attributes:
        weight: the term's weight in the sum.
        scale: multiplies ``r - shift`` (flow_grpo's PickScore/26 is ``scale = 1/26``).
        shift: subtracted from ``r`` before scaling.
        device: where the reward runs; ``None`` follows the sum's ``device``.
        dtype: the reward model's dtype (``"bf16"``...); ``None`` follows the sum's ``dtype``.
        options: keyword options of the reward's factory (``path``, ``revision``, ...).
    """

    weight: float = 1.0
    scale: float = 1.0
    shift: float = 0.0
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_term(name: str, value: float | Mapping[str, Any], built: bool = False) -> Term:
    """Check one ``name: value`` entry of a reward mapping and return its :class:`Term`; nothing is loaded.

    Args:
        name: the reward: a registered name, a custom spec, or a built reward's name.
        value: a weight (a number), or a mapping of :data:`TERM_KEYS` and factory options, e.g.
            ``{"weight": 1.0, "scale": 1 / 26, "path": "/models/PickScore_v1", "dtype": "bf16"}``.
        built: the reward is already built, so only ``weight``, ``scale`` and ``shift`` can apply.

    Raises:
        RewardSpecError: naming the bad key: a weight, scale or shift that is not a finite number (or a zero
            scale), an unknown device or dtype, or an option the registered factory does not take (with a
            did-you-mean). Options of custom specs are checked when they load.
    """
    if _is_number(value):
        if not math.isfinite(value):
            raise RewardSpecError((name,), f"weight must be a finite number, got {value}")
        return Term(weight=float(value))
    if not isinstance(value, Mapping):
        raise RewardSpecError(
            (name,), f"must be a weight (a number) or a mapping such as {{weight: 1.0, scale: 0.5}}, got {value!r}"
        )
    _check_keys_are_strings(value, (name,))
    loading = [key for key in value if key not in ("weight", "scale", "shift")]
    if built and loading:
        raise RewardSpecError(
            (name, loading[0]), "cannot apply to an already built reward; only weight, scale and shift do"
        )
    term = Term(
        weight=_finite_number(value, "weight", 1.0, name),
        scale=_finite_number(value, "scale", 1.0, name),
        shift=_finite_number(value, "shift", 0.0, name),
        device=_device(value.get("device"), (name, "device")),
        dtype=_dtype(value.get("dtype"), (name, "dtype")),
        options=_factory_options(name, value),
    )
    if term.scale == 0:
        raise RewardSpecError((name, "scale"), "must not be 0; to log a reward without training on it use weight: 0")
    return term


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_keys_are_strings(mapping: Mapping[Any, Any], key: tuple[str, ...]) -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise RewardSpecError((*key, str(bad[0])), f"option names must be strings, got {bad[0]!r}")


def _finite_number(value: Mapping[str, Any], key: str, default: float, name: str) -> float:
    number = value.get(key, default)
    if not _is_number(number) or not math.isfinite(number):
        raise RewardSpecError((name, key), f"must be a finite number, got {number!r}")
    return float(number)


def _device(value: Any, key: tuple[str, ...]) -> str | torch.device | None:
    if value is not None:
        try:
            torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            raise RewardSpecError(key, f"{value!r} is not a device; use e.g. cpu, cuda or cuda:1") from None
    return value


def _dtype(value: Any, key: tuple[str, ...]) -> str | torch.dtype | None:
    from rewards.model import parse_dtype

    if value is not None:
        try:
            parse_dtype(value)
        except ValueError as err:
            raise RewardSpecError(key, str(err)) from None
    return value


def _factory_options(name: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """The factory options of a term mapping: its keys other than :data:`TERM_KEYS`, plus those under ``options``."""
    flat = {key: option for key, option in value.items() if key not in TERM_KEYS}
    nested = value.get("options") or {}
    if not isinstance(nested, Mapping):
        raise RewardSpecError((name, "options"), f"must be a mapping of factory options, got {nested!r}")
    _check_keys_are_strings(nested, (name, "options"))
    twice = sorted(set(flat) & set(nested))
    if twice:
        raise RewardSpecError((name, "options", twice[0]), f"is also given as {name}.{twice[0]}; give it once")
    _check_option_names(name, flat, ())
    _check_option_names(name, nested, ("options",))
    return {**flat, **nested}


def _check_option_names(name: str, options: Mapping[str, Any], where: tuple[str, ...]) -> None:
    """Refuse options that a registered factory's signature does not take (custom specs are checked at load)."""
    from rewards.registry import factory_options, unknown_option_message

    accepted = factory_options(name) if options else None
    if accepted is None:
        return
    for option in options:
        if option not in accepted:
            message = unknown_option_message(name, option, accepted)
            every = f" Every reward also takes {', '.join(TERM_KEYS)}."
            raise RewardSpecError((name, *where, option), message + every)


class WeightedSum(Reward):
    """A weighted sum of rewards that also reports each part.

    Args:
        weights: ``{reward: term}``; a key is a registered name, a custom spec (``"pkg.mod:fn"``) or a built
            :class:`~rewards.base.Reward` (named by its ``name``); a term is a weight or a mapping
            (:func:`parse_term`), e.g. ``{"pickscore": {"weight": 1.0, "scale": 1 / 26, "dtype": "bf16"}}``.
        device: passed to every reward loaded by name whose term names no ``device``.
        dtype: passed to every reward loaded by name whose term names no ``dtype``.
        options: per-reward load options, ``{"pickscore": {"path": "/models/PickScore_v1"}}`` (the same as giving
            them in the term).
        normalize: per-reward ``{name: (shift, divisor)}``, applied as ``(r - shift) / divisor`` (not with a term
            that has its own ``scale`` or ``shift``).

    Raises:
        RewardSpecError: a malformed term (a ``ValueError`` naming the key).
        ValueError: no reward, two parts with one name, options or normalisations for rewards not in the sum.

    Example:
        >>> reward = WeightedSum({"pickscore": {"scale": 1 / 26}, "aesthetic": 0.5}, device="cuda")
        >>> total, parts = reward.score_parts(images, prompts)   # Tensor[B], {"pickscore": Tensor[B], ...}
    """

    name = "weighted_sum"

    def __init__(
        self,
        weights: Mapping[str | Reward, float | Mapping[str, Any]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        normalize: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        if not weights:
            raise ValueError("WeightedSum needs at least one reward")
        extra_options = dict(options or {})
        self.rewards: dict[str, Reward] = {}
        self.terms: dict[str, Term] = {}
        for key, value in weights.items():
            label = key.name if isinstance(key, Reward) else key
            term = parse_term(label, value, built=isinstance(key, Reward))
            term = _with_options(term, label, extra_options.pop(label, {})) if isinstance(key, str) else term
            reward = key if isinstance(key, Reward) else _load_term(key, term, device, dtype)
            if label in self.rewards:
                raise ValueError(f"WeightedSum: two parts are named {label!r}")
            self.rewards[label], self.terms[label] = reward, term
        if extra_options:
            raise ValueError(f"WeightedSum: options given for rewards not in the sum: {sorted(extra_options)}")
        self.weights = {name: term.weight for name, term in self.terms.items()}
        self.normalize = self._check_normalize(normalize or {})
        self.differentiable = all(r.differentiable for r in self.rewards.values())
        self.needs_prompts = any(r.needs_prompts for r in self.rewards.values())
        self.takes_metadata = any(r.takes_metadata for r in self.rewards.values())

    def _check_normalize(self, normalize: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        unknown = sorted(set(normalize) - set(self.rewards))
        if unknown:
            raise ValueError(f"WeightedSum: normalize names rewards not in the sum: {unknown}")
        checked = {}
        for name, (shift, scale) in normalize.items():
            if not math.isfinite(shift) or not math.isfinite(scale) or scale == 0:
                raise ValueError(f"WeightedSum: normalize[{name!r}] needs a finite shift and a non-zero scale")
            if (self.terms[name].scale, self.terms[name].shift) != (1.0, 0.0):
                raise ValueError(f"WeightedSum: {name!r} has a scale or shift in its term; drop normalize[{name!r}]")
            checked[name] = (float(shift), float(scale))
        return checked

    def score_parts(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Score with every part.

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1].
            prompts: ``B`` strings (optional only if no part needs prompts).
            metadata: ``B`` dicts, passed to the parts that take metadata (``None``: empty dicts for them).

        Returns:
            ``(total, parts)``: the weighted sum ``Tensor[B]`` float32 and ``{name: Tensor[B]}`` raw part scores.
        """
        check_images(images, self.name)
        prompt_list = check_prompts(prompts, images.shape[0], self.name, required=self.needs_prompts)
        metadata_list = check_metadata(metadata, images.shape[0], self.name) if self.takes_metadata else None
        total, parts = self._parts(images, prompt_list, metadata_list)
        return check_scores(total, images.shape[0], self.name, device=images.device), parts

    def _parts(
        self, images: Tensor, prompts: list[str] | None, metadata: list[dict[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {
            name: reward.score(images, prompts, **metadata_kwargs(reward, metadata))
            for name, reward in self.rewards.items()
        }
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for name, part in parts.items():
            total = total + self.terms[name].weight * self.normalized_part(name, part)
        return total, parts

    def normalized_part(self, name: str, raw: Tensor) -> Tensor:
        """A part's raw scores ``[B]`` after its shift and scale, before its weight: ``scale * (raw - shift)``, or
        ``(raw - shift) / divisor`` for a part given in ``normalize``. The total is ``sum weight * this``; a trainer
        that normalises each reward on its own (GRPO's ``per_reward``) uses it to keep a negative scale's sign."""
        if name in self.normalize:
            shift, divisor = self.normalize[name]
            return (raw - shift) / divisor
        term = self.terms[name]
        return (raw - term.shift) * term.scale

    def _score(self, images: Tensor, prompts: list[str] | None, *metadata: list[dict[str, Any]]) -> Tensor:
        return self._parts(images, prompts, *metadata)[0]

    def __repr__(self) -> str:
        terms = ", ".join(f"{name!r}: {_describe(term)}" for name, term in self.terms.items())
        return f"WeightedSum({{{terms}}}, differentiable={self.differentiable})"


def _with_options(term: Term, name: str, options: Mapping[str, Any]) -> Term:
    """``term`` with the load ``options`` given beside the mapping (``WeightedSum(options=...)``) added."""
    twice = sorted(set(term.options) & set(options))
    if twice:
        raise ValueError(f"WeightedSum: option {twice[0]!r} of {name!r} is given both in its term and in options=")
    return dataclasses.replace(term, options={**term.options, **options}) if options else term


def _load_term(spec: str, term: Term, device: Any, dtype: Any) -> Reward:
    from rewards.registry import load  # the registry builds WeightedSum from mappings: import late

    device = term.device if term.device is not None else device
    dtype = term.dtype if term.dtype is not None else dtype
    return load(spec, device=device, dtype=dtype, **term.options)


def _describe(term: Term) -> str:
    text = f"{term.weight:g}"
    if (term.scale, term.shift) != (1.0, 0.0):
        text += f" * {term.scale:g} * (r - {term.shift:g})"
    return text
