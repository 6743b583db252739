"""The fully connected family (Goodfellow et al.): vectors, or images flattened."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import add_condition_strength, label_embedding_dim, pack, spectral_norm_if
from .spec import NetworkSpec


class MLPGenerator(nn.Module):
    """Fully connected generator: tanh images in [-1, 1], or unbounded standardised vectors."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.num_classes, label_embedding_dim(spec.num_classes)) \
            if spec.conditional else None
        if spec.conditional:
            add_condition_strength(self)
        width = spec.g_width
        layers: list[nn.Module] = []
        c_in = spec.latent_dim + (self.embed.embedding_dim if self.embed else 0)
        for _ in range(spec.mlp_layers):
            layers += [nn.Linear(c_in, width), nn.ReLU()]
            c_in = width
        layers.append(nn.Linear(c_in, math.prod(spec.sample_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels) * self.condition_strength], dim=1)
        out = self.net(z)
        if self.spec.is_image:
            return torch.tanh(out).view(-1, *self.spec.sample_shape)
        return out


class MLPDiscriminator(nn.Module):
    """Fully connected discriminator; labels by projection or concatenated one-hot."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        sn = spectral_norm_if(spec.spectral_norm)
        self.concat_labels = spec.conditional and spec.d_conditioning == "concat"
        c_in = math.prod(spec.sample_shape) * spec.pack + (spec.num_classes if self.concat_labels else 0)
        layers: list[nn.Module] = []
        for _ in range(spec.mlp_layers):
            layers += [sn(nn.Linear(c_in, spec.d_width)), nn.LeakyReLU(0.2)]
            c_in = spec.d_width
        self.features = nn.Sequential(*layers)
        self.to_logit = sn(nn.Linear(c_in, 1))
        self.project = sn(nn.Embedding(spec.num_classes, c_in)) \
            if spec.conditional and spec.d_conditioning == "projection" else None
        if spec.conditional:
            add_condition_strength(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = pack(x, self.spec.pack).flatten(1)
        if self.concat_labels:
            maps = nn.functional.one_hot(labels, self.spec.num_classes).to(x.dtype) * self.condition_strength
            x = torch.cat([x, maps], dim=1)
        h = self.features(x)
        logit = self.to_logit(h).flatten()
        if self.project is not None:
            logit = logit + (self.project(labels) * h).sum(dim=1) * self.condition_strength
        return logit
