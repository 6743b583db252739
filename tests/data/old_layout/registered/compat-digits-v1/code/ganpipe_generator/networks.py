"""Generators and discriminators: MLP GAN, DCGAN, and their conditional variants.

This module depends on torch and numpy alone: registered MLflow models ship it as their code, so
a generator loads anywhere `mlflow` and `torch` are installed. A `NetworkSpec` (plain JSON) is
everything needed to rebuild a network around its saved weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


@dataclass(frozen=True)
class NetworkSpec:
    family: str  # mlp | dcgan
    sample_shape: tuple[int, ...]  # (C, H, W) for images, (D,) for vectors
    latent_dim: int
    num_classes: int = 0  # 0: unconditional
    g_width: int = 64
    d_width: int = 64
    mlp_layers: int = 3
    g_conditioning: str = "embedding"  # embedding | cbn
    d_conditioning: str = "projection"  # projection | concat
    spectral_norm: bool = False
    d_norm: str = "batch"  # batch | none
    pack: int = 1
    # For vector data: the statistics that map the generator's standardised output back to data units.
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    columns: tuple[str, ...] = field(default_factory=tuple)
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkSpec:
        tuples = {"sample_shape", "mean", "std", "columns", "classes"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


# --- building blocks ---------------------------------------------------------------------------

class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class (conditional BN, as in BigGAN)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int, first: bool):
        super().__init__()
        stride, padding = (1, 0) if first else (2, 1)
        self.conv = nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
        self.norm = ConditionalBatchNorm2d(c_out, num_classes) if num_classes else nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.conv(x)
        x = self.norm(x, labels) if isinstance(self.norm, ConditionalBatchNorm2d) else self.norm(x)
        return torch.relu(x)


def _label_embedding_dim(num_classes: int) -> int:
    return min(64, max(8, num_classes))


def _dcgan_depth(resolution: int) -> int:
    depth = int(math.log2(resolution)) - 2  # stride-2 layers between 4x4 and the output
    if 2**(depth + 2) != resolution or depth < 1:
        raise ValueError(f"DCGAN needs a power-of-two resolution of at least 8, got {resolution}")
    return depth


# --- generators --------------------------------------------------------------------------------

class DCGANGenerator(nn.Module):
    """Transposed convolutions from a 4x4 seed, doubling the size and halving the channels
    (Radford et al.), with label embedding or conditional batch norm for class control."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        channels, resolution, _ = spec.sample_shape
        depth = _dcgan_depth(resolution)
        self.spec = spec
        z_dim = spec.latent_dim
        cbn_classes = spec.num_classes if spec.conditional and spec.g_conditioning == "cbn" else 0
        self.embed = None
        if spec.conditional and spec.g_conditioning == "embedding":
            self.embed = nn.Embedding(spec.num_classes, _label_embedding_dim(spec.num_classes))
            z_dim += self.embed.embedding_dim
        width = spec.g_width * 2 ** (depth - 1)
        blocks = [UpBlock(z_dim, width, cbn_classes, first=True)]
        for _ in range(depth - 1):
            blocks.append(UpBlock(width, width // 2, cbn_classes, first=False))
            width //= 2
        self.blocks = nn.ModuleList(blocks)
        self.to_image = nn.ConvTranspose2d(width, channels, 4, 2, 1)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = z[:, :, None, None]
        for block in self.blocks:
            x = block(x, labels)
        return torch.tanh(self.to_image(x))


class MLPGenerator(nn.Module):
    """Fully connected generator (Goodfellow et al.): vectors, or images flattened."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.num_classes, _label_embedding_dim(spec.num_classes)) \
            if spec.conditional else None
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
            z = torch.cat([z, self.embed(labels)], dim=1)
        out = self.net(z)
        if self.spec.is_image:
            return torch.tanh(out).view(-1, *self.spec.sample_shape)
        return out


# --- discriminators ----------------------------------------------------------------------------

class DCGANDiscriminator(nn.Module):
    """Strided convolutions down to 4x4, then one logit. Conditioning by projection (Miyato &
    Koyama: logit + <embed(y), features>) or by label maps concatenated to the input."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        channels, resolution, _ = spec.sample_shape
        depth = _dcgan_depth(resolution)
        self.spec = spec
        sn = _spectral_norm if spec.spectral_norm else (lambda m: m)
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
        _dcgan_init(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = _pack(x, self.spec.pack)
        if self.concat_labels:
            maps = nn.functional.one_hot(labels, self.spec.num_classes).to(x.dtype)
            x = torch.cat([x, maps[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        h = self.features(x)
        logit = self.to_logit(h).flatten()
        if self.project is not None:
            logit = logit + (self.project(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return logit


class MLPDiscriminator(nn.Module):
    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        sn = _spectral_norm if spec.spectral_norm else (lambda m: m)
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

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = _pack(x, self.spec.pack).flatten(1)
        if self.concat_labels:
            x = torch.cat([x, nn.functional.one_hot(labels, self.spec.num_classes).to(x.dtype)], dim=1)
        h = self.features(x)
        logit = self.to_logit(h).flatten()
        if self.project is not None:
            logit = logit + (self.project(labels) * h).sum(dim=1)
        return logit


def _pack(x: torch.Tensor, pack: int) -> torch.Tensor:
    """PacGAN: judge `pack` samples at once, so a collapsed generator is easier to spot."""
    if pack == 1:
        return x
    if x.shape[0] % pack:
        raise ValueError(f"batch of {x.shape[0]} is not divisible by model.pack={pack}")
    return x.reshape(x.shape[0] // pack, pack * x.shape[1], *x.shape[2:])


def _dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


GENERATORS = {"dcgan": DCGANGenerator, "mlp": MLPGenerator}
DISCRIMINATORS = {"dcgan": DCGANDiscriminator, "mlp": MLPDiscriminator}


def build_generator(spec: NetworkSpec) -> nn.Module:
    return GENERATORS[spec.family](spec)


def build_discriminator(spec: NetworkSpec) -> nn.Module:
    return DISCRIMINATORS[spec.family](spec)


# --- sampling: shared by training previews, generate, export and the MLflow model ------------------

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


def to_output(samples: torch.Tensor, spec: NetworkSpec) -> torch.Tensor:
    """Network output -> user units: uint8 NHWC images, or vectors in the data's own scale."""
    samples = samples.float()
    if spec.is_image:
        return ((samples + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    if spec.mean:
        samples = samples * torch.tensor(spec.std) + torch.tensor(spec.mean)
    return samples.cpu()


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows appended up to `rows`: see `generate` for why every pass has one shape."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


@torch.no_grad()
def generate(generator: nn.Module, spec: NetworkSpec, seeds: list[int], labels: list[int] | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu",
             truncation: float | None = None) -> torch.Tensor:
    """Samples for `seeds` (and `labels` for conditional models) in user units.

    Every forward pass sees exactly `batch_size` rows (the last chunk is padded with zeros): CPU
    kernels (MKL, oneDNN) choose their blocking, and so their summation order, by the batch's
    shape, so a row generated alone could differ in the last bit from the same row in a batch of
    300. With one shape, a sample is bit-identical however many rows are generated with it."""
    if spec.conditional and labels is None:
        raise ValueError("a conditional generator needs one label per seed")
    outputs = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        z = pad_rows(latents_for_seeds(chunk, spec.latent_dim, truncation), batch_size).to(device)
        y = pad_rows(torch.as_tensor(labels[start:start + batch_size]), batch_size).to(device) \
            if spec.conditional else None
        outputs.append(to_output(generator(z, y)[:len(chunk)], spec))
    return torch.cat(outputs) if outputs else torch.empty(0)
