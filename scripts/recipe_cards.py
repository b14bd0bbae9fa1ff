"""Recipe cards: the published hyperparameters behind every shipped config, and docs/recipes.md generated from them.

Each shipped config ``configs/<group>/<stem>.yaml`` has a card ``configs/cards/<group>_<stem>.yaml`` that records
where the recipe comes from (repository, files, the commit read, or paper and table), a short summary, every
hyperparameter with a published counterpart (``values``: dotted config key, the published value translated into
diffalign's units, where it was read), the keys on which the shipped config deliberately departs from it
(``differences``: ours, published, reason), and published settings that no config key expresses (``not_compared``).

    python scripts/recipe_cards.py            # regenerate docs/recipes.md
    python scripts/recipe_cards.py --check    # exit 1 when docs/recipes.md is not current
    python scripts/recipe_cards.py --drift    # list every card/config mismatch (exit 1 if any)

The same functions back ``tests/test_recipe_cards.py``: every shipped config has a card, every card key is a config
key, every config value equals its card's published value unless the card lists a deliberate difference, and no
difference is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


ROOT = Path(__file__).resolve().parents[1]
CARDS_DIR = Path("configs/cards")
DOC_PATH = Path("docs/recipes.md")
GROUPS: tuple[tuple[str, str], ...] = (
    ("grpo", "Flow-GRPO and DDPO"),
    ("dpo", "Diffusion-DPO"),
    ("backprop", "Reward backprop"),
    ("self_play", "Self-play rounds (RAFT, SPIN-Diffusion, SePPO)"),
    ("self_npo", "Negative models (Self-NPO)"),
)
REGENERATE = "run python scripts/recipe_cards.py"

CARD_FIELDS = ("config", "title", "method", "reproduces", "order", "source", "summary", "values", "differences")
VALUE_FIELDS = ("key", "published", "where")
DIFFERENCE_FIELDS = ("key", "ours", "published", "reason")
REL_TOL = 1e-9

_MISSING = object()


class CardError(ValueError):
    """A card that does not follow the card schema."""


# --------------------------------------------------------------------------------------------------------------------
# Files


NOT_RECIPES = (CARDS_DIR, Path("configs/accelerate"))
"""Folders of ``configs/`` that hold no training recipe: the cards, and accelerate's launch configs."""


def shipped_configs(root: Path = ROOT) -> list[Path]:
    """Every shipped recipe, ``configs/<group>/<stem>.yaml`` (relative to ``root``), :data:`NOT_RECIPES` excluded."""
    found = [path.relative_to(root) for path in (root / "configs").glob("*/*.yaml")]
    return sorted(path for path in found if path.parent not in NOT_RECIPES)


def card_name(config: str | os.PathLike) -> str:
    """The card file name of a config path: ``configs/grpo/tiny_cpu.yaml`` -> ``grpo_tiny_cpu.yaml``."""
    path = Path(config)
    return f"{path.parent.name}_{path.stem}.yaml"


def card_paths(root: Path = ROOT) -> list[Path]:
    """Every card file (relative to ``root``)."""
    return sorted(path.relative_to(root) for path in (root / CARDS_DIR).glob("*.yaml"))


def load_card(path: str | os.PathLike, root: Path = ROOT) -> dict[str, Any]:
    """Reads and checks the layout of one card; raises :class:`CardError` naming the card."""
    full = root / path
    with open(full, encoding="utf-8") as handle:
        card = yaml.safe_load(handle)
    problems = card_schema_problems(card, Path(path).name)
    if problems:
        raise CardError("\n".join(problems))
    return card


def card_schema_problems(card: Any, name: str) -> list[str]:
    """Layout problems of a card (fields, value and difference entries, consistency between them)."""
    if not isinstance(card, Mapping):
        return [f"{name}: a card is a mapping, got {type(card).__name__}"]
    problems = [f"{name}: missing field {field!r}" for field in CARD_FIELDS if field not in card]
    if problems:
        return problems
    if card_name(card["config"]) != name:
        problems.append(f"{name}: names config {card['config']!r}, whose card would be {card_name(card['config'])}")
    published: dict[str, Any] = {}
    for index, entry in enumerate(card["values"] or []):
        if not isinstance(entry, Mapping) or any(field not in entry for field in VALUE_FIELDS):
            problems.append(f"{name}: values[{index}] needs {', '.join(VALUE_FIELDS)}, got {entry!r}")
            continue
        if entry["key"] in published:
            problems.append(f"{name}: key {entry['key']!r} is listed twice in values")
        published[entry["key"]] = entry["published"]
    for index, entry in enumerate(card["differences"] or []):
        if not isinstance(entry, Mapping) or any(field not in entry for field in DIFFERENCE_FIELDS):
            problems.append(f"{name}: differences[{index}] needs {', '.join(DIFFERENCE_FIELDS)}, got {entry!r}")
            continue
        key = entry["key"]
        if key not in published:
            problems.append(f"{name}: difference {key!r} has no entry in values")
        elif not values_equal(entry["published"], published[key], key):
            problems.append(
                f"{name}: difference {key!r} says published {show(entry['published'])}, "
                f"values say {show(published[key])}"
            )
    return problems


