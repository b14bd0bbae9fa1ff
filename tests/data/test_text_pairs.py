"""Text preference pairs (free-lunch alignment): the rule-set caption perturbations, the data set they make, and
Diffusion-DPO on one image under two captions (docs/methods/dpo.md#text-preference-pairs)."""

import json
import random

import pytest
import torch
from config_probes import perturbed_lora
from PIL import Image

from diffalign.config import load_config
from diffalign.data.preference import load_preference_dataset, write_preference_dataset
from diffalign.data.text_pairs import make_text_preference_pairs, perturb_caption
from diffalign.trainers.common import TrainingRun
from diffalign.trainers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer


def test_each_principle_rewrites_its_own_words():
    rng = random.Random(0)
    caption = "a red circle left of a blue square"
    assert perturb_caption(caption, rng, ["spatial"]) == "a red circle right of a blue square"
    content = perturb_caption("two green stars at night", rng, ["content"]).split()
    changed = [new for new, old in zip(content, "two green stars at night".split()) if new != old]
    assert len(changed) == 1 and changed[0] in {"one", "three", "four", "five", "circles", "squares", "triangles"}
    context = perturb_caption("two green stars at night", rng, ["context"])
    assert context == "two green stars at day"
    # the attribute rules include exchanging the colours of two objects (their binding)
    rewrites = {perturb_caption(caption, random.Random(s), ["attribute"]) for s in range(300)}
    assert "a blue circle left of a red square" in rewrites
    assert all(r != caption and len(r.split()) == len(caption.split()) for r in rewrites)
    assert perturb_caption("A Dog", rng, ["content"]).split()[1][0].isupper()  # case kept
    assert perturb_caption("an abstract painting", rng) is None
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_caption(caption, rng, ["style"])


def write_images(folder, captions):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(folder / f"{i}.png")
        records.append({"prompt": caption, "image": f"{i}.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_data_set_holds_one_image_under_two_captions(tmp_path):
    source = write_images(tmp_path / "real", ["a red circle", "an abstract painting", "two blue squares"])
    summary = make_text_preference_pairs(source, tmp_path / "pairs", seed=3)
    assert summary == {"pairs": 2, "skipped": 1}
    dataset = load_preference_dataset(tmp_path / "pairs", resolution=32)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["caption"] for item in items] == ["a red circle", "two blue squares"]
    for item in items:
        assert torch.equal(item["pixel_values_w"], item["pixel_values_l"]) and item["caption_l"] != item["caption"]


def test_caption_1_follows_its_image_when_image_1_wins_and_drops_with_the_caption(tmp_path):
    red, blue = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    red[0], blue[2] = 1.0, 1.0
    write_preference_dataset([("red one", red, blue, 0.0, "blue one")], tmp_path / "flip")
    (item,) = load_preference_dataset(tmp_path / "flip", resolution=8)
    assert (item["caption"], item["caption_l"]) == ("blue one", "red one") and item["pixel_values_w"][2].min() == 1
    (dropped,) = load_preference_dataset(tmp_path / "flip", resolution=8, empty_caption_prob=1.0)
    assert dropped["caption"] == dropped["caption_l"] == ""
    with pytest.raises(ValueError, match="jsonl"):
        write_preference_dataset([("a", red, red, 1.0, "b")], tmp_path / "parquet", "parquet")


def test_dpo_on_a_text_pair_prefers_the_true_caption_on_one_shared_latent(tiny_pipeline_dir, tmp_path):
    source = write_images(tmp_path / "real", ["a red circle left of a blue square"])
    make_text_preference_pairs(source, tmp_path / "pairs", kinds=["spatial"])
    record = json.loads((tmp_path / "pairs" / "data.jsonl").read_text())
    swapped = {**record, "caption": record["caption_1"], "caption_1": record["caption"]}
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "data.jsonl").write_text(json.dumps(swapped) + "\n")

    def config(data):
        raw = {
            "model": {"path": str(tiny_pipeline_dir("sd3")), "lora": {"rank": 4}},
            "data": {"source": str(tmp_path / data), "batch_size": 1, "random_flip": False},
            "output_dir": str(tmp_path / f"run-{data}"),
            "logging": {"log_with": "none"},
        }
        return load_config(DiffusionDPOConfig, raw)

    run = TrainingRun(config("pairs"), adapter_kwargs={"max_sequence_length": 77})

    def loss(data):
        trainer = DiffusionDPOTrainer(config(data), run=run)
        batch = next(trainer.batch_stream(0, 0))[2]
        with perturbed_lora(run), torch.no_grad():  # policy != reference, so the margin is not 0
            return trainer.loss(batch, trainer.pair_generators(0, batch["indices"]))[1]

    assert set(DiffusionDPOTrainer(config("pairs"), run=run)._unique_captions()) == {  # the caption cache's list
        record["caption"],
        record["caption_1"],
        "",
    }
    true_first, perturbed_first = loss("pairs"), loss("swapped")
    # One latent, one noise, one timestep: exchanging the captions negates the implicit reward margin exactly.
    assert true_first["reward_margin"].abs() > 0
    torch.testing.assert_close(true_first["reward_margin"], -perturbed_first["reward_margin"])
    assert true_first["mse_w"] == pytest.approx(perturbed_first["mse_l"].item())
