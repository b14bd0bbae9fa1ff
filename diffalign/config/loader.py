"""Generic typed-YAML loader: YAML files and dotted command-line overrides, validated into nested dataclasses.

A config is a tree of ``kw_only`` dataclasses. Its type hints are the schema and the string literal under each
field (an attribute docstring) is its help text, the only one. ``load_config`` reads YAML (or a dict), applies
``key.path=value`` overrides, checks every key and type, runs the dataclasses' ``__post_init__`` cross-field
checks and raises one :class:`ConfigError` that lists every problem, each with its dotted key::

    cfg = load_config(GRPOConfig, "configs/grpo/sd35m_pickscore.yaml", ["optim.lr=1e-4", "seed=1"])
    save_config(cfg)  # -> <output_dir>/config.yaml, which load_config reads back to an equal config

YAML is read with YAML 1.2 rules for numbers and booleans: ``1e-4`` is a float (PyYAML's YAML 1.1 rules make it a
string) and only ``true``/``false`` are booleans (``yes``, ``on`` and ``off`` stay strings). Values are not
silently coerced across kinds: a string is never turned into a number or the reverse.

This module knows nothing about diffusion: the config groups shared by every trainer live in
:mod:`diffalign.config.groups`.
"""

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import os
import re
import textwrap
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml


__all__ = [
    "RESOLVED_CONFIG_NAME",
    "ConfigError",
    "ConfigIssue",
    "config_to_dict",
    "describe_config",
    "field_docs",
    "load_config",
    "save_config",
]

T = TypeVar("T")

RESOLVED_CONFIG_NAME = "config.yaml"
"""File name of the resolved config that every run writes into its output folder."""


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class ConfigIssue(NamedTuple):
    """One problem in a config: the dotted key(s) it concerns and what is wrong."""

    keys: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{', '.join(self.keys)}: {self.message}" if self.keys else self.message


class ConfigError(ValueError):
    """A config that cannot be loaded. Lists every problem found, each naming its dotted key.

    Raise it from a config dataclass's ``__post_init__`` for a cross-field check, naming the field(s) relative to
    that dataclass: the loader prefixes the group's path, so ``key="warmup_steps"`` raised by ``OptimConfig`` is
    reported as ``optim.warmup_steps``.

    Args:
        message: What is wrong and how to fix it.
        key: The field name(s) the problem concerns, relative to the dataclass that raises.
        source: Where the config came from (a file name); shown in the message.
        issues: Several problems at once (used by the loader); replaces ``message`` and ``key``.

    Attributes:
        issues: The problems, in the order they were found.
        source: The file name, or None.
    """

    def __init__(
        self,
        message: str = "",
        *,
        key: str | Sequence[str] | None = None,
        source: str | None = None,
        issues: Sequence[ConfigIssue] | None = None,
    ) -> None:
        if issues is None:
            keys = (key,) if isinstance(key, str) else tuple(key or ())
            issues = [ConfigIssue(keys, message)]
        self.issues = list(issues)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        header = f"invalid config {self.source}" if self.source else "invalid config"
        if len(self.issues) == 1:
            return f"{header}: {self.issues[0]}" if self.source else str(self.issues[0])
        listing = "\n".join(f"  - {issue}" for issue in self.issues)
        return f"{header} ({len(self.issues)} errors):\n{listing}"

    def prefixed(self, prefix: str) -> "ConfigError":
        """The same error with every key moved under ``prefix`` (a group's dotted path)."""
        if not prefix:
            return self
        issues = [
            ConfigIssue(tuple(_join(prefix, key) for key in issue.keys) or (prefix,), issue.message)
            for issue in self.issues
        ]
        return ConfigError(issues=issues, source=self.source)


# --------------------------------------------------------------------------------------------------------------
# YAML dialect
# --------------------------------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot or without a sign (1e-4, 1e4,
# 1.0e5). PyYAML's own float pattern stays in place for the rest (1.5, .inf, .nan).
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_STRICT_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL_WORDS = {"", "~", "null", "Null", "NULL"}


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers and booleans, and duplicate keys rejected instead of silently dropped."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _YamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes every string the loader would read as something else (``'1e-4'``, ``'yes'``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a config file is read by people: never write &id001 anchors


