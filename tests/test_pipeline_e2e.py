"""The whole chain at tiny size, as a user runs it: `ganpipe pipeline CONFIG --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from tests.conftest import TINY_DIGITS, last_json, run_cli, write_config


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path: Path, ganpipe_home: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    result = run_cli("pipeline", str(config), "--set", "export.num_images=200", "--set", "export.shard_size=64",
                     "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["model_uri"] == "models:/tiny-digits/1" and summary["version"] == 1
    assert summary["aliases"] == ["champion"]
    fd = summary["metrics"]["fd_domain"]
    assert np.isfinite(fd["value"]) and fd["value"] > 0 and fd["uncertainty"] > 0
    assert "mlflow ui --backend-store-uri" in result.stdout and "ganpipe pipeline finished" in result.stdout

    # The export reads back through datasets, every row once, reproducible from its seed.
    export = summary["export"]
    assert export["num_images"] == 200 and export["num_shards"] == 4
    files = sorted(str(p) for p in Path(export["out"]).glob("data/*.parquet"))
    rows = datasets.load_dataset("parquet", data_files=files, split="train")
    assert rows.num_rows == 200
    assert sorted(rows["index"]) == list(range(200))
    assert len(set(rows["seed"])) == 200
    assert np.asarray(rows[0]["image"]).shape == (16, 16)
    manifest = json.loads(Path(export["manifest"]).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 64, 8]

    # The registered version carries its lineage and loads in a process that imports only mlflow + torch.
    fingerprint = summary["data_fingerprint"]
    script = f"""
import sys, mlflow, pandas as pd, numpy as np
mlflow.set_tracking_uri("sqlite:///{ganpipe_home}/mlflow.db")
client = mlflow.MlflowClient()
version = client.get_model_version_by_alias("tiny-digits", "champion")
assert version.tags["ganpipe.data_fingerprint"] == "{fingerprint}", version.tags
model = mlflow.pyfunc.load_model("models:/tiny-digits@champion")
assert "ganpipe" not in sys.modules
out = model.predict(pd.DataFrame({{"seed": [5, 6, 7]}}))
again = model.predict(pd.DataFrame({{"seed": [7]}}))
assert out.dtype == np.uint8 and out.shape == (3, 16, 16, 1), out.shape
assert (out[2] == again[0]).all()
print("ok")
"""
    check = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stderr[-3000:]


def test_bad_evaluation_settings_are_one_error_line_before_prefect_starts(tmp_path: Path, ganpipe_home: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)
    for overrides, expected in ((["eval.metrics=[fd_domain,lpips]", "register.primary_metric=lpips"],
                                 "error: register.primary_metric: lpips needs eval.lpips_weights"),
                                (["register.primary_metric=kid"], "error: register.primary_metric: 'kid' is not among")):
        result = run_cli("pipeline", str(config), *[a for o in overrides for a in ("--set", o)])
        assert result.returncode == 2
        assert result.stderr.strip().startswith(expected) and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr[-2000:]
        assert "Starting temporary server" not in result.stderr
    assert not (ganpipe_home / "runs").exists()  # nothing was prepared or trained
