"""SRGAN's networks: an SRResNet generator (image in, image `scale` times larger out) and a
VGG-style strided discriminator (Ledig et al. 2017; ESRGAN's choice of no batch norm in G by
default, which avoids its artefacts at inference sizes other than the training crop's).

The generator is the one image-to-image family: its input is a low-resolution image in [-1, 1]
(N x C x h x w), not a latent; it is fully convolutional, so it takes any h and w. Its signature
keeps the (input, labels) shape of the other generators so the training and footprint code can
call every generator alike; labels are unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import spectral_norm_if
from .spec import NetworkSpec

SCALES = (2, 4, 8)


def check(spec: NetworkSpec) -> None:
    """The sizes this family builds, as ValueErrors naming the config key."""
    if spec.scale not in SCALES:
        raise ValueError(f"model.scale: srgan upscales by 2, 4 or 8, got {spec.scale}")
    if spec.conditional:
        raise ValueError("model.conditional: srgan is not class-conditional (set false)")
    resolution = spec.sample_shape[-1]
    if resolution % (spec.scale * 4) or resolution < 4 * spec.scale:
        raise ValueError(f"data.resolution: srgan's training crop must be a multiple of 4 x model.scale "
                         f"({4 * spec.scale}), got {resolution}")


class ResidualBlock(nn.Module):
    """conv-(BN)-PReLU-conv-(BN) plus the identity; BN only with model.sr_batch_norm."""

    def __init__(self, width: int, batch_norm: bool):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(width)) if batch_norm else nn.Identity
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), norm(), nn.PReLU(width),
                                  nn.Conv2d(width, width, 3, 1, 1), norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNetGenerator(nn.Module):
    """head conv -> residual blocks -> conv, plus the head (global skip) -> log2(scale) x
    (conv to 4x channels, pixel shuffle x2, PReLU) -> conv to the image's channels.

    The output is the bicubic-free residual-learning form of SRResNet: no tanh (outputs near the
    target's range from the start train faster); it is clamped to [-1, 1] only outside training."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        check(spec)
        channels, width = spec.sample_shape[0], spec.g_width
        self.scale = spec.scale
        self.head = nn.Sequential(nn.Conv2d(channels, width, 9, 1, 4), nn.PReLU(width))
        self.blocks = nn.Sequential(*[ResidualBlock(width, spec.sr_batch_norm) for _ in range(spec.sr_blocks)])
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1),
                                  nn.BatchNorm2d(width) if spec.sr_batch_norm else nn.Identity())
        ups: list[nn.Module] = []
        for _ in range(spec.scale.bit_length() - 1):
            ups += [nn.Conv2d(width, width * 4, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(width)]
        self.upsample = nn.Sequential(*ups)
        self.to_image = nn.Conv2d(width, channels, 9, 1, 4)
        self.input_skip = spec.sr_input_skip == "bicubic"
        if self.input_skip:  # a residual over bicubic: zero at first, so training starts from bicubic's quality
            nn.init.zeros_(self.to_image.weight)
            nn.init.zeros_(self.to_image.bias)

    def forward(self, lr: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        head = self.head(lr)
        x = self.upsample(head + self.fuse(self.blocks(head)))
        out = self.to_image(x)
        if self.input_skip:
            out = out + F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return out if self.training else out.clamp(-1.0, 1.0)


class SRDiscriminator(nn.Module):
    """VGG-style: pairs of 3x3 convolutions (the second strided) doubling the width every pair
    up to 8x d_width, then global average pooling and a small dense head to one logit. The
    pooling makes it take any crop size. Batch norm per model.d_norm, spectral norm optional."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        check(spec)
        sn = spectral_norm_if(spec.spectral_norm)
        channels, width = spec.sample_shape[0], spec.d_width
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 3, 1, 1)), nn.LeakyReLU(0.2)]
        c_in = width
        for i, stride in enumerate((2, 1, 2, 1, 2, 1, 2)):
            c_out = width * min(8, 2 ** ((i + 1) // 2))
            layers.append(sn(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=spec.d_norm != "batch")))
            if spec.d_norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(sn(nn.Linear(c_in, c_in * 2)), nn.LeakyReLU(0.2), sn(nn.Linear(c_in * 2, 1)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).flatten()
