"""The remote reward in diffalign: a GRPO trainer scoring on a reward server, configs, and ``diffalign reward serve``.

The servers run in threads of the test process on loopback (rewards.server.BackgroundServer).
"""

import threading
import time

import pytest
import torch
from test_grpo import colour_recipe, held_out_redness
from test_grpo import make_config as grpo_config

import rewards
from diffalign import cli
from diffalign.testing import redness
from diffalign.trainers.grpo import GRPOTrainer


pytest.importorskip("fastapi", reason="the reward server's extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("httpx", reason="the reward server's extra (fastapi, uvicorn, httpx) is not installed")
from rewards.server import BackgroundServer, create_app  # noqa: E402


def make_config(folder, output_dir, reward, **overrides):
    """The tiny sd3 Flow-GRPO config of tests/trainers/test_grpo.py, with ``reward`` as given."""
    return grpo_config(folder, output_dir, reward=reward, **overrides)


@pytest.fixture
def redness_server():
    """A server of the colour reward, recording each call's start and end times and scores.

    Its first call waits (at most 10 s) until ``server.denoised`` is set after the call began: a test sets it from a
    denoiser hook, so the call ends early only if sampling went on while it was scoring (no timing assumed).
    """
    calls, denoised = [], threading.Event()

    def timed_redness(images, prompts):
        start = time.monotonic()
        if not calls:
            denoised.clear()
            denoised.wait(10)
        calls.append((start, time.monotonic(), redness(images)))
        return calls[-1][2]

    server = BackgroundServer(create_app(rewards.load(timed_redness), batch_size=64)).start()
    server.calls, server.denoised = calls, denoised
    yield server
    server.stop(force=True)


def test_grpo_trains_on_a_remote_reward_and_samples_while_it_scores(redness_server, tiny_pipeline_dir, tmp_path):
    # The reward as a YAML config holds it: the name ``remote`` with its options, checked when the config loads.
    reward = {"remote": {"urls": [redness_server.url], "image_format": "npz"}}
    config = make_config(tiny_pipeline_dir("sd3"), tmp_path, reward, max_steps=1, **{"sampling.batch_size": 4})
    trainer = GRPOTrainer(config)
    forwards = []

    def seen(*_):  # returns None: a forward hook's return value would replace the output
        forwards.append(time.monotonic())
        redness_server.denoised.set()

    trainer.adapter.denoiser.register_forward_hook(seen)
    metrics = trainer.train()
    # Two rollout chunks of 4 images, each scored on the server, nothing else.
    assert [len(scores) for *_, scores in redness_server.calls] == [4, 4]
    scores = torch.cat([scores for *_, scores in redness_server.calls])
    assert metrics["reward_mean"] == pytest.approx(scores.mean().item(), rel=1e-5)
    assert metrics["reward/remote"] == pytest.approx(scores.mean().item(), rel=1e-5)
    # Scoring is asynchronous: the second chunk was sampled while the server scored the first.
    start, end, _ = redness_server.calls[0]
    assert any(start < t < end for t in forwards), "no denoiser call while the first chunk was being scored"


@pytest.mark.slow  # a learning run
def test_colour_reward_rises_with_a_remote_reward(tiny_pipeline_dir, tmp_path):
    """tests/trainers/test_grpo.py::test_colour_reward_rises (sd3, Flow-GRPO, LoRA), scoring on a server over PNG.

    In process the recipe gains +0.021 held-out (seed 0) and the test asks for > 0.005; the 8-bit images the server
    scores change the rewards by at most 1/255 per channel mean, and the same margin must hold.
    """
    server = BackgroundServer(create_app(rewards.load(redness), batch_size=16)).start()
    try:
        extra = colour_recipe(lora_rank=8, lr=1e-2, epochs=15)
        reward = {"remote": {"urls": [server.url]}}
        trainer = GRPOTrainer(make_config(tiny_pipeline_dir("sd3", vae="shapes"), tmp_path, reward, **extra))
        before = held_out_redness(trainer.adapter)
        trainer.train()
        after = held_out_redness(trainer.adapter)
    finally:
        server.stop(force=True)
    gain = (after - before).mean().item()
    assert gain > 0.005, f"held-out redness {before.mean():.4f} -> {after.mean():.4f}"


def test_config_checks_the_options_of_a_remote_term(tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"reward\.remote\.tokn.*Did you mean 'token'"):
        make_config(tmp_path, tmp_path, {"remote": {"urls": ["http://127.0.0.1:8000"], "tokn": "x"}})


def test_reward_serve_command_builds_the_reward_and_serves_it(monkeypatch):
    import rewards.server

    served = {}
    monkeypatch.setattr(rewards.server, "serve", lambda reward, **settings: served.update(reward=reward, **settings))
    argv = ["reward", "serve", "--reward", "jpeg_compressibility", "--port", "8123", "--batch-size", "4"]
    argv += ["--device", "cpu", "--option", "quality=50", "--max-wait-ms", "20", "--token", "t"]
    assert cli.main(argv) == 0
    assert served["reward"].name == "jpeg_compressibility" and served["reward"].quality == 50
    assert (served["host"], served["port"], served["batch_size"], served["max_wait"]) == ("127.0.0.1", 8123, 4, 0.02)
    assert (served["device"], served["token"], served["max_queue"], served["timeout"]) == ("cpu", "t", 256, 300.0)
    assert cli.main(["reward", "serve", "--reward", '{"jpeg_compressibility": 0.5}', "--device", "cpu"]) == 0
    assert isinstance(served["reward"], rewards.WeightedSum)
    assert cli.main(["reward", "serve", "--reward", "jpeg_compressibility", "--option", "quality"]) == 2
    assert cli.main(["reward", "serve", "--reward", "remote:http://a:1"]) == 2


def test_several_threads_share_one_remote_reward():
    server = BackgroundServer(create_app(rewards.load(redness))).start()
    remote = rewards.load(f"remote:{server.url}", image_format="npz")
    images = [torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = [None] * 3

    def score(i):
        results[i] = remote.score(images[i], ["p"] * 3)

    threads = [threading.Thread(target=score, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    server.stop(force=True)
    for batch, result in zip(images, results):
        assert torch.equal(result, redness(batch))
