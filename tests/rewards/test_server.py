"""Reward server (rewards.server) and its client (rewards.remote), on loopback with cheap function rewards.

Every server runs in a thread of the test process on a free port and is stopped by the fixture; every wait is
bounded (the blocking rewards give up after 10 s).
"""

import copy
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.remote import RemoteReward, RemoteRewardError, encode_images


httpx = pytest.importorskip("httpx", reason="the reward server's extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("fastapi", reason="the reward server's extra (fastapi, uvicorn, httpx) is not installed")
from rewards.server import BackgroundServer, create_app, decode_image  # noqa: E402


PROMPTS = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "ggggggg"]


def colour_and_prompt(images, prompts):
    """Mean red minus mean blue, plus the prompt's length: a score that depends on every input."""
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2)) + torch.tensor([len(p) for p in prompts])


def quantised(images):
    return (images * 255).round() / 255


@pytest.fixture
def serve():
    """``serve(reward, **create_app settings) -> BackgroundServer`` started on a free port; all stopped after."""
    servers = []

    def start(reward, **settings):
        server = BackgroundServer(create_app(rewards.load(reward), **settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(force=True)


class Gate:
    """A reward that blocks until released (at most 10 s), recording the batch sizes it was called with."""

    def __init__(self):
        self.release, self.entered, self.calls = threading.Event(), threading.Event(), []

    def __call__(self, images, prompts):
        self.calls.append(len(images))
        self.entered.set()
        self.release.wait(10)
        return colour_and_prompt(images, prompts)


def post(url, blobs, prompts=None, **fields):
    files = [("images", (f"{i}.bin", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]
    data = {key: json.dumps(value) for key, value in {"prompts": prompts, **fields}.items() if value is not None}
    return httpx.post(f"{url}/score", files=files, data=data, timeout=10)


def png_bytes(images):
    return [data for data, _ in encode_images(images, "png")]


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --- scores ---------------------------------------------------------------------------------------------------------


def test_remote_scores_equal_in_process_scores(serve):
    server = serve(colour_and_prompt, batch_size=4)
    images = torch.rand(7, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    # PNG: exactly the in-process score of the 8-bit image; chunks of 3 are merged and split by the server (batch 4).
    png = rewards.load(f"remote:{server.url}", batch_size=3)
    assert torch.equal(png.score(images, PROMPTS), colour_and_prompt(quantised(images), PROMPTS))
    # NPZ: the float32 values themselves, so exactly the in-process score.
    npz = rewards.load(f"remote:{server.url}", image_format="npz")
    assert torch.equal(npz.score(images, PROMPTS), colour_and_prompt(images, PROMPTS))
    # The quantisation is visible: PNG and NPZ scores differ, by at most half a grey level per channel mean.
    assert 0 < (png.score(images, PROMPTS) - npz.score(images, PROMPTS)).abs().max() <= 1 / 255
    assert not png.differentiable


def test_parts_of_a_served_weighted_sum_come_back(serve):
    served = rewards.WeightedSum({rewards.load(colour_and_prompt): 2.0, "jpeg_compressibility": 0.5})
    server = serve(served)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    total, parts = rewards.load(f"remote:{server.url}").score_parts(images, PROMPTS[:3])
    expected_total, expected_parts = served.score_parts(quantised(images), PROMPTS[:3])
    torch.testing.assert_close(total, expected_total)
    assert parts.keys() == expected_parts.keys()
    for name in parts:
        torch.testing.assert_close(parts[name], expected_parts[name])


def test_metadata_reaches_a_reward_that_takes_it(serve):
    seen = []

    def tagged(images, prompts, metadata):
        seen.append(metadata)
        return [float(item.get("count", -1)) for item in metadata]

    server = serve(tagged)
    remote = rewards.load(f"remote:{server.url}")
    images = torch.rand(3, 3, 8, 8)
    metadata = [{"count": 2, "tag": "counting"}, {"count": 5}, {}]
    assert remote.score(images, PROMPTS[:3], metadata=metadata).tolist() == [2.0, 5.0, -1.0]
    assert seen == [metadata]
    with pytest.raises(rewards.RewardInputError, match="metadata of image 1 cannot be sent as JSON"):
        remote.score(images, PROMPTS[:3], metadata=[{}, {"x": torch.zeros(1)}, {}])


def test_concurrent_requests_are_batched_and_grouped_by_size(serve):
    """A first request holds the worker; four more queue up meanwhile (no timing involved: the test waits for the
    queue depth), then one batch takes all their images and scores each image size in one call."""
    gate = Gate()
    server = serve(gate, batch_size=8)
    remote = rewards.load(f"remote:{server.url}")
    holder = threading.Thread(target=post, args=(server.url, png_bytes(torch.rand(1, 3, 8, 8)), ["a"]))
    holder.start()
    assert gate.entered.wait(10)
    batches = [torch.rand(2, 3, 8 if i < 3 else 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = [None] * 4

    def score(i):
        results[i] = remote.score(batches[i], PROMPTS[:2])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).json()["queue_depth"] == 8)
    gate.release.set()
    for thread in [holder, *threads]:
        thread.join(20)
    for batch, result in zip(batches, results):
        assert torch.equal(result, colour_and_prompt(quantised(batch), PROMPTS[:2]))
    # The holder alone, then the three requests of 8x8 images in one call and the 6x8 one in another.
    assert sorted(gate.calls) == [1, 2, 6]


def test_health_needs_no_token(serve):
    server = serve(colour_and_prompt, batch_size=5, max_queue=17, token="secret")
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert health["reward"] == "colour_and_prompt"
    assert (health["status"], health["batch_size"], health["max_queue"], health["queue_depth"]) == ("ok", 5, 17, 0)
    assert health["needs_prompts"] is True and health["takes_metadata"] is False
    assert health["device"] == "cpu" and health["image_formats"] == ["png", "npz"]
    # No other route: no interactive docs or schema to probe.
    assert httpx.get(f"{server.url}/docs", timeout=5).status_code == 404


# --- errors ---------------------------------------------------------------------------------------------------------


def test_token_is_required_when_set(serve, monkeypatch):
    server = serve(colour_and_prompt, token="s3cret")
    images = torch.rand(2, 3, 8, 8)
    assert post(server.url, png_bytes(images), PROMPTS[:2]).status_code == 401
    wrong = httpx.post(
        f"{server.url}/score",
        headers={"Authorization": "Bearer s3cre"},
        files=[("images", ("0.png", png_bytes(images[:1])[0], "image/png"))],
        data={"prompts": '["a"]'},
        timeout=5,
    )
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["detail"]
    with pytest.raises(RemoteRewardError, match="refused the token"):
        rewards.load(f"remote:{server.url}", token="nope", retries=3).score(images, PROMPTS[:2])
    right = rewards.load(f"remote:{server.url}", token="s3cret").score(images, PROMPTS[:2])
    assert torch.equal(right, colour_and_prompt(quantised(images), PROMPTS[:2]))
    monkeypatch.setenv("REWARD_SERVER_TOKEN", "s3cret")  # the token from the environment, kept out of configs
    assert torch.equal(rewards.load(f"remote:{server.url}").score(images, PROMPTS[:2]), right)
    assert "s3cret" not in repr(rewards.load(f"remote:{server.url}"))


def test_malformed_requests_get_400_naming_the_problem(serve):
    server = serve(colour_and_prompt, max_queue=3)
    good = png_bytes(torch.rand(1, 3, 8, 8))[0]

    def detail(blobs, prompts, **fields):
        response = post(server.url, blobs, prompts, **fields)
        assert response.status_code == 400, response.text
        return response.json()["detail"]

    assert "image 1: not a PNG or NPZ" in detail([good, b"GIF89a..."], ["a", "b"])
    assert "image 0: cannot decode the PNG" in detail([good[:40]], ["a"])
    buffer = io.BytesIO()
    Image.new("I;16", (4, 4)).save(buffer, format="PNG")
    assert "image 1: PNG mode 'I" in detail([good, buffer.getvalue()], ["a", "b"])
    assert "image 0: the NPZ array must be float [3, H, W]" in detail([_npz(np.zeros((4, 4, 3), np.float32))], ["a"])
    assert "image 0: cannot read the NPZ" in detail([_npz(np.array([{"x": 1}], dtype=object))], ["a"])  # no pickle
    assert "image 0: NPZ values must be finite and in [0, 1], got values in [200, 200]" in detail(
        [_npz(np.full((3, 4, 4), 200, np.float32))], ["a"]
    )
    assert "got 1 prompts for 2 images" in detail([good, good], ["a"])
    assert "has 4 images, more than the server's --max-queue 3" in detail([good] * 4, ["a"] * 4)
    assert "needs one prompt per image" in detail([good], None)
    assert "metadata must be dicts; item 0" in detail([good], ["a"], metadata=[3])
    assert "'prompts' is not valid JSON" in post_raw(server.url, [good], prompts="[a").json()["detail"]
    response = httpx.post(f"{server.url}/score", json={"images": []}, timeout=5)
    assert response.status_code == 400 and "multipart/form-data" in response.json()["detail"]
    # The client turns a 400 into the reward protocol's input error, with the server's message.
    with pytest.raises(rewards.RewardInputError, match="needs one prompt per image"):
        rewards.load(f"remote:{server.url}").score(torch.rand(1, 3, 8, 8))


def _npz(array):
    buffer = io.BytesIO()
    np.savez(buffer, image=array)
    return buffer.getvalue()


def post_raw(url, blobs, **fields):
    files = [("images", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    return httpx.post(f"{url}/score", files=files, data=fields, timeout=5)


def test_reward_errors_become_422_or_500(serve):
    def picky(images, prompts):
        if images.shape[-1] != images.shape[-2]:
            raise rewards.RewardInputError("picky needs square images")
        if prompts[0] == "boom":
            raise RuntimeError("the model fell over " + "x" * 1000)
        return images.mean((1, 2, 3))

    server = serve(picky)
    remote = rewards.load(f"remote:{server.url}", retries=3, backoff=0)
    with pytest.raises(rewards.RewardInputError, match="picky needs square images"):
        remote.score(torch.rand(1, 3, 8, 6), ["a"])
    with pytest.raises(RemoteRewardError, match="HTTP 500: the reward failed: RuntimeError: the model fell") as err:
        remote.score(torch.rand(1, 3, 8, 8), ["boom"])
    assert len(str(err.value)) < 500  # a short message, not the whole exception
    response = post(server.url, png_bytes(torch.rand(1, 3, 8, 6)), ["a"])
    assert response.status_code == 422 and response.json() == {"detail": "picky needs square images"}
    assert remote.score(torch.rand(2, 3, 8, 8), ["a", "b"]).shape == (2,)  # the server still works


def test_a_failing_request_does_not_fail_the_requests_batched_with_it(serve):
    gate = Gate()

    def fails_on_boom(images, prompts):
        gate(images, prompts)
        if "boom" in prompts:
            raise RuntimeError("boom")
        return colour_and_prompt(images, prompts)

    server = serve(fails_on_boom, batch_size=8, max_wait=0.0)
    remote = rewards.load(f"remote:{server.url}", backoff=0)
    outcomes = {}

    def score(key, prompts):
        try:
            outcomes[key] = remote.score(torch.zeros(len(prompts), 3, 4, 4), prompts)
        except RemoteRewardError as err:
            outcomes[key] = err

    first = threading.Thread(target=score, args=("first", ["a"]))
    first.start()
    gate.entered.wait(10)  # the worker is busy: the next two requests queue up and are batched together
    others = [threading.Thread(target=score, args=(key, [key])) for key in ("boom", "fine")]
    for thread in others:
        thread.start()
    wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).json()["queue_depth"] == 2)
    gate.release.set()
    for thread in [first, *others]:
        thread.join(20)
    assert gate.calls == [1, 2, 1, 1]  # the merged call failed, then each request was scored alone
    assert isinstance(outcomes["boom"], RemoteRewardError)
    assert outcomes["fine"].tolist() == [4.0] and outcomes["first"].tolist() == [1.0]


def test_full_queue_answers_503_and_the_client_gives_up_clearly(serve):
    gate = Gate()
    server = serve(gate, batch_size=1, max_queue=2)
    busy = threading.Thread(target=post, args=(server.url, png_bytes(torch.rand(1, 3, 8, 8)), ["a"]))
    busy.start()
    gate.entered.wait(10)  # one image is being scored
    waiting = threading.Thread(target=post, args=(server.url, png_bytes(torch.rand(2, 3, 8, 8)), ["a", "b"]))
    waiting.start()
    wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).json()["queue_depth"] == 2)
    response = post(server.url, png_bytes(torch.rand(1, 3, 8, 8)), ["c"])
    assert response.status_code == 503 and "queue is full (2 images waiting" in response.json()["detail"]
    with pytest.raises(RemoteRewardError, match=r"stayed busy \(HTTP 503\) over 3 attempts"):
        rewards.load(f"remote:{server.url}", retries=2, backoff=0.01).score(torch.rand(1, 3, 8, 8), ["c"])
    gate.release.set()
    busy.join(10)
    waiting.join(10)
    assert gate.calls == [1, 1, 1]


def test_a_request_over_the_timeout_gets_504_and_is_not_retried(serve):
    gate = Gate()
    server = serve(gate, timeout=0.2)
    remote = rewards.load(f"remote:{server.url}", retries=3, backoff=0)
    try:
        with pytest.raises(RemoteRewardError, match=r"HTTP 504: no score within the server's timeout of 0.2 s"):
            remote.score(torch.rand(1, 3, 8, 8), ["a"])
    finally:
        gate.release.set()
    assert gate.calls == [1]


# --- servers going away ---------------------------------------------------------------------------------------------


def test_a_server_stopped_mid_request_fails_over_to_the_next_one(serve):
    gate = Gate()
    dying, healthy = serve(gate), serve(colour_and_prompt)
    remote = rewards.load(f"remote:{dying.url},{healthy.url}", backoff=0)
    images = torch.rand(3, 3, 8, 8)
    killer = threading.Thread(target=lambda: gate.entered.wait(10) and dying.stop(force=True))
    killer.start()
    try:
        scores = remote.score(images, PROMPTS[:3])
    finally:
        gate.release.set()
        killer.join(10)
    assert gate.calls == [3]  # the first server had the request when it stopped
    assert torch.equal(scores, colour_and_prompt(quantised(images), PROMPTS[:3]))


def test_a_connection_dropped_mid_request_fails_over_to_the_next_one(serve):
    """A server process killed mid-request resets its connections: the client sees the socket close unanswered."""
    healthy = serve(colour_and_prompt)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        dropped = []

        def drop_one():
            connection, _ = listener.accept()
            with connection:
                dropped.append(connection.recv(1024))  # the request began to arrive; no answer ever comes

        thread = threading.Thread(target=drop_one)
        thread.start()
        port = listener.getsockname()[1]
        remote = rewards.load(f"remote:http://127.0.0.1:{port},{healthy.url}", backoff=0)
        images = torch.rand(2, 3, 8, 8)
        scores = remote.score(images, PROMPTS[:2])
        thread.join(10)
    assert dropped and dropped[0].startswith(b"POST /score")
    assert torch.equal(scores, colour_and_prompt(quantised(images), PROMPTS[:2]))


def test_no_server_running_gives_one_clear_error():
    ports = []
    for _ in range(2):  # ports that were free a moment ago: nothing listens there
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    remote = rewards.load("remote", urls=urls, retries=3, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError) as err:
        remote.score(torch.rand(1, 3, 8, 8), ["a"])
    message = str(err.value)
    assert f"cannot reach the reward server(s) {urls[0]}, {urls[1]} (4 attempts" in message
    assert f"diffalign reward serve --reward NAME --port {ports[0]}" in message and "ConnectError" in message
    assert time.monotonic() - start < 5


def test_requests_go_round_robin_over_the_servers(serve):
    counts = {"a": 0, "b": 0}

    def counting(key):
        def reward(images, prompts):
            counts[key] += len(images)
            return colour_and_prompt(images, prompts)

        return reward

    first, second = serve(counting("a")), serve(counting("b"))
    remote = rewards.load(f"remote:{first.url},{second.url}", batch_size=2)
    images = torch.rand(7, 3, 8, 8)
    assert torch.equal(remote.score(images, PROMPTS), colour_and_prompt(quantised(images), PROMPTS))
    assert counts == {"a": 4, "b": 3}  # chunks 0 and 2 to the first server, 1 and 3 to the second


# --- specs and options ----------------------------------------------------------------------------------------------


def test_remote_specs_load_without_touching_the_network():
    remote = rewards.load("remote:http://a:8000/,https://b.example:8001", timeout=5, retries=0, batch_size=16)
    assert isinstance(remote, RemoteReward)
    assert remote.urls == ["http://a:8000", "https://b.example:8001"]
    assert (remote.timeout, remote.retries, remote.batch_size, remote.image_format) == (5.0, 0, 16, "png")
    assert remote.name == "remote:http://a:8000,https://b.example:8001"
    assert copy.deepcopy(remote).urls == remote.urls  # trainers may copy a reward: no live connection is copied
    assert rewards.load("remote", urls=["http://a:8000"]).urls == ["http://a:8000"]
    assert "remote" in rewards.available()
    assert {"token", "timeout", "retries", "batch_size", "image_format"} <= set(rewards.factory_options("remote:x"))
    assert "urls" not in rewards.factory_options("remote:http://a:1") and "urls" in rewards.factory_options("remote")
    with pytest.raises(TypeError, match="does not take option 'tokn'. Did you mean 'token'"):
        rewards.load("remote:http://a:8000", tokn="x")
    with pytest.raises(ValueError, match="must look like http://host:port"):
        rewards.load("remote:127.0.0.1:8000")
    with pytest.raises(ValueError, match="needs server URLs"):
        rewards.load("remote")
    with pytest.raises(ValueError, match="image_format must be one of"):
        rewards.load("remote:http://a:1", image_format="jpeg")
    # As a weighted-sum term: the term's options are checked against the client's before anything loads.
    with pytest.raises(rewards.RewardSpecError, match=r"remote:http://a:1.retrys: .*Did you mean 'retries'"):
        rewards.parse_term("remote:http://a:1", {"weight": 1.0, "retrys": 2})
    total = rewards.load({"remote:http://a:1": {"weight": 2.0, "token": "t"}, "jpeg_compressibility": 1.0})
    assert not total.differentiable and total.takes_metadata


def test_decoded_png_is_the_8_bit_image():
    images = torch.rand(1, 3, 5, 4)
    decoded = decode_image(png_bytes(images)[0], 0)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, quantised(images)[0])


def test_an_answer_without_one_number_per_image_is_refused():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/score")
    async def score():
        return {"scores": [1.0, None]}

    with BackgroundServer(app) as server:
        with pytest.raises(rewards.RewardOutputError, match="other than one number per image"):
            rewards.load(f"remote:{server.url}").score(torch.rand(2, 3, 4, 4), ["a", "b"])


# --- limits ----------------------------------------------------------------------------------------------------------


def test_oversized_images_and_bodies_are_refused_before_decoding(serve):
    server = serve(colour_and_prompt, max_pixels=32 * 32, max_request_bytes=200_000)
    small, large = png_bytes(torch.rand(1, 3, 8, 8))[0], png_bytes(torch.rand(1, 3, 64, 64))[0]
    response = post(server.url, [small, large], ["a", "b"])
    assert response.status_code == 400
    assert response.json()["detail"].startswith("image 1: 64 x 64 pixels is more than the server's limit of 1024")
    response = post_raw(server.url, [_npz(np.zeros((3, 64, 64), np.float32))], prompts=json.dumps(["a"]))
    assert response.status_code == 400 and "image 0: 64 x 64 pixels" in response.json()["detail"]
    response = post_raw(server.url, [b"\0" * 300_000], prompts=json.dumps(["a"]))
    assert response.status_code == 413 and "more than the server's limit of 200000" in response.json()["detail"]
    assert post(server.url, [small], ["a"]).status_code == 200


def test_a_timed_out_request_frees_its_queue_places(serve):
    gate = Gate()
    server = serve(gate, batch_size=1, max_queue=2, timeout=0.5)
    holder = threading.Thread(target=post, args=(server.url, png_bytes(torch.rand(1, 3, 8, 8)), ["a"]))
    holder.start()
    assert gate.entered.wait(10)
    try:
        assert post(server.url, png_bytes(torch.rand(2, 3, 8, 8)), ["a", "b"]).status_code == 504
        assert httpx.get(f"{server.url}/health", timeout=5).json()["queue_depth"] == 0
        waiting = threading.Thread(target=post, args=(server.url, png_bytes(torch.rand(2, 3, 8, 8)), ["c", "d"]))
        waiting.start()  # admitted: the abandoned images no longer count against --max-queue 2
        wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).json()["queue_depth"] == 2)
    finally:
        gate.release.set()
    holder.join(10)
    waiting.join(10)
    assert gate.calls == [1, 1, 1]  # the holder, then the admitted request's two images; the abandoned ones skipped


class WrongTotal(rewards.Reward):
    """A reward whose ``score_parts`` returns one total for the whole batch (a custom reward's bug)."""

    name, needs_prompts = "wrong_total", False

    def _score(self, images, prompts):
        return images.mean((1, 2, 3))

    def score_parts(self, images, prompts=None, metadata=None):
        total = self.score(images, prompts)
        return total.mean(0, keepdim=True), {"wrong_total": total}


def test_a_wrongly_shaped_total_fails_its_request_and_the_worker_goes_on(serve):
    server = serve(WrongTotal(), batch_size=4)
    response = post(server.url, png_bytes(torch.rand(2, 3, 8, 8)))
    assert response.status_code == 500 and "returned shape (1,), not [2]" in response.json()["detail"]
    response = post(server.url, png_bytes(torch.rand(1, 3, 8, 8)))  # one image: the total has the right shape
    assert response.status_code == 200 and len(response.json()["scores"]) == 1


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="an empty token would let anyone in"):
        create_app(rewards.load(colour_and_prompt), token=" ")
