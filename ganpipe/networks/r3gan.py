"""The R3GAN family (Huang et al., NeurIPS 2024, "The GAN is dead; long live the GAN!"): a
modernised ResNet without any normalisation layer, trained with the relativistic loss plus R1
and R2 (the training options; this module is the networks).

- Residual blocks are inverted bottlenecks: 1x1 expand by `r3gan_expansion`, grouped 3x3
  convolution (`r3gan_group_size` channels per group), 1x1 project back, leaky ReLU (0.2) after
  the first two; the identity path carries no activation.
- Fix-up initialisation: with L blocks in the network and m = 3 layers per branch, the first two
  layers are He-initialised with gain L^(-1/(2m-2)) = L^(-1/4) and the last one is zero, so every
  fresh block is the identity and the network's depth does not blow up its output variance.
- Resampling is fixed and bilinear: upsampling by bilinear interpolation, downsampling by the
  [1, 3, 3, 1] low-pass filter then decimation, with 1x1 convolutions where the width changes.
  No learned transposed convolutions.
- The generator modulates a learned 4x4 basis channel-wise by a linear map of the latent (the
  label's embedding concatenated to it); the discriminator mirrors it down to 4x4, where a
  depthwise 4x4 convolution and a linear map give the logit, or, conditional, the features whose
  dot product with the label's embedding is the logit (R3GAN's projection).

Differences from the paper's code, on purpose: the generator ends in tanh, as every ganpipe
family does (network space is [-1, 1]); convolutions carry the bias that the paper adds in its
fused activation (the same function); widths follow `layers.channel_width` instead of presets.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .layers import channel_width, pack, pyramid
from .spec import NetworkSpec

RESOLUTIONS = (16, 256)
LEAK = 0.2
ACTIVATION_GAIN = math.sqrt(2.0 / (1.0 + LEAK**2))  # He gain of a leaky ReLU
LAYERS_PER_BRANCH = 3


def he(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """Variance-preserving normal initialisation (std = gain / sqrt(fan-in)); zero bias. gain 0
    zeroes the weights: the last layer of a fix-up branch."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def groups_for(channels: int, group_size: int) -> int:
    """Number of groups of the 3x3 convolution over `channels` (one group when there are fewer
    channels than a group holds)."""
    size = min(group_size, channels)
    if channels % size:
        raise ValueError(f"model.r3gan_group_size: {group_size} does not divide the expanded width {channels} "
                         f"(a stage's width x model.r3gan_expansion)")
    return channels // size


def r3gan_widths(spec: NetworkSpec, base: int) -> tuple[list[int], list[int]]:
    """(sizes 4..resolution, the width at each), checked: resolution, no attention, and group
    sizes that divide every expanded width, so a bad spec fails before anything is built."""
    resolution = spec.sample_shape[1]
    sizes = pyramid(resolution, *RESOLUTIONS, "r3gan")
    if spec.attention_resolution:
        raise ValueError("model.attention_resolution: r3gan has no attention layers (set 0)")
    widths = [channel_width(base, size, resolution) for size in sizes]
    for width in widths:
        groups_for(width * spec.r3gan_expansion, spec.r3gan_group_size)
    return sizes, widths


def check(spec: NetworkSpec) -> None:
    r3gan_widths(spec, spec.g_width)
    r3gan_widths(spec, spec.d_width)


class ResidualBlock(nn.Module):
    """x + project(act(grouped(act(expand(x))))): an inverted bottleneck, fix-up initialised."""

    def __init__(self, channels: int, expansion: int, group_size: int, total_blocks: int):
        super().__init__()
        expanded = channels * expansion
        gain = ACTIVATION_GAIN * total_blocks ** (-1.0 / (2 * LAYERS_PER_BRANCH - 2))
        self.expand = he(nn.Conv2d(channels, expanded, 1), gain)
        self.grouped = he(nn.Conv2d(expanded, expanded, 3, 1, 1, groups=groups_for(expanded, group_size)), gain)
        self.project = he(nn.Conv2d(expanded, channels, 1, bias=False), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.expand(x), LEAK)
        y = F.leaky_relu(self.grouped(y), LEAK)
        return x + self.project(y)


