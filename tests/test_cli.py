"""The ``diffalign`` command line, in process: sample, grid, score and train end to end on tiny pipelines, and one
clean error line (no traceback without --debug) for every kind of bad input."""

import json
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import __version__
from diffalign.adapters import load_adapter
from diffalign.cli import main
from diffalign.eval.grid import caption_height, ode_images, to_pil
from diffalign.testing import redness


SIZE = 32
REDNESS = "diffalign.testing:redness"
FAMILY = "sd15"  # the fastest tiny pipeline; SD3/FLUX go through the same code paths


@pytest.fixture(scope="module")
def model(tiny_pipeline_dir):
    return str(tiny_pipeline_dir(FAMILY))


@pytest.fixture(scope="module")
def lora_dir(model, tmp_path_factory):
    """A LoRA with random (non-zero) weights, saved in diffusers format."""
    adapter = load_adapter(model, height=SIZE, width=SIZE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.add_lora(2):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return adapter.save_lora(tmp_path_factory.mktemp("run") / "checkpoint-7" / "lora")


def _sampling(steps=2, guidance=3.0):
    return ["--steps", str(steps), "--guidance", str(guidance), "--height", str(SIZE), "--width", str(SIZE)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("diffalign:")]
    assert len(lines) == 1, err
    return lines[0]


# --- help ------------------------------------------------------------------------------------------------------------


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "sample", "grid", "score", "pairs", "export", "plan", "bench", "demo"):
        assert command in out
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 0


