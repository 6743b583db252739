"""FID at scale: images/s of feature extraction, FID wall time and peak memory against the number
of generated images N, the real side's statistics cached beforehand.

Two parts, each N measured in a fresh child process (so each peak is its own):

  pipeline    an untrained DCGAN (or --model) generates N images on the device, Inception takes
              them there and the statistics stream (`evaluate(ctx, ["fid"])`, as `ganpipe
              evaluate` runs it). Reports images/s of generation + extraction + accumulation,
              the FID wall time (cached reference read, fake side, distance with its bootstrap),
              the peak resident memory and, on CUDA, the peak device memory.
  statistics  the statistics alone on N synthetic 2048-d features (no network): streamed
              moments against holding the features (the path below `stream_from`), so the
              memory of each can be read against N at sizes a CPU reaches in seconds.

Memory figures are the peak above the process's resident size when the part began (MB).

    python -m benchmarks.fid_scale                                   # GPU: N = 10,000 and 50,000
    python -m benchmarks.fid_scale --num-images 16 64 --stream-from 0 --random-weights   # a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import ROOT, peak_rss_mb
from benchmarks.fid_speed import generator_for, weights_for
from ganpipe.config import DataConfig
from ganpipe.data import ingest, open_prepared
from ganpipe.metrics import EvalContext, evaluate
from ganpipe.metrics.frechet import frechet_of_moments, frechet_with_uncertainty
from ganpipe.metrics.inception import FEATURES
from ganpipe.metrics.samples import GeneratedSamples, RealSamples
from ganpipe.metrics.streaming import GaussianMoments

CHUNK = 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def pipeline(args: argparse.Namespace, num_images: int) -> dict[str, Any]:
    """One FID of `num_images` generated images against the cached real statistics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights, weights_kind = weights_for(args)
    data = open_prepared(ingest(DataConfig(source="builtin:digits", resolution=args.resolution)).location)
    loaded = generator_for(args, device, data.sample_shape)
    ctx = EvalContext(RealSamples(data, args.num_real), GeneratedSamples(loaded, num_images, seed=1, device=device),
                      bootstrap=args.bootstrap, inception_weights=str(weights), stream_from=args.stream_from)
    started = time.perf_counter()
    ctx.extractor("inception")
    load_s = time.perf_counter() - started
    before = rss_mb()
    started = time.perf_counter()
    ctx.reference_stats("inception")
    reference_s = time.perf_counter() - started
    started = time.perf_counter()
    if ctx.streams("inception"):
        ctx.fake_moments("inception")
    else:
        ctx.features("inception", ctx.fake)
    synchronise(device)
    extract_s = time.perf_counter() - started
    started = time.perf_counter()
    result = evaluate(ctx, ["fid"])["fid"]
    distance_s = time.perf_counter() - started
    return {"part": "pipeline", "num_images": num_images, "streamed": result["streamed"], "weights": weights_kind,
            "images_per_s": num_images / extract_s, "fid_seconds": reference_s + extract_s + distance_s,
            "extract_seconds": extract_s, "distance_seconds": distance_s, "inception_load_seconds": load_s,
            "fid": result["value"], "uncertainty": result["uncertainty"], "peak_mb": peak_rss_mb() - before,
            "device_peak_mb": device_peak_mb(device)}


