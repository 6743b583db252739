"""Feature extraction split across Accelerate processes: each takes a contiguous range of the
samples, and the ranges are gathered back in rank order, so the result is row for row what one
process would have produced (no sample twice, none missing)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def shard(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """Process `rank`'s range [start, stop): sizes differ by at most one and tile [0, num_samples)."""
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows(accelerator: Any, local: np.ndarray, num_samples: int) -> np.ndarray:
    """All processes' rows in rank order. `accelerator.gather` needs equal shapes, so each range is
    padded to the longest, gathered, and trimmed back to its known length."""
    world = accelerator.num_processes
    sizes = [stop - start for start, stop in (shard(num_samples, r, world) for r in range(world))]
    assert len(local) == sizes[accelerator.process_index], "local rows do not match this process's range"
    longest = max(sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=torch.from_numpy(local[:0]).dtype)
    padded[:len(local)] = torch.from_numpy(np.ascontiguousarray(local))
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu()
    return torch.cat([gathered[r * longest:r * longest + size] for r, size in enumerate(sizes)]).numpy()
