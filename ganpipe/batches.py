"""The real batches of one training rank, delivered on the training device (ganpipe.trainer).

Why: gathering a batch from memory-mapped shards, converting it to float and scaling it on the
CPU, synchronously, costs more than a DCGAN step on a modern GPU at 64 px. So:

- a batch travels as stored, uint8 for images (a quarter of float32's bytes), from pinned
  memory with a non-blocking copy on CUDA, and is mapped to network space on the device
  (ganpipe.networks.space, the same function as before, so the same numbers);
- the next batches are gathered while the current step runs: a background thread fills a queue
  of `train.prefetch` batches (0: gathered in the step, as before);
- on CUDA, a dataset that fits in `train.data_on_device_fraction` of the device's memory is copied
  there once, and a batch is an index into it (no host work at all). On CPU the memory map is
  already that cache, so this mode is never chosen there (tests force it to check its batches).

Whatever the mode, the batches are the sampler's, in the sampler's order: the prefetching thread
owns the sampler and runs ahead of the step, each queued batch carrying the sampler's position
after it, and `state_dict()` is the position after the last batch the step CONSUMED. A checkpoint
therefore resumes at the first batch not trained on, bitwise as an uninterrupted run would
(batches prefetched but not consumed are gathered again after a resume). Every draw, the
discriminator's and the relativistic generator update's own, goes through the one `next()`, so
the sequence is the same in every mode.
"""

from __future__ import annotations

import queue
import sys
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ganpipe.data import PreparedData
from ganpipe.networks import NetworkSpec, to_network_space
from ganpipe.recipe import BatchSampler

Mode = Literal["sync", "prefetch", "device"]
RESIDENT_CHUNK_ROWS = 8192  # rows per host-to-device copy when caching a dataset on the device
POLL_S = 0.1  # how often a blocked producer checks that it should stop


@dataclass
class HostBatch:
    """One gathered batch in data units on the host, and the sampler's position after it."""

    rows: torch.Tensor  # uint8 NHWC images or float32 vectors; pinned on CUDA
    labels: torch.Tensor | None
    position: dict[str, int]


def choose_mode(data: PreparedData, device: torch.device, prefetch: int, fraction: float) -> tuple[Mode, str | None]:
    """The data path for this device and dataset, and a line to log when the on-device cache was
    wanted but the dataset does not fit (not an error: prefetching serves it)."""
    fallback: Mode = "prefetch" if prefetch else "sync"
    if device.type != "cuda" or fraction <= 0:
        return fallback, None
    capacity = torch.cuda.get_device_properties(device).total_memory
    if data.nbytes <= fraction * capacity:
        return "device", None
    return fallback, (f"data: the prepared data ({data.nbytes / 2**30:.2f} GiB) exceeds train.data_on_device_fraction "
                      f"{fraction:g} of {device}'s {capacity / 2**30:.1f} GiB; reading it from the memory map"
                      + (f" with {prefetch} batch(es) prefetched" if prefetch else ""))