def test_help_config_lists_the_method_keys(tmp_path, capsys):
    assert main(["train", "--help-config", "--method", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "sampling.images_per_prompt: int = 8" in out and "model.path: str  (required)" in out
    config = tmp_path / "c.yaml"
    config.write_text("method: grpo\n")  # the method is enough: the rest need not be valid yet
    assert main(["train", str(config), "--help-config"]) == 0
    assert capsys.readouterr().out == out


# --- sample ----------------------------------------------------------------------------------------------------------


def test_sample_one_prompt_writes_one_png(model, tmp_path, capsys):
    out = tmp_path / "one.png"
    args = ["sample", "--model", model, "--prompt", "a red circle", "--seed", "3", "--out", str(out)]
    assert main([*args, *_sampling()]) == 0
    image = Image.open(out)
    assert image.size == (SIZE, SIZE) and image.format == "PNG"
    # Same pixels as the ODE rollout for that prompt and seed.
    expected = ode_images(load_adapter(model, height=SIZE, width=SIZE), ["a red circle"], [3], 2, 3.0)
    assert np.array_equal(np.asarray(image), np.asarray(to_pil(expected[0])))


def test_sample_several_prompts_make_a_grid_or_a_folder(model, tmp_path):
    prompts = ["--prompt", "a red circle", "--prompt", "a blue square", "--prompt", "a cat"]
    grid = tmp_path / "grid.png"
    args = ["sample", "--model", model, *prompts, "--num-images-per-prompt", "2", *_sampling()]
    assert main([*args, "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 * SIZE, 3 * SIZE)  # rows = prompts, columns = images per prompt
    folder = tmp_path / "each"
    folder.mkdir()
    assert main([*args, "--out", str(folder)]) == 0
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 6 and files[0] == "000-a-red-circle-s0.png" and files[-1] == "005-a-cat-s1.png"


# --- grid ------------------------------------------------------------------------------------------------------------


def test_grid_layout_and_scores(model, lora_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts = ["a red circle", "two blue squares"]
    prompts_file.write_text("\n".join(prompts) + "\n")
    out, cell = tmp_path / "grid.png", 40
    args = ["grid", "--model", model, "--lora", str(lora_dir.parent), "--prompts", str(prompts_file)]
    args += ["--seeds", "0", "5", "--reward", REDNESS, "--cell-size", str(cell), "--out", str(out), *_sampling()]
    assert main(args) == 0

    num_columns, caption = 2 * 2, caption_height(1)  # (base, checkpoint-7) x 2 seeds; one score line
    assert Image.open(out).size == (240 + num_columns * cell, caption + len(prompts) * (cell + caption))
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["columns"] == ["base", "checkpoint-7"]
    records = payload["records"]
    assert [(r["prompt"], r["column"], r["seed"]) for r in records[:4]] == [
        ("a red circle", "base", 0),
        ("a red circle", "base", 5),
        ("a red circle", "checkpoint-7", 0),
        ("a red circle", "checkpoint-7", 5),
    ]
    # The scores equal redness of images sampled independently, with and without the LoRA.
    adapter = load_adapter(model, height=SIZE, width=SIZE)
    base = redness(ode_images(adapter, prompts, [0, 5], 2, 3.0))
    adapter.load_lora(lora_dir)
    tuned = redness(ode_images(adapter, prompts, [0, 5], 2, 3.0))
    expected = torch.stack([base.view(2, 2), tuned.view(2, 2)], dim=1).flatten()
    got = torch.tensor([r["scores"]["redness"] for r in records])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(base, tuned), "the LoRA column should differ from the base"


# --- score -----------------------------------------------------------------------------------------------------------


def test_score_folder_skips_broken_files(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        to_pil(torch.rand(3, 16 + 8 * i, 24, generator=generator)).save(folder / f"img{i}.png")
    (folder / "img1b.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("ignored")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("p0\np1\np1b\np2\n")  # one per image file, sorted: img0, img1, img1b, img2
    out = tmp_path / "scores.json"
    args = ["score", "--reward", REDNESS, "--images", str(folder), "--prompts", str(prompts), "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable file(s)" in printed and "img1b.png" in printed
    payload = json.loads(out.read_text())
    assert [r["prompt"] for r in payload["records"]] == ["p0", "p1", "p2"]
    assert len(payload["skipped"]) == 1
    for record in payload["records"]:
        pixels = np.asarray(Image.open(record["image"]).convert("RGB"), dtype=np.float64) / 255
        expected = (pixels[..., 0] - (pixels[..., 1] + pixels[..., 2]) / 2).mean()
        assert abs(record["scores"]["redness"] - expected) <= 1e-6
    assert payload["mean"]["redness"] == pytest.approx(np.mean([r["scores"]["redness"] for r in payload["records"]]))


# --- prompts of score, grid and pairs --------------------------------------------------------------------------------


def _tiny_images(folder, count=2):
    folder.mkdir()
    for i in range(count):
        to_pil(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))).save(folder / f"img{i}.png")
    return folder


def _argv_but_prompts(command, tmp_path):
    """score, grid or pairs without their prompts; grid and pairs name a model folder that does not exist, so an
    error about the prompts shows that they are checked before any model is loaded."""
    if command == "score":
        return ["score", "--reward", REDNESS, "--images", str(_tiny_images(tmp_path / "images"))]
    missing = str(tmp_path / "no-model")
    if command == "grid":
        return ["grid", "--model", missing, "--reward", REDNESS, "--out", str(tmp_path / "grid.png"), *_sampling()]
    argv = ["pairs", "--model", missing, "--reward", REDNESS, "--num-per-prompt", "2", "--out", str(tmp_path / "p")]
    return [*argv, *_sampling()]


@pytest.mark.parametrize("command", ["score", "grid", "pairs"])
@pytest.mark.parametrize("missing", ["my_prompts.lst", "prompts/missing.txt"])
def test_a_missing_prompt_file_is_an_error(command, missing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*_argv_but_prompts(command, tmp_path), "--prompts", missing]) == 1
    line = _error_line(capsys)
    assert f"prompt file '{missing}' does not exist" in line and "--prompt 'TEXT'" in line


@pytest.mark.parametrize("command", ["score", "grid", "pairs"])
def test_prompt_and_prompts_exclude_each_other(command, tmp_path, capsys):
    argv = _argv_but_prompts(command, tmp_path)
    assert main(argv) == 2
    assert "--prompts --prompt is required" in _error_line(capsys)
    assert main([*argv, "--prompts", "a", "--prompt", "b"]) == 2
    assert "not allowed with argument --prompts" in _error_line(capsys)


def test_score_literal_prompts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scores.json"
    argv = [*_argv_but_prompts("score", tmp_path), "--json", str(out)]

    def prompts_of(*args):
        assert main([*argv, *args]) == 0
        records = json.loads(out.read_text())["records"]
        assert all(np.isfinite(r["scores"]["redness"]) for r in records)
        return [r["prompt"] for r in records]

    assert prompts_of("--prompt", "prompts/missing.txt") == ["prompts/missing.txt"] * 2  # one for all, never a file
    assert prompts_of("--prompt", "a photo of a cat.", "--prompt", "Mr. Smith waves") == [
        "a photo of a cat.",
        "Mr. Smith waves",
    ]
    assert prompts_of("--prompts", "version 3.5") == ["version 3.5"] * 2  # not a path: one literal prompt
    (tmp_path / "my_prompts.lst").write_text("p0\np1\n")
    assert prompts_of("--prompts", "my_prompts.lst") == ["p0", "p1"]  # an existing file, whatever its suffix
    capsys.readouterr()
    assert main([*argv, "--prompt", "a", "--prompt", "b", "--prompt", "c"]) == 1
    assert "3 prompts for 2 images" in _error_line(capsys)


def test_sample_best_of_and_grid_alignment_scales(model, lora_dir, tmp_path, capsys):
    out = tmp_path / "best.png"
    args = ["sample", "--model", model, "--prompt", "a red circle", "--best-of", "3", "--reward", REDNESS]
    assert main([*args, "--out", str(out), *_sampling()]) == 0
    report = json.loads((tmp_path / "best.png.search.json").read_text())
    (cell,) = report["cells"]
    assert [c["index"] for c in cell["candidates"]] == [0, 1, 2] and sum(c["chosen"] for c in cell["candidates"]) == 1
    best = max(c["reward"] for c in cell["candidates"])
    chosen = redness(torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)[None].float() / 255)
    assert chosen.item() == pytest.approx(best, abs=0.01)  # the PNG is the best candidate (8-bit rounding aside)

    grid = tmp_path / "grid.png"
    args = ["grid", "--model", model, "--lora", str(lora_dir.parent), "--prompt", "a red circle", "--no-base"]
    args += ["--alignment-scale", "0", "1", "--reward", REDNESS, "--out", str(grid), *_sampling()]
    assert main(args) == 0
    payload = json.loads(grid.with_suffix(".json").read_text())
    assert payload["columns"] == ["checkpoint-7 w=0", "checkpoint-7 w=1"]
    assert payload["settings"]["alignment_scales"] == [0.0, 1.0]
    adapter = load_adapter(model, height=SIZE, width=SIZE)
    base = redness(ode_images(adapter, ["a red circle"], [0], 2, 3.0))
    assert payload["records"][0]["scores"]["redness"] == pytest.approx(base.item(), abs=1e-6)  # w = 0: the base

    capsys.readouterr()
    assert main(["sample", "--model", model, "--prompt", "a", "--alignment-scale", "1", "--out", str(out)]) == 2
    assert "give the --lora" in capsys.readouterr().err
    assert main(["sample", "--model", model, "--prompt", "a", "--best-of", "2", "--out", str(out)]) == 2
    assert "needs a --reward" in capsys.readouterr().err


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
def test_sample_and_grid_with_a_negative_lora(model, lora_dir, tmp_path, capsys):
    out = tmp_path / "npo.png"
    args = ["sample", "--model", model, "--prompt", "a red circle", "--negative-lora", str(lora_dir.parent)]
    assert main([*args, "--out", str(out), *_sampling()]) == 0
    adapter = load_adapter(model, height=SIZE, width=SIZE)
    adapter.load_negative_lora(lora_dir)
    expected = ode_images(adapter, ["a red circle"], [0], 2, 3.0)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(to_pil(expected[0])))
    plain = ode_images(load_adapter(model, height=SIZE, width=SIZE), ["a red circle"], [0], 2, 3.0)
    assert (expected - plain).abs().max() > 1e-3  # the negative branch changed the image

    grid = tmp_path / "grid.png"
    args = ["grid", "--model", model, "--prompt", "a red circle", "--negative-lora", str(lora_dir)]
    assert main([*args, "--reward", REDNESS, "--out", str(grid), *_sampling()]) == 0
    payload = json.loads(grid.with_suffix(".json").read_text())
    assert payload["settings"]["negative_lora"] == str(lora_dir)
    assert payload["records"][0]["scores"]["redness"] == pytest.approx(redness(expected).item(), abs=1e-6)

    capsys.readouterr()
    assert main([*args, "--out", str(grid), *_sampling(guidance=1.0)]) == 2
    assert "--guidance above 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["grid", "pairs"])
def test_grid_and_pairs_take_literal_prompts(command, tmp_path, monkeypatch, capsys):
    seen = []

    def capture(adapter, prompts, *args, **kwargs):
        seen.append(prompts)
        raise RuntimeError("captured")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("diffalign.cli._load_model", lambda args: SimpleNamespace(device="cpu"))
    monkeypatch.setattr("diffalign.eval.grid.make_eval_grid", capture)
    monkeypatch.setattr("diffalign.data.ai_feedback.make_preference_pairs", capture)
    argv = _argv_but_prompts(command, tmp_path)
    assert main([*argv, "--prompt", "a cat/dog", "--prompt", "b.txt"]) == 1
    (tmp_path / "my_prompts.lst").write_text("p0\n# comment\np1\n")
    assert main([*argv, "--prompts", "my_prompts.lst"]) == 1
    assert main([*argv, "--prompts", "a photo of a cat."]) == 1
    assert seen == [["a cat/dog", "b.txt"], ["p0", "p1"], ["a photo of a cat."]]


# --- train -----------------------------------------------------------------------------------------------------------


def _grpo_yaml(path, model, output_dir):
    path.write_text(
        textwrap.dedent(
            f"""\
            method: grpo
            model:
              path: {model}
              lora: {{rank: 2}}
            reward: {REDNESS}
            output_dir: {output_dir}
            max_steps: 2
            optim: {{lr: 1e-3}}
            logging: {{log_with: none}}
            checkpoint: {{every: 1}}
            sampling:
              prompts: [a red circle, a blue square]
              num_steps: 2
              guidance_scale: 1.0
              images_per_prompt: 2
              prompts_per_epoch: 1
              batch_size: 2
              resolution: {SIZE}
            train: {{batch_size: 2}}
            """
        )
    )
    return path


def test_train_then_resume_latest(model, tmp_path, capsys):
    config = _grpo_yaml(tmp_path / "grpo.yaml", model, tmp_path / "run")
    assert main(["train", str(config)]) == 0
    assert "trained grpo for 2 steps" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()

    assert main(["train", str(config), "max_steps=3", "--resume", "latest"]) == 0
    state = json.loads((run / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["optimizer_steps"] == 3  # 2 from the first run + 1 after resuming
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(3) == 1 and steps.count(1) == 1, "the resumed run must not redo steps 1-2"


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def good_yaml(tmp_path, model):
    return _grpo_yaml(tmp_path / "ok.yaml", model, tmp_path / "run")


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in _error_line(capsys)


def test_unknown_key_is_named(good_yaml, capsys):
    good_yaml.write_text(good_yaml.read_text().replace("max_steps: 2", "max_stpes: 2"))
    assert main(["train", str(good_yaml)]) == 2
    line = _error_line(capsys)
    assert "max_stpes" in line and "max_steps" in line  # the key and the did-you-mean


def test_bad_override(good_yaml, capsys):
    assert main(["train", str(good_yaml), "optim.lr"]) == 2
    assert "malformed override 'optim.lr'" in _error_line(capsys)
    assert main(["train", str(good_yaml), "optim.lr=fast"]) == 2
    assert "optim.lr" in _error_line(capsys)


def test_unknown_or_missing_method(good_yaml, capsys):
    good_yaml.write_text(good_yaml.read_text().replace("method: grpo", "method: grpoo"))
    assert main(["train", str(good_yaml)]) == 2
    line = _error_line(capsys)
    assert "unknown method 'grpoo'" in line and "diffusion_dpo" in line
    good_yaml.write_text(good_yaml.read_text().replace("method: grpoo\n", ""))
    assert main(["train", str(good_yaml)]) == 2
    assert "no 'method' key" in _error_line(capsys)


def test_missing_model_folder(tmp_path, capsys):
    args = ["sample", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert main(args) == 1
    assert "no pipeline folder" in _error_line(capsys)
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    assert main(["sample", "--model", str(not_a_pipeline), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 1
    assert "model_index.json" in _error_line(capsys)


def test_unknown_reward(tmp_path, capsys):
    to_pil(torch.rand(3, 8, 8)).save(tmp_path / "a.png")
    assert main(["score", "--reward", "pikscore", "--images", str(tmp_path), "--prompts", "x"]) == 1
    line = _error_line(capsys)
    assert "unknown reward 'pikscore'" in line and "pickscore" in line


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "--prompt", "x"]) == 2
    assert "--model" in _error_line(capsys)
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in _error_line(capsys)
    assert main(["score", "--reward", REDNESS, "--images", str(tmp_path / "none"), "--prompts", "x"]) == 1
    assert "no such image file or folder" in _error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "train", str(tmp_path / "nope.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


# --- lazily wired commands -------------------------------------------------------------------------------------------


def test_bench_rollout_prints_the_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "rollout",
        "--families",
        "sd15",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--batch-size",
        "1",
        "--threads",
        "1",
    ]
    assert main([*argv, "--json", str(out)]) == 0
    assert "ratio" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    assert record["family"] == "sd15" and record["ratio"] > 0 and record["max_abs_diff"] <= 1e-4


def test_pairs_calls_ai_feedback(model, tmp_path, capsys):
    pytest.importorskip("diffalign.data.ai_feedback")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    argv = ["pairs", "--model", model, "--prompts", str(prompts), "--reward", REDNESS, "--num-per-prompt", "2"]
    argv += ["--out", str(tmp_path / "pairs"), *_sampling()]
    assert main(argv) == 0
    assert "wrote preference pairs to" in capsys.readouterr().out
    assert any((tmp_path / "pairs").rglob("*"))


def test_reward_labels_name_each_spec_by_what_tells_it_apart():
    from diffalign.eval.score import reward_label

    assert reward_label("pickscore") == "pickscore"
    assert reward_label("my_pkg.rewards:sharpness") == "sharpness"
    # A server spec's last colon is its port's: the whole spec is its label.
    assert reward_label("remote:http://127.0.0.1:8000") == "remote:http://127.0.0.1:8000"
