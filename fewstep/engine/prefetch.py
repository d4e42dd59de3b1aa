"""Batches made ahead of the step that uses them, on a background thread.

The data source's `batches()` iterator runs on a thread of its own, `depth` batches ahead of the training step;
on a CUDA device each CPU tensor of a batch is copied into pinned (page-locked) memory and sent to the device with
a non-blocking copy, so the step never waits for the data pipeline or for a host-to-device copy, and no copy from
pageable memory synchronises the host. Tensors already on the device (an in-memory data set the source keeps
there) pass through untouched.

The first batch is made on the calling thread, before the thread starts: whatever the source does when its
stream starts (a DataLoader drawing its base seed from the global RNG, say) happens where it did without
prefetching, so the run's random numbers do not depend on thread timing. The batches and their order are those
of `batches()` itself: sources make them from (seed, step) only (DataSource.batches), so running ahead changes
no value. An exception in the source is raised by the `next()` that would have returned that batch.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import torch

from ..interfaces import Batch


class _End:
    def __init__(self, exc: BaseException | None = None):
        self.exc = exc


def to_device(b: Batch, device: torch.device, pin: bool) -> Batch:
    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if pin and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return Batch(move(b.x), None if b.y is None else move(b.y), {k: move(v) for k, v in b.cond.items()})


class Prefetcher:
    """An iterator over `batches` (already on `device`), made `depth` batches ahead on a daemon thread."""

    def __init__(self, batches: Iterator[Batch], device: Any, depth: int = 2):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pin = self.device.type == "cuda"
        self._it = batches
        self._first: Batch | None = to_device(next(batches), self.device, self.pin)  # on this thread (see above)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fewstep-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            for b in self._it:
                if not self._put(to_device(b, self.device, self.pin)):
                    break
            else:
                self._put(_End())
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised by its next()
            self._put(_End(exc))
        finally:
            close = getattr(self._it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - a source that cannot close is not the run's failure
                    pass

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self._first is not None:
            b, self._first = self._first, None
            return b
        item = self._q.get()
        if isinstance(item, _End):
            self._q.put(item)  # every later next() ends the same way
            if item.exc is not None:
                raise item.exc
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making) and drop the batches made ahead."""
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
