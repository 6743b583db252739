"""InceptionV3 pool3 features for FID, KID and precision/recall: the field's standard network.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TensorFlow FID graph ported
bit-faithfully, TF1-style bilinear resize to 299x299 included), fed the FID weights
pt_inception-2015-12-05 (torch-fidelity names the same file weights-inception-2015-12-05-6726825d.pth).
Images go in as uint8 RGB at their own resolution (greyscale repeated to three channels, as
PIL's convert("RGB") does for torch-fidelity's image folders); the resize happens on the device,
in batches.

ganpipe never downloads the weights. They come from, in order: --inception-weights FILE (or
config eval.inception_weights), $GANPIPE_INCEPTION_WEIGHTS, or the cache a torch-fidelity,
torchmetrics or pytorch-fid download would have filled ($TORCH_HOME/hub/checkpoints/).

Only the standard file is used, recognised by its sha256: a number called `fid` (and `kid`, `pr`,
which are defined on the same features) always means the standard one. Another file (other
weights, a truncated download, a stand-in) is refused with a message saying how to get the right
one, rather than reported under a name it does not deserve.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ganpipe import storage
from ganpipe.errors import UserError

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
# torch-fidelity / torchmetrics name, then pytorch-fid's name for the same converted weights.
WEIGHTS_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
# sha256 of the standard FID weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which is
# also torch-fidelity's weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes; torch.hub
# names files NAME-<first 8 hex digits of their sha256>, hence "6726825d" in both names). The full
# digest is the one projects pinning this file record, e.g. genforce's Inception model
# (`_MODEL_URL_SHA256['tf_inception_v3']`); ganpipe never downloads, so it was not recomputed here.
STANDARD_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURES = 2048
PREPROCESSING = "uint8-rgb-tf1bilinear299"  # part of the cache key: change it when the input path changes


class WeightsUnavailable(RuntimeError):
    """No usable weights file; the message says how to provide one."""


class WeightsMissing(WeightsUnavailable):
    """No weights file anywhere ganpipe looks."""


class WeightsNotStandard(WeightsUnavailable):
    """A weights file whose sha256 is not the standard FID weights'."""


def download_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def how_to_provide() -> str:
    return ("pass --inception-weights FILE, set eval.inception_weights or GANPIPE_INCEPTION_WEIGHTS, "
            f"or put the file in {download_cache_dir()}/ (get it from {WEIGHTS_URL})")


def missing_weights_message() -> str:
    return ("needs the InceptionV3 FID weights (pt_inception-2015-12-05-6726825d.pth) and ganpipe never "
            f"downloads: {how_to_provide()}")


def resolve_weights(explicit: str | None = None) -> Path:
    """The weights file to use (see the module doc for the order), or WeightsMissing."""
    for origin, value in (("inception weights", explicit),
                          ("GANPIPE_INCEPTION_WEIGHTS", os.environ.get("GANPIPE_INCEPTION_WEIGHTS"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise UserError(f"{origin} {value}: file not found")
            return path
    for name in WEIGHTS_FILENAMES:
        if (download_cache_dir() / name).is_file():
            return download_cache_dir() / name
    raise WeightsMissing(missing_weights_message())


def standard_weights(explicit: str | None = None) -> tuple[Path, str]:
    """The weights file to use and its sha256, when it is the standard one; else WeightsMissing
    or WeightsNotStandard, whose message names the file and says how to provide the right one."""
    path = resolve_weights(explicit)
    sha256 = storage.sha256_file(path)
    if sha256 != STANDARD_WEIGHTS_SHA256:
        raise WeightsNotStandard(
            f"inception weights {path}: not the standard FID weights (its sha256 is {sha256[:16]}..., "
            f"pt_inception-2015-12-05-6726825d.pth's is {STANDARD_WEIGHTS_SHA256[:16]}...), and fid, kid and pr "
            f"are defined on those only: {how_to_provide()}")
    return path, sha256


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """torch-fidelity reads weights with torch.load(weights_only=False); torch's own switch makes
    every load in this block refuse anything but tensors, so a weights file is never run as code."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_network(weights: Path) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        with weights_only_loads():
            return FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURES)],
                                               feature_extractor_weights_path=str(weights))
    except Exception as exc:  # noqa: BLE001 - unpickling and state-dict errors have many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"inception weights {weights}: not a pt_inception-2015-12-05 state dict "
                        f"({first_line[:200]})") from None


class InceptionFeatures:
    """Feature function: uint8 NHWC batches -> float32 (N, 2048) pool3 features.

    `tensor` leaves the features on the device (streamed statistics consume them there); calling
    the object brings them to the host as numpy. A batch already on the device (generated there)
    is used where it is; a host batch is copied without blocking."""

    dims = FEATURES

    def __init__(self, weights: Path, device: torch.device | str = "cpu", batch_size: int | None = None,
                 sha256: str | None = None):
        self.weights = weights
        self.sha256 = sha256 or storage.sha256_file(weights)  # given when the caller hashed it already
        self.device = torch.device(device)
        self.network = load_network(weights).to(self.device)
        self.batch_size = batch_size or (200 if self.device.type == "cuda" else 64)
        self.id = f"inception-v3-pool3-{self.sha256[:16]}-{PREPROCESSING}"
        self.info = {"network": "torch-fidelity FeatureExtractorInceptionV3, pool3 (2048-d)",
                     "weights": str(weights), "weights_sha256": self.sha256}

    @torch.no_grad()
    def tensor(self, batch: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in batch.split(self.batch_size):
            x = chunk.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out.append(self.network(x.contiguous())[0].float())
        return torch.cat(out)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.tensor(batch).cpu().numpy()
