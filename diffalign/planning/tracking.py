"""Live tensor-storage accounting: the peak of the bytes held by live tensors while some code runs.

:class:`StorageTracker` is a ``TorchDispatchMode``: every aten op's output storage that is new (not one of the op's
inputs' storages, not already counted) is counted with its size, and a ``weakref.finalize`` on the storage
subtracts it when the last tensor using it dies (torch keeps one Python object per live storage, so the finalizer
fires with the storage itself). It works on any device, the meta device included, where it measures what a run
*would* hold without allocating anything. It sees tensor storage only: memory a kernel allocates inside itself
(a cuBLAS workspace) and allocator rounding are not counted, which is what ``torch.cuda.max_memory_allocated``
reports up to that rounding.

Used by :mod:`diffalign.planning.costs` on the meta device, and by the tests to measure real CPU training steps::

    with StorageTracker(count_existing=True) as tracker:   # start from every tensor alive now
        trainer.train_step(1)
    tracker.peak                                           # bytes
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


__all__ = ["StorageTracker", "live_storages"]


def live_storages() -> list[torch.UntypedStorage]:
    """The distinct storages of every tensor the garbage collector can see (parameters, buffers, gradients,
    optimizer states, anything a Python object holds)."""
    seen: dict[int, torch.UntypedStorage] = {}
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes among the objects
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if obj.is_meta:  # holds nothing
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            continue
        seen.setdefault(id(storage), storage)
    return list(seen.values())


class StorageTracker(TorchDispatchMode):
    """Count live tensor storage while the mode is active; :attr:`peak` is the most bytes live at once.

    Args:
        count_existing: start from every storage alive when the mode is entered (:func:`live_storages`; they are
            subtracted when freed), so that :attr:`peak` is the process's whole tensor memory; ``False`` counts
            only what the tracked code allocates.

    Attributes:
        current: bytes counted and still alive.
        peak: the largest ``current`` seen (:meth:`reset_peak` sets it back to ``current``).
        baseline: bytes alive when the mode was entered (``count_existing``), else 0.
    """

    def __init__(self, count_existing: bool = False) -> None:
        super().__init__()
        self.count_existing = count_existing
        self.current = 0
        self.peak = 0
        self.baseline = 0
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> StorageTracker:
        if self.count_existing:
            for storage in live_storages():
                self._add(storage)
            self.baseline = self.current
        return super().__enter__()

    def reset_peak(self) -> None:
        """Forget the peak so far: it restarts at what is alive now."""
        self.peak = self.current

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        with self._lock:
            if key in self._sizes:
                return
            size = storage.nbytes()
            self._sizes[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key).atexit = False

    def _release(self, key: int) -> None:
        with self._lock:
            self.current -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage (an in-place op, a view) is no new memory.
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in inputs:
                    self._add(storage)
        return out
