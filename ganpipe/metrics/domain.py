"""fd_domain: a Fréchet distance on features of a small network trained on the dataset itself.

Not FID (no ImageNet Inception features): it needs no downloads and knows the domain. For
labelled image data the network is a small CNN classifier (features: its 128-d penultimate
layer); for unlabelled image data, a small convolutional autoencoder (features: its 128-d code);
for vector data, the standardised vectors themselves. The network is trained once per dataset
fingerprint, deterministically, and cached under $GANPIPE_HOME/cache/fd_domain/.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ganpipe import storage
from ganpipe.data import PreparedData
from ganpipe.networks import images_to_network_space, vectors_to_network_space

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


BATCH = 128


def fit(modules: list[nn.Module], batch_loss: Callable[[torch.Tensor], torch.Tensor], num_examples: int,
        steps: int, seed: int = 0) -> float:
    """Adam on `batch_loss(indices)` over random batches of example indices; the final loss."""
    optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = batch_loss(torch.randint(num_examples, (BATCH,), generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def training_steps(num_examples: int) -> int:
    return int(np.clip(8 * num_examples // BATCH, 250, 2000))


class Classifier(nn.Module):
    """The small CNN: Encoder features -> class logits. fd_domain uses its features, CAS its accuracy."""

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        self.encoder = Encoder(channels, resolution)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
                     seed: int = 0) -> tuple[Classifier, float]:
    """A Classifier trained on uint8 NHWC `images`; deterministic for a seed. Returns it and its last loss."""
    torch.manual_seed(seed)
    model = Classifier(images.shape[-1], images.shape[1], num_classes)
    loss = fit([model], lambda idx: nn.functional.cross_entropy(model(images_to_network_space(images[idx])),
                                                                labels[idx]),
               len(images), steps, seed)
    return model.eval(), loss


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(images_to_network_space(images[i:i + 512])).argmax(1)
                             for i in range(0, len(images), 512)])
    return float((predictions == labels).float().mean())


def _train(data: PreparedData, seed: int = 0) -> tuple[Encoder, dict]:
    channels, resolution, _ = data.sample_shape
    images, labels = data.load_all() if data.num_records <= 200_000 else data.gather(
        np.random.default_rng(seed).choice(data.num_records, 200_000, replace=False))
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    steps = training_steps(len(x_all))
    info: dict = {"steps": steps, "channels": channels, "resolution": resolution, "version": VERSION}
    if labels is not None and data.num_classes > 1:
        y_all = torch.from_numpy(labels)
        classifier, loss = train_classifier(x_all, y_all, data.num_classes, steps, seed)
        encoder = classifier.encoder
        info |= {"kind": "classifier", "train_accuracy": accuracy(classifier, x_all, y_all)}
    else:
        torch.manual_seed(seed)
        encoder, decoder = Encoder(channels, resolution), Decoder(channels, resolution)

        def reconstruction_loss(idx: torch.Tensor) -> torch.Tensor:
            x = images_to_network_space(x_all[idx])
            target = nn.functional.avg_pool2d(x, encoder.pool) if encoder.pool > 1 else x
            return nn.functional.mse_loss(decoder(encoder(x)), target)

        loss = fit([encoder, decoder], reconstruction_loss, len(x_all), steps, seed)
        info["kind"] = "autoencoder"
    info["final_loss"] = loss
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
    """Feature function for fd_domain: batches in user units -> float32 features. A small
    network: it runs on the CPU (`device`), where batches are brought."""

    device = torch.device("cpu")

    def __init__(self, data: PreparedData):
        self.data = data
        if data.kind == "image":
            self.encoder, self.info = load_or_train(data)
            self.id = f"fd_domain-v{VERSION}-{data.fingerprint}"
            self.dims = FEATURES
        else:
            self.encoder, self.info = None, {"kind": "standardised vectors"}
            self.id = f"fd_domain-vectors-{data.fingerprint}"
            self.mean, self.std = (torch.from_numpy(a) for a in data.vector_stats)
            self.dims = len(self.mean)

    @torch.no_grad()
    def tensor(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.cpu()
        if self.encoder is None:
            return vectors_to_network_space(batch, self.mean, self.std)
        return self.encoder(images_to_network_space(batch))

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.tensor(batch).numpy()
