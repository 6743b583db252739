"""`ganpipe generate`: samples of one generator to a .png grid, a .npy array or a .parquet table.

Row i has the seed `ganpipe export` gives row i, so either command regenerates the other's rows.
.npy and .parquet are written as they are generated (a memory-mapped array, parquet row groups):
memory does not grow with the number of rows. The file is staged next to its target and renamed
into place when complete, so a failed or interrupted run leaves the previous file (or none).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganpipe.errors import UserError
from ganpipe.generators import load_generator
from ganpipe.networks import NetworkSpec, generate
from ganpipe.previews import save_grid
from ganpipe.synthetic_rows import hf_features, row_seed, shard_table

SUFFIXES = (".png", ".npy", ".parquet")
MAX_GRID_IMAGES = 4096  # a grid larger than this is no longer a picture anyone looks at
CHUNK_ROWS = 4096  # rows generated (and held in memory) at a time: a multiple of generate's batch


@dataclass
class Chunk:
    """Consecutive rows: their indices, labels (conditional models), seeds and samples."""

    indices: np.ndarray
    labels: np.ndarray | None
    seeds: np.ndarray
    samples: torch.Tensor


def parse_labels(text: str | None, spec: NetworkSpec) -> list[int] | None:
    """`--labels 3,7` or class names: ids into spec.classes. None when not given."""
    if text is None:
        return None
    if not spec.conditional:
        raise UserError("--labels: this model is unconditional")
    names = list(spec.classes)
    labels = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in names:
            labels.append(names.index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < spec.num_classes:
            labels.append(int(item))
        else:
            raise UserError(f"--labels: {item[:100]!r} is not a class of this model "
                            f"(ids 0..{spec.num_classes - 1} or names {', '.join(names)[:300]})")
    if not labels:
        raise UserError("--labels: no labels given")
    return labels


def check_request(out: Path, num_images: int, seed: int, truncation: float | None) -> None:
    """Bad arguments are exit 2 before any model is loaded."""
    if out.suffix not in SUFFIXES:
        raise UserError(f"--out {out}: expected a .png, .npy or .parquet file")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; expected a file name ending in {out.suffix}")
    parent = out.absolute().parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--out {out}: {folder} is a file, not a folder")
            break
    if num_images < 1:
        raise UserError("--num-images must be at least 1")
    if out.suffix == ".png" and num_images > MAX_GRID_IMAGES:
        raise UserError(f"--num-images {num_images}: a .png grid holds at most {MAX_GRID_IMAGES} images; "
                        "write .npy or .parquet (streamed) for more")
    if not 0 <= seed < 2**31:
        raise UserError(f"--seed {seed}: expected 0 <= seed < 2**31")
    if truncation is not None and not truncation > 0:
        raise UserError(f"--truncation {truncation}: expected a positive number")


def refuse_image_to_image(spec: NetworkSpec, key: str, command: str) -> None:
    """Seed-based commands cannot drive a generator that takes images (super-resolution)."""
    if spec.image_to_image:
        raise UserError(f"{key}: a {spec.family} generator super-resolves images; `ganpipe {command}` samples "
                        "from seeds and does not apply to it (see README, Super-resolution)")


def generate_to_file(model: str, out: Path, num_images: int, seed: int = 0, labels_text: str | None = None,
                     truncation: float | None = None) -> dict[str, Any]:
    """Write `num_images` samples of `model` to `out`; returns the contract's result."""
    check_request(out, num_images, seed, truncation)
    loaded = load_generator(model)
    spec = loaded.spec
    refuse_image_to_image(spec, "--model", "generate")
    if out.suffix == ".png" and not spec.is_image:
        raise UserError("--out .png needs an image model; use .npy or .parquet for vectors")
    labels = parse_labels(labels_text, spec)
    if spec.conditional:  # the given labels (default: every class) cycled over the rows
        labels = labels or list(range(spec.num_classes))

    def chunks() -> Iterator[Chunk]:
        for start in range(0, num_images, CHUNK_ROWS):
            indices = np.arange(start, min(start + CHUNK_ROWS, num_images), dtype=np.int64)
            chunk_labels = np.asarray([labels[i % len(labels)] for i in indices]) if labels else None
            seeds = row_seed(seed, indices)
            samples = generate(loaded.generator, spec, seeds.tolist(),
                               chunk_labels.tolist() if chunk_labels is not None else None, truncation=truncation)
            yield Chunk(indices, chunk_labels, seeds, samples)

    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staged = out.absolute().parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        if out.suffix == ".png":
            save_grid(torch.cat([chunk.samples for chunk in chunks()]), staged.with_suffix(".png"))
            staged.with_suffix(".png").replace(staged)
        elif out.suffix == ".npy":
            write_npy(staged, num_images, chunks())
        else:
            write_parquet(staged, spec, chunks())
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
        staged.with_suffix(".png").unlink(missing_ok=True)
    return {"out": str(out), "num_images": num_images, "model": loaded.source.get("model_uri")}


def write_npy(path: Path, num_rows: int, chunks: Iterator[Chunk]) -> None:
    """One .npy through a memory map: the shape and dtype come from the first chunk."""
    array = None
    for chunk in chunks:
        values = chunk.samples.numpy()
        if array is None:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=values.dtype,
                                              shape=(num_rows, *values.shape[1:]))
        array[chunk.indices[0]:chunk.indices[-1] + 1] = values
    if array is not None:
        array.flush()


def write_parquet(path: Path, spec: NetworkSpec, chunks: Iterator[Chunk]) -> None:
    """A parquet file with one row group per chunk, in the schema `ganpipe export` writes."""
    import pyarrow.parquet as pq  # deferred: pyarrow adds start-up time to every .npy and .png call

    with pq.ParquetWriter(path, hf_features(spec).arrow_schema) as writer:
        for chunk in chunks:
            writer.write_table(shard_table(spec, chunk.samples, chunk.labels, chunk.seeds, chunk.indices, None))
