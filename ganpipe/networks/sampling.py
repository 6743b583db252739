"""Sampling: per-seed latent streams and `generate`, shared by training previews, the CLI,
evaluation, export and the MLflow model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .space import from_network_space
from .spec import NetworkSpec


class _SeedStreams:
    """A standard-normal stream per seed, a function of the seed alone.

    Seeds in [0, 2**32) use torch's CPU generator. That generator keeps only the low 32 bits of a
    seed, so wider seeds (export rows use seed * 2**32 + index) would repeat the same latents for
    every export seed; they use numpy's Philox keyed by all 64 bits instead (a counter-based
    generator: distinct keys give independent streams). One Philox is re-keyed per seed because
    building one costs several times more than the draw."""

    def __init__(self) -> None:
        self.torch_generator = torch.Generator()
        self.philox = np.random.Philox(0)
        self.numpy_generator = np.random.Generator(self.philox)
        self.wide = False

    def start(self, seed: int) -> None:
        self.wide = not 0 <= seed < 2**32
        if not self.wide:
            self.torch_generator.manual_seed(seed)
            return
        self.philox.state = {"bit_generator": "Philox",
                             "state": {"counter": np.zeros(4, np.uint64),
                                       "key": np.array([seed % 2**64, 0], np.uint64)},
                             "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}

    def normal(self, n: int) -> torch.Tensor:
        if self.wide:
            return torch.from_numpy(self.numpy_generator.standard_normal(n, dtype=np.float32))
        return torch.randn(n, generator=self.torch_generator)


def latents_for_seeds(seeds: list[int] | torch.Tensor, latent_dim: int,
                      truncation: float | None = None) -> torch.Tensor:
    """One latent per seed, each from its own stream: a sample depends on its seed alone,
    never on the batch it was generated in. With `truncation`, values beyond it are redrawn
    from the same stream (the truncation trick), so the result is still a function of the seed."""
    out = torch.empty(len(seeds), latent_dim)
    streams = _SeedStreams()
    for i, seed in enumerate(seeds):
        streams.start(int(seed))
        z = streams.normal(latent_dim)
        if truncation is not None:
            for _ in range(1000):
                outside = z.abs() > truncation
                if not outside.any():
                    break
                z[outside] = streams.normal(int(outside.sum()))
            z.clamp_(-truncation, truncation)
        out[i] = z
    return out


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows appended up to `rows`: see `generate` for why every pass has one shape."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


@torch.no_grad()
def generate(generator: nn.Module, spec: NetworkSpec, seeds: list[int], labels: list[int] | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu",
             truncation: float | None = None, on_device: bool = False) -> torch.Tensor:
    """Samples for `seeds` (and `labels` for conditional models) in data units, on the CPU, or
    with `on_device` (images only) left on `device` (see `from_network_space`).

    Every forward pass sees exactly `batch_size` rows (the last chunk is padded with zeros): CPU
    kernels (MKL, oneDNN) choose their blocking, and so their summation order, by the batch's
    shape, so a row generated alone could differ in the last bit from the same row in a batch of
    300. With one shape, a sample is bit-identical however many rows are generated with it."""
    if spec.image_to_image:
        raise ValueError(f"a {spec.family} generator maps images to images: it does not sample from seeds")
    if spec.conditional and labels is None:
        raise ValueError("a conditional generator needs one label per seed")
    outputs = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        # Non-blocking: a blocking copy to a GPU would wait for the previous batch's work to finish.
        z = pad_rows(latents_for_seeds(chunk, spec.latent_dim, truncation), batch_size).to(device, non_blocking=True)
        y = pad_rows(torch.as_tensor(labels[start:start + batch_size]), batch_size).to(device, non_blocking=True) \
            if spec.conditional else None
        outputs.append(from_network_space(generator(z, y)[:len(chunk)], spec, on_device))
    return torch.cat(outputs) if outputs else torch.empty(0)
