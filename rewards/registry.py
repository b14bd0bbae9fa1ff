"""Reward registry and loader: ``@register("name")``, ``load(spec)``, ``available()``.

``load`` accepts:

- a registered name: ``load("pickscore", device="cuda", dtype="bf16", path="/models/PickScore_v1")``;
- ``"package.module:callable"`` or ``"path/to/file.py:callable"``: a :class:`~rewards.base.Reward` subclass (built
  with ``device``, ``dtype`` and the options), a ``Reward`` instance, or a plain scoring function
  ``fn(images, prompts) -> Tensor[B] | list[float]``, which is wrapped in :class:`FunctionReward`;
- a ``{name: weight}`` or ``{name: {weight:, scale:, shift:, device:, dtype:, <factory options>}}`` mapping, built
  as :class:`~rewards.composite.WeightedSum`;
- a ``Reward`` instance (returned as is) or a scoring function (wrapped);
- ``"remote:http://host:8000"`` (several servers: ``"remote:http://a:8000,http://b:8001"``), or the name
  ``"remote"`` with the option ``urls=[...]``: a :class:`~rewards.remote.RemoteReward` scoring on reward servers.

Factories registered from outside this package (e.g. a library's own verifier reward) use the same decorator,
or an entry point in the ``rewards`` group of their package's metadata, which ``load`` and ``available`` find
without anything importing that package first (``pyproject.toml``)::

    [project.entry-points.rewards]
    my_reward = "my_pkg.rewards:MyReward"

The entry point is imported when its name is first loaded; a name registered with the decorator shadows an entry
point of the same name (and ``unregister`` brings the entry point back).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import Tensor

from rewards.base import Reward


FactoryT = TypeVar("FactoryT", bound=Callable[..., Reward])


class UnknownRewardError(KeyError):
    """``load`` was given a name that is not registered (the message carries a did-you-mean)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


_FACTORIES: dict[str, Callable[..., Reward]] = {}
"""Factories registered with the decorator."""
_PLUGINS: dict[str, Callable[..., Reward]] = {}
"""Factories imported from entry points so far (a decorator registration of the same name takes precedence)."""


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise ValueError(f"invalid reward name {name!r}: use a non-empty string without ':' or surrounding spaces")


def register(name: str) -> Callable[[FactoryT], FactoryT]:
    """Register a reward factory under ``name``.

    The factory (a ``Reward`` subclass or a function) is called as ``factory(device=None, dtype=None, **options)``
    and must return a :class:`~rewards.base.Reward`.

    Args:
        name: the registry name; must not be registered with this decorator already and must not contain ``":"``
            (reserved for custom specs). It may shadow an installed package's entry point of the same name.

    Raises:
        ValueError: an empty or malformed name, or a name that is already registered.
    """
    _check_name(name)

    def decorator(factory: FactoryT) -> FactoryT:
        if name in _FACTORIES:
            previous = _FACTORIES[name]
            raise ValueError(
                f"reward {name!r} is already registered (by {previous.__module__}.{previous.__qualname__}); "
                "pick another name."
            )
        _FACTORIES[name] = factory
        return factory

    return decorator


def unregister(name: str) -> None:
    """Remove a decorator registration (for tests and interactive sessions); an entry point it shadowed comes back.

    Raises:
        KeyError: ``name`` was not registered with the decorator (entry points of installed packages cannot be
            removed: uninstall the package instead).
    """
    if name not in _FACTORIES:
        where = " (it comes from an installed package's entry point)" if name in _entry_points() else ""
        raise KeyError(f"reward {name!r} is not registered with rewards.register{where}")
    del _FACTORIES[name]


ENTRY_POINT_GROUP = "rewards"
"""Package-metadata group through which installed packages register reward factories."""


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The group's entry points whose names a registration could have (others are not rewards this loads)."""
    points = {}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            _check_name(point.name)
        except ValueError:
            continue
        points[point.name] = point
    return points


def _factory(name: str) -> Callable[..., Reward] | None:
    """The factory of ``name``: a decorator registration, else its entry point (imported on first use); or None."""
    if name in _FACTORIES:
        return _FACTORIES[name]
    if name not in _PLUGINS:
        point = _entry_points().get(name)
        if point is None:
            return None
        try:
            factory = point.load()
        except Exception as err:
            raise ImportError(
                f"reward {name!r} comes from the entry point {point.value!r}, which failed to import: {err}"
            ) from err
        if not callable(factory):
            raise TypeError(f"entry point {point.value!r} of reward {name!r} is not a reward class or function")
        _PLUGINS[name] = factory
    return _PLUGINS[name]


REMOTE_NAME = "remote"
"""The name of the remote reward: ``"remote:<urls>"`` as a spec, or ``"remote"`` with the option ``urls``."""


