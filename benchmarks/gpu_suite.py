"""The GPU figures in one call: training throughput, FID-50k, export. Prints one table and writes
one JSON file of figures.

    python -m benchmarks.gpu_suite [--out gpu_suite.json]        # a GPU box: 8-10 minutes on an H200 (estimated)
    python -m benchmarks.gpu_suite --quick                       # any machine: the same code paths, tiny

Each part runs the repository's own benchmark script in a child process (one Accelerate state,
precision and device per process, as `ganpipe train` has), with `--json`:

- training (benchmarks/train_throughput.py), against a plain PyTorch fp32 loop with the same
  networks and batch: at 64 px, every family (dcgan, resnet, r3gan) in fp32, and in bf16 with
  channels_last through each data path (dataset on the device, prefetching from the memory map,
  synchronous gathering), DCGAN also compiled; at 32 px, every family in bf16 with channels_last.
  Goal: >= 2x the plain fp32 loop at DCGAN 64 px through the fast path.
- FID of 50,000 generated images against cached real statistics, ganpipe against torch-fidelity on
  the same images and weights (benchmarks/fid_speed.py; random weights in the FID layout when the
  real file is absent: timings hold, values are not FIDs). Goal: >= 3x faster, values within 1e-3.
- FID at scale (benchmarks/fid_scale.py): images/s of on-device generation + Inception + streamed
  statistics, FID wall time and peak host and device memory for N = 5,000 and 20,000 (the fid
  part gives 50,000), and the statistics alone, streamed against held, at 4,096 and 16,384
  features: memory flat in N when streamed.
- export images/s against the plain one-PNG-per-image loop (benchmarks/export_throughput.py).
  Goal: >= 5x.

A part that fails is reported in the table and the JSON (its error's last line), and the others
still run; the exit code is 1 then.
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

ROOT = Path(__file__).resolve().parents[1]

Part = tuple[str, str, list[str]]  # (name, module, arguments)


def parts(quick: bool) -> list[Part]:
    """What to run: the GPU sizes, or with `quick` the same paths at sizes a CPU runs in minutes."""
    if quick:
        size = ["--batch-size", "8", "--width", "8", "--steps", "2", "--warmup", "1", "--repeats", "1"]
        train = [(f"train {family} 32px {label}", "benchmarks.train_throughput",
                  ["--family", family, "--resolution", "32", *size, *options])
                 for family in ("dcgan", "resnet", "r3gan")
                 for label, options in (("fp32", []),
                                        ("bf16 cl", ["--precision", "bf16", "--channels-last", "--no-plain",
                                                     "--data-path", "device", "prefetch", "sync"]))]
        train.append(("train dcgan 32px bf16 cl compile", "benchmarks.train_throughput",
                      ["--family", "dcgan", "--resolution", "32", *size, "--precision", "bf16", "--channels-last",
                       "--compile", "--no-plain"]))
        return [*train,
                ("fid", "benchmarks.fid_speed", ["--num-images", "32", "--num-real", "32", "--random-weights",
                                                  "--no-warmup"]),
                ("fid scale", "benchmarks.fid_scale", ["--num-images", "8", "--no-warmup", "--num-real", "32", "--stream-from",
                                                       "0", "--bootstrap", "2", "--random-weights",
                                                       "--statistics-images", "2048"]),
                ("export", "benchmarks.export_throughput", ["--num-images", "128"])]
    size = ["--batch-size", "256", "--width", "64", "--steps", "25", "--warmup", "8", "--repeats", "1"]
    train = []
    for family in ("dcgan", "resnet", "r3gan"):
        train += [(f"train {family} 64px fp32", "benchmarks.train_throughput",
                   ["--family", family, "--resolution", "64", *size, "--data-path", "device"]),
                  (f"train {family} 64px bf16 cl", "benchmarks.train_throughput",
                   ["--family", family, "--resolution", "64", *size, "--precision", "bf16", "--channels-last",
                    "--no-plain", "--data-path", "device", "prefetch", "sync"])]
    train.append(("train dcgan 64px bf16 cl compile", "benchmarks.train_throughput",
                  ["--family", "dcgan", "--resolution", "64", *size, "--precision", "bf16", "--channels-last",
                   "--compile", "--no-plain", "--data-path", "device"]))
    train += [(f"train {family} 32px bf16 cl", "benchmarks.train_throughput",
               ["--family", family, "--resolution", "32", *size, "--precision", "bf16", "--channels-last",
                "--data-path", "device"]) for family in ("dcgan", "resnet", "r3gan")]
    return [*train,
            ("fid", "benchmarks.fid_speed", ["--num-images", "50000", "--num-real", "1797"]),
            ("fid scale", "benchmarks.fid_scale", ["--num-images", "5000", "20000", "--num-real", "1797"]),
            ("export", "benchmarks.export_throughput", ["--num-images", "50000"])]


def run_part(module: str, arguments: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", module, *arguments, "--json"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        last = (done.stderr.strip().splitlines() or lines or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {last[:300]}", "seconds": seconds}
    return {**json.loads(lines[-1]), "seconds": seconds}


def table_rows(name: str, result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, figure, against the baseline) rows for one part."""
    if "error" in result:
        return [(name, "FAILED", result["error"])]
    if name.startswith("train"):
        plain = result.get("plain_images_per_s")
        rows = [(f"{name} [{path}, ran {row['mode']}]", f"{row['images_per_s']:,.0f} img/s",
                 f"{row['ratio_to_plain']:.2f}x plain {result['plain_precision']}" if row.get("ratio_to_plain") else "")
                for path, row in result["ganpipe"].items()]
        if plain:
            rows.append((f"{name} [plain loop]", f"{plain:,.0f} img/s", ""))
        return rows
    if name == "fid":
        return [(f"fid {result['num_images']:,} images ({result['weights']})",
                 f"{result['ganpipe_seconds']:.1f} s vs {result['torch_fidelity_seconds']:.1f} s",
                 f"{result['speedup']:.2f}x torch-fidelity, rel. diff {result['relative_difference']:.1e}")]
    if name == "fid scale":
        return [(f"fid scale N={row['num_images']:,} {row['part']} {'streamed' if row['streamed'] else 'held'}",
                 f"{row['images_per_s']:,.1f} img/s, FID {row['fid_seconds']:.1f} s" if row["part"] == "pipeline"
                 else f"{row['seconds']:.1f} s",
                 f"peak +{row['peak_mb']:,.0f} MB host" + (f", {row['device_peak_mb']:,.0f} MB device"
                                                           if row["device_peak_mb"] is not None else ""))
                for row in result["rows"]]
    return [(f"export {result['num_images']:,} images (parquet)", f"{result['parquet_images_per_s']:,.0f} img/s",
             f"{result['parquet_vs_plain_png']:.2f}x one PNG per image")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check on a CPU that every part runs")
    parser.add_argument("--out", type=Path, default=Path("gpu_suite.json"), help="the JSON file of figures")
    parser.add_argument("--part-timeout", type=float, default=600, help="seconds one part may take")
    args = parser.parse_args()

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} CPUs)"
    started = time.perf_counter()
    results: dict[str, Any] = {"device": device, "quick": args.quick, "parts": {}}
    print(f"gpu_suite on {device}{' (quick)' if args.quick else ''}", flush=True)
    for name, module, arguments in parts(args.quick):
        result = run_part(module, arguments, args.part_timeout)
        results["parts"][name] = result
        status = "FAILED" if "error" in result else "ok"
        print(f"  {name:<40} {result['seconds']:6.1f} s {status}", flush=True)
    results["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2))

    rows = [row for name, result in results["parts"].items() for row in table_rows(name, result)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"\n{results['seconds']:.0f} s in all; figures in {args.out}")
    return 1 if any("error" in r for r in results["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