def low_pass_downsample(x: torch.Tensor) -> torch.Tensor:
    """2x downsampling through R3GAN's [1, 3, 3, 1] low-pass filter (bilinear's antialiasing
    filter at this scale) as a fixed depthwise convolution: unlike interpolate(antialias=True) it
    runs in bf16 on CPUs, is deterministic on GPUs, and is twice differentiable (R1/R2)."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (taps[:, None] * taps[None, :] / 64.0).expand(x.shape[1], 1, 4, 4)
    return F.conv2d(x, kernel, stride=2, padding=1, groups=x.shape[1])


class Resample(nn.Module):
    """Bilinear 2x upsampling or low-pass 2x downsampling, with a 1x1 convolution where the width
    changes: before upsampling, after downsampling (on the smaller map)."""

    def __init__(self, c_in: int, c_out: int, up: bool):
        super().__init__()
        self.up = up
        self.linear = he(nn.Conv2d(c_in, c_out, 1, bias=False)) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = self.linear(x) if self.linear is not None else x
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = low_pass_downsample(x)
        return self.linear(x) if self.linear is not None else x


def blocks(spec: NetworkSpec, width: int, total: int) -> list[nn.Module]:
    """One resolution's residual blocks; `total`, the blocks in the whole network, scales their init."""
    return [ResidualBlock(width, spec.r3gan_expansion, spec.r3gan_group_size, total) for _ in range(spec.r3gan_blocks)]


class R3GANGenerator(nn.Module):
    """basis(4x4) x linear([z, embed(y)]) -> stages of residual blocks, each stage after the first
    upsampling 2x -> 1x1 convolution to the image -> tanh."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        channels = spec.sample_shape[0]
        sizes, widths = r3gan_widths(spec, spec.g_width)
        total = len(sizes) * spec.r3gan_blocks
        z_dim = spec.latent_dim
        self.embed = None
        if spec.conditional:  # as R3GAN: a linear map of the one-hot label, as wide as the latent
            self.embed = nn.Embedding(spec.num_classes, spec.latent_dim)
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / math.sqrt(spec.num_classes))
            z_dim += spec.latent_dim
        self.basis = nn.Parameter(torch.randn(widths[0], 4, 4))
        self.modulation = he(nn.Linear(z_dim, widths[0], bias=False))
        stages = [nn.Sequential(*blocks(spec, widths[0], total))]
        stages += [nn.Sequential(Resample(a, b, up=True), *blocks(spec, b, total))
                   for a, b in zip(widths, widths[1:], strict=False)]
        self.stages = nn.Sequential(*stages)
        self.to_image = he(nn.Conv2d(widths[-1], channels, 1, bias=False))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = self.basis[None] * self.modulation(z)[:, :, None, None]
        return torch.tanh(self.to_image(self.stages(x)))


class R3GANDiscriminator(nn.Module):
    """1x1 convolution from the image -> stages of residual blocks, each followed by a 2x
    downsampling, down to 4x4 -> residual blocks -> depthwise 4x4 convolution -> linear logit
    (conditional: features dotted with the label's embedding)."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        channels = spec.sample_shape[0]
        sizes, widths = r3gan_widths(spec, spec.d_width)
        widths = widths[::-1]  # the image's size first
        total = len(sizes) * spec.r3gan_blocks
        self.from_image = he(nn.Conv2d(channels * spec.pack, widths[0], 1, bias=False))
        stages = [nn.Sequential(*blocks(spec, a, total), Resample(a, b, up=False))
                  for a, b in zip(widths, widths[1:], strict=False)]
        stages.append(nn.Sequential(*blocks(spec, widths[-1], total)))
        self.stages = nn.Sequential(*stages)
        self.basis = he(nn.Conv2d(widths[-1], widths[-1], 4, groups=widths[-1], bias=False))
        self.to_logit = he(nn.Linear(widths[-1], widths[-1] if spec.conditional else 1, bias=False))
        self.embed = None
        if spec.conditional:  # R3GAN's scale: std 1 / sqrt(width x classes)
            self.embed = nn.Embedding(spec.num_classes, widths[-1])
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / math.sqrt(widths[-1] * spec.num_classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stages(self.from_image(pack(x, self.spec.pack)))
        out = self.to_logit(self.basis(h).flatten(1))
        if self.embed is not None:
            return (out * self.embed(labels)).sum(dim=1)
        return out.flatten()
