"""The decode process pool: ingest's image decoding, in worker processes once a source is large
enough to pay for their start-up and inline before that, in tasks of bounded size (the caller
bounds how many are in flight).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from ganpipe.data.decode import (
    ImageSpec,
    Record,
    decode_chunk,
    decode_native_chunk,
    decode_paired_chunk,
    warm_up,
)

CHUNK_BYTES = 16 << 20  # bytes (encoded in + decoded out) per decode task: large images do not pile up
PARALLEL_MIN_RECORDS = 2048  # below this, worker processes cost more than they save


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, a container's cpuset), which can be
    fewer than the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_tasks(indices: np.ndarray, records: list[Record], spec: ImageSpec) -> list[np.ndarray]:
    """Split a batch's record indices into decode tasks of about CHUNK_BYTES at most, counting each
    record's encoded bytes and its decoded image."""
    decoded = spec.resolution * spec.resolution * spec.channels
    sizes = np.array([len(records[i][0] or b"") + decoded for i in indices], dtype=np.int64)
    task = np.cumsum(sizes) // CHUNK_BYTES
    return [indices] if not len(task) or task[-1] == 0 else [indices[task == t] for t in np.unique(task)]


class DecodePool:
    """Runs `decode_chunk` in worker processes, or inline while a source is too small to pay for them.

    Workers start on `start()`, or once PARALLEL_MIN_RECORDS rows have gone through inline (for
    streams of unknown length): a tiny dataset never pays for process start-up."""

    def __init__(self, workers: int, start: bool = False):
        self.workers = workers
        self.seen = 0
        self.executor: ProcessPoolExecutor | None = None
        if start:
            self.start()

    def start(self) -> None:
        if self.executor is not None or self.workers <= 1:
            return
        # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
        self.executor = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        for _ in range(self.workers):  # start every worker now (each submit starts at most one)
            self.executor.submit(warm_up)

    def submit(self, records: list[Record] | list[tuple[Record, Record]], spec: ImageSpec) -> Future:
        self.seen += len(records)
        if self.seen > PARALLEL_MIN_RECORDS:
            self.start()
        decode = decode_paired_chunk if spec.pair_scale else decode_native_chunk if spec.resize == "native" \
            else decode_chunk
        if self.executor is not None:
            return self.executor.submit(decode, records, spec)
        done: Future = Future()
        done.set_result(decode(records, spec))
        return done

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

