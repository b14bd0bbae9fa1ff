"""An HTTP server for one reward, with dynamic batching: ``create_app(reward)`` and ``serve(reward, port=8000)``
(docs/rewards.md#reward-server).

A reward model that does not fit next to the policy, or that needs its own environment, runs in its own process
(one per GPU) and trainers score through :class:`rewards.remote.RemoteReward` (the ``remote:http://host:8000``
spec). The command line is ``diffalign reward serve --reward NAME``.

Protocol (version :data:`PROTOCOL_VERSION`; no pickle anywhere, nothing in a request is executed):

- ``GET /health`` (no token needed): ``{"status", "protocol", "reward", "batch_size", "queue_depth", "max_queue",
  "device", "needs_prompts", "takes_metadata", "image_formats"}``.
- ``POST /score``, ``multipart/form-data``: one ``images`` file part per image, in order, each a PNG (8-bit; RGB,
  or grey/palette/alpha converted to RGB, alpha dropped) or an NPZ holding one float array ``image`` ``[3, H, W]``
  in [0, 1] (read with ``allow_pickle=False``); a ``prompts`` field, a JSON list of one string per image (or
  ``null`` for rewards that need none); an optional ``metadata`` field, a JSON list of one object per image,
  passed to rewards that take metadata. Answer: ``{"scores": [B floats]}``, plus ``"parts": {name: [B floats]}``
  when the reward reports parts (a weighted sum's terms).
- Status codes: 400 a malformed request (an image that does not decode or is larger than ``max_pixels``, named by
  its index; bad JSON; wrong counts), 401 a missing or wrong ``Authorization: Bearer <token>``, 411 no
  ``Content-Length``, 413 a body larger than ``max_request_bytes``, 422 the reward refused the inputs
  (:class:`~rewards.base.RewardInputError`, its message), 500 the reward failed (a short message; the traceback
  is in the server's log), 503 the queue is full or the server is stopping (retry later or elsewhere), 504 no
  score within the server's timeout. Every error body is ``{"detail": message}``.

Batching: requests are split into images that wait in one bounded queue; a worker takes up to ``batch_size`` of
them (waiting at most ``max_wait`` seconds for a batch to fill), groups them by image size, and scores each group in
one reward call, in one dedicated thread under ``torch.no_grad``, so that the event loop keeps accepting requests
while the model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import (
    RANGE_TOLERANCE,
    Reward,
    RewardInputError,
    RewardOutputError,
    check_metadata,
    check_prompts,
)
from rewards.remote import IMAGE_FORMATS, TOKEN_ENV


try:  # the server's dependencies are an extra: say which one when they are missing
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the reward server needs fastapi and uvicorn ({err}); install them with pip install fastapi uvicorn "
        "python-multipart (or diffalign's extra: pip install 'diffalign[server]')"
    ) from err


logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
"""Version of the request/answer format, reported by ``GET /health``."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # an .npz file is a zip archive
PNG_MODES = ("RGB", "RGBA", "L", "LA", "P")
"""8-bit PNG modes that are read (converted to RGB); 16-bit and other modes are refused."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_PIXELS = 4096 * 4096
"""Default largest image (height x width) a request may hold: checked from the PNG header or the NPZ array header
before anything is decoded, so a small compressed file cannot expand into gigabytes."""
MAX_REQUEST_BYTES = 256 * 1024 * 1024
"""Default largest request body; larger ones get HTTP 413 before they are read."""


class MalformedRequestError(ValueError):
    """A request that does not follow the protocol (answered with HTTP 400)."""


class QueueFullError(RuntimeError):
    """The bounded queue cannot take a request's images (answered with HTTP 503)."""


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------


def decode_image(data: bytes, index: int, max_pixels: int = MAX_PIXELS) -> Tensor:
    """One request image as a float32 ``[3, H, W]`` tensor in [0, 1].

    Args:
        data: a PNG file (8-bit; uint8 values ``v`` become ``v / 255``) or an NPZ file with one float array
            ``image`` of shape ``[3, H, W]`` in [0, 1].
        index: the image's position in the request, quoted in errors.
        max_pixels: the largest ``H * W`` accepted, checked from the file's header before decoding.

    Raises:
        MalformedRequestError: naming the item: neither format, an undecodable file, too many pixels, a wrong
            mode, shape, dtype or value range.
    """
    if data.startswith(PNG_SIGNATURE):
        return _decode_png(data, index, max_pixels)
    if data.startswith(ZIP_SIGNATURE):
        return _decode_npz(data, index, max_pixels)
    raise MalformedRequestError(
        f"image {index}: not a PNG or NPZ file (it starts with {data[:8]!r}); send PNG bytes or an .npz holding "
        "a float array 'image' [3, H, W]"
    )