def statistics(args: argparse.Namespace, num_images: int, streamed: bool) -> dict[str, Any]:
    """The statistics of `num_images` synthetic features: streamed, or held as the features."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(FEATURES, FEATURES, generator=generator) / FEATURES**0.5
    reference = GaussianMoments(FEATURES, device=device)
    reference.update((torch.randn(CHUNK, FEATURES, generator=generator) @ mixing).to(device), 0)
    reference_stats = tuple(t.cpu().numpy() for t in reference.row(0))
    del reference
    chunks = ((torch.randn(min(CHUNK, num_images - first), FEATURES, generator=generator) + 0.1) @ mixing
              for first in range(0, num_images, CHUNK))
    before = rss_mb()
    started = time.perf_counter()
    if streamed:
        moments = GaussianMoments(FEATURES, args.statistics_bootstrap, device=device)
        for first, chunk in zip(range(0, num_images, CHUNK), chunks, strict=True):
            moments.update(chunk.to(device), first)
        value = frechet_of_moments(reference_stats, moments, device=device)["value"]
    else:
        held = np.concatenate([chunk.numpy() for chunk in chunks])
        value = frechet_with_uncertainty(reference_stats, held, args.statistics_bootstrap, device=device)["value"]
    synchronise(device)
    return {"part": "statistics", "num_images": num_images, "streamed": streamed,
            "seconds": time.perf_counter() - started, "fd": value, "peak_mb": peak_rss_mb() - before,
            "device_peak_mb": device_peak_mb(device)}


def child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """Run this script for one measurement in a fresh process; its JSON line."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    passed = ["--num-real", str(args.num_real), "--resolution", str(args.resolution), "--bootstrap", str(args.bootstrap),
              "--statistics-bootstrap", str(args.statistics_bootstrap)]
    passed += ["--stream-from", str(args.stream_from)] if args.stream_from is not None else []
    passed += ["--random-weights"] if args.random_weights else []
    passed += ["--inception-weights", args.inception_weights] if args.inception_weights else []
    passed += ["--model", args.model] if args.model else []
    done = subprocess.run([sys.executable, "-m", "benchmarks.fid_scale", *passed, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fid_scale {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, nargs="+", help="N (default 10,000 and 50,000 on GPU, 16 and 64 on CPU)")
    parser.add_argument("--statistics-images", type=int, nargs="+", default=[4096, 16384],
                        help="N of the statistics part (0: skip it)")
    parser.add_argument("--num-real", type=int, default=1797, help="real images behind the cached statistics")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=20, help="bootstrap replicates of the pipeline's FID")
    parser.add_argument("--statistics-bootstrap", type=int, default=0,
                        help="replicates in the statistics part (streamed memory grows by d x d x 8 bytes each)")
    parser.add_argument("--stream-from", type=int, help="stream from this N (default: the feature dimension, 2048)")
    parser.add_argument("--model")
    parser.add_argument("--inception-weights")
    parser.add_argument("--random-weights", action="store_true", help="time with random weights in the FID layout")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="ingest and cache the real statistics in an untimed first child (--no-warmup: the "
                             "first size pays for it; for checking that the script runs, not for figures)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    parser.add_argument("--child", nargs=2, metavar=("PART", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        part, n = args.child[0], int(args.child[1])
        result = pipeline(args, n) if part == "pipeline" else statistics(args, n, part == "streamed")
        print(json.dumps(result))
        return 0

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
    sizes = args.num_images or ([10_000, 50_000] if cuda else [16, 64])
    print(f"fid_scale on {device}; real statistics from {args.num_real} digits at {args.resolution} px; "
          f"bootstrap {args.bootstrap} (statistics part: {args.statistics_bootstrap})")
    if args.warmup:
        child(args, "--child", "pipeline", "2")  # ingests, and caches the real statistics
    rows = [child(args, "--child", "pipeline", str(n)) for n in sizes]
    for row in rows:
        print(f"  pipeline   N={row['num_images']:>6,} {'streamed' if row['streamed'] else 'held':8} "
              f"{row['images_per_s']:9.1f} images/s  FID in {row['fid_seconds']:7.1f} s "
              f"(distance {row['distance_seconds']:.1f} s)  peak +{row['peak_mb']:7.0f} MB host"
              + (f", {row['device_peak_mb']:7.0f} MB device" if row["device_peak_mb"] is not None else ""))
    for n in [n for n in args.statistics_images if n > 0]:
        for mode in ("streamed", "held"):
            row = child(args, "--child", mode, str(n))
            rows.append(row)
            print(f"  statistics N={n:>6,} {mode:8} {row['seconds']:7.1f} s  peak +{row['peak_mb']:7.0f} MB host"
                  + (f", {row['device_peak_mb']:7.0f} MB device" if row["device_peak_mb"] is not None else ""))
    if args.json:
        print(json.dumps({"device": device, "bootstrap": args.bootstrap,
                          "statistics_bootstrap": args.statistics_bootstrap, "rows": rows}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