def _is_remote(spec: str) -> bool:
    return spec == REMOTE_NAME or spec.startswith(REMOTE_NAME + ":")


def _remote_factory(spec: str) -> Callable[..., Reward]:
    """The factory of a ``remote`` spec: the class itself, or the class with the spec's URLs bound (then a ``urls``
    option is refused as unknown: the URLs are given once)."""
    from rewards.remote import RemoteReward  # light: httpx is imported at the first request

    if spec == REMOTE_NAME:
        return RemoteReward
    return functools.partial(RemoteReward, spec[len(REMOTE_NAME) + 1 :])


def available() -> list[str]:
    """The registered reward names, entry points of installed packages included, and ``"remote"``, sorted."""
    return sorted(set(_FACTORIES) | set(_entry_points()) | {REMOTE_NAME})


def load(
    spec: str | Reward | Mapping[str, float | Mapping[str, Any]] | Callable[..., Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **options: Any,
) -> Reward:
    """Build a reward from a registered name, a custom ``"module:callable"``/``"file.py:callable"`` spec, a
    ``{name: weight}`` or ``{name: {option: value}}`` mapping (a weighted sum), a ``Reward`` or a scoring function.

    Model weights are not read here: they load at the first score (or ``reward.load_weights()``) and are cached per
    process, keyed by reward, weight location, device and dtype.

    Args:
        spec: what to load (see the module docstring).
        device: where a model-backed reward runs; ``None`` follows the device of the first batch.
        dtype: the model's dtype; scores are float32 whatever this is.
        **options: passed to the factory, e.g. ``path=``/``revision=`` (weights location) for model-backed rewards,
            or ``differentiable=True`` for a wrapped function; for a mapping, ``WeightedSum``'s ``options`` and
            ``normalize``.

    Returns:
        The reward.

    Raises:
        UnknownRewardError: an unknown name (a ``KeyError``, with a did-you-mean and the available names).
        TypeError: an option the factory does not accept, or a spec of an unsupported type.
        RewardSpecError: a malformed term of a mapping (a ``ValueError`` naming the key).
        ImportError, FileNotFoundError, AttributeError: a custom spec that cannot be resolved.
    """
    if isinstance(spec, Reward):
        if options:
            raise TypeError(f"options {sorted(options)} cannot apply to an already built reward {spec!r}")
        return spec
    if isinstance(spec, Mapping):
        from rewards.composite import WeightedSum

        return WeightedSum(spec, device=device, dtype=dtype, **options)
    if callable(spec) and not isinstance(spec, str):
        return _from_object(spec, getattr(spec, "__name__", type(spec).__name__), device, dtype, options)
    if not isinstance(spec, str):
        raise TypeError(f"cannot load a reward from {type(spec).__name__}; pass a name or 'module:callable'")
    if _is_remote(spec):  # before the "module:callable" form: a URL has colons too
        return _call_factory(_remote_factory(spec), spec, device, dtype, options)
    if ":" not in spec and (factory := _factory(spec)) is not None:
        return _call_factory(factory, spec, device, dtype, options)
    if ":" in spec:
        return _from_object(_resolve_custom(spec), spec, device, dtype, options)
    raise UnknownRewardError(_unknown_name_message(spec))


def factory_options(name: str) -> list[str] | None:
    """The options a registered reward's factory takes besides ``device`` and ``dtype``, read from its signature
    without building it (no weights are read; an entry point's module is imported).

    Returns:
        The option names in signature order, or ``None`` when they cannot be listed cheaply: ``name`` is not a
        registered name (a custom ``module:callable`` spec is imported only when loaded), its entry point fails to
        import (``load`` reports that), or the factory takes ``**kwargs`` or has no introspectable signature.
        A ``remote:<urls>`` spec lists the remote reward's options.
    """
    if _is_remote(name):
        return _signature_options(_remote_factory(name))
    if ":" in name:
        return None
    try:
        factory = _factory(name)
    except (ImportError, TypeError):
        return None
    return None if factory is None else _signature_options(factory)


def _signature_options(factory: Callable[..., Any]) -> list[str] | None:
    """Keyword parameters of ``factory`` other than ``self``/``device``/``dtype``; None if it takes ``**kwargs``."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword_kinds and p.name not in ("self", "device", "dtype")]


def unknown_option_message(name: str, option: str, accepted: Sequence[str]) -> str:
    """``"reward 'pickscore' does not take option 'pth'. Did you mean 'path'? Its options: [...]"``."""
    close = difflib.get_close_matches(option, accepted, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"reward {name!r} does not take option {option!r}.{hint} Its options: {list(accepted)}."


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, available(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown reward {name!r}.{hint} Available: {available()}. A custom reward is loaded as "
        "'package.module:callable' or 'path/to/file.py:callable'. A reward that an installed package provides "
        "(e.g. diffalign's 'shapes') is found through that package's metadata: reinstall it (pip install -e .) "
        "if it was installed before it declared the reward."
    )


def _call_factory(
    factory: Callable[..., Reward], name: str, device: Any, dtype: Any, options: dict[str, Any], strict: bool = True
) -> Reward:
    """Call ``factory(device=, dtype=, **options)`` after checking that it accepts them.

    With ``strict=False`` (user classes loaded from a spec) ``device``/``dtype`` are left out when the factory does
    not take them and they are ``None``.
    """
    kwargs = {"device": device, "dtype": dtype, **options}
    try:
        params = inspect.signature(factory).parameters
    except ValueError:  # no introspectable signature: let the call itself complain
        params = None
    if params is not None:
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not strict and not takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in params or k not in ("device", "dtype") or v is not None}
        unknown = [k for k in kwargs if k not in params] if not takes_any else []
        if unknown:
            accepted = [p for p in params if p not in ("self", "device", "dtype")]
            raise TypeError(unknown_option_message(name, sorted(unknown)[0], accepted))
    reward = factory(**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(f"the factory of reward {name!r} returned {type(reward).__name__}, not a rewards.Reward")
    return reward


def _from_object(obj: Any, name: str, device: Any, dtype: Any, options: dict[str, Any]) -> Reward:
    """Turn a resolved custom object into a reward: class -> built, instance -> as is, function -> wrapped."""
    if isinstance(obj, type) and issubclass(obj, Reward):
        reward = _call_factory(obj, name, device, dtype, options, strict=False)
        if reward.name == Reward.name:  # the class kept the default name: name it after its spec
            reward.name = name
        return reward
    if isinstance(obj, Reward):
        return load(obj, **options)
    if callable(obj):
        return FunctionReward(obj, name=name, **options)
    raise TypeError(f"custom reward {name!r} resolved to {type(obj).__name__}, which is not callable")


def _resolve_custom(spec: str) -> Any:
    """Import the object named by ``"package.module:attr"`` or ``"path/to/file.py:attr"`` (``attr`` may be dotted)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"custom reward spec {spec!r} must look like 'package.module:callable' or 'file.py:callable'")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(target) if is_file else _import_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise AttributeError(f"custom reward {spec!r}: {target!r} has no attribute {part!r}.{hint}")
        obj = getattr(obj, part)
    return obj


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        raise ImportError(
            f"custom reward {spec!r}: cannot import module {target!r} ({err}); is it installed or on sys.path? "
            "For a file, give its path: 'path/to/file.py:callable'."
        ) from err


