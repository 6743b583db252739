"""fd_domain: a Fréchet distance on features of a small network trained on the dataset itself.

Not FID (no ImageNet Inception features): it needs no downloads and knows the domain. For
labelled image data the network is a small CNN classifier (features: its 128-d penultimate
layer); for unlabelled image data, a small convolutional autoencoder (features: its 128-d code);
for vector data, the standardised vectors themselves. The network is trained once per dataset
fingerprint, deterministically, and cached under $GANPIPE_HOME/cache/fd_domain/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ganpipe import storage
from ganpipe.data import PreparedData

FEATURES = 128
VERSION = 2  # bump when the architecture or the training recipe changes
MAX_SIDE = 64  # larger images are average-pooled to this before the network


class Encoder(nn.Module):
    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.pool = max(1, resolution // MAX_SIDE)
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.side = max(1, min(resolution, MAX_SIDE) // 8)
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 64 * self.side * self.side), nn.ReLU(),
            nn.Unflatten(1, (64, self.side, self.side)),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Tanh())

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)


def _to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _train(data: PreparedData, seed: int = 0) -> tuple[Encoder, dict]:
    torch.manual_seed(seed)
    channels, resolution, _ = data.sample_shape
    images, labels = data.load_all() if data.num_records <= 200_000 else data.gather(
        np.random.default_rng(seed).choice(data.num_records, 200_000, replace=False))
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(labels) if labels is not None and data.num_classes > 1 else None
    encoder = Encoder(channels, resolution)
    head: nn.Module = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, data.num_classes)) if y_all is not None \
        else Decoder(channels, resolution)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    batch = 128
    steps = int(np.clip(8 * len(x_all) // batch, 250, 2000))
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=generator)
        x = _to_input(x_all[idx])
        if y_all is not None:
            loss = nn.functional.cross_entropy(head(encoder(x)), y_all[idx])
        else:
            target = nn.functional.avg_pool2d(x, encoder.pool) if encoder.pool > 1 else x
            loss = nn.functional.mse_loss(head(encoder(x)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    info = {"kind": "classifier" if y_all is not None else "autoencoder", "steps": steps,
            "final_loss": float(loss), "channels": channels, "resolution": resolution, "version": VERSION}
    if y_all is not None:
        with torch.no_grad():
            predictions = torch.cat([head(encoder(_to_input(x_all[i:i + 512]))).argmax(1)
                                     for i in range(0, len(x_all), 512)])
        info["train_accuracy"] = float((predictions == y_all).float().mean())
    return encoder.eval(), info


def extractor_dir(data: PreparedData) -> Path:
    return storage.ganpipe_home() / "cache" / "fd_domain" / f"{data.fingerprint}-v{VERSION}"


def load_or_train(data: PreparedData) -> tuple[Encoder, dict]:
    """The dataset's feature network: trained on first use, then read from the cache."""
    folder = extractor_dir(data)
    channels, resolution, _ = data.sample_shape
    if (folder / "meta.json").exists():
        encoder = Encoder(channels, resolution)
        encoder.load_state_dict(load_file(str(folder / "encoder.safetensors")))
        return encoder.eval(), json.loads((folder / "meta.json").read_text())
    encoder, info = _train(data)
    with storage.atomic_directory(folder) as tmp:
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / "encoder.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
    return encoder, info


class DomainFeatures:
    """Feature function for fd_domain: batches in user units -> float64 features."""

    def __init__(self, data: PreparedData):
        self.data = data
        if data.kind == "image":
            self.encoder, self.info = load_or_train(data)
            self.id = f"fd_domain-v{VERSION}-{data.fingerprint}"
        else:
            self.encoder, self.info = None, {"kind": "standardised vectors"}
            self.id = f"fd_domain-vectors-{data.fingerprint}"
            self.mean, self.std = (torch.from_numpy(a) for a in data.vector_stats)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        if self.encoder is None:
            return ((batch.float() - self.mean) / self.std).double().numpy()
        return self.encoder(_to_input(batch)).double().numpy()
