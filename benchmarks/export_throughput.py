"""Export throughput: N (default 100,000) 32x32 RGB images from one DCGAN generator.

Reports images/s and peak memory for
  (a) the bare generation rate: `models.generate` in batches into memory, nothing kept or written,
  (b) `ganpipe export` to local parquet shards (PNG-encoded, overlapped with generation),
  (c) `ganpipe export --format imagefolder` (one PNG file per image, plus metadata.parquet),
  (d) a plain loop that generates batches and saves one PNG file per image with PIL,
and, with --num-processes 2, (e) the parquet export split over 2 processes.
Each runs in its own child process (peak memory = that process's VmHWM). The generator is an
untrained DCGAN of the default width (same cost as a trained one) saved as a run directory.

    PYTHONPATH=. python benchmarks/export_throughput.py [--num-images 100000] [--num-processes 2]

Goal on 2 CPU cores, where generation is the bottleneck: (b) at 85% or more of (a), and faster
than (d). Timings are wall-clock: on a shared machine, say how busy it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import peak_rss_mb, write_untrained_run  # noqa: E402

SHAPE = (3, 32, 32)


def measure(mode: str, run: Path, num_images: int, out: Path, num_processes: int) -> dict:
    from ganpipe.generators import load_generator

    loaded = load_generator(str(run))
    started = time.perf_counter()
    if mode == "bare":
        from ganpipe.export import GENERATE_ROWS
        from ganpipe.networks import generate

        for first in range(0, num_images, GENERATE_ROWS):
            generate(loaded.generator, loaded.spec, list(range(first, min(num_images, first + GENERATE_ROWS))))
    elif mode == "pil":
        from PIL import Image

        from ganpipe.networks import generate

        out.mkdir(parents=True)
        for first in range(0, num_images, 256):
            batch = generate(loaded.generator, loaded.spec, list(range(first, min(num_images, first + 256))))
            for i, image in enumerate(batch.numpy()):
                Image.fromarray(image).save(out / f"{first + i:07d}.png")
    else:
        from ganpipe.config import ExportConfig
        from ganpipe.export import export

        fmt = "imagefolder" if mode == "imagefolder" else "parquet"
        settings = ExportConfig(num_images=num_images, out=str(out), format=fmt, num_processes=num_processes)
        result = export(str(run), settings, progress=False)
        assert result["num_images"] == num_images, result
    seconds = time.perf_counter() - started
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "bytes_written": written}


def run_child(mode: str, args: argparse.Namespace, run: Path, work: Path, num_processes: int = 1) -> dict:
    out = work / f"out-{mode}-{num_processes}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, GANPIPE_HOME=str(work / "home"), TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, __file__, "--child", mode, "--run", str(run), "--out", str(out),
               "--num-images", str(args.num_images), "--num-processes", str(num_processes)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=100_000)
    parser.add_argument("--num-processes", type=int, default=1, help="also time the export over this many processes")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    parser.add_argument("--child", choices=["bare", "parquet", "imagefolder", "pil"], help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.run, args.num_images, args.out, args.num_processes)))
        return

    import torch

    from ganpipe.networks import NetworkSpec

    n = args.num_images
    print(f"{n:,} images {SHAPE[1]}x{SHAPE[2]} RGB from an untrained DCGAN (latent 100, default width); "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} before the run", flush=True)
    with tempfile.TemporaryDirectory(prefix="ganpipe-export-bench-") as tmp:
        work = Path(tmp)
        write_untrained_run(work / "run", NetworkSpec(family="dcgan", sample_shape=SHAPE, latent_dim=100))
        results = {}
        modes = [("bare", "(a) bare generation, nothing written"), ("parquet", "(b) ganpipe export, parquet"),
                 ("imagefolder", "(c) ganpipe export, imagefolder"), ("pil", "(d) plain loop: one PNG per image")]
        for mode, label in modes:
            results[mode] = out = run_child(mode, args, work / "run", work)
            print(f"{label:<40} {out['seconds']:7.1f} s {n / out['seconds']:9,.0f} images/s   "
                  f"peak {out['peak_rss_mb']:5.0f} MB   {out['bytes_written'] / 2**20:7.1f} MiB written", flush=True)
        if args.num_processes > 1:
            out = run_child("parquet", args, work / "run", work, args.num_processes)
            print(f"{f'(e) ganpipe export, {args.num_processes} processes':<40} {out['seconds']:7.1f} s "
                  f"{n / out['seconds']:9,.0f} images/s   peak {out['peak_rss_mb']:5.0f} MB (launcher)", flush=True)
    bare = results["bare"]["seconds"]
    print(f"export (parquet) at {bare / results['parquet']['seconds']:.0%} of the bare generation rate "
          f"(imagefolder {bare / results['imagefolder']['seconds']:.0%}); "
          f"{results['pil']['seconds'] / results['parquet']['seconds']:.2f}x the plain PNG loop; "
          f"load average {os.getloadavg()[0]:.1f} after")
    if args.json:
        print(json.dumps({"num_images": n, **{f"{mode}_images_per_s": n / out["seconds"] for mode, out in results.items()},
                          "parquet_vs_plain_png": results["pil"]["seconds"] / results["parquet"]["seconds"]}))


if __name__ == "__main__":
    main()
