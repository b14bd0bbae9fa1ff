"""Recipe cards (configs/cards/*.yaml) against the shipped configs and docs/recipes.md.

Each check runs on the real files, and a companion test applies the same checker to a deliberately broken in-memory
card or config to show that it fails, with a message naming what is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("recipe_cards", ROOT / "scripts" / "recipe_cards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recipe_cards", module)
    spec.loader.exec_module(module)
    return module


rc = _load_script()
CARD_PATHS = rc.card_paths(ROOT)


@cache
def _cards() -> dict[str, dict[str, Any]]:
    return {path.name: rc.load_card(path, ROOT) for path in CARD_PATHS}


@cache
def _config(path: str) -> Any:
    return rc.load_recipe_config(path, ROOT) if (ROOT / path).exists() else None


def _set(config: Any, key: str, value: Any) -> Any:
    """A deep copy of ``config`` with the dotted ``key`` set to ``value`` (no validation: an in-memory drift)."""
    config = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = getattr(node, part)
    object.__setattr__(node, last, value)
    return config


# --------------------------------------------------------------------------------------------------------------------
# (a) every shipped config has a card, every card names a shipped config


def test_every_shipped_config_has_a_card_and_every_card_a_config() -> None:
    problems = rc.coverage_problems(rc.shipped_configs(ROOT), _cards())
    assert not problems, "\n".join(problems)


def test_coverage_check_fails_on_a_missing_card_and_an_orphan_card() -> None:
    cards = dict(_cards())
    cards.pop("grpo_tiny_cpu.yaml")
    orphan = dict(cards["dpo_tiny_cpu.yaml"], config="configs/dpo/gone.yaml")
    cards["dpo_gone.yaml"] = orphan
    problems = rc.coverage_problems(rc.shipped_configs(ROOT), cards)
    assert any("configs/grpo/tiny_cpu.yaml: no card" in p for p in problems), problems
    assert any("dpo_gone.yaml: names configs/dpo/gone.yaml" in p for p in problems), problems


def test_cards_follow_the_schema() -> None:
    assert CARD_PATHS, "no cards under configs/cards"
    problems = [p for path in CARD_PATHS for p in rc.card_schema_problems(_raw(path), path.name)]
    assert not problems, "\n".join(problems)


def _raw(path: Path) -> Any:
    import yaml

    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def test_schema_check_fails_on_inconsistent_differences() -> None:
    card = copy.deepcopy(_cards()["grpo_sd35m_shapes_verifier.yaml"])
    card["differences"].append({"key": "optim.lr", "ours": 1.0, "published": 2.0, "reason": "x"})
    card["differences"][0]["published"] = "something else"
    problems = rc.card_schema_problems(card, "grpo_sd35m_shapes_verifier.yaml")
    assert any("difference 'reward' says published" in p for p in problems), problems
    assert any("optim.lr" in p and "says published 2" in p for p in problems), problems
    assert rc.card_schema_problems({"config": "x"}, "c.yaml")[0].startswith("c.yaml: missing field")


# --------------------------------------------------------------------------------------------------------------------
# (b) every card key is a config key


@pytest.mark.parametrize("card_path", CARD_PATHS, ids=[path.name for path in CARD_PATHS])
def test_card_keys_are_config_keys(card_path: Path) -> None:
    card = _cards()[card_path.name]
    config = _config(card["config"])
    if config is None:
        pytest.fail(f"{card_path.name}: config {card['config']} does not exist")
    problems = rc.key_problems(type(config), card, card_path.name)
    assert not problems, "\n".join(problems)


def test_key_check_fails_on_an_unknown_key() -> None:
    card = copy.deepcopy(_cards()["grpo_sd35m_pickscore.yaml"])
    card["values"].append({"key": "optim.learning_rate", "published": 3e-4, "where": "x"})
    card["values"].append({"key": "sampling.num_steps.deep", "published": 1, "where": "x"})
    problems = rc.key_problems(type(_config(card["config"])), card, "grpo_sd35m_pickscore.yaml")
    assert len(problems) == 2, problems
    assert "grpo_sd35m_pickscore.yaml: key 'optim.learning_rate'" in problems[0]
    assert "optim has no field 'learning_rate'" in problems[0]
    assert "sampling.num_steps is not a config group" in problems[1]


def test_key_check_accepts_nested_groups_and_mapping_entries() -> None:
    cls = type(_config("configs/grpo/sd35m_pickscore.yaml"))
    for key in ("model.lora.rank", "optim.betas", "reward", "reward.pickscore", "eval.num_steps"):
        assert rc.key_problem(cls, key) is None, key


# --------------------------------------------------------------------------------------------------------------------
# (c) configs equal their cards' published values except for listed differences; differences are not stale


@pytest.mark.parametrize("card_path", CARD_PATHS, ids=[path.name for path in CARD_PATHS])
def test_config_matches_its_card(card_path: Path) -> None:
    card = _cards()[card_path.name]
    config = _config(card["config"])
    if config is None:
        pytest.fail(f"{card_path.name}: config {card['config']} does not exist")
    problems = rc.drift_problems(config, card, card_path.name)
    assert not problems, "\n".join(problems)


def _pickscore() -> tuple[Any, dict[str, Any]]:
    card = copy.deepcopy(_cards()["grpo_sd35m_pickscore.yaml"])
    return _config(card["config"]), card


def test_drift_check_fails_when_a_config_drifts() -> None:
    config, card = _pickscore()
    assert rc.drift_problems(config, card, "card.yaml") == []
    drifted = _set(_set(config, "optim.lr", 1e-4), "optim.betas", (0.9, 0.99))
    problems = rc.drift_problems(drifted, card, "card.yaml")
    assert len(problems) == 2, problems
    assert problems[0].startswith("configs/grpo/sd35m_pickscore.yaml: optim.lr drifted")
    assert "ours 0.0001, published 0.0003" in problems[0]
    assert "optim.betas" in problems[1] and "ours [0.9, 0.99], published [0.9, 0.999]" in problems[1]


def test_drift_check_uses_a_relative_tolerance() -> None:
    config, card = _pickscore()
    assert rc.drift_problems(_set(config, "optim.lr", 3e-4 * (1 + 1e-12)), card, "card.yaml") == []
    assert rc.drift_problems(_set(config, "optim.lr", 3e-4 * (1 + 1e-6)), card, "card.yaml")


def test_drift_check_fails_on_a_stale_difference() -> None:
    config, card = _pickscore()
    # A difference whose "ours" is no longer the config's value.
    card["differences"] = [{"key": "optim.lr", "ours": 1e-4, "published": 3e-4, "reason": "x"}]
    problems = rc.drift_problems(config, card, "card.yaml")
    assert any(
        "stale card card.yaml: difference optim.lr says ours 0.0001, the config has 0.0003" in p for p in problems
    )
    # A difference whose values are equal.
    assert any("is listed as a difference but ours 0.0003 equals published 0.0003" in p for p in problems), problems
    # A real difference passes.
    drifted = _set(config, "optim.lr", 1e-4)
    assert rc.drift_problems(drifted, card, "card.yaml") == []


def test_drift_check_fails_on_a_key_missing_from_the_config() -> None:
    config, card = _pickscore()
    card["values"].append({"key": "train.no_such_key", "published": 1, "where": "x"})
    problems = rc.drift_problems(config, card, "card.yaml")
    assert problems == [
        "configs/grpo/sd35m_pickscore.yaml: train.no_such_key is not in the config (card card.yaml publishes 1)"
    ]


def test_values_equal_normalises_like_the_loader() -> None:
    assert rc.values_equal("pickscore", {"pickscore": 1.0}, "reward")
    assert not rc.values_equal("pickscore", {"pickscore": 0.5}, "reward")
    assert rc.values_equal((0.9, 0.999), [0.9, 0.999])
    assert rc.values_equal(Path("a/b.txt"), "a/b.txt")
    assert rc.values_equal(8, 8.0)
    assert not rc.values_equal(True, 1)
    assert not rc.values_equal(None, 0)
    assert not rc.values_equal([1, 2], [1, 2, 3])


# --------------------------------------------------------------------------------------------------------------------
# (d) docs/recipes.md is generated from the cards


def test_docs_are_generated_from_the_cards() -> None:
    cards = _cards()
    configs = {Path(card["config"]).as_posix(): _config(card["config"]) for card in cards.values()}
    expected = rc.render(cards, configs)
    doc = ROOT / rc.DOC_PATH
    problem = rc.docs_problem(expected, doc.read_text(encoding="utf-8") if doc.exists() else None)
    assert problem is None, problem


def test_docs_check_fails_on_a_stale_page() -> None:
    config, card = _pickscore()
    cards = {"grpo_sd35m_pickscore.yaml": card}
    text = rc.render(cards, {card["config"]: config})
    assert rc.docs_problem(text, text) is None
    edited = copy.deepcopy(card)
    edited["summary"] = "changed"
    problem = rc.docs_problem(rc.render({"grpo_sd35m_pickscore.yaml": edited}, {card["config"]: config}), text)
    assert problem is not None and "run python scripts/recipe_cards.py" in problem
    assert "run python scripts/recipe_cards.py" in rc.docs_problem(text, None)


def test_docs_mark_differences_and_drift() -> None:
    config, card = _pickscore()
    card["differences"] = [{"key": "optim.lr", "ours": 1e-4, "published": 3e-4, "reason": "a reason"}]
    text = rc.render_card(card, _set(_set(config, "optim.lr", 1e-4), "optim.eps", 1e-6))
    assert "| `optim.lr` | **0.0001** | 0.0003 |" in text
    assert "| `optim.eps` | 1e-06 (drift) | 1e-08 |" in text
    assert "- `optim.lr`: ours 0.0001, published 0.0003 -- a reason" in text


def test_docs_keep_the_anchors_other_pages_link_to() -> None:
    """Section titles whose anchors docs/ and configs/ link to (docs/recipes.md#...)."""
    titles = {card["title"] for card in _cards().values()}
    for title in (
        "GRPO: SD3.5-M with PickScore",
        "MixGRPO: FLUX.1-dev with three rewards",
        "DDPO: SD 1.5 with the aesthetic reward",
        "DPO: SD 1.5 on Pick-a-Pic",
        "DPO: SDXL on Pick-a-Pic",
        "DPO: SD3.5 Medium on Pick-a-Pic",
        "Reward backprop: DRaFT-K on FLUX.1-dev with HPSv2.1",
    ):
        assert title in titles, title


def test_card_names_follow_the_config_paths() -> None:
    assert rc.card_name("configs/grpo/sd35m_pickscore.yaml") == "grpo_sd35m_pickscore.yaml"
    for name, card in _cards().items():
        assert rc.card_name(card["config"]) == name
        assert dataclasses.is_dataclass(_config(card["config"])) or _config(card["config"]) is None
