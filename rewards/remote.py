"""A reward scored by reward servers over HTTP: ``rewards.load("remote:http://127.0.0.1:8000")``
(docs/rewards.md#reward-server).

The spec works wherever a reward spec does (``rewards.load``, a ``WeightedSum`` term, a trainer's ``reward:``);
several servers are listed with commas, ``remote:http://a:8000,http://b:8001``, or as the option ``urls`` of the
name ``remote`` (``{remote: {urls: [http://a:8000, http://b:8001], token: ...}}``). Requests go round-robin over
the servers; a server that cannot be reached or answers 503 (busy) is retried on the next one, with backoff, a
bounded number of times. The servers are ``rewards.server`` processes (``diffalign reward serve --reward NAME``).

Images travel as PNG by default: lossless for uint8 images, so the score equals the in-process score of the
image quantised to 8 bits, ``(x * 255).round() / 255``. ``image_format="npz"`` sends the float32 values
themselves (about 4x the bytes of an uncompressed image), for scores equal to in-process scoring bit for bit.

Not differentiable: the server returns numbers, not a graph. The client blocks the calling thread while it waits
(GRPO calls rewards from its scoring thread, so sampling goes on meanwhile); every network wait has a timeout.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import (
    Reward,
    RewardInputError,
    RewardOutputError,
    check_images,
    check_metadata,
    check_prompts,
    check_scores,
)


REMOTE_PREFIX = "remote:"
"""Specs starting with this are reward-server URLs: ``remote:http://host:8000[,http://host2:8001]``."""
TOKEN_ENV = "REWARD_SERVER_TOKEN"
"""Environment variable read for the token when none is given (the server reads the same one)."""
IMAGE_FORMATS = ("png", "npz")
MAX_BACKOFF_S = 30.0


class RemoteRewardError(RuntimeError):
    """The reward servers could not be reached, refused the token, timed out or failed."""


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """Server base URLs from a comma-separated string or a list, checked and without a trailing ``/``.

    Raises:
        ValueError: no URL, or one that is not ``http(s)://host:port``.
    """
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    parsed = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"reward server URL must be a string like http://127.0.0.1:8000, got {item!r}")
        url = item.strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"reward server URL {item.strip()!r} must look like http://host:port (e.g. http://127.0.0.1:8000)"
            )
        parsed.append(url)
    if not parsed:
        raise ValueError("no reward server URL given: use remote:http://host:8000 or urls=[http://host:8000]")
    return parsed