# --------------------------------------------------------------------------------------------------------------------
# Configs and keys


def config_class(method: str) -> type:
    """The config dataclass of a trainer method (``grpo``, ``diffusion_dpo``, ``reward_backprop``)."""
    from diffalign.trainers import get_trainer

    return get_trainer(method)[0]


def load_recipe_config(path: str | os.PathLike, root: Path = ROOT) -> Any:
    """Loads a shipped config into its trainer's config dataclass (picked by its ``method``)."""
    from diffalign.config import load_config

    full = root / path
    with open(full, encoding="utf-8") as handle:
        method = (yaml.safe_load(handle) or {}).get("method")
    return load_config(config_class(method), full)


def _field_types(tp: Any) -> list[Any]:
    """The concrete types of an annotation (the members of a union, or the type itself)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return [member for arg in typing.get_args(tp) for member in _field_types(arg)]
    return [tp]


def key_problem(cls: type, key: str) -> str | None:
    """Why ``key`` is not a dotted key of the config dataclass ``cls``; None if it is one.

    A key names a field (``optim.lr``, ``model.lora.rank``, ``reward``), or an entry of a mapping-typed field
    (``reward.pickscore``)."""
    current: list[Any] = [cls]
    for depth, part in enumerate(key.split(".")):
        dataclass_types = [tp for tp in current if dataclasses.is_dataclass(tp)]
        if dataclass_types:
            found = None
            for tp in dataclass_types:
                fields = {field.name for field in dataclasses.fields(tp) if field.init}
                if part in fields:
                    found = _field_types(typing.get_type_hints(tp)[part])
                    break
            if found is None:
                prefix = ".".join(key.split(".")[:depth]) or "the config"
                return f"{prefix} has no field {part!r}"
            current = found
        elif any(typing.get_origin(tp) in (dict, Mapping) or tp is dict for tp in current):
            current = [Any]
        else:
            return f"{'.'.join(key.split('.')[:depth])} is not a config group"
    return None


def resolve(config: Any, key: str) -> Any:
    """The value of a dotted key in a loaded config (``_MISSING`` where the key does not exist)."""
    value = config
    for part in key.split("."):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            names = {field.name for field in dataclasses.fields(value)}
            if part not in names:
                return _MISSING
            value = getattr(value, part)
        elif isinstance(value, Mapping):
            if part not in value:
                return _MISSING
            value = value[part]
        else:
            return _MISSING
    return value


def _plain(value: Any, key: str = "") -> Any:
    """A comparable form: paths as text, tuples as lists, a single reward name as ``{name: 1.0}``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if key == "reward" and isinstance(value, str):
        return {value: 1.0}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def values_equal(ours: Any, published: Any, key: str = "") -> bool:
    """Equality of a config value and a published one: numbers to a relative tolerance of 1e-9, sequences
    elementwise, mappings entrywise; ``reward: name`` equals ``{name: 1.0}``."""
    a, b = _plain(ours, key), _plain(published, key)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=REL_TOL)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def show(value: Any) -> str:
    """A value in YAML-like text (``null``, ``true``, ``3e-04``, ``[0.9, 0.999]``, ``{pickscore: 1}``)."""
    value = _plain(value)
    if value is _MISSING:
        return "(no such key)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, list):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


# --------------------------------------------------------------------------------------------------------------------
# Checks


