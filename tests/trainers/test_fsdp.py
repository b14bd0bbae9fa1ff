"""FSDP2 (configs/accelerate/fsdp2.yaml) on 2 CPU processes with gloo: the sharded trainers train what one process
trains at the same global batch, resume exactly, and export whole weights; and the misuses get one clear error.

The launches run ``distributed_run_script.py`` (a tiny pipeline, 2-4 trainer steps, a checkpoint every step). The
global batch is the same on 1 and 2 processes (8 GRPO samples in one optimizer step, 4 reward-backprop images,
4 DPO pairs), so the gradients are the same up to float summation order: losses and gradient norms agree to 1e-5
relative and the trained weights to 1e-5 (they are O(1)); DPO's large tiny-UNet gradients widen that (see there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_common import make_run

from diffalign.config import ConfigError
from diffalign.testing import cpu_launch_command
from diffalign.trainers import sharding
from diffalign.trainers.checkpoints import RunFolderError


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("distributed_run_script.py")
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"


def _launch(out: Path, method: str, model: Path, rank: int, steps: int, *extra: str, config: str | None = "fsdp2"):
    """Run the script on 2 CPU processes under ``configs/accelerate/<config>.yaml`` (or on one process when
    ``config`` is None); returns (returncode, output)."""
    args = [str(SCRIPT), method, str(model), str(out), str(rank), str(steps), *extra]
    if config is None:
        command, env = [sys.executable, *args], {**os.environ, "OMP_NUM_THREADS": "2"}
    else:
        command = cpu_launch_command(2) + ["--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml")]
        command += ["--mixed_precision", "no"]
        command += args
        # accelerate's CPU multi-process mode (gloo); diffalign turns FSDP on there (diffalign.trainers.sharding).
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return done.returncode, done.stdout + done.stderr


def _run(out: Path, *args, **kwargs) -> dict:
    code, output = _launch(out, *args, **kwargs)
    assert code == 0, output[-4000:]
    return json.loads((out / "result-rank0.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    run = out / "run"
    denoiser = [run / "model" / name / "diffusion_pytorch_model.safetensors" for name in ("transformer", "unet")]
    files = list((run / "lora").glob("*.safetensors")) or [path for path in denoiser if path.is_file()]
    return load_file(str(files[0]))


def _series(result: dict, key: str) -> list[float]:
    return [m[key] for m in result["metrics"]]


def _assert_same_training(one: dict, two: dict, keys: tuple[str, ...], steps: int | None = None) -> None:
    for key in keys:
        assert _series(two, key)[:steps] == pytest.approx(_series(one, key)[:steps], rel=1e-5, abs=1e-9), key


def _assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow  # 5 launches
def test_grpo_lora_sharded_matches_one_process_and_resumes(tiny_pipeline_dir, tmp_path):
    model = tiny_pipeline_dir("sd3")
    one = _run(tmp_path / "one", "grpo", model, 4, 3, config=None)
    two = _run(tmp_path / "two", "grpo", model, 4, 2)
    assert (two["world_size"], two["sharded"], two["shard_type"]) == (2, True, "DTensor")
    keys = ("grad_norm", "reward_mean", "ratio_mean")
    _assert_same_training(one, two, keys, steps=2)
    shards = sorted(p.name for p in (tmp_path / "two/run/checkpoints/checkpoint-2/sharded").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)  # one file per process
    # "Killed" after step 2: resuming the sharded checkpoint on 2 processes continues as the uninterrupted run.
    resumed = _run(tmp_path / "two", "grpo", model, 4, 3, "--resume")
    assert [m["step"] for m in resumed["metrics"]] == [1, 2, 3]
    _assert_same_training(one, resumed, keys)
    _assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    # With the text-embedding cache, each process encodes half of the 4 prompts and gathers the rest; the text
    # encoders are gone, and the training is the same.
    cached = _run(tmp_path / "cached", "grpo", model, 4, 2, "--cache")
    assert (cached["encoded"], cached["cached"], cached["encoders_left"]) == (2, 4, [])
    _assert_same_training(one, cached, keys, steps=2)
    # The same checkpoint on one process (unsharded): one error saying what to do.
    code, output = _launch(tmp_path / "two", "grpo", model, 4, 4, "--resume", "--as-two", config=None)
    assert code != 0 and "was saved with FSDP (sharded)" in output and "diffalign export" in output


@pytest.mark.slow  # 2 launches and an export
def test_grpo_full_finetuning_sharded_with_its_reference(tiny_pipeline_dir, tmp_path):
    """Full fine-tuning with beta > 0: the frozen reference is a sharded copy; the exported pipeline is whole."""
    from diffusers import DiffusionPipeline

    model = tiny_pipeline_dir("sd3")
    one = _run(tmp_path / "one", "grpo", model, 0, 2, config=None)
    two = _run(tmp_path / "two", "grpo", model, 0, 2)
    _assert_same_training(one, two, ("grad_norm", "reward_mean", "approx_kl"))
    exported = _weights(tmp_path / "two")
    _assert_same_weights(_weights(tmp_path / "one"), exported)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "two" / "run" / "model")
    state = pipe.transformer.state_dict()
    assert sorted(state) == sorted(exported) and all(torch.equal(state[k], exported[k]) for k in exported)
    # The consolidation step: the shards of the checkpoint, joined offline, give the same pipeline.
    done = subprocess.run(
        [sys.executable, "-m", "diffalign.cli", "export", str(tmp_path / "two" / "run"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    joined = load_file(str(next((tmp_path / "x" / "transformer").glob("*.safetensors"))))
    assert all(torch.equal(joined[k], exported[k]) for k in exported)


@pytest.mark.slow  # 2 launches
def test_bf16_sharded_run_follows_the_fp32_one(tiny_pipeline_dir, tmp_path):
    """bf16 compute with fp32 gradient reduction (the FSDP2 policy diffalign sets) on gloo: the gradients follow
    fp32's to bf16 precision (measured: 0.3% apart on this model)."""
    model = tiny_pipeline_dir("sd3")
    fp32 = _run(tmp_path / "fp32", "grpo", model, 4, 2)
    bf16 = _run(tmp_path / "bf16", "grpo", model, 4, 2, "--bf16")
    assert bf16["sharded"]
    assert _series(bf16, "grad_norm") == pytest.approx(_series(fp32, "grad_norm"), rel=3e-2)
    assert _series(bf16, "grad_norm") != pytest.approx(_series(fp32, "grad_norm"), rel=1e-6)  # bf16 did run