# Each class gets its own copy of the resolver table, so PyYAML's SafeLoader is left untouched for other users.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL_TAG, _STRICT_BOOL, list("tTfF"))
_YamlLoader.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789."))
# The dumper keeps YAML 1.1 booleans as well, so that 'yes' is written quoted and any YAML reader agrees.
_YamlDumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
_YamlDumper.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789."))


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as stream:
            return yaml.load(stream, Loader=_YamlLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:  # a folder, no permission, ...
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", source=str(path)) from None


def _inline_yaml(value: Any) -> str:
    text = yaml.dump(_to_plain(value), Dumper=_YamlDumper, default_flow_style=True, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# --------------------------------------------------------------------------------------------------------------
# Schema helpers
# --------------------------------------------------------------------------------------------------------------

_INVALID: Any = object()  # what a conversion returns after recording an issue


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _members(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if _is_union(tp) else (tp,)


@functools.cache
def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations (modules using `from __future__ import annotations`).
    return get_type_hints(cls)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@functools.cache
def _dotted_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for name in _init_fields(cls):
        key, tp = _join(prefix, name), _hints(cls)[name]
        keys.extend(_dotted_keys(tp, key) if _is_dataclass_type(tp) else [key])
    return tuple(keys)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_type_name(m) for m in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(tp))
    if _is_dataclass_type(tp):
        return f"mapping ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return "path"
    args = get_args(tp)
    if args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{get_origin(tp).__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _shape(tp: Any) -> str:
    origin = get_origin(tp) or tp
    if _is_dataclass_type(tp) or origin is dict:
        return "mapping"
    return "sequence" if origin in (list, tuple) else "scalar"


def _shape_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    return "sequence" if isinstance(value, (list, tuple)) else "scalar"


# --------------------------------------------------------------------------------------------------------------
# Conversion: raw YAML values -> typed values, recording every problem
# --------------------------------------------------------------------------------------------------------------


def _to_bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _INVALID


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):  # bool is an int subclass; `seed: true` is a mistake, not 1
        return _INVALID
    if isinstance(value, int):
        return value
    # YAML has no integer exponent notation, so `max_steps: 1e4` arrives as 10000.0.
    return int(value) if isinstance(value, float) and value.is_integer() else _INVALID


def _to_float(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID


def _to_str(value: Any) -> Any:
    return value if isinstance(value, str) else _INVALID


def _to_path(value: Any) -> Any:
    return Path(value) if isinstance(value, (str, os.PathLike)) else _INVALID


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, Path: _to_path}


def _mismatch_hint(value: Any, tp: Any) -> str:
    if tp is str and isinstance(value, (int, float, bool)):
        return "; quote the value to keep it a string"
    if tp in (int, float) and isinstance(value, str) and _looks_numeric(value):
        return "; remove the quotes to make it a number"
    return ""


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Builder:
    """Converts a raw (YAML-shaped) value to a schema type, collecting issues instead of stopping at the first."""

    def __init__(self, root: type) -> None:
        self.root = root
        self.issues: list[ConfigIssue] = []

    def error(self, key: str, message: str) -> Any:
        self.issues.append(ConfigIssue((key,) if key else (), message))
        return _INVALID

    def mismatch(self, value: Any, tp: Any, path: str) -> Any:
        return self.error(path, f"expected {_type_name(tp)}, got {_show(value)}{_mismatch_hint(value, tp)}")

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        origin = get_origin(tp) or tp
        if tp is Any or tp is object:
            return value
        if _is_dataclass_type(tp):
            return self.dataclass(tp, value, path)
        if _is_union(tp):
            return self.union(tp, value, path)
        if origin is Literal:
            return self.literal(tp, value, path)
        if origin in (list, tuple):
            return self.sequence(tp, value, path)
        if origin is dict:
            return self.mapping(tp, value, path)
        if tp in _SCALARS:
            result = _SCALARS[tp](value)
            return self.mismatch(value, tp, path) if result is _INVALID else result
        return value if isinstance(value, origin) else self.mismatch(value, tp, path)

    def union(self, tp: Any, value: Any, path: str) -> Any:
        members = [m for m in get_args(tp) if m is not type(None)]
        if value is None:
            return None if len(members) < len(get_args(tp)) else self.mismatch(value, tp, path)
        for member in members:  # first member that accepts the value wins, as in the annotation's order
            trial = _Builder(self.root)
            result = trial.convert(value, member, path)
            if not trial.issues:
                return result
        # A mapping or list that fits exactly one member is reported against that member: its nested errors
        # ("reward.pickscore: expected float") say more than "expected str or dict[str, float]".
        fitting = [m for m in members if _shape(m) == _shape_of(value) != "scalar"]
        if len(fitting) == 1:
            return self.convert(value, fitting[0], path)
        return self.mismatch(value, tp, path)

    def literal(self, tp: Any, value: Any, path: str) -> Any:
        choices = get_args(tp)
        if any(value == choice and type(value) is type(choice) for choice in choices):
            return value
        message = f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}"
        close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
        if isinstance(value, str) and close:
            message += f" (did you mean {close[0]!r}?)"
        return self.error(path, message)

    def sequence(self, tp: Any, value: Any, path: str) -> Any:
        if not isinstance(value, (list, tuple)):
            return self.mismatch(value, tp, path)
        origin, args = get_origin(tp) or tp, get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return self.error(path, f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [self.convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        if any(item is _INVALID for item in items):
            return _INVALID
        return tuple(items) if origin is tuple else items

    def mapping(self, tp: Any, value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            return self.mismatch(value, tp, path)
        key_type, value_type = get_args(tp) or (Any, Any)
        result, ok = {}, True
        for raw_key, raw_value in value.items():
            key_path = _join(path, str(raw_key))
            key = _SCALARS.get(key_type, lambda k: k)(raw_key)
            if key is _INVALID:
                self.error(key_path, f"key must be {_type_name(key_type)}, got {_show(raw_key)}")
                ok = False
                continue
            result[key] = self.convert(raw_value, value_type, key_path)
            ok = ok and result[key] is not _INVALID
        return result if ok else _INVALID

    def dataclass(self, cls: type, value: Any, path: str) -> Any:
        if isinstance(value, cls):
            return value
        if value is None:  # an empty YAML section (`optim:` with every line commented out) means "defaults"
            value = {}
        if not isinstance(value, Mapping):
            return self.mismatch(value, cls, path)
        fields, hints = _init_fields(cls), _hints(cls)
        unknown = [str(key) for key in value if key not in fields]
        for key in unknown:
            self.unknown_key(cls, key, path)
        ok = not unknown
        kwargs = {}
        for name, f in fields.items():
            key_path = _join(path, name)
            if name in value:
                kwargs[name] = self.convert(value[name], hints[name], key_path)
            elif _is_required(f) and _is_dataclass_type(hints[name]):
                kwargs[name] = self.dataclass(hints[name], {}, key_path)  # names the group's own missing keys
            elif _is_required(f):
                kwargs[name] = self.error(key_path, "missing required key")
            ok = ok and kwargs.get(name) is not _INVALID
        return self.construct(cls, kwargs, path) if ok else _INVALID

    def construct(self, cls: type, kwargs: dict[str, Any], path: str) -> Any:
        try:
            obj = cls(**kwargs)  # runs __post_init__ cross-field checks
            validate = getattr(obj, "validate", None)
            if callable(validate):
                validate()
        except ConfigError as err:
            self.issues.extend(err.prefixed(path).issues)
            return _INVALID
        return obj

    def unknown_key(self, cls: type, key: str, path: str) -> Any:
        names = list(_init_fields(cls))
        close = difflib.get_close_matches(key, names, n=1)
        # A key in the wrong group (`lr` at the top level) is suggested at its right place.
        elsewhere = [k for k in _dotted_keys(self.root) if k.rsplit(".", 1)[-1] == key][:3]
        if close:
            hint = f"did you mean '{_join(path, close[0])}'?"
        elif elsewhere:
            hint = "did you mean " + " or ".join(f"'{k}'" for k in elsewhere) + "?"
        else:
            hint = "valid keys: " + ", ".join(names)
        return self.error(_join(path, key), f"unknown key ({hint})")


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------


def _parse_override_value(text: str, key: str, builder: _Builder) -> Any:
    stripped = text.strip()
    try:
        value = yaml.load(stripped, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        return builder.error(key, f"cannot parse override value {stripped!r} as YAML ({problem})")
    # "#1" parses as a YAML comment, i.e. null; the user meant the text.
    return stripped if value is None and stripped not in _NULL_WORDS else value


def _child_type(tp: Any, part: str, path: str, builder: _Builder) -> Any:
    """Type of sub-key ``part`` of a value of type ``tp`` at ``path``; records an issue if there is no such key."""
    for member in _members(tp):
        if _is_dataclass_type(member):
            if part in _init_fields(member):
                return _hints(member)[part]
            return builder.unknown_key(member, part, path)
    for member in _members(tp):
        if (get_origin(member) or member) is dict:
            return (get_args(member) or (Any, Any))[1]
    return builder.error(path, f"{_type_name(tp)} has no sub-keys; set the value as a whole: {path}=VALUE")


def _deep_merge(base: Mapping, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        both_mappings = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _deep_merge(merged[key], value) if both_mappings else value
    return merged


def _override_type(root: type, parts: list[str], text: str, builder: _Builder) -> Any:
    """Schema type at a dotted override key, or _INVALID (with an issue naming the override) if there is none."""
    tp = root
    for i, part in enumerate(parts):
        tp = _child_type(tp, part, ".".join(parts[:i]), builder)
        if tp is _INVALID:
            last = builder.issues[-1]
            builder.issues[-1] = last._replace(message=f"{last.message} (in override {text!r})")
            return _INVALID
    return tp


def _apply_override(raw: dict, root: type, text: str, builder: _Builder) -> str | None:
    """Merges one ``a.b.c=value`` override into ``raw``; returns its key, or None if it was rejected."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        builder.error(key, f"malformed override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. optim.lr=1e-4")
        return None
    value = _parse_override_value(value_text, key, builder)
    tp = _override_type(root, parts, text, builder)  # checked before raw is touched
    if value is _INVALID or tp is _INVALID:
        return None
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            child = config_to_dict(child)
        # A non-mapping value on the way (e.g. `reward: pickscore` under `reward.aesthetic=0.5`) is replaced.
        node[part] = dict(child) if isinstance(child, Mapping) else {}
        node = node[part]
    # A mapping set on a config group merges into what the file gave; on a dict-typed value it replaces it.
    merge = isinstance(value, Mapping) and isinstance(node.get(parts[-1]), Mapping)
    merge = merge and any(_is_dataclass_type(m) for m in _members(tp))
    node[parts[-1]] = _deep_merge(node[parts[-1]], value) if merge else value
    return key


def _attribute_to_overrides(issues: list[ConfigIssue], origins: dict[str, str]) -> list[ConfigIssue]:
    def origin(keys: tuple[str, ...]) -> str | None:
        for key, text in reversed(origins.items()):
            if any(k == key or k.startswith((key + ".", key + "[")) for k in keys):
                return text
        return None

    annotated = []
    for issue in issues:
        text = origin(issue.keys)
        annotated.append(issue._replace(message=f"{issue.message} (from override {text!r})") if text else issue)
    return annotated


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def _read_source(source: str | os.PathLike | Mapping[str, Any] | None) -> tuple[dict, str | None]:
    if source is None:
        return {}, None
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), None
    path = Path(source)
    data = _read_yaml(path)
    if data is None:  # an empty file
        return {}, str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {_show(data)}", source=str(path))
    return data, str(path)


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Builds a validated config from YAML (or a dict) and dotted overrides.

    Args:
        cls: The config dataclass (``kw_only`` dataclasses of nested dataclasses).
        source: A YAML file, a mapping with the same layout, or None for the defaults.
        overrides: ``"a.b.c=value"`` strings applied in order after ``source``. The value is YAML (``1e-4``,
            ``[1, 2]``, ``null``, ``{pickscore: 1.0}``). A mapping set on a config group merges into it; set on a
            dict-typed field (``reward={...}``) it replaces it, and ``reward.pickscore=0.7`` sets one entry.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: Listing every unknown key (with a did-you-mean), wrong type, missing required key, bad
            override and failed cross-field check, each by its dotted key; and the file name if there is one.
        TypeError: If ``cls`` is not a dataclass or ``overrides`` is a single string.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    raw, file_name = _read_source(source)
    builder = _Builder(cls)
    origins: dict[str, str] = {}
    for text in overrides:
        key = _apply_override(raw, cls, text, builder)
        if key is not None:
            origins[key] = text
    # Issues found while applying overrides name the override already; those found while building the config
    # are traced back to the override that set their key, if any.
    override_issues, builder.issues = builder.issues, []
    config = builder.dataclass(cls, raw, "")
    issues = override_issues + _attribute_to_overrides(builder.issues, origins)
    if issues:
        raise ConfigError(issues=issues, source=file_name)
    return config


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-ready form of a config: nested dicts in field order, paths as str, tuples as lists."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {config!r}")
    return {f.name: _to_plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def save_config(config: Any, path: str | os.PathLike | None = None) -> Path:
    """Writes a config as YAML, keys in field order, in a form ``load_config`` reads back to an equal config.

    Args:
        config: A config dataclass instance.
        path: The file to write; by default ``<config.output_dir>/config.yaml``. Parent folders are created.

    Returns:
        The path written.
    """
    if path is None:
        if getattr(config, "output_dir", None) is None:
            raise TypeError(f"{type(config).__name__} has no output_dir; pass the path to save_config")
        path = Path(config.output_dir) / RESOLVED_CONFIG_NAME
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(config_to_dict(config), Dumper=_YamlDumper, sort_keys=False, allow_unicode=True, width=119)
    path.write_text(f"# Resolved {type(config).__name__}, written by diffalign.\n{body}", encoding="utf-8")
    return path


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (interactive session, frozen app): no help text, not an error
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        is_field = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if is_field and is_doc and isinstance(after.value.value, str):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass's fields (inherited ones included), in field order.

    An attribute docstring is the string literal on the line after a field, the only help text a field has.
    Sources are parsed once per class.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring for a redeclared field wins
        if _is_dataclass_type(klass):
            docs.update(_own_field_docs(klass))
    return {name: docs[name] for name in _init_fields(cls) if name in docs}


def _describe_lines(cls: type, prefix: str, depth: int) -> Iterator[str]:
    docs, hints, indent = field_docs(cls), _hints(cls), "  " * depth
    for name, f in _init_fields(cls).items():
        key, tp = _join(prefix, name), hints[name]
        doc_lines = docs.get(name, "").splitlines()
        if _is_dataclass_type(tp):
            yield f"{indent}{key}: {doc_lines[0] if doc_lines else tp.__name__}"
            yield from _describe_lines(tp, key, depth + 1)
            continue
        default = "  (required)" if _is_required(f) else f" = {_inline_yaml(_default_of(f))}"
        yield f"{indent}{key}: {_type_name(tp)}{default}"
        yield from (f"{indent}    {line}" for line in doc_lines)


def describe_config(cls: type) -> str:
    """Every key of a config as ``dotted.key: type = default`` followed by its docstring (``--help-config``)."""
    return "\n".join(_describe_lines(cls, "", 0))
