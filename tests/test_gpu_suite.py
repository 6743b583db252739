"""benchmarks/gpu_suite.py cannot rot: `--quick` runs every part of it on a CPU (the training
throughput of each family, precision and data path, FID against torch-fidelity with random
weights, export) and writes the JSON file of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_gpu_suite_runs_every_part_quickly_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick", "--out", str(out), "--part-timeout", "1800"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    parts = figures["parts"]
    assert figures["quick"] is True and not [name for name, part in parts.items() if "error" in part]
    trains = {name: part for name, part in parts.items() if name.startswith("train")}
    assert {part["family"] for part in trains.values()} == {"dcgan", "resnet", "r3gan"}
    fast = trains["train r3gan 32px bf16 cl"]["ganpipe"]
    assert set(fast) == {"device", "prefetch", "sync"} and fast["sync"]["mode"] == "sync"
    assert fast["device"]["mode"] == "prefetch"  # the on-device cache is for CUDA only
    assert all(row["images_per_s"] > 0 for part in trains.values() for row in part["ganpipe"].values())
    assert trains["train dcgan 32px fp32"]["ganpipe"]["prefetch"]["ratio_to_plain"] > 0
    assert parts["fid"]["relative_difference"] <= 1e-3 and parts["export"]["parquet_images_per_s"] > 0
    table = proc.stdout.split("\n\n")[-2]
    assert "x plain no" in table and "x torch-fidelity" in table and "x one PNG per image" in table
