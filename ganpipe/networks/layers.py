"""Building blocks shared by the network families: conditional batch norm, label embeddings,
optional spectral norm, PacGAN packing, and the resolution pyramid and channel widths of the
convolutional families."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

STRENGTH = "condition_strength"


def add_condition_strength(module: nn.Module) -> None:
    """Give a module that takes labels the scalar it multiplies their effect by (1: fully
    conditional, 0: the labels do nothing), which training moves along `train.condition_ramp`.
    A buffer rather than a float: it follows .to() and the EMA copy, and torch.compile does not
    recompile as it changes. Not persistent: checkpoints and exported weights are unchanged, and
    a loaded network runs at full strength."""
    module.register_buffer(STRENGTH, torch.ones(()), persistent=False)


def condition_strengths(*networks: nn.Module) -> list[torch.Tensor]:
    """The label-strength buffers of every module of `networks` that has one (fill them to set it)."""
    return [buffer for network in networks for module in network.modules()
            for name, buffer in module.named_buffers(recurse=False) if name == STRENGTH]


def set_condition_strength(value: float, *networks: nn.Module) -> None:
    """Set the label strength of every module of `networks` that takes labels."""
    for buffer in condition_strengths(*networks):
        buffer.fill_(value)


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class (conditional BN, as in BigGAN).
    At label strength s the scale is s * gain + (1 - s) and the shift s * bias: plain batch norm
    at 0, exactly the per-class values at 1."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)
        add_condition_strength(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = self.condition_strength
        gain, bias = self.gain(labels) * s + (1 - s), self.bias(labels) * s
        return self.norm(x) * gain[:, :, None, None] + bias[:, :, None, None]


def batch_norm(channels: int, num_classes: int) -> nn.Module:
    """Conditional batch norm for a class-conditional generator (num_classes > 0), else plain."""
    return ConditionalBatchNorm2d(channels, num_classes) if num_classes else nn.BatchNorm2d(channels)


def normalise(norm: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Apply a batch norm that is conditional (takes the labels) or plain (does not)."""
    return norm(x, labels) if isinstance(norm, ConditionalBatchNorm2d) else norm(x)


def label_embedding_dim(num_classes: int) -> int:
    """Width of a generator's label embedding: enough to tell the classes apart, at most 64."""
    return min(64, max(8, num_classes))


def spectral_norm_if(enabled: bool) -> Callable[[nn.Module], nn.Module]:
    """`spectral_norm` when enabled, else the identity: wrap each layer in the returned function.
    (torch's parametrization, so the weights' state_dict keys are torch's `parametrizations.weight.*`.)"""
    return spectral_norm if enabled else (lambda module: module)


def pack(x: torch.Tensor, group: int) -> torch.Tensor:
    """PacGAN: judge `group` samples at once, so a collapsed generator is easier to spot."""
    if group == 1:
        return x
    if x.shape[0] % group:
        raise ValueError(f"batch of {x.shape[0]} is not divisible by model.pack={group}")
    return x.reshape(x.shape[0] // group, group * x.shape[1], *x.shape[2:])


def pyramid(resolution: int, lowest: int, highest: int, family: str) -> list[int]:
    """The feature-map sizes 4, 8, ..., `resolution` of a family that grows images from 4x4.
    A size it cannot build is a ValueError naming data.resolution (the key that sets it)."""
    if resolution & (resolution - 1) or not lowest <= resolution <= highest:
        raise ValueError(f"data.resolution: {family} needs a power of two in [{lowest}, {highest}], got {resolution}")
    return [2**k for k in range(2, resolution.bit_length())]


def channel_width(base: int, resolution: int, image_resolution: int, cap: int = 16) -> int:
    """BigGAN's width schedule: `base` channels at the image's own size, twice as many at each
    halving below it, at most `cap` x base: small maps are cheap, so they get the most channels."""
    return base * min(cap, image_resolution // resolution)
