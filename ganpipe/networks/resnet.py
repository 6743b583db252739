"""The residual family (SNGAN, Miyato et al. 2018; BigGAN, Brock et al. 2019): upsampling
residual blocks with (class-conditional) batch norm in the generator, downsampling residual
blocks with spectral norm and a projection head in the discriminator, optional SAGAN
self-attention in both, 32 to 256 px.

Decisions: the discriminator is always spectrally normalised (it is what makes this family train
stably; `spec.spectral_norm` is recorded as true and not consulted); the generator has no spectral
norm (SNGAN's choice) and is conditioned by conditional batch norm only; widths follow BigGAN's
schedule (`layers.channel_width`); initialisation is SNGAN's (Glorot uniform, gain sqrt(2) on
the residual branches' 3x3 convolutions, 1 elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .layers import (
    add_condition_strength,
    batch_norm,
    channel_width,
    normalise,
    pack,
    pyramid,
    spectral_norm_if,
)
from .spec import NetworkSpec

RESOLUTIONS = (32, 256)
RESIDUAL_GAIN = math.sqrt(2.0)


def glorot(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """SNGAN's initialisation, applied before spectral norm wraps the layer."""
    nn.init.xavier_uniform_(layer.weight, gain)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


spectral = spectral_norm_if(True)  # every layer of the discriminator


def resnet_resolutions(spec: NetworkSpec) -> list[int]:
    """4, 8, ..., the image size; checks the spec's resolution and attention resolution, so a bad
    spec fails the same way whether the recipe or a builder meets it first."""
    resolution = spec.sample_shape[1]
    sizes = pyramid(resolution, *RESOLUTIONS, "resnet")
    if spec.attention_resolution and spec.attention_resolution not in sizes[1:]:
        raise ValueError(f"model.attention_resolution: {spec.attention_resolution} is not one of the generator's "
                         f"resolutions ({', '.join(map(str, sizes[1:]))}; 0 turns attention off)")
    return sizes


def check(spec: NetworkSpec) -> None:
    resnet_resolutions(spec)


