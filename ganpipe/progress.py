"""Progress of a long job (training steps, exported rows) with its rate and ETA: a tqdm bar on a
terminal; plain lines on stderr otherwise, for logs and Prefect, which parse some of them (the
training's `step N/M ... eta=` lines feed the flow's progress artifact)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

Values = dict[str, float]


class Progress:
    """`position` of `total`, from `start`. Each caller formats its own plain lines (`line`);
    they are printed every `every` seconds and at the end, or, with `every=None`, whenever
    `values` (e.g. losses) come with a move. On a terminal the `bar_keys` of the values are shown
    beside the bar."""

    def __init__(self, total: int, desc: str, unit: str, line: Callable[[Progress, Values | None], str], *,
                 enabled: bool = True, start: int = 0, every: float | None = None,
                 bar_keys: tuple[str, ...] = ()):
        self.total, self.line, self.enabled, self.every, self.bar_keys = total, line, enabled, every, bar_keys
        self.position = self.start = start
        self.started, self.last_line = time.time(), 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # only on a terminal

            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = time.time() - self.started
        return (self.position - self.start) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        """Seconds left at the current rate (nan while unknown)."""
        rate = self.rate
        return (self.total - self.position) / rate if rate > 0 else float("nan")

    def advance(self, n: int) -> None:
        self.move_to(self.position + n)

    def move_to(self, position: int, values: Values | None = None) -> None:
        self.position = position
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(position - self.bar.n)
            if values and self.bar_keys:
                self.bar.set_postfix({k: f"{values[k]:.3g}" for k in self.bar_keys if k in values})
            return
        now = time.time()
        due = values is not None if self.every is None else \
            now - self.last_line >= self.every or position >= self.total
        if due:
            self.last_line = now
            print(self.line(self, values), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """H:MM:SS, or ? when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