def _check_pixels(height: int, width: int, index: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise MalformedRequestError(
            f"image {index}: {height} x {width} pixels is more than the server's limit of {max_pixels} "
            "(--max-pixels); resize it before scoring"
        )


def _decode_png(data: bytes, index: int, max_pixels: int) -> Tensor:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            _check_pixels(image.height, image.width, index, max_pixels)  # from the header: nothing decoded yet
            image.load()
            if image.mode not in PNG_MODES:
                raise MalformedRequestError(
                    f"image {index}: PNG mode {image.mode!r} is not read; send an 8-bit RGB PNG (or NPZ for floats)"
                )
            pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except MalformedRequestError:
        raise
    except Exception as err:  # PIL raises many types for a broken file (OSError, SyntaxError, DecompressionBomb)
        raise MalformedRequestError(f"image {index}: cannot decode the PNG ({type(err).__name__}: {err})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


def _npz_array_shape(archive: Any, name: str) -> tuple[int, ...]:
    """The shape in an NPZ member's ``.npy`` header, read without decompressing the array."""
    with archive.zip.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(member)
    return tuple(shape)


def _decode_npz(data: bytes, index: int, max_pixels: int) -> Tensor:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # no pickle: object arrays are refused
            if "image" not in archive.files:
                raise MalformedRequestError(f"image {index}: the NPZ has {archive.files}, not an array 'image'")
            shape = _npz_array_shape(archive, "image")
            if len(shape) == 3:  # other shapes are refused below, once read (small: no pixel count to bound)
                _check_pixels(shape[1], shape[2], index, max_pixels)
            elif math.prod(shape) > 3 * max_pixels:
                raise MalformedRequestError(f"image {index}: the NPZ array {shape} is larger than any image accepted")
            array = archive["image"]
    except MalformedRequestError:
        raise
    except Exception as err:
        raise MalformedRequestError(f"image {index}: cannot read the NPZ ({type(err).__name__}: {err})") from None
    if array.dtype not in (np.float16, np.float32, np.float64) or array.ndim != 3 or array.shape[0] != 3:
        raise MalformedRequestError(
            f"image {index}: the NPZ array must be float [3, H, W], got {array.dtype} {tuple(array.shape)}"
        )
    image = torch.from_numpy(array.astype(np.float32))
    lo, hi = (value.item() for value in torch.aminmax(image))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise MalformedRequestError(
            f"image {index}: NPZ values must be finite and in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
        )
    return image


def _parse_json_list(form: Mapping[str, Any], field: str, count: int) -> list[Any] | None:
    """The JSON list in form field ``field``; ``None`` when the field is absent or ``null``."""
    text = form.get(field)
    if text is None:
        return None
    if not isinstance(text, str):
        raise MalformedRequestError(f"'{field}' must be a form field holding JSON, not a file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedRequestError(f"'{field}' is not valid JSON ({err})") from None
    if value is None:
        return None
    if not isinstance(value, list):
        kind = type(value).__name__
        raise MalformedRequestError(f"'{field}' must be a JSON list with one entry per image, got {kind}")
    if len(value) != count:
        raise MalformedRequestError(f"got {len(value)} {field} for {count} images")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """One ``POST /score``: its decoded images, prompts and metadata, and the slots its answer fills."""

    images: list[Tensor]
    prompts: list[str] | None
    metadata: list[dict[str, Any]] | None
    future: asyncio.Future
    scores: list[float | None] = dataclasses.field(default_factory=list)
    parts: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    remaining: int = 0
    abandoned: bool = False
    queued: int = 0  # images still waiting in the batcher's queue

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.images)
        self.remaining = len(self.images)

    def fill(self, index: int, score: float, parts: Mapping[str, float]) -> None:
        self.scores[index] = score
        for name, value in parts.items():
            self.parts.setdefault(name, [None] * len(self.images))[index] = value
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result({"scores": self.scores, **({"parts": self.parts} if self.parts else {})})

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


@dataclasses.dataclass(frozen=True, eq=False)
class _Item:
    job: _Job
    index: int

    @property
    def image(self) -> Tensor:
        return self.job.images[self.index]

    def group_key(self) -> tuple[Any, ...]:
        """Items that can share one reward call: same image size, prompts given or not."""
        return (tuple(self.image.shape), self.job.prompts is None)


class _Batcher:
    """The bounded queue of images and the worker that scores them in batches (one reward call per image size)."""

    def __init__(self, reward: Reward, batch_size: int, max_queue: int, max_wait: float, device: Any) -> None:
        self.reward, self.batch_size, self.max_wait, self.device = reward, batch_size, max_wait, device
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.max_queue = max_queue
        self.waiting = 0  # live images in the queue (those of abandoned requests no longer count)
        self.scoring = 0
        # One thread runs the reward: a model is never used by two threads at once, and CUDA state stays put.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-server")

    def submit(self, job: _Job) -> None:
        """Queue a job's images, or refuse the whole job when they do not fit (no partial admission)."""
        waiting = self.waiting
        if waiting + len(job.images) > self.max_queue:
            raise QueueFullError(
                f"the reward server's queue is full ({waiting} images waiting, {len(job.images)} more asked, limit "
                f"--max-queue {self.max_queue}); retry later, send smaller requests, or start another server "
                "(diffalign reward serve ... --port OTHER) and give the client both URLs"
            )
        job.queued = len(job.images)
        self.waiting += job.queued
        for index in range(len(job.images)):
            self.queue.put_nowait(_Item(job, index))

    def abandon(self, job: _Job) -> None:
        """Stop working for ``job`` (its request timed out or failed): its images still queued are skipped and no
        longer count against ``max_queue``."""
        if not job.abandoned:
            job.abandoned = True
            self.waiting -= job.queued
            job.queued = 0

    def _take(self, item: _Item) -> bool:
        """Account for a dequeued item; False when its request was abandoned (skip it)."""
        if item.job.abandoned:
            return False
        item.job.queued -= 1
        self.waiting -= 1
        return True

    async def run(self) -> None:
        """Score queued images until cancelled. An unexpected error fails that batch's requests, is logged, and the
        worker goes on (a dead worker would turn every later request into a 504)."""
        while True:
            batch = await self._next_batch()
            groups: dict[tuple[Any, ...], list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.group_key(), []).append(item)
            self.scoring = len(batch)
            try:
                for items in groups.values():
                    await self._score_group(items)
            except Exception as err:
                logger.exception("reward server worker: a batch failed outside the reward call")
                for job in dict.fromkeys(item.job for item in batch):
                    job.fail(err)
            finally:
                self.scoring = 0

    async def _next_batch(self) -> list[_Item]:
        """Up to ``batch_size`` live items: the first one awaited, then more until full or ``max_wait`` passes."""
        batch: list[_Item] = []
        while not batch:
            item = await self.queue.get()
            if self._take(item):
                batch.append(item)
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.batch_size:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if self._take(item):  # False: its request timed out, skip its images
                batch.append(item)
        return batch

    async def _score_group(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            scores, parts = await loop.run_in_executor(self.executor, self._score_items, items)
        except Exception as err:
            jobs = list(dict.fromkeys(item.job for item in items))
            if len(jobs) == 1:
                self.abandon(jobs[0])
                jobs[0].fail(err)
                return
            # Several requests shared the call: score each alone so that the error reaches only the one causing it.
            for job in jobs:
                await self._score_group([item for item in items if item.job is job])
            return
        for position, item in enumerate(items):
            item.job.fill(item.index, scores[position], {name: values[position] for name, values in parts.items()})

    def _score_items(self, items: list[_Item]) -> tuple[list[float], dict[str, list[float]]]:
        """Runs in the reward thread: one reward call on the items' images ``[N, 3, H, W]``."""
        images = torch.stack([item.image for item in items])
        if self.device is not None:
            images = images.to(self.device)
        prompts = None if items[0].job.prompts is None else [item.job.prompts[item.index] for item in items]
        extra = {}
        if self.reward.takes_metadata:
            extra["metadata"] = [item.job.metadata[item.index] if item.job.metadata else {} for item in items]
        with torch.no_grad():
            total, parts = self.reward.score_parts(images, prompts, **extra)
        if tuple(total.shape) != (len(items),):
            raise RewardOutputError(
                f"reward {self.reward.name!r} returned shape {tuple(total.shape)}, not [{len(items)}]"
            )
        # A plain reward reports itself as its one part: that is no part to send.
        named = {name: value for name, value in parts.items() if value is not total}
        for name, value in named.items():
            if tuple(value.shape) != (len(items),):
                raise RewardOutputError(f"reward part {name!r} has shape {tuple(value.shape)}, not [{len(items)}]")
        return total.float().cpu().tolist(), {name: value.float().cpu().tolist() for name, value in named.items()}

    def close(self) -> None:
        while not self.queue.empty():
            job = self.queue.get_nowait().job
            self.abandon(job)
            job.fail(QueueFullError("the reward server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------


def create_app(
    reward: Reward,
    *,
    batch_size: int = 8,
    max_queue: int = 256,
    timeout: float = 300.0,
    token: str | None = None,
    device: torch.device | str | None = None,
    max_wait: float = 0.005,
    max_pixels: int = MAX_PIXELS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``reward`` (see the module docstring for the protocol).

    Args:
        reward: the reward to serve, already built (``rewards.load(...)``); its weights load at the first batch.
        batch_size: the most images scored in one reward call; requests are merged or split to fill it.
        max_queue: the most images waiting to be scored; a request that does not fit gets HTTP 503.
        timeout: seconds a request may take, queueing included, before HTTP 504.
        token: if set, ``POST /score`` needs ``Authorization: Bearer <token>`` (``/health`` never does).
        device: where images go before scoring (the reward's device); ``None`` leaves them on the CPU.
        max_wait: seconds the worker waits for more images once it has some and the batch is not full.
        max_pixels: the largest image (``H * W``) accepted; larger ones get HTTP 400 before they are decoded.
        max_request_bytes: the largest request body; larger ones get HTTP 413 before they are read.

    Raises:
        ValueError: a non-positive ``batch_size``, ``max_queue``, ``timeout``, ``max_pixels`` or
            ``max_request_bytes``, a negative ``max_wait``, or an empty ``token``.
    """
    counts = {"max_pixels": max_pixels, "max_request_bytes": max_request_bytes}
    _check_settings(batch_size=batch_size, max_queue=max_queue, timeout=timeout, max_wait=max_wait, **counts)
    if token is not None and not token.strip():
        raise ValueError("reward server: an empty token would let anyone in; give a real one, or none (loopback)")
    if not isinstance(reward, Reward):
        raise TypeError(f"create_app serves a rewards.Reward; got {type(reward).__name__} (use rewards.load first)")
    state: dict[str, _Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = state["batcher"] = _Batcher(reward, batch_size, max_queue, max_wait, device)
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            batcher.close()

    # No interactive docs or schema route: the server answers two routes and nothing else.
    app = FastAPI(title="reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "reward": reward.name,
            "batch_size": batch_size,
            "queue_depth": batcher.waiting if batcher else 0,
            "scoring": batcher.scoring if batcher else 0,
            "max_queue": max_queue,
            "device": str(device if device is not None else getattr(reward, "device", None) or "cpu"),
            "needs_prompts": reward.needs_prompts,
            "takes_metadata": reward.takes_metadata,
            "image_formats": list(IMAGE_FORMATS),
        }

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        if token is not None and not _authorized(request.headers.get("authorization"), token):
            return _error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")
        size = request.headers.get("content-length")
        if size is None or not size.isdigit():
            return _error(411, "send a Content-Length header (the server bounds request sizes)")
        if int(size) > max_request_bytes:
            return _error(413, f"the request has {size} bytes, more than the server's limit of {max_request_bytes}")
        batcher = state["batcher"]
        try:
            job = await _read_job(request, reward, max_queue, max_pixels)
            batcher.submit(job)
        except MalformedRequestError as err:
            return _error(400, str(err))
        except QueueFullError as err:
            return _error(503, str(err))
        try:
            answer = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except asyncio.TimeoutError:
            batcher.abandon(job)  # its images still queued are skipped
            return _error(504, f"no score within the server's timeout of {timeout:g} s (raise --timeout)")
        except asyncio.CancelledError:
            # The server is stopping (uvicorn cancels requests still running after its graceful wait): answer 503,
            # which clients retry on another server, rather than the 500 an unhandled cancellation would give.
            batcher.abandon(job)
            return _error(503, "the reward server is stopping; retry on another server")
        except RewardInputError as err:
            return _error(422, str(err))
        except QueueFullError as err:
            return _error(503, str(err))
        except Exception as err:
            logger.exception("reward %r failed", reward.name)
            return _error(500, f"the reward failed: {type(err).__name__}: {_short(str(err))}")
        return JSONResponse(answer)

    return app


def _check_settings(timeout: float, max_wait: float, **counts: int) -> None:
    """``timeout`` > 0, ``max_wait`` >= 0 seconds, and each of ``counts`` an integer >= 1."""
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"reward server: {name} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"reward server: timeout must be a positive number of seconds, got {timeout!r}")
    if not (math.isfinite(max_wait) and max_wait >= 0):
        raise ValueError(f"reward server: max_wait must be >= 0 seconds, got {max_wait!r}")


def _authorized(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    # compare_digest: the time taken does not tell how much of the token was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _read_job(request: Request, reward: Reward, max_queue: int, max_pixels: int) -> _Job:
    """Parse and check one ``POST /score`` body; images decode in a worker thread, off the event loop."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise MalformedRequestError(
            "POST /score takes multipart/form-data: one 'images' file part per image (PNG or NPZ), a 'prompts' "
            "field (JSON list) and an optional 'metadata' field (JSON list)"
        )
    try:
        form = await request.form(max_files=max_queue + 1, max_fields=16, max_part_size=64 * 1024 * 1024)
    except Exception as err:  # starlette reports a broken or oversized body with its own exception types
        raise MalformedRequestError(
            f"cannot read the multipart body ({err}); a request holds at most --max-queue {max_queue} images"
        ) from None
    try:  # the form spools large parts to temporary files: close it whatever happens
        uploads = form.getlist("images")
        if not uploads:
            raise MalformedRequestError("no 'images' parts in the request")
        if len(uploads) > max_queue:
            raise MalformedRequestError(
                f"the request has {len(uploads)} images, more than the server's --max-queue {max_queue}; send fewer "
                "per request (the remote reward's option batch_size)"
            )
        if any(isinstance(upload, str) for upload in uploads):
            raise MalformedRequestError("'images' must be file parts (PNG or NPZ bytes), not text fields")
        blobs = [await upload.read() for upload in uploads]
        prompts = _parse_json_list(form, "prompts", len(blobs))
        metadata = _parse_json_list(form, "metadata", len(blobs))
        try:
            prompts = check_prompts(prompts, len(blobs), reward.name, required=reward.needs_prompts)
            metadata = None if metadata is None else check_metadata(metadata, len(blobs), reward.name)
        except RewardInputError as err:
            raise MalformedRequestError(str(err)) from None
    finally:
        await form.close()
    images = await asyncio.to_thread(lambda: [decode_image(blob, i, max_pixels) for i, blob in enumerate(blobs)])
    future = asyncio.get_running_loop().create_future()
    # An answer that comes after the request timed out is read here, so asyncio does not log it as lost.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return _Job(images, prompts, metadata, future)


# ---------------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------------


def serve(
    reward: Reward,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    batch_size: int = 8,
    max_queue: int = 256,
    timeout: float = 300.0,
    token: str | None = None,
    device: torch.device | str | None = None,
    max_wait: float = 0.005,
    max_pixels: int = MAX_PIXELS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    log_level: str = "info",
) -> None:
    """Serve ``reward`` over HTTP until interrupted (Ctrl-C); see :func:`create_app` for the settings.

    ``host`` defaults to loopback (only this machine can connect). The token defaults to the environment variable
    :data:`TOKEN_ENV`; a server reachable from other machines without one is warned about.
    """
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    app = create_app(
        reward,
        batch_size=batch_size,
        max_queue=max_queue,
        timeout=timeout,
        token=token,
        device=device,
        max_wait=max_wait,
        max_pixels=max_pixels,
        max_request_bytes=max_request_bytes,
    )
    if host not in LOOPBACK_HOSTS and token is None:
        logger.warning(
            "reward server on %s without a token: anyone who reaches port %d can use it; set --token or %s",
            host,
            port,
            TOKEN_ENV,
        )
    url = f"http://{host}:{port}"
    logger.warning("serving reward %r at %s (client spec: remote:%s)", reward.name, url, url)
    # One access-log line per request would flood the log at training rates: only at debug level.
    access_log = log_level == "debug"
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5)


class BackgroundServer:
    """A server in a thread of this process, for tests, benchmarks and notebooks (a context manager).

    ``port=0`` takes a free port; :attr:`url` is the address once started.

    Example:
        >>> with BackgroundServer(create_app(rewards.load("jpeg_compressibility"))) as server:
        ...     remote = rewards.load(f"remote:{server.url}")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.host, self.start_timeout = host, start_timeout
        self.thread = threading.Thread(target=self.server.run, name="reward-server-http", daemon=True)
        self.url = ""

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start within {self.start_timeout:g} s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float = 10.0, force: bool = False) -> None:
        """Stop serving; ``force`` does not wait for requests in progress (they are answered 503)."""
        self.server.force_exit = force
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_option_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``["path=/models/x", "scale=0.5"]`` -> ``{"path": "/models/x", "scale": 0.5}`` (values read as JSON when
    they are JSON, else kept as text), for ``--option key=value`` on a command line."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {pair!r} must look like key=value, e.g. path=/models/PickScore_v1")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return options