class SelfAttention(nn.Module):
    """SAGAN's self-attention (Zhang et al. 2019): every position attends to every other; keys and
    values are max-pooled 2x as in BigGAN. gamma starts at 0, so a fresh layer is the identity and
    training decides how much non-local context to mix in."""

    def __init__(self, channels: int, spectral_norm: bool = False):
        super().__init__()
        wrap = spectral_norm_if(spectral_norm)
        inner = max(1, channels // 8)
        self.query = wrap(glorot(nn.Conv2d(channels, inner, 1, bias=False)))
        self.key = wrap(glorot(nn.Conv2d(channels, inner, 1, bias=False)))
        self.value = wrap(glorot(nn.Conv2d(channels, max(1, channels // 2), 1, bias=False)))
        self.out = wrap(glorot(nn.Conv2d(max(1, channels // 2), channels, 1, bias=False)))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        query = self.query(x).flatten(2)  # (n, inner, hw)
        key = F.max_pool2d(self.key(x), 2).flatten(2)  # (n, inner, hw/4)
        value = F.max_pool2d(self.value(x), 2).flatten(2)  # (n, c/2, hw/4)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # (n, hw, hw/4)
        mixed = (value @ attention.transpose(1, 2)).view(n, -1, h, w)
        return x + self.gamma * self.out(mixed)


class UpBlock(nn.Module):
    """BN-ReLU-upsample-conv-BN-ReLU-conv, plus the nearest-upsampled input (through a learned 1x1
    convolution when the width changes)."""

    def __init__(self, c_in: int, c_out: int, num_classes: int):
        super().__init__()
        self.norm1 = batch_norm(c_in, num_classes)
        self.conv1 = glorot(nn.Conv2d(c_in, c_out, 3, 1, 1), RESIDUAL_GAIN)
        self.norm2 = batch_norm(c_out, num_classes)
        self.conv2 = glorot(nn.Conv2d(c_out, c_out, 3, 1, 1), RESIDUAL_GAIN)
        self.shortcut = glorot(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(normalise(self.norm1, x, labels)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(normalise(self.norm2, self.conv1(h), labels)))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class DownBlock(nn.Module):
    """ReLU-conv-ReLU-conv(-avgpool), plus the input through a 1x1 convolution (when the width
    changes or the block downsamples, as SNGAN). `first`: SNGAN's optimised block for the image
    itself (no ReLU before the first convolution, the shortcut pools before it projects)."""

    def __init__(self, c_in: int, c_out: int, downsample: bool = True, first: bool = False):
        super().__init__()
        self.downsample, self.first = downsample, first
        self.conv1 = spectral(glorot(nn.Conv2d(c_in, c_out, 3, 1, 1), RESIDUAL_GAIN))
        self.conv2 = spectral(glorot(nn.Conv2d(c_out, c_out, 3, 1, 1), RESIDUAL_GAIN))
        self.shortcut = spectral(glorot(nn.Conv2d(c_in, c_out, 1))) if c_in != c_out or downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        if self.first:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return h + (F.avg_pool2d(x, 2) if self.downsample else x)


class ResNetGenerator(nn.Module):
    """A linear map from the latent to 4x4, upsampling residual blocks to the image size (BigGAN's
    widths: g_width x 16 at the small end, g_width at the image's size), optional self-attention
    after the block that reaches `attention_resolution`, then BN-ReLU-conv3x3-tanh. Labels enter
    through every block's conditional batch norm."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        channels, resolution, _ = spec.sample_shape
        sizes = resnet_resolutions(spec)
        widths = [channel_width(spec.g_width, size, resolution) for size in sizes]
        self.linear = glorot(nn.Linear(spec.latent_dim, widths[0] * 16))
        self.blocks = nn.ModuleList(UpBlock(a, b, spec.num_classes) for a, b in zip(widths, widths[1:], strict=False))
        # attention after block i, which outputs sizes[i + 1]; -1: none
        self.attention_after = sizes.index(spec.attention_resolution) - 1 if spec.attention_resolution else -1
        self.attention = SelfAttention(widths[self.attention_after + 1]) if spec.attention_resolution else None
        self.out_norm = nn.BatchNorm2d(widths[-1])
        self.to_image = glorot(nn.Conv2d(widths[-1], channels, 3, 1, 1))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.linear(z).view(z.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            x = block(x, labels)
            if i == self.attention_after:
                x = self.attention(x)
        return torch.tanh(self.to_image(F.relu(self.out_norm(x))))


class ResNetDiscriminator(nn.Module):
    """SNGAN's optimised block on the image, downsampling residual blocks to 4x4 and one more
    block there (BigGAN's widths, mirrored: d_width at half the image's size), optional
    self-attention where a block outputs `attention_resolution`, ReLU, global sum pooling, a
    linear logit plus the projection <embed(y), features> for labels. Spectral norm everywhere."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        channels, resolution, _ = spec.sample_shape
        sizes = resnet_resolutions(spec)[-2::-1]  # block outputs: resolution/2, ..., 4
        widths = [channel_width(spec.d_width, 2 * size, resolution) for size in sizes]
        blocks = [DownBlock(channels * spec.pack, widths[0], first=True)]
        blocks += [DownBlock(a, b) for a, b in zip(widths, widths[1:], strict=False)]
        blocks.append(DownBlock(widths[-1], widths[-1], downsample=False))
        self.blocks = nn.ModuleList(blocks)
        # The image itself is the only map at the full resolution: no attention there.
        self.attention_after = sizes.index(spec.attention_resolution) if spec.attention_resolution in sizes else -1
        self.attention = SelfAttention(widths[self.attention_after], spectral_norm=True) \
            if self.attention_after >= 0 else None
        self.to_logit = spectral(glorot(nn.Linear(widths[-1], 1)))
        self.project = None
        if spec.conditional:
            self.project = nn.Embedding(spec.num_classes, widths[-1])
            nn.init.xavier_uniform_(self.project.weight)
            self.project = spectral(self.project)
            add_condition_strength(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = pack(x, self.spec.pack)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attention_after:
                h = self.attention(h)
        features = F.relu(h).sum(dim=(2, 3))
        logit = self.to_logit(features).flatten()
        if self.project is not None:
            logit = logit + (self.project(labels) * features).sum(dim=1) * self.condition_strength
        return logit