def coverage_problems(configs: Iterable[str | os.PathLike], cards: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Shipped configs without a card, and cards whose config is not shipped (``cards``: file name -> card)."""
    config_set = {Path(path).as_posix() for path in configs}
    named = {Path(card["config"]).as_posix(): name for name, card in cards.items()}
    problems = [
        f"{path}: no card (expected {CARDS_DIR.as_posix()}/{card_name(path)})"
        for path in sorted(config_set)
        if path not in named
    ]
    problems += [
        f"{name}: names {path}, which is not a shipped config"
        for path, name in sorted(named.items())
        if path not in config_set
    ]
    return problems


def key_problems(cls: type, card: Mapping[str, Any], name: str) -> list[str]:
    """Card keys (values and differences) that are no key of the config dataclass ``cls``."""
    keys = [entry["key"] for entry in card.get("values") or []]
    keys += [entry["key"] for entry in card.get("differences") or [] if entry["key"] not in keys]
    problems = []
    for key in keys:
        problem = key_problem(cls, key)
        if problem is not None:
            problems.append(f"{name}: key {key!r} is not a config key of {cls.__name__} ({problem})")
    return problems


def drift_problems(config: Any, card: Mapping[str, Any], name: str) -> list[str]:
    """Where the loaded config disagrees with its card.

    - a value whose key is not in ``differences`` must equal the published value (else: drift);
    - a difference's ``ours`` must still be the config's value, and must differ from the published one (else: the
      card is stale)."""
    path = card["config"]
    differences = {entry["key"]: entry for entry in card.get("differences") or []}
    problems = []
    for entry in card.get("values") or []:
        key, published = entry["key"], entry["published"]
        ours = resolve(config, key)
        if ours is _MISSING:
            problems.append(f"{path}: {key} is not in the config (card {name} publishes {show(published)})")
            continue
        difference = differences.get(key)
        if difference is None:
            if not values_equal(ours, published, key):
                problems.append(
                    f"{path}: {key} drifted from the published run: ours {show(ours)}, published {show(published)} "
                    f"({entry['where']}); fix the config or list it in {name} differences"
                )
            continue
        if not values_equal(ours, difference["ours"], key):
            problems.append(
                f"{path}: stale card {name}: difference {key} says ours {show(difference['ours'])}, "
                f"the config has {show(ours)}"
            )
        if values_equal(ours, published, key):
            problems.append(
                f"{path}: stale card {name}: {key} is listed as a difference but ours {show(ours)} equals "
                f"published {show(published)}; remove the difference"
            )
    return problems


def docs_problem(expected: str, actual: str | None) -> str | None:
    """Why the docs text ``actual`` is not the generated ``expected``; None when it is."""
    if actual is None:
        return f"{DOC_PATH.as_posix()} is missing: {REGENERATE}"
    if actual != expected:
        return f"{DOC_PATH.as_posix()} is not current: {REGENERATE}"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Rendering


INTRO = """\
# Recipes

<!-- Generated by scripts/recipe_cards.py from configs/cards/*.yaml and the configs; edit the cards, then run
python scripts/recipe_cards.py. -->

The configs under `configs/` reproduce published runs, translated into diffalign's keys. Each one has a recipe card
(`configs/cards/<group>_<config>.yaml`) recording the source (repository, files and the commit read, or the paper),
every hyperparameter with a published counterpart, and the keys on which the config deliberately departs from it,
with the reason. This page is generated from the cards and the configs; `tests/test_recipe_cards.py` fails when a
config drifts from its card. The `tiny_cpu.yaml` files are smoke runs on tiny random-weight pipelines that finish
in about a minute on a CPU; they have no published source.

Launch a recipe on one GPU with `diffalign train CONFIG.yaml`, on several with
`accelerate launch --num_processes N -m diffalign.cli train CONFIG.yaml`. Batch keys are per process: effective
batch sizes in the published runs assume a number of GPUs (each card says which); with fewer GPUs, raise
`optim.gradient_accumulation_steps` to keep the batch per optimizer step. Data paths (`data/...`, `prompts/...`)
are placeholders for files you provide.

Units: Flow-GRPO / DDPO `max_steps` counts epochs (a sampling round and its updates); DPO and reward backprop count
optimizer steps (one AlignProp "epoch" is one update). Bookkeeping keys (output paths, seeds, logging, checkpoint and
evaluation frequency) are not compared.
"""


def _cell(text: Any) -> str:
    if isinstance(text, str) and text != text.strip() or text == "":
        return f"`{text!r}`"  # a value of blanks (a negative prompt of one space) would be an empty cell
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source_line(source: Mapping[str, Any]) -> str:
    parts = []
    repository = source.get("repository")
    if repository:
        name = repository.removeprefix("https://github.com/")
        parts.append(f"[{name}]({repository})")
    files = source.get("files") or []
    if files:
        parts.append(", ".join(f"`{file}`" for file in files))
    if source.get("commit"):
        parts.append(f"at commit `{source['commit']}`")
    text = " ".join(parts)
    if source.get("paper"):
        text = f"{text}; {source['paper']}" if text else source["paper"]
    return text or "none"


def render_card(card: Mapping[str, Any], config: Any) -> str:
    """The docs section of one card (``config``: the loaded config, or None when it cannot be loaded)."""
    lines = [f"### {card['title']}", ""]
    source = card["source"] or {}
    lines.append(f"`{card['config']}` -- {card['method']}. Source: {_source_line(source)}.")
    if source.get("gpus"):
        lines.append(f"Published on {source['gpus']} GPUs. {str(source.get('gpu_note') or '').strip()}".rstrip())
    if source.get("note"):
        lines.append(str(source["note"]).strip())
    if config is None:
        lines.append(f"(`{card['config']}` is not in the tree: the `ours` column is empty.)")
    lines += ["", str(card["summary"]).strip()]
    see = card.get("see") or []
    if see:
        lines += ["", "See " + ", ".join(f"[{link}]({link})" for link in see) + "."]
    lines.append("")
    values = card.get("values") or []
    differences = {entry["key"]: entry for entry in card.get("differences") or []}
    if values:
        lines += ["| key | ours | published | where |", "|---|---|---|---|"]
        for entry in values:
            key = entry["key"]
            ours = resolve(config, key) if config is not None else _MISSING
            ours_text = "" if config is None else show(ours)
            if key in differences and config is not None:
                ours_text = f"**{ours_text}**"
            elif config is not None and (ours is _MISSING or not values_equal(ours, entry["published"], key)):
                ours_text = f"{ours_text} (drift)"
            lines.append(
                f"| `{key}` | {_cell(ours_text)} | {_cell(show(entry['published']))} | {_cell(entry['where'])} |"
            )
        lines.append("")
    if differences:
        lines += ["Deliberate differences (**bold** above):", ""]
        for key, entry in differences.items():
            lines.append(
                f"- `{key}`: ours {show(entry['ours'])}, published {show(entry['published'])} -- "
                f"{str(entry['reason']).strip()}"
            )
        lines.append("")
    not_compared = card.get("not_compared") or []
    if not_compared:
        lines += ["Published settings without a compared key:", ""]
        for entry in not_compared:
            note = f" -- {str(entry['note']).strip()}" if entry.get("note") else ""
            lines.append(f"- {entry['setting']}: {show(entry['published'])} ({entry['where']}){note}")
        lines.append("")
    return "\n".join(lines)


def _sorted_cards(cards: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_group: dict[str, list[Mapping[str, Any]]] = {group: [] for group, _ in GROUPS}
    for card in cards.values():
        group = Path(card["config"]).parent.name
        by_group.setdefault(group, []).append(card)
    for group_cards in by_group.values():
        group_cards.sort(key=lambda card: (card["order"], card["config"]))
    return by_group


def render(cards: Mapping[str, Mapping[str, Any]], configs: Mapping[str, Any]) -> str:
    """docs/recipes.md from the cards (file name -> card) and their loaded configs (config path -> config or None)."""
    by_group = _sorted_cards(cards)
    titles = dict(GROUPS)
    lines = [INTRO, "| file | method | reproduces |", "|---|---|---|"]
    for group_cards in by_group.values():
        for card in group_cards:
            lines.append(f"| `{card['config']}` | {_cell(card['method'])} | {_cell(card['reproduces'])} |")
    lines.append("")
    for group, group_cards in by_group.items():
        if not group_cards:
            continue
        lines += [f"## {titles.get(group, group)}", ""]
        for card in group_cards:
            lines.append(render_card(card, configs.get(Path(card["config"]).as_posix())))
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def load_all(root: Path = ROOT) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every card (file name -> card) and the config each names (config path -> loaded config, or None when the
    file does not exist)."""
    cards = {path.name: load_card(path, root) for path in card_paths(root)}
    configs: dict[str, Any] = {}
    for card in cards.values():
        path = Path(card["config"])
        configs[path.as_posix()] = load_recipe_config(path, root) if (root / path).exists() else None
    return cards, configs


def all_problems(root: Path = ROOT) -> list[str]:
    """Coverage, key and drift problems of every card, and whether the docs are current."""
    cards, configs = load_all(root)
    problems = coverage_problems(shipped_configs(root), cards)
    for name, card in cards.items():
        config = configs[Path(card["config"]).as_posix()]
        if config is None:
            continue
        problems += key_problems(type(config), card, name)
        problems += drift_problems(config, card, name)
    doc = root / DOC_PATH
    problem = docs_problem(render(cards, configs), doc.read_text(encoding="utf-8") if doc.exists() else None)
    if problem:
        problems.append(problem)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when docs/recipes.md is not current")
    mode.add_argument("--drift", action="store_true", help="list every card/config problem; exit 1 if any")
    args = parser.parse_args(argv)
    if args.drift:
        problems = all_problems()
        print("\n".join(problems) if problems else "no problems")  # noqa: T201
        return 1 if problems else 0
    cards, configs = load_all()
    text = render(cards, configs)
    doc = ROOT / DOC_PATH
    if args.check:
        problem = docs_problem(text, doc.read_text(encoding="utf-8") if doc.exists() else None)
        if problem:
            print(problem, file=sys.stderr)  # noqa: T201
            return 1
        return 0
    doc.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH.as_posix()}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
