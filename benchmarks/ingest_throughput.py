"""Ingest throughput: N (default 60,000) 28x28 greyscale PNGs in one parquet file.

Reports images/s and peak memory for
  (a) ganpipe's first ingest (cache miss: every image decoded, shards written),
  (b) an unchanged re-ingest (cache hit: nothing opened or decoded),
  (c) a plain loop that reads the parquet file, decodes each PNG with PIL and stacks them,
  (d) the same loop with torchvision.io.decode_png, for comparison (with torch's import time).
Each measurement runs in its own child process. Peak memory is the kernel's high-water mark of
resident memory (VmHWM) of that process and, for (a), of each decode worker (sampled while they run;
the figure printed is the largest worker's). ru_maxrss is not used: Linux carries it across exec.

    PYTHONPATH=. python benchmarks/ingest_throughput.py [--num-images 60000] [--workers N]

The synthetic data (scikit-learn digits upscaled to 28x28 plus noise, labels 0..9) is written once
to --workdir and reused. Timings are wall-clock: on a shared machine, say how busy it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import peak_rss_mb  # noqa: E402


def watch_children() -> dict[int, float]:
    """Peak memory of this process's children (the decode workers), sampled every 50 ms."""
    import threading

    peaks: dict[int, float] = {}

    def sample() -> None:
        while True:
            for task in Path("/proc/self/task").iterdir():
                for pid in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):  # exited meanwhile
                        peaks[int(pid)] = max(peaks.get(int(pid), 0.0), peak_rss_mb(pid))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    return peaks


def make_parquet(path: Path, num_images: int) -> None:
    import io

    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    bases = [np.asarray(Image.fromarray(np.uint8(d * 255 / 16)).resize((28, 28), Image.Resampling.BILINEAR),
                        dtype=np.int16) for d in digits.images]
    encoded, labels = [], []
    for i in range(num_images):
        k = i % len(bases)
        noisy = np.clip(bases[k] + rng.integers(-12, 13, (28, 28)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy, mode="L").save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(int(digits.target[k]))
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    table = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features).data.table
    path.parent.mkdir(parents=True, exist_ok=True)
    # Row groups of 1,000 rows, with the Hugging Face features in the schema metadata, like the
    # parquet files on the hub (which use even smaller row groups for images).
    pq.write_table(table, str(path) + ".tmp", row_group_size=1000)
    os.replace(str(path) + ".tmp", path)


# --- measurements, each run in a child process ------------------------------------------------------

def measure_ingest(data: Path, workers: int | None, shard_size: int, max_records: int | None) -> dict:
    started = time.perf_counter()
    from ganpipe.config import DataConfig
    from ganpipe.data import ingest

    imported = time.perf_counter()
    cfg = DataConfig(source=str(data), resolution=28, channels=1, shard_size=shard_size, max_records=max_records)
    result = ingest(cfg, workers=workers)
    done = time.perf_counter()
    return {"seconds": done - imported, "import_seconds": imported - started, "cached": result.cached,
            "num_records": result.num_records, "fingerprint": result.fingerprint}


def measure_plain_pil(data: Path) -> dict:
    started = time.perf_counter()
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    imported = time.perf_counter()
    images = []
    for batch in pq.ParquetFile(data).iter_batches(columns=["image"]):
        for value in batch.column(0).to_pylist():
            images.append(np.asarray(Image.open(io.BytesIO(value["bytes"]))))
    stacked = np.stack(images)
    return {"seconds": time.perf_counter() - imported, "import_seconds": imported - started,
            "num_records": len(stacked), "shape": list(stacked.shape)}


def measure_plain_torchvision(data: Path) -> dict:
    started = time.perf_counter()
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torchvision.io import ImageReadMode, decode_png

    torch.set_num_threads(1)
    imported = time.perf_counter()
    images = []
    for batch in pq.ParquetFile(data).iter_batches(columns=["image"]):
        for value in batch.column(0).to_pylist():
            encoded = torch.frombuffer(bytearray(value["bytes"]), dtype=torch.uint8)
            images.append(decode_png(encoded, ImageReadMode.GRAY).numpy())
    stacked = np.stack(images)
    return {"seconds": time.perf_counter() - imported, "import_seconds": imported - started,
            "num_records": len(stacked), "shape": list(stacked.shape)}