class RealBatches:
    """`next()` -> (x, labels or None) on `device`: x in network space and `memory_format`,
    labels only for a conditional spec. Call `close()` when done (the thread is a daemon too)."""

    def __init__(self, data: PreparedData, sampler: BatchSampler, spec: NetworkSpec, device: torch.device,
                 memory_format: torch.memory_format, mode: Mode, prefetch: int = 2):
        self.data, self.sampler, self.spec, self.device = data, sampler, spec, device
        self.memory_format, self.mode, self.depth = memory_format, mode, max(1, prefetch)
        self.pinned = device.type == "cuda"
        self.position = sampler.state_dict()  # after the last batch consumed
        self.resident = self._copy_to_device() if mode == "device" else None
        self._queue: queue.Queue[HostBatch | BaseException] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- what the trainer calls --------------------------------------------------------------
    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.resident is not None:
            rows, labels = self._index_resident(self.sampler.next_indices())
            self.position = self.sampler.state_dict()
        else:
            batch = self._from_queue() if self.mode == "prefetch" else self._gather()
            self.position = batch.position
            rows = batch.rows.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device, non_blocking=True) if batch.labels is not None else None
        x = to_network_space(rows, self.spec)
        if self.spec.is_image:
            # A copy in the training memory format, not `.contiguous()`: with C = 1, NHWC strides also
            # count as contiguous and torch picks conv kernels by strides (runs from before
            # networks.space had NCHW batches and must resume bit for bit: tests/test_compat.py).
            x = x.clone(memory_format=self.memory_format)
        return x, (labels if self.spec.conditional else None)

    def state_dict(self) -> dict[str, int]:
        """The sampler's position after the last batch consumed (not the last prefetched)."""
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after `state` (a checkpoint's): batches prefetched from before are dropped."""
        self.close()
        self.sampler.load_state_dict(state)
        self.position = self.sampler.state_dict()

    def close(self) -> None:
        """Stop the prefetching thread (it is restarted by the next `next()`)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue = None, None
        self._stop.clear()

    # --- gathering on the host -----------------------------------------------------------------
    def _gather(self) -> HostBatch:
        indices = self.sampler.next_indices()
        position = self.sampler.state_dict()
        rows = torch.empty((len(indices), *self.data.row_shape), dtype=torch_dtype(self.data.dtype),
                           pin_memory=self.pinned)
        _, labels = self.data.gather(indices, out=rows.numpy())
        label_tensor = torch.from_numpy(labels) if labels is not None and self.spec.conditional else None
        if label_tensor is not None and self.pinned:
            label_tensor = label_tensor.pin_memory()
        return HostBatch(rows, label_tensor, position)

    def _from_queue(self) -> HostBatch:
        if self._thread is None:
            self.data.open_shards()  # before the thread shares the dataset (PreparedData's note on threads)
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._produce, name="ganpipe-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def _produce(self) -> None:
        """The thread: gather batches in the sampler's order until told to stop. Its failure is
        handed to the step, which raises it."""
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                item: HostBatch | BaseException = self._gather()
            except BaseException as exc:  # noqa: BLE001 - raised again in the training thread
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    # --- the dataset on the device ---------------------------------------------------------------
    def _copy_to_device(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole dataset as stored, on the device, copied in chunks (bounded host memory)."""
        n = self.data.num_records
        rows = None
        labels = None
        start = 0
        for chunk, chunk_labels in self.data.chunks(RESIDENT_CHUNK_ROWS):
            if rows is None:
                rows = torch.empty((n, *chunk.shape[1:]), dtype=torch_dtype(chunk.dtype), device=self.device)
            rows[start:start + len(chunk)] = torch.from_numpy(chunk).to(self.device)
            if chunk_labels is not None and self.spec.conditional:
                if labels is None:
                    labels = torch.empty(n, dtype=torch_dtype(chunk_labels.dtype), device=self.device)
                labels[start:start + len(chunk)] = torch.from_numpy(chunk_labels).to(self.device)
            start += len(chunk)
        assert rows is not None
        return rows, labels

    def _index_resident(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.resident is not None
        rows, labels = self.resident
        index = torch.from_numpy(indices).to(self.device, non_blocking=True)
        return rows.index_select(0, index), (labels.index_select(0, index) if labels is not None else None)


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def real_batches(data: PreparedData, sampler: BatchSampler, spec: NetworkSpec, device: torch.device,
                 memory_format: torch.memory_format, prefetch: int, fraction: float, log: bool) -> RealBatches:
    """The data path the config asks for on this device (`choose_mode`), logging a fallback on
    the main process (`log`)."""
    mode, note = choose_mode(data, device, prefetch, fraction)
    if note and log:
        print(note, file=sys.stderr, flush=True)
    return RealBatches(data, sampler, spec, device, memory_format, mode, prefetch)