class RemoteReward(Reward):
    """Score images with reward servers (``rewards.server``), round-robin over ``urls``.

    Args:
        urls: server base URLs, ``"http://a:8000,http://b:8001"`` or a list.
        token: the servers' token (sent as ``Authorization: Bearer``); default: the environment variable
            :data:`TOKEN_ENV`, else none.
        timeout: seconds to wait for one answer (connecting: at most 10 of them); the default is longer than the
            server's default timeout (300 s), so that a slow request ends with the server's 504.
        retries: further attempts of a request after a connection error or a 503, each on the next server; other
            errors (400, 401, 422, 500, 504, a read timeout) are not retried.
        batch_size: images per request; a larger batch is split and the requests run concurrently (one per server,
            at least two). ``None``: the whole batch in one request.
        image_format: ``"png"`` (8-bit, lossless for uint8 images) or ``"npz"`` (float32, exact).
        backoff: seconds slept before the second round over the servers, doubling each round (at most 30 s).
        name: the reward's name in logs; default: the spec, ``"remote:<urls>"``.
        device, dtype: accepted for the factory protocol and unused: the server decides where and in which dtype
            its model runs (``diffalign reward serve --device cuda:1 --dtype bf16``); scores come back on the
            images' device.

    Raises:
        ValueError: a malformed URL or option.
    """

    differentiable = False
    needs_prompts = False  # the server knows whether its reward needs them, and says so (HTTP 422)
    takes_metadata = True  # passed on; the server gives it to a reward that takes it

    def __init__(
        self,
        urls: str | Sequence[str] | None = None,
        token: str | None = None,
        timeout: float = 330.0,
        retries: int = 3,
        batch_size: int | None = None,
        image_format: str = "png",
        backoff: float = 0.5,
        name: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if urls is None:
            raise ValueError("the remote reward needs server URLs: 'remote:http://host:8000' or urls=[...]")
        self.urls = parse_urls(urls)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = _positive(timeout, "timeout")
        self.backoff = _positive(backoff, "backoff", allow_zero=True)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"remote reward: retries must be an integer >= 0, got {retries!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"remote reward: batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"remote reward: image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.retries, self.batch_size, self.image_format = retries, batch_size, image_format
        self.name = name or REMOTE_PREFIX + ",".join(self.urls)
        # Trainer processes start at different servers (torch.distributed's RANK), so they do not all send their
        # first request to the first server at the same moment.
        rank = os.environ.get("RANK", "0")
        self._next_server = int(rank) % len(self.urls) if rank.isdigit() else 0
        self._lock = threading.Lock()
        self._client: Any = None

    # --- scoring --------------------------------------------------------------------------------------------------

    def score_parts(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and the server reward's parts (a served weighted sum's terms), else ``{name: total}``."""
        check_images(images, self.name)
        prompt_list = check_prompts(prompts, images.shape[0], self.name, required=False)
        metadata_list = check_metadata(metadata, images.shape[0], self.name)
        if images.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=images.device)
            return empty, {self.name: empty}
        total, parts = self._remote_scores(images, prompt_list, metadata_list)
        total = check_scores(total, images.shape[0], self.name, device=images.device)
        if not parts:
            return total, {self.name: total}
        return total, {
            name: check_scores(value, images.shape[0], f"{self.name} part {name!r}", device=images.device)
            for name, value in parts.items()
        }

    def _score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict[str, Any]]) -> Tensor:
        return self._remote_scores(images, prompts, metadata)[0]

    def _remote_scores(
        self, images: Tensor, prompts: list[str] | None, metadata: list[dict[str, Any]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores ``[B]`` and parts ``{name: [B]}`` (float32, CPU), one request per chunk of ``batch_size``."""
        fields = _json_fields(prompts, metadata, self.name)
        size = self.batch_size or images.shape[0]
        chunks = [slice(start, start + size) for start in range(0, images.shape[0], size)]
        with self._lock:
            first = self._next_server
            self._next_server = (first + len(chunks)) % len(self.urls)
        jobs = [(chunk, (first + i) % len(self.urls)) for i, chunk in enumerate(chunks)]

        def run(job: tuple[slice, int]) -> dict[str, Any]:
            chunk, server = job
            files = encode_images(images[chunk], self.image_format)
            return self._post(server, files, {key: value[chunk] for key, value in fields.items()})

        if len(jobs) == 1:
            answers = [run(jobs[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(jobs), max(2, len(self.urls)))) as pool:
                answers = list(pool.map(run, jobs))
        total = torch.tensor([s for answer in answers for s in answer["scores"]], dtype=torch.float32)
        names = set(answers[0].get("parts") or {})
        if any(set(answer.get("parts") or {}) != names for answer in answers):
            raise RewardOutputError(
                f"reward servers {', '.join(self.urls)} answered with different parts: do they serve the same reward?"
            )
        parts = {name: torch.tensor([v for a in answers for v in a["parts"][name]]) for name in sorted(names)}
        return total, parts

    # --- HTTP -----------------------------------------------------------------------------------------------------

    def _http(self) -> Any:
        """The shared ``httpx.Client`` (thread-safe; made on first use so that building the reward needs no httpx)."""
        with self._lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError as err:
                    raise ImportError(
                        "the remote reward needs httpx: pip install httpx (or pip install 'diffalign[server]')"
                    ) from err
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
                self._client = httpx.Client(timeout=timeout, headers=headers)
            return self._client

    def _post(self, server: int, files: list[tuple[bytes, str]], fields: dict[str, list[Any]]) -> dict[str, Any]:
        """POST one chunk, starting at server ``server`` and moving on to the next one after a retryable failure."""
        import httpx

        client = self._http()
        count = len(files)
        body = {key: json.dumps(value) for key, value in fields.items()}
        failures: list[str] = []
        for attempt in range(self.retries + 1):
            url = self.urls[(server + attempt) % len(self.urls)]
            if attempt and attempt % len(self.urls) == 0:  # every server failed once more: back off
                time.sleep(min(self.backoff * 2 ** (attempt // len(self.urls) - 1), MAX_BACKOFF_S))
            parts = [("images", (f"{i}.{self.image_format}", data, kind)) for i, (data, kind) in enumerate(files)]
            try:
                response = client.post(f"{url}/score", files=parts, data=body)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as err:
                raise RemoteRewardError(
                    f"reward server {url} gave no answer within {self.timeout:g} s ({type(err).__name__}); raise the "
                    "option timeout, lower batch_size, or check the server's log"
                ) from err
            except httpx.TransportError as err:  # refused, reset, closed mid-answer: try the next server
                failures.append(f"{url}: {type(err).__name__}: {err}")
                continue
            if response.status_code == 503:
                failures.append(f"{url}: HTTP 503: {_detail(response)}")
                continue
            return self._answer(response, url, count)
        raise RemoteRewardError(self._unreachable(failures))

    def _answer(self, response: Any, url: str, count: int) -> dict[str, Any]:
        status, detail = response.status_code, _detail(response)
        if status in (400, 422):
            raise RewardInputError(f"reward server {url} refused the request: {detail}")
        if status == 401:
            raise RemoteRewardError(
                f"reward server {url} refused the token ({detail}); give the server's token with the option token "
                f"or the environment variable {TOKEN_ENV}"
            )
        if status != 200:
            raise RemoteRewardError(f"reward server {url} answered HTTP {status}: {detail}")
        try:
            answer = response.json()
            scores, parts = answer["scores"], answer.get("parts") or {}
            columns = [scores, *parts.values()]
            ok = all(len(values) == count and all(_is_number(v) for v in values) for values in columns)
        except (ValueError, KeyError, TypeError) as err:
            raise RewardOutputError(f"reward server {url} sent an answer other than {{scores: [...]}}: {err}") from err
        if not ok:
            raise RewardOutputError(f"reward server {url} sent other than one number per image ({count} sent)")
        return answer

    def _unreachable(self, failures: list[str]) -> str:
        listed = ", ".join(self.urls)
        busy = all("HTTP 503" in failure for failure in failures)
        if busy:
            return (
                f"reward server(s) {listed} stayed busy (HTTP 503) over {len(failures)} attempts: start more "
                f"servers, raise their --max-queue, or lower the option batch_size. Last answer: {failures[-1]}"
            )
        port = urllib.parse.urlsplit(self.urls[0]).port or 8000
        return (
            f"cannot reach the reward server(s) {listed} ({len(failures)} attempts; last: {failures[-1]}). Is the "
            f"server running? Start one with: diffalign reward serve --reward NAME --port {port}; or fix the URL "
            f"in the spec {self.name!r}."
        )

    def close(self) -> None:
        """Close the HTTP connections (they reopen on the next score)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles (e.g. to worker processes) reconnect
        state = self.__dict__.copy()
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return f"RemoteReward(urls={self.urls}, image_format={self.image_format!r}, differentiable=False)"


def encode_images(images: Tensor, image_format: str = "png") -> list[tuple[bytes, str]]:
    """``[B, 3, H, W]`` images in [0, 1] as ``B`` files ``(bytes, content type)`` of the server protocol.

    PNG: 8-bit RGB of ``(x * 255).round()`` (the uint8 conversion of the JPEG reward and of image files), stored
    without zlib compression: encoding is the client's main cost (a 256 px image: 1.8 ms stored, 3.9 ms at zlib
    level 1 for 40% fewer bytes), and bytes are cheap on the loopback or LAN a reward server sits on. NPZ: the
    float32 values, array ``image`` ``[3, H, W]``.
    """
    images = images.detach().float().cpu()
    if image_format == "npz":
        files = []
        for image in images:
            buffer = io.BytesIO()
            np.savez(buffer, image=image.numpy())
            files.append((buffer.getvalue(), "application/octet-stream"))
        return files
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    files = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=0)
        files.append((buffer.getvalue(), "image/png"))
    return files


def _json_fields(prompts: list[str] | None, metadata: list[dict[str, Any]], name: str) -> dict[str, list[Any]]:
    """The request's JSON fields, checked to serialise (a tensor in metadata is named, not sent as a string)."""
    fields: dict[str, list[Any]] = {}
    if prompts is not None:
        fields["prompts"] = prompts
    if any(metadata):
        for index, item in enumerate(metadata):
            try:
                json.dumps(item)
            except (TypeError, ValueError) as err:
                raise RewardInputError(
                    f"reward {name!r}: metadata of image {index} cannot be sent as JSON ({err}); use numbers, "
                    "strings, lists and dicts"
                ) from None
        fields["metadata"] = metadata
    return fields


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail if detail is not None else response.text[:300])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any, option: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"remote reward: {option} must be a {'non-negative' if allow_zero else 'positive'} number")
    return float(value)
