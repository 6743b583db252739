"""Test fixtures shared by tests and benchmarks (benchmarks import them from the repository root:
`from tests.fixtures import ...`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ganpipe.config import Config
from ganpipe.launch import prepared_run
from ganpipe.metrics import inception
from ganpipe.metrics.inception import FEATURES
from ganpipe.trainer import Trainer

# --- a stand-in Inception weights file, for machines without the real one (nothing downloads) ------

def write_random_weights(path: Path, seed: int = 0, calibration_images: int = 4) -> Path:
    """A weights file in the exact layout of the FID weights, with random values that keep features
    alive through the network's depth: He-normal convolutions, and batch-norm statistics measured
    on random images so every layer's output is normalised (the default initialisation decays to
    near-zero features and a meaningless FID of 0). Not a substitute for the real weights."""
    class _Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # noqa: ANN002,ANN003 - build the modules, load nothing
            return None

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    network = _Layout("inception-v3-compat", [str(FEATURES)], feature_extractor_weights_path=str(empty))
    empty.unlink()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: one batch sets the statistics exactly
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(module.in_features))
                module.bias.zero_()
        network.float().train()
        network((torch.rand(calibration_images, 3, 64, 64, generator=generator) * 255).to(torch.uint8))
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def accept_as_standard(monkeypatch: pytest.MonkeyPatch, weights: Path) -> Path:
    """Make `weights` (a stand-in from write_random_weights) pass the standard-FID-weights check
    for this test, in this process only: fid refuses any other file. A subprocess (run_cli)
    would still refuse it, so tests that need it run the CLI in-process."""
    monkeypatch.setattr(inception, "STANDARD_WEIGHTS_SHA256", hashlib.sha256(weights.read_bytes()).hexdigest())
    return weights


def new_run_dir(cfg: Config) -> Path:
    """A prepared run directory for `cfg` (ingested, checked, config saved, lock released), for
    tests that build a Trainer in this process."""
    with prepared_run(cfg) as run:
        return run.run_dir


def train_iterations(trainer: Trainer, iterations: int) -> None:
    """`iterations` training steps of an in-process Trainer, counted as ganpipe.train's loop counts
    them (no checkpoints, logging or previews: the updates alone)."""
    for _ in range(iterations):
        trainer.iteration()
        trainer.step += 1


def trainer_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Copies of every trained tensor: G, D and the EMA."""
    nets = trainer.nets
    return {f"{name}.{k}": v.detach().clone() for name, module in (("G", nets.g_raw), ("D", nets.d_raw),
                                                                   ("ema", nets.ema))
            for k, v in module.state_dict().items()}


def resumed_halfway(make: Callable[[int, str], Trainer], first_steps: int, total_steps: int, name: str) -> Trainer:
    """A run `name` (`make(steps, name)` builds its Trainer) trained total_steps // 2 iterations in a
    Trainer of `first_steps` steps, saved and closed, then a new Trainer of `total_steps` steps on
    the same run (what `--resume auto` builds) trained to the end. Returns the second, still open."""
    half = total_steps // 2
    first = make(first_steps, name)
    train_iterations(first, half)
    assert first.save({"metrics": {}}) is not None
    first.close()
    second = make(total_steps, name)
    assert second.resumed_from == half
    train_iterations(second, total_steps - half)
    return second


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise identical: {different[:5]}"


# --- super-resolution: an image folder of photographs of several sizes ---------------------------

@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for in-process training of tiny networks: on a loaded machine two
    threads per process contend for the cores, and a step takes ten times as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_photo_folder(folder: Path, count: int = 24, seed: int = 0) -> Path:
    """`count` PNG crops of scikit-learn's sample photographs, of several sizes from 32 to 72 px
    a side (real image statistics: bicubic is a meaningful baseline on them)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = (int(v) for v in rng.integers(32, 73, size=2))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        Image.fromarray(photo[top:top + height, left:left + width]).save(folder / f"photo-{i:03d}.png")
    return folder


def write_random_vgg19(path: Path, seed: int = 0) -> Path:
    """A VGG19 weights file in torchvision's layout (`features.N.weight/bias`, as `vgg19().state_dict()`),
    random He-normal values: for the feature loss's tests, never a substitute for real weights.
    `.safetensors` or a weights-only `torch.save` file, by the suffix."""

    from ganpipe.sr_losses import vgg19_features

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in vgg19_features().state_dict().items():
        fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
        state[f"features.{name}"] = (torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in)
                                     if tensor.dim() > 1 else torch.zeros(tensor.shape))
    state["classifier.6.bias"] = torch.zeros(1000)  # a token of the classifier (the loss ignores it; 400 MB in full)
    return save_state(state, path)


def save_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    """`.safetensors` or a weights-only `torch.save` file, by the suffix."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def write_random_lpips(path: Path, backbone: str = "alex", seed: int = 0) -> Path:
    """An LPIPS weights file in the `lpips` package's state-dict layout (`net.sliceK.N.*`,
    `linK.model.1.weight`), random values (He-normal convolutions, positive linear weights as
    the learned ones are): for tests that need the layout without the package, never a
    substitute for real weights. `.safetensors` or a weights-only `torch.save` file, by the suffix."""

    from ganpipe.metrics.lpips import LPIPS

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in LPIPS(backbone).state_dict().items():
        if name.startswith("lin"):
            state[name] = torch.rand(tensor.shape, generator=generator) / tensor.shape[1]
        elif tensor.dim() > 1:
            state[name] = torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / tensor[0].numel())
        else:
            state[name] = torch.zeros(tensor.shape)
    return save_state(state, path)