@pytest.mark.slow  # 2 launches
def test_reward_backprop_lora_sharded_matches_one_process(tiny_pipeline_dir, tmp_path):
    model = tiny_pipeline_dir("sd3")
    one = _run(tmp_path / "one", "reward_backprop", model, 4, 2, config=None)
    two = _run(tmp_path / "two", "reward_backprop", model, 4, 2)
    assert two["sharded"]
    _assert_same_training(one, two, ("loss", "grad_norm"))
    _assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"))


@pytest.mark.slow  # 4 launches
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_dpo_sharded_matches_one_process(lora_rank, tiny_pipeline_dir, tmp_path):
    """DPO on the UNet (nested FSDP units): 2 sharded processes train what one does (2 data streams either way,
    each pair's draws seeded by its index)."""
    from diffalign.data.preference import write_preference_dataset

    generator = torch.Generator().manual_seed(0)
    captions = ["a red circle", "two blue squares", "a green triangle", "a cat"]
    images = [torch.rand(2, 3, 16, 16, generator=generator) for _ in range(8)]
    records = [(captions[i % 4], pair[0], pair[1], float(i % 2)) for i, pair in enumerate(images)]
    data = write_preference_dataset(records, tmp_path / "pairs")
    model = tiny_pipeline_dir("sd15")
    one = _run(tmp_path / "one", "diffusion_dpo", model, lora_rank, 2, str(data), config=None)
    two = _run(tmp_path / "two", "diffusion_dpo", model, lora_rank, 2, str(data))
    assert two["sharded"]
    # The first step agrees to float precision; the tiny UNet's DPO gradients are large (norms 20-3000, clipped to
    # 1 with lr 1e-2 / 1e-3), which magnifies summation-order differences in the second (measured: 3e-4 relative).
    assert _series(two, "grad_norm")[0] == pytest.approx(_series(one, "grad_norm")[0], rel=1e-5)
    for key in ("loss", "grad_norm"):
        assert _series(two, key) == pytest.approx(_series(one, key), rel=2e-3), key
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-3


# --- the misuses, in one process ----------------------------------------------------------------------------------


def _accelerator(distributed_type: str, num_processes: int, plugin=None):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=plugin, distributed_type=DistributedType[distributed_type])
    return SimpleNamespace(distributed_type=state.distributed_type, num_processes=num_processes, state=state)


def test_fsdp_on_one_process_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="on one process shards nothing"):
        sharding.enable_fsdp2(_accelerator("NO", 1), "no")


def test_fsdp_version_1_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP2 only"):
        sharding.enable_fsdp2(_accelerator("MULTI_CPU", 2), "no")


def test_no_fsdp_without_an_fsdp_launch(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding.enable_fsdp2(_accelerator("MULTI_CPU", 2), "bf16") is False


def test_bf16_shards_compute_in_bf16_and_reduce_in_fp32():
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = _accelerator("FSDP", 2, plugin)
    assert sharding.enable_fsdp2(accelerator, "bf16") is True
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_multi_cpu_launch_with_an_fsdp_config_turns_fsdp_on(monkeypatch):
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    accelerator = _accelerator("MULTI_CPU", 2)
    assert sharding.enable_fsdp2(accelerator, "no") is True
    assert accelerator.state.distributed_type == DistributedType.FSDP
    assert accelerator.state.fsdp_plugin.fsdp_version == 2


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("optimizer", "adafactor", "use adamw"), ("use_8bit_adam", True, "8-bit Adam")],
)
def test_optimizers_that_cannot_take_shards_are_refused(key, value, message):
    optim = SimpleNamespace(optimizer="adamw", use_8bit_adam=False)
    setattr(optim, key, value)
    with pytest.raises(ConfigError, match=message):
        sharding.check_sharded_options(SimpleNamespace(optim=optim))


def test_a_sharded_checkpoint_needs_its_process_count(tiny_pipeline_dir, tmp_path):
    """Even with --allow-config-change: the shards of 2 processes are not resumed by another count."""
    run = make_run(tiny_pipeline_dir("sd3"), tmp_path / "run", allow_config_change=True)
    run.sharded = True  # as if launched with the FSDP config: only the checks run here
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    (checkpoint / sharding.SHARDED_DIR).mkdir(parents=True)
    (checkpoint / sharding.SHARDED_DIR / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1, "num_processes": 2}))
    with pytest.raises(RunFolderError, match=r"shards of 2 process\(es\), this run has 1: launch 2 processes"):
        run._check_checkpoint(checkpoint)
