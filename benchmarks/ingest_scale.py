"""Large data: does ingest stream, and does training read without loading everything?

Ingests N synthetic 64x64 RGB PNGs (default 20,000 and 100,000) from parquet files with
hub-sized row groups, and reads the prepared data as training does (ganpipe.batches, random
batches of 256 with prefetching), each in a child process of its own. Reports per size:

- ingest: wall time, images/s, peak resident memory (VmHWM) of the ingest process and of its
  largest decode worker;
- training reads: peak anonymous memory (RssAnon, sampled) of a process drawing 400 batches
  through the memory map. File-backed pages of the map count in VmHWM but are page cache the
  kernel reclaims under pressure, so anonymous memory is what must stay bounded.

    PYTHONPATH=. python benchmarks/ingest_scale.py [--sizes 20000 100000] [--workdir DIR]

Memory is bounded when the peaks barely move from the small dataset to the large one while the
decoded data grows 5x (20k x 12 KiB = 234 MiB; 100k = 1.2 GiB). The synthetic data is written
once to --workdir (about 0.5 GB for 100k) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import peak_rss_mb  # noqa: E402
from benchmarks.ingest_throughput import watch_children  # noqa: E402

RESOLUTION = 64
ROWS_PER_FILE = 10_000
ROW_GROUP = 500


def make_parquet(folder: Path, num_images: int) -> None:
    """Coloured, blurred scikit-learn digits at 64x64 with mild noise (PNGs of a few KB, as
    photographs of this size compress), in files of ROWS_PER_FILE rows."""
    import io

    import datasets
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    bases = [np.asarray(Image.fromarray(np.uint8(d * 255 / 16)).resize((RESOLUTION, RESOLUTION),
                                                                        Image.Resampling.BICUBIC), dtype=np.int16)
             for d in digits.images]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, num_images, ROWS_PER_FILE):
        encoded, labels = [], []
        for i in range(start, min(start + ROWS_PER_FILE, num_images)):
            k = i % len(bases)
            colour = rng.integers(40, 256, 3)
            rgb = bases[k][..., None] * colour[None, None, :] // 255 + rng.integers(-4, 5, (RESOLUTION, RESOLUTION, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(int(digits.target[k]))
        table = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features).data.table
        pq.write_table(table, str(folder / f"train-{start // ROWS_PER_FILE:05d}.parquet"), row_group_size=ROW_GROUP)
    (folder / "complete").write_text(str(num_images))


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the measurements, each in a child process -------------------------------------------------

def measure_ingest(data: Path) -> dict:
    from ganpipe.config import DataConfig
    from ganpipe.data import ingest

    workers = watch_children()
    started = time.perf_counter()
    result = ingest(DataConfig(source=str(data), resolution=RESOLUTION, channels=3, label_column="label"))
    return {"seconds": time.perf_counter() - started, "num_records": result.num_records,
            "location": result.location, "peak_rss_mb": peak_rss_mb(),
            "worker_peak_rss_mb": max(workers.values(), default=0.0), "workers": len(workers)}


def measure_reads(location: str, batches: int) -> dict:
    import torch

    from ganpipe.batches import RealBatches
    from ganpipe.data import open_prepared
    from ganpipe.networks import NetworkSpec
    from ganpipe.recipe import BatchSampler

    data = open_prepared(location)
    spec = NetworkSpec(family="dcgan", sample_shape=data.sample_shape, latent_dim=8, num_classes=10)
    source = RealBatches(data, BatchSampler(data.num_records, 256, 0, 0, 1), spec, torch.device("cpu"),
                         torch.contiguous_format, "prefetch", prefetch=2)
    peak, done = [rss_anon_mb()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    baseline = rss_anon_mb()
    started = time.perf_counter()
    for _ in range(batches):
        x, _ = source.next()
    seconds = time.perf_counter() - started
    done.set()
    source.close()
    return {"seconds": seconds, "batches": batches, "images_per_s": batches * 256 / seconds,
            "rss_anon_before_mb": baseline, "rss_anon_peak_mb": peak[0], "vm_hwm_mb": peak_rss_mb(),
            "decoded_mb": data.nbytes / 2**20}


def child(args: argparse.Namespace) -> None:
    if args.child == "make":
        make_parquet(args.data, args.num_images)
        return
    out = measure_ingest(args.data) if args.child == "ingest" else measure_reads(args.location, args.batches)
    print(json.dumps(out))


def run_child(*argv: str, home: Path) -> dict:
    env = dict(os.environ, GANPIPE_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{argv[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--batches", type=int, default=400, help="batches of 256 read per size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ganpipe-ingest-scale"))
    parser.add_argument("--child", choices=["make", "ingest", "reads"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--location", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows = []
    for n in args.sizes:
        data = args.workdir / f"pngs-{n}"
        if not (data / "complete").exists():
            shutil.rmtree(data, ignore_errors=True)
            print(f"writing {n:,} 64x64 PNGs to {data} ...", flush=True)
            run_child("--child", "make", "--data", str(data), "--num-images", str(n), home=args.workdir)
        size_mb = sum(f.stat().st_size for f in data.glob("*.parquet")) / 2**20
        home = args.workdir / f"home-{n}"
        shutil.rmtree(home, ignore_errors=True)
        load = os.getloadavg()[0]
        ingested = run_child("--child", "ingest", "--data", str(data), home=home)
        reads = run_child("--child", "reads", "--location", ingested["location"], "--batches", str(args.batches),
                          home=home)
        rows.append((n, size_mb, load, ingested, reads))
        print(f"{n:>8,} images: parquet {size_mb:7.0f} MiB, decoded {reads['decoded_mb']:6.0f} MiB | ingest "
              f"{ingested['seconds']:6.1f} s ({n / ingested['seconds']:6,.0f} img/s), peak RSS "
              f"{ingested['peak_rss_mb']:5.0f} MiB, largest of {ingested['workers']} decode workers "
              f"{ingested['worker_peak_rss_mb']:4.0f} MiB | training reads {reads['images_per_s']:7,.0f} img/s, "
              f"anonymous memory {reads['rss_anon_before_mb']:4.0f} -> peak {reads['rss_anon_peak_mb']:4.0f} MiB "
              f"(VmHWM with mapped pages {reads['vm_hwm_mb']:5.0f} MiB) | load {load:.1f}", flush=True)
        shutil.rmtree(home, ignore_errors=True)
    if len(rows) > 1:
        (n0, _, _, i0, r0), (n1, _, _, i1, r1) = rows[0], rows[-1]
        print(f"{n1 / n0:.0f}x the images: ingest peak RSS x{i1['peak_rss_mb'] / i0['peak_rss_mb']:.2f}, "
              f"decode worker peak x{i1['worker_peak_rss_mb'] / max(i0['worker_peak_rss_mb'], 1):.2f}, "
              f"training-read anonymous peak x{r1['rss_anon_peak_mb'] / r0['rss_anon_peak_mb']:.2f}")


if __name__ == "__main__":
    main()
