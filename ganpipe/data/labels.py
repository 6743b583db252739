"""Validate a table's label and value columns: labels become contiguous class ids with their names
kept, vector values become float64 with a mask of the bad ones (which ingest reports or skips).

Neither datasets nor pyarrow is imported at the top: decode workers import this package.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LABEL_NAMES = ("label", "labels", "class", "target", "y", "category")


class Labels:
    """Validates labels and maps them to contiguous ids, keeping class names.

    ClassLabel columns keep their names and order; declared `data.classes` win over both; strings and
    integers otherwise get ids in sorted order once every label has been seen (the label shards are
    written with provisional ids and remapped at the end)."""

    def __init__(self, feature: Any, declared: list[str] | None):
        import datasets

        self.names: list[str] | None = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self.declared = declared
        self.seen: dict[str, int] = {}  # provisional ids, in order of first appearance
        self.numeric = True

    def provisional_id(self, value: Any) -> tuple[int | None, str | None]:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None, "missing label"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if self.names is not None:
            if value == -1:  # datasets' ClassLabel marks a missing label with -1
                return None, "missing label (-1)"
            if not isinstance(value, int) or not 0 <= value < len(self.names):
                return None, f"label {value!r} outside the ClassLabel's {len(self.names)} classes"
            name = self.names[value]
        elif self.declared is not None and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(self.declared):
                return None, f"label {value} outside data.classes (ids 0..{len(self.declared) - 1})"
            name = self.declared[value]
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            self.numeric &= isinstance(value, int)
            name = str(value)
        else:
            return None, f"label {value!r} is not an integer or a string"
        if self.declared is not None and name not in self.declared:
            return None, f"label {name!r} not in data.classes"
        return self.seen.setdefault(name, len(self.seen)), None

    def final_names(self) -> list[str]:
        if self.declared is not None:
            return list(self.declared)
        if self.names is not None:
            return list(self.names)
        return sorted(self.seen, key=int) if self.numeric else sorted(self.seen)

    def remap(self) -> np.ndarray:
        """provisional id -> final id."""
        final = {name: i for i, name in enumerate(self.final_names())}
        remap = np.zeros(max(len(self.seen), 1), dtype=np.int64)
        for name, provisional in self.seen.items():
            remap[provisional] = final[name]
        return remap

def numeric(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, mask of the non-numeric ones) of an Arrow column. Numbers stored as text
    (CSV) count as numbers; booleans, empty cells, NaN and infinities do not."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = np.array([_parse_float(v) for v in column.to_pylist()], dtype=np.float64)
    else:
        values = np.full(len(column), np.nan)
    problems = ~np.isfinite(values)
    values[problems] = 0.0
    return values, problems


def _parse_float(text: str | None) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan

