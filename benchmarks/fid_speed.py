"""FID speed: ganpipe against torch-fidelity on the same device, weights and generated images.

Both compute the FID of N generated images against real statistics cached beforehand (the
warm-up is not timed; loading the Inception network is).

  ganpipe         generates on the device in batches and feeds the uint8 batches straight to
                  InceptionV3 (resized on the device, in batches): `evaluate(ctx, ["fid"])`.
  torch-fidelity  the usual route: generate, write PNGs, `calculate_metrics(input1=folder,
                  input2=real, fid=True)` with its cached real statistics.

The two FIDs must agree within 1e-3 relative (exit 1 otherwise). Without the real FID weights
(--inception-weights, GANPIPE_INCEPTION_WEIGHTS or the torch hub cache), --random-weights uses
a random file in the same layout: timings are the same, FID values are not meaningful.

    python benchmarks/fid_speed.py                       # N = 5,000 on CPU, 50,000 on GPU
    python benchmarks/fid_speed.py --num-images 200 --num-real 200 --random-weights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ganpipe import storage
from ganpipe.config import DataConfig
from ganpipe.data import ingest, open_prepared
from ganpipe.generators import LoadedGenerator, load_generator
from ganpipe.metrics import EvalContext, evaluate, inception
from ganpipe.metrics.inception import WeightsUnavailable, standard_weights, weights_only_loads
from ganpipe.metrics.samples import GeneratedSamples, RealSamples
from ganpipe.networks import NetworkSpec, build_generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file (python benchmarks/fid_speed.py): the repository's tests/ too
from tests.fixtures import write_random_weights  # noqa: E402

# torch-fidelity caches its statistics as numpy arrays: allow exactly what rebuilds those.
NUMPY_ARRAYS = [np.dtype, np.ndarray, np._core.multiarray._reconstruct, type(np.dtype(np.float32)),
                type(np.dtype(np.float64))]


class RealImages(Dataset):
    """The same real images ganpipe uses, as torch-fidelity wants them: uint8 3 x H x W."""

    def __init__(self, real: RealSamples):
        self.images = np.concatenate([batch.numpy() for batch, _ in real.batches()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def generator_for(args: argparse.Namespace, device: torch.device, shape: tuple[int, int, int]) -> LoadedGenerator:
    if args.model:
        return load_generator(args.model, device)
    spec = NetworkSpec(family="dcgan", sample_shape=shape, latent_dim=100)  # untrained: same speed
    torch.manual_seed(0)
    return LoadedGenerator(build_generator(spec).to(device).eval(), spec, {"model_uri": "untrained DCGAN"})


def weights_for(args: argparse.Namespace) -> tuple[Path, str]:
    if not args.random_weights:
        try:
            return standard_weights(args.inception_weights)[0], "FID weights"
        except WeightsUnavailable as exc:
            print(f"no usable FID weights ({exc}): using random weights (timings valid, FID values not meaningful)")
    path = storage.ganpipe_home() / "cache" / "benchmarks" / "random-inception.pth"
    if not path.exists():
        write_random_weights(path)
    # fid refuses any file but the standard one; in this process only, the stand-in takes its place.
    inception.STANDARD_WEIGHTS_SHA256 = storage.sha256_file(path)
    return path, "random weights in the FID layout"


def time_ganpipe(real: RealSamples, fake: GeneratedSamples, weights: Path) -> tuple[float, float]:
    start = time.perf_counter()
    ctx = EvalContext(real, fake, bootstrap=0, inception_weights=str(weights))
    value = evaluate(ctx, ["fid"])["fid"]["value"]
    return time.perf_counter() - start, value


def time_torch_fidelity(real_images: RealImages, fake: GeneratedSamples, weights: Path, cache_name: str,
                        cache_root: Path, device: torch.device) -> tuple[float, float, float]:
    import torch_fidelity

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fid-speed-png-") as folder:
        index = 0
        for batch, _ in fake.batches():
            for image in batch.numpy():
                Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(f"{folder}/{index:06d}.png")
                index += 1
        written = time.perf_counter() - start
        # Weights and torch-fidelity's cache are read tensor- and array-only, never as code.
        with weights_only_loads(), torch.serialization.safe_globals(NUMPY_ARRAYS):
            metrics = torch_fidelity.calculate_metrics(
                input1=folder, input2=real_images, input2_cache_name=cache_name, cache_root=str(cache_root),
                fid=True, cuda=device.type == "cuda", feature_extractor_weights_path=str(weights), verbose=False)
    return time.perf_counter() - start, metrics["frechet_inception_distance"], written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, help="generated images (default 50,000 on GPU, 5,000 on CPU)")
    parser.add_argument("--num-real", type=int, default=1797, help="real images behind the cached statistics")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--model", help="MODEL to generate with (default: an untrained DCGAN)")
    parser.add_argument("--inception-weights")
    parser.add_argument("--random-weights", action="store_true", help="time with random weights in the FID layout")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="cache the real statistics untimed first (--no-warmup: the timed runs pay for it; "
                             "for checking that the script runs, not for figures)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_images = args.num_images or (50_000 if device.type == "cuda" else 5_000)
    weights, weights_kind = weights_for(args)
    data = open_prepared(ingest(DataConfig(source="builtin:digits", resolution=args.resolution)).location)
    real = RealSamples(data, args.num_real)
    loaded = generator_for(args, device, data.sample_shape)
    fake = GeneratedSamples(loaded, num_images, seed=1, device=device)
    cache_root = storage.ganpipe_home() / "cache" / "benchmarks" / "torch-fidelity"
    cache_name = f"ganpipe-bench-{data.fingerprint[:16]}-n{real.num_samples}-{storage.sha256_file(weights)[:12]}"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}; {num_images} generated {data.sample_shape} images "
          f"({loaded.source.get('model_uri')}); real statistics from {real.num_samples} digits; {weights_kind}")

    real_images = RealImages(real)
    if args.warmup:  # untimed: both tools extract and cache the real statistics
        warm = time.perf_counter()
        time_ganpipe(real, GeneratedSamples(loaded, 8, seed=1, device=device), weights)
        time_torch_fidelity(real_images, GeneratedSamples(loaded, 8, seed=1, device=device), weights, cache_name,
                            cache_root, device)
        print(f"warm-up (real statistics cached by both): {time.perf_counter() - warm:.1f} s")

    ours_s, ours = time_ganpipe(real, fake, weights)
    theirs_s, theirs, png_s = time_torch_fidelity(real_images, fake, weights, cache_name, cache_root, device)
    relative = abs(ours - theirs) / max(abs(theirs), 1e-12)
    print(f"ganpipe        {ours_s:8.1f} s {num_images / ours_s:8.1f} images/s   FID {ours:.6f}")
    print(f"torch-fidelity {theirs_s:8.1f} s {num_images / theirs_s:8.1f} images/s   FID {theirs:.6f}"
          f"   (generate + PNG {png_s:.1f} s)")
    print(f"speed-up {theirs_s / ours_s:.2f}x; relative FID difference {relative:.2e} "
          f"({'OK' if relative <= 1e-3 else 'MISMATCH'}: <= 1e-3)")
    if args.json:
        print(json.dumps({"device": str(device), "num_images": num_images, "num_real": real.num_samples,
                          "weights": weights_kind, "ganpipe_seconds": ours_s, "torch_fidelity_seconds": theirs_s,
                          "speedup": theirs_s / ours_s, "fid_ganpipe": ours, "fid_torch_fidelity": theirs,
                          "relative_difference": relative}))
    return 0 if relative <= 1e-3 else 1


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
