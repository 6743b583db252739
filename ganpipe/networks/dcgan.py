"""The DCGAN family (Radford et al.): transposed convolutions up from 4x4, strided ones down."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import add_condition_strength, batch_norm, label_embedding_dim, normalise, pack, spectral_norm_if
from .spec import NetworkSpec


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int, first: bool):
        super().__init__()
        stride, padding = (1, 0) if first else (2, 1)
        self.conv = nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
        self.norm = batch_norm(c_out, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(normalise(self.norm, self.conv(x), labels))


def dcgan_depth(resolution: int) -> int:
    """Number of stride-2 layers between the 4x4 seed and a `resolution` output."""
    depth = int(math.log2(resolution)) - 2
    if 2**(depth + 2) != resolution or depth < 1:
        raise ValueError(f"DCGAN needs a power-of-two resolution of at least 8, got {resolution}")
    return depth


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """Transposed convolutions from a 4x4 seed, doubling the size and halving the channels,
    with label embedding or conditional batch norm for class control."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        channels, resolution, _ = spec.sample_shape
        depth = dcgan_depth(resolution)
        self.spec = spec
        z_dim = spec.latent_dim
        cbn_classes = spec.num_classes if spec.conditional and spec.g_conditioning == "cbn" else 0
        self.embed = None
        if spec.conditional and spec.g_conditioning == "embedding":
            self.embed = nn.Embedding(spec.num_classes, label_embedding_dim(spec.num_classes))
            z_dim += self.embed.embedding_dim
            add_condition_strength(self)
        width = spec.g_width * 2 ** (depth - 1)
        blocks = [UpBlock(z_dim, width, cbn_classes, first=True)]
        for _ in range(depth - 1):
            blocks.append(UpBlock(width, width // 2, cbn_classes, first=False))
            width //= 2
        self.blocks = nn.ModuleList(blocks)
        self.to_image = nn.ConvTranspose2d(width, channels, 4, 2, 1)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels) * self.condition_strength], dim=1)
        x = z[:, :, None, None]
        for block in self.blocks:
            x = block(x, labels)
        return torch.tanh(self.to_image(x))


class DCGANDiscriminator(nn.Module):
    """Strided convolutions down to 4x4, then one logit. Conditioning by projection (Miyato &
    Koyama: logit + <embed(y), features>) or by label maps concatenated to the input."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        channels, resolution, _ = spec.sample_shape
        depth = dcgan_depth(resolution)
        self.spec = spec
        sn = spectral_norm_if(spec.spectral_norm)
        self.concat_labels = spec.conditional and spec.d_conditioning == "concat"
        c_in = channels * spec.pack + (spec.num_classes if self.concat_labels else 0)
        width = spec.d_width
        layers: list[nn.Module] = [sn(nn.Conv2d(c_in, width, 4, 2, 1)), nn.LeakyReLU(0.2)]
        for _ in range(depth - 1):
            layers.append(sn(nn.Conv2d(width, width * 2, 4, 2, 1, bias=spec.d_norm != "batch")))
            if spec.d_norm == "batch":
                layers.append(nn.BatchNorm2d(width * 2))
            layers.append(nn.LeakyReLU(0.2))
            width *= 2
        self.features = nn.Sequential(*layers)
        self.to_logit = sn(nn.Conv2d(width, 1, 4, 1, 0))
        self.project = sn(nn.Embedding(spec.num_classes, width)) \
            if spec.conditional and spec.d_conditioning == "projection" else None
        if spec.conditional:
            add_condition_strength(self)
        dcgan_init(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = pack(x, self.spec.pack)
        if self.concat_labels:
            maps = nn.functional.one_hot(labels, self.spec.num_classes).to(x.dtype) * self.condition_strength
            x = torch.cat([x, maps[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        h = self.features(x)
        logit = self.to_logit(h).flatten()
        if self.project is not None:
            logit = logit + (self.project(labels) * h.sum(dim=(2, 3))).sum(dim=1) * self.condition_strength
        return logit
