"""AI-feedback pairs: ranking, the written dataset, and its labels (docs/methods/dpo.md#ai-feedback-pairs)."""

import json

import pytest
import torch

import rewards
from diffalign.adapters import load_adapter
from diffalign.data.ai_feedback import SUMMARY_NAME, make_preference_pairs, rank_pairs
from diffalign.data.preference import load_preference_dataset
from diffalign.testing import redness


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot to oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_rank_pairs_best_worst_and_all():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.1])
    assert rank_pairs(scores) == [(1, 3)]
    assert rank_pairs(scores, "all") == [(1, 2), (1, 0), (1, 3), (2, 0), (2, 3), (0, 3)]


def test_rank_pairs_skips_ties():
    assert rank_pairs(torch.tensor([0.5, 0.5, 0.5])) == []
    assert rank_pairs(torch.tensor([0.5, 0.5, 0.1]), "all") == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="pairing"):
        rank_pairs(torch.tensor([0.0, 1.0]), "some")


@pytest.mark.parametrize("pairing, per_prompt", [("best_worst", 1), ("all", 3)])
def test_pairs_are_written_preferred_first(pairing, per_prompt, tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    prompts = ["a red circle", "two blue squares"]
    reward = rewards.load("diffalign.testing:redness")
    path = make_preference_pairs(
        adapter, prompts, reward, 3, tmp_path / "pairs", pairing=pairing, num_steps=3, guidance_scale=2.0, batch_size=4
    )
    assert path == tmp_path / "pairs" / "data.jsonl"
    dataset = load_preference_dataset(tmp_path / "pairs", resolution=adapter.height)
    assert len(dataset) == per_prompt * len(prompts)
    summary = json.loads((tmp_path / "pairs" / SUMMARY_NAME).read_text())
    assert summary["num_pairs"] == len(dataset) and len(summary["rewards"]) == 2
    for index in range(len(dataset)):
        item = dataset[index]
        # PNG keeps the 8-bit pixels: the written winner still scores above the loser.
        assert redness(item["pixel_values_w"][None]) > redness(item["pixel_values_l"][None])
        assert item["caption"] in prompts
    best = [max(group["rewards"]) for group in summary["rewards"]]
    winners = torch.stack([dataset[i]["pixel_values_w"] for i in range(len(dataset))])
    assert max(redness(winners).tolist()) == pytest.approx(max(best), abs=2e-3)


def test_candidates_do_not_depend_on_batch_size(tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))
    kwargs = dict(num_steps=2, guidance_scale=1.0, seed=3)
    make_preference_pairs(adapter, ["a cat", "a dog"], redness, 2, tmp_path / "a", batch_size=1, **kwargs)
    make_preference_pairs(adapter, ["a cat", "a dog"], redness, 2, tmp_path / "b", batch_size=4, **kwargs)
    a = json.loads((tmp_path / "a" / SUMMARY_NAME).read_text())["rewards"]
    b = json.loads((tmp_path / "b" / SUMMARY_NAME).read_text())["rewards"]
    assert [x["prompt"] for x in a] == ["a cat", "a dog"]
    assert [x["rewards"] for x in a] == [pytest.approx(y["rewards"], abs=1e-6) for y in b]


def test_constant_reward_is_refused(tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir("sd15"))

    def constant(images, prompts=None):
        return torch.zeros(images.shape[0])

    with pytest.raises(ValueError, match="no preference pair"):
        make_preference_pairs(adapter, ["a cat"], constant, 2, tmp_path / "c", num_steps=2, guidance_scale=1.0)