def _import_file(target: str) -> ModuleType:
    """Import a Python file once per process, under a module name derived from its absolute path."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"custom reward file {target!r} not found (resolved to {path})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"_rewards_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # registered first so that dataclasses/pickling inside the file work
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


class FunctionReward(Reward):
    """Wrap a plain scoring function ``fn(images, prompts) -> Tensor[B] | list[float]`` as a reward.

    The function receives checked inputs (``[B, 3, H, W]`` float in [0, 1], a list of ``B`` prompts) and its output
    is checked (shape ``[B]``, finite), errors naming the reward.

    A function with a parameter named ``metadata`` (``fn(images, prompts, metadata)``) also receives the per-image
    metadata, ``B`` dicts aligned with the images (docs/rewards.md#per-prompt-metadata).

    Args:
        fn: the scoring function.
        name: the reward's name (the spec it was loaded from).
        differentiable: whether gradients flow from the output to the images; defaults to the function's
            ``differentiable`` attribute, else ``False`` (a reward backprop trainer then refuses it instead of
            silently training on a constant).
        needs_prompts: whether prompts are required; defaults to ``fn.needs_prompts``, else ``True``.
        takes_metadata: whether ``fn`` is called with ``metadata=``; defaults to ``fn.takes_metadata``, else
            whether its signature has a ``metadata`` parameter.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        differentiable: bool | None = None,
        needs_prompts: bool | None = None,
        takes_metadata: bool | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.differentiable = bool(getattr(fn, "differentiable", False) if differentiable is None else differentiable)
        self.needs_prompts = bool(getattr(fn, "needs_prompts", True) if needs_prompts is None else needs_prompts)
        if takes_metadata is None:
            takes_metadata = getattr(fn, "takes_metadata", None)
        self.takes_metadata = bool(_has_parameter(fn, "metadata") if takes_metadata is None else takes_metadata)

    def _score(self, images: Tensor, prompts: list[str] | None, *metadata: list[dict[str, Any]]) -> Any:
        if self.takes_metadata:
            return self.fn(images, prompts, metadata=metadata[0])
        return self.fn(images, prompts)


def _has_parameter(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn``'s signature names a parameter ``name`` (False when it has no introspectable signature)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