def child(args: argparse.Namespace) -> None:
    if args.child == "make":
        make_parquet(args.data, args.num_images)
        return
    workers_peak = watch_children()
    if args.child == "ingest":
        out = measure_ingest(args.data, args.workers, args.shard_size, args.max_records)
    elif args.child == "pil":
        out = measure_plain_pil(args.data)
    else:
        out = measure_plain_torchvision(args.data)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu_seconds"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    out["peak_rss_mb"] = peak_rss_mb()
    out["worker_peak_rss_mb"] = max(workers_peak.values(), default=0.0)
    out["num_workers_seen"] = len(workers_peak)
    print(json.dumps(out))


def run_child(mode: str, args: argparse.Namespace, home: Path, shard_size: int | None = None,
              max_records: int | None = None) -> dict:
    env = dict(os.environ, GANPIPE_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, __file__, "--child", mode, "--data", str(args.data),
               "--shard-size", str(shard_size or args.shard_size)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if max_records is not None:
        command += ["--max-records", str(max_records)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_seconds"] = wall
    return out


def report(label: str, out: dict) -> None:
    n = out["num_records"]
    rate = n / out["seconds"] if out["seconds"] > 0 else float("inf")
    workers = (f" + {out['num_workers_seen']} decode workers, {out['worker_peak_rss_mb']:.0f} MB each at most"
               if out["num_workers_seen"] else "")
    print(f"{label:<44} {out['seconds']:6.2f} s {rate:9,.0f} images/s  CPU {out['cpu_seconds']:5.1f} s   "
          f"peak {out['peak_rss_mb']:4.0f} MB{workers}   (imports {out['import_seconds']:.2f} s, "
          f"whole process {out['process_seconds']:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=60_000)
    parser.add_argument("--workers", type=int, help="decode workers (default: the CPUs available)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ganpipe-ingest-bench"))
    parser.add_argument("--skip-torchvision", action="store_true")
    parser.add_argument("--child", choices=["make", "ingest", "pil", "torchvision"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-records", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    args.data = args.workdir / f"pngs-{args.num_images}.parquet"
    if not args.data.exists():
        print(f"writing {args.num_images:,} PNGs to {args.data} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", "make", "--data", str(args.data),
                        "--num-images", str(args.num_images)], check=True)
    n = args.num_images
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{n:,} 28x28 greyscale PNGs, {args.data.stat().st_size / 2**20:.1f} MiB parquet "
          f"({n * 28 * 28 / 2**20:.0f} MiB decoded); {cpus} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} before the run; shard size {args.shard_size:,}")

    home = args.workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    first = run_child("ingest", args, home)
    assert not first["cached"] and first["num_records"] == n, first
    report("(a) ganpipe ingest, first (decodes all)", first)
    again = run_child("ingest", args, home)
    assert again["cached"] and again["fingerprint"] == first["fingerprint"], again
    report("(b) ganpipe ingest, unchanged (cache hit)", again)
    plain = run_child("pil", args, home)
    report("(c) plain loop: PIL decode + np.stack", plain)
    if not args.skip_torchvision:
        report("(d) plain loop: torchvision decode_png", run_child("torchvision", args, home))
    # Memory bounded by the shard size, not the dataset size: a third of the rows peaks about
    # as high; a tenth of the shard size lowers the peak by the shard buffer.
    report(f"(a') first ingest of {n // 3:,} rows only", run_child("ingest", args, home, max_records=n // 3))
    report(f"(a'') first ingest, shard size {args.shard_size // 10:,}",
           run_child("ingest", args, home, shard_size=args.shard_size // 10))
    shutil.rmtree(home, ignore_errors=True)
    print(f"first ingest vs plain PIL loop: {plain['seconds'] / first['seconds']:.2f}x wall-clock, "
          f"{plain['cpu_seconds'] / first['cpu_seconds']:.2f}x CPU time; cache hit: {again['seconds']:.2f} s in "
          f"ingest(), {again['process_seconds']:.2f} s for the whole process; "
          f"load average {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
