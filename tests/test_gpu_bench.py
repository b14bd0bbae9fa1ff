"""The GPU benchmark (benchmarks/gpu/bench.py), checked on the CPU: its FLOP phases on hand-computed matmuls, its
config-folder builder and random text conditioning against the real ones on the tiny pipelines, its errors, and
(slow) the whole script on the tiny pipelines in a subprocess."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop


ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_bench", None)


# --- FLOPs ----------------------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 2, bias=False))


def _step(model: nn.Module, x: torch.Tensor, checkpointed: bool) -> None:
    with torch.no_grad():
        model(x)
    out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
    out.sum().backward()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_flop_phases_hand_computed(bench, checkpointed):
    # x [3, 5] -> Linear 5->7 (2*3*5*7 = 210 FLOPs) -> tanh -> Linear 7->2 (2*3*7*2 = 84).
    # Backward (x needs no grad): grad W2 84 + grad h 84 + grad W1 210 = 378. Checkpointing re-runs the first
    # Linear inside backward to rebuild tanh's output, and stops there (early stop): 210 recomputed.
    model, x = _mlp(), torch.randn(3, 5)
    with set_checkpoint_early_stop(True):
        _, flops = bench.count_flops(lambda: _step(model, x, checkpointed))
    recompute = 210 if checkpointed else 0
    assert flops.phases == {"forward_no_grad": 294, "forward_grad": 294, "recompute": recompute, "backward": 378}
    assert flops.total == 966 + recompute
    assert flops.model_flops == 966  # the same model FLOPs with or without checkpointing
    assert flops.phases_known
    assert flops.by_module == {"Sequential": flops.total}


def test_cpu_attention_is_counted(bench):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # q, k, v [1, 1, 4, 8]: forward QK^T and PV, 2*4*4*8 = 256 FLOPs each; flash backward recomputes the scores
    # and makes four more such products: 5 * 256. Plain FlopCounterMode has no formula for the CPU kernel (0).
    q, k, v = (torch.randn(1, 1, 4, 8, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _, flops = bench.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert flops.phases == {"forward_no_grad": 0, "forward_grad": 512, "recompute": 0, "backward": 1280}


def test_phase_record_mfu(bench):
    phases = {"forward_no_grad": 10**12, "forward_grad": 10**12, "recompute": 10**12, "backward": 10**12}
    flops = bench.FlopCount(4 * 10**12, phases, {})
    timing = bench.Timing(2.0, 2.1, 5.0, 6.0, "test")
    record = bench.phase_record(flops, timing, peak_tflops=1.0)
    assert record["model_flops"] == 3 * 10**12
    assert record["model_tflops_per_s"] == pytest.approx(1.5)
    assert record["mfu"] == pytest.approx(1.5)  # 3 TFLOP / 2 s / 1 TFLOP/s
    assert record["hfu"] == pytest.approx(2.0)  # recomputation included
    assert bench.phase_record(flops, timing, peak_tflops=None)["mfu"] is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table(bench, name, peak):
    assert bench.peak_tflops_for(name) == peak


# --- building from a config folder, text conditioning ---------------------------------------------------------------


@pytest.mark.slow  # loads and builds tiny pipelines (~4-14 s each on 2 cores)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_build_pipeline_matches_saved_architecture(bench, tiny_pipeline_dir, family):
    import diffusers

    folder = tiny_pipeline_dir(family)
    pipe = bench.build_pipeline(folder, torch.device("cpu"), torch.bfloat16)
    index = json.loads((folder / "model_index.json").read_text())
    for name, dtype in (("transformer", torch.bfloat16), ("vae", torch.float32)):  # the adapters keep the VAE fp32
        saved = getattr(diffusers, index[name][1]).from_pretrained(folder / name)
        built, reference = getattr(pipe, name).state_dict(), saved.state_dict()
        assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in reference.items()}
        assert {v.dtype for v in built.values() if v.is_floating_point()} == {dtype}
        assert type(getattr(pipe, name)) is type(saved)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert type(pipe).__name__ == index["_class_name"]
    assert pipe.scheduler.config == type(pipe.scheduler).from_pretrained(folder / "scheduler").config
    assert all(getattr(pipe, name) is None for name in pipe.components if name.startswith(("text_", "tokenizer")))


@pytest.mark.slow  # loads and builds tiny pipelines (~4-14 s each on 2 cores)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_random_conditioning_has_the_encoders_layout(bench, tiny_pipeline_dir, family):
    from diffalign.adapters import load_adapter

    adapter = load_adapter(tiny_pipeline_dir(family), max_sequence_length=24)
    real = adapter.encode_prompt(["a red circle", "two blue squares"], with_negative=True)
    drawn = bench.random_conditioning(adapter, 2, True, torch.Generator().manual_seed(0))

    def layout(group):
        return None if group is None else {k: (tuple(v.shape), v.dtype) for k, v in group.items()}

    assert layout(drawn.embeds) == layout(real.embeds)
    assert layout(drawn.negative) == layout(real.negative)
    assert layout(drawn.extras) == layout(real.extras)
    assert (drawn.negative is None) == (family == "flux")  # FLUX.1-dev: guidance embedding, no CFG branch


def test_text_cache_serves_every_training_prompt(bench, tiny_pipeline_dir):
    from diffalign.adapters import load_adapter
    from diffalign.trainers.grpo import GRPOSamplingConfig

    adapter = load_adapter(bench.build_pipeline(tiny_pipeline_dir("sd3"), torch.device("cpu"), torch.float32))
    sampling = GRPOSamplingConfig(prompts=["p0", "p1", "p2"], guidance_scale=4.5)
    bench.fill_text_cache(adapter, sampling.prompts, sampling)
    cond = adapter.encode_prompt(["p2", "p0"], with_negative=True)  # no text encoder: answered from the cache
    assert len(cond) == 2 and cond.negative is not None
    assert adapter.text_encoders_released == "delete"
    with pytest.raises(RuntimeError, match="not in the text-embedding cache"):
        adapter.encode_prompt(["never cached"], with_negative=True)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_folders_are_named(bench, tmp_path):
    with pytest.raises(bench.BenchError, match="no architecture folder .* --arch-dir"):
        bench.read_model_index(tmp_path / "missing")
    with pytest.raises(bench.BenchError, match="no model_index.json"):
        bench.read_model_index(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(bench.BenchError, match="'NoSuchPipeline', not a diffusers pipeline"):
        bench.build_pipeline(tmp_path, torch.device("cpu"), torch.float32)


def test_per_model_paths(bench, tmp_path):
    assert bench._per_model([str(tmp_path)], ["flux"], "--arch-dir") == {"flux": tmp_path.resolve()}
    assert bench._per_model([f"sd35m={tmp_path}"], ["sd35m", "flux"], "--arch-dir") == {"sd35m": tmp_path.resolve()}
    with pytest.raises(bench.BenchError, match="name the one it is for"):
        bench._per_model([str(tmp_path)], ["sd35m", "flux"], "--arch-dir")
    with pytest.raises(bench.BenchError, match="'sdxl' is not one of"):
        bench._per_model([f"sdxl={tmp_path}"], ["flux"], "--arch-dir")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_no_cuda_is_one_clear_error(bench, capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_failed_phase_is_recorded_and_printed(bench):
    record = bench._guarded(lambda: 1 / 0, torch.device("cpu"))
    assert record == {"error": "ZeroDivisionError: division by zero"}
    settings = {"sample_batch": 9, "group_size": 24, "prompts_per_step": 1}
    phase = {"seconds": 2.0, "peak_gb": 1.5, "model_flops": 3e12, "model_tflops_per_s": 1.5, "mfu": 0.25}
    model = {"label": "SD3.5-Medium", "settings": settings, "sample": phase, "train_step": record}
    table = bench.format_table({"models": [model]}).splitlines()
    assert table[1].split() == ["SD3.5-Medium", "sample", "(9", "img)", "2.00", "1.50", "3", "1.5", "25.0%"]
    assert table[2].endswith("failed: ZeroDivisionError: division by zero")
    assert bench._failed(model) and not bench._failed({**model, "train_step": phase})


# --- the whole script, tiny ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    small = ["sampling.images_per_prompt=4", "sampling.batch_size=2", "train.batch_size=2", "sampling.num_steps=4"]
    command = [sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--threads", "1", "--peak-tflops", "1.0"]
    command += [arg for setting in small for arg in ("--set", setting)] + ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["peak_tflops"] == 1.0 and results["device_type"] == "cpu"
    assert [m["model"] for m in results["models"]] == ["sd35m", "flux"]
    for model in results["models"]:
        assert "error" not in model
        assert model["settings"]["group_size"] == 4 and model["settings"]["lora_params"] > 0
        for phase in ("sample", "train_step"):
            record = model[phase]
            for key in ("seconds", "wall_s", "peak_gb", "flops", "model_flops", "model_tflops_per_s", "mfu", "hfu"):
                assert record[key] > 0, (model["model"], phase, key)
            assert record["mfu"] == pytest.approx(record["model_tflops_per_s"])  # peak 1 TFLOP/s
        assert model["sample"]["images"] == 2 and model["sample"]["images_finite"]
        assert model["sample"]["flops_by_phase"]["forward_no_grad"] == model["sample"]["flops"]
        train = model["train_step"]
        assert train["lora_changed"] and train["lora_max_abs_change"] > 0
        assert train["flops_by_phase"]["backward"] > 0 and train["flops_by_phase"]["forward_grad"] > 0
        assert train["optimizer_steps"] == 2  # one per GRPO step (accumulation covers the whole group)
    sd3, flux = results["models"]
    # The FLUX config checkpoints activations: its recomputed forwards are counted apart, SD3.5's config does not.
    assert flux["train_step"]["flops_by_phase"]["recompute"] > 0
    assert flux["train_step"]["model_flops"] < flux["train_step"]["flops"]
    assert sd3["train_step"]["flops_by_phase"]["recompute"] == 0
    assert "GRPO step (4 img)" in done.stdout
