"""Each kind of bad record under both policies, through the CLI (`ganpipe ingest CONFIG --json`).

`error`: exit 2 and one `error:` line naming the source and the row. `skip`: the row is dropped,
counted, and its id is in report.json; the good rows are prepared as usual. Faults of the whole
dataset (a missing column, no rows at all) cannot be skipped: exit 2 under both policies.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ganpipe import cli
from ganpipe.data import open_prepared
from tests.conftest import error_lines, last_json, run_cli
from tests.test_ingest import noise_images, png, write_data_config

BAD_ROW = 3
ROWS = 6


def _images_with(bad: Any) -> list:
    encoded: list = [png(a) for a in noise_images(ROWS)]
    encoded[BAD_ROW] = bad
    return encoded


def corrupt_image(tmp: Path) -> dict:
    pq.write_table(pa.table({"image": _images_with(b"these bytes are no image")}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet")}


def truncated_image(tmp: Path) -> dict:
    whole = png(noise_images(1, size=8, seed=7)[0])
    pq.write_table(pa.table({"image": _images_with(whole[: len(whole) // 2])}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet")}


def missing_image(tmp: Path) -> dict:
    pq.write_table(pa.table({"image": pa.array(_images_with(None), pa.binary())}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet")}


def missing_image_file(tmp: Path) -> dict:
    (tmp / "files").mkdir()
    paths = []
    for i, image in enumerate(noise_images(ROWS)):
        paths.append(f"files/{i}.png")
        if i != BAD_ROW:
            (tmp / "files" / f"{i}.png").write_bytes(png(image))
    pq.write_table(pa.table({"file": paths}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet"), "image_column": "file"}


def label_outside_classes(tmp: Path) -> dict:
    labels = ["cat", "dog", "cat", "emu", "dog", "cat"]
    pq.write_table(pa.table({"image": _images_with(png(noise_images(1)[0])), "label": labels}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet"), "classes": ["cat", "dog"]}


def non_numeric_value(tmp: Path) -> dict:
    rows = ["x,y"] + [f"{i}.5,{i * 2}" for i in range(ROWS)]
    rows[1 + BAD_ROW] = "abc,6"
    (tmp / "d.csv").write_text("\n".join(rows) + "\n")
    return {"source": str(tmp / "d.csv"), "kind": "vector", "columns": ["x", "y"]}


ROW_FAULTS: dict[str, tuple[Callable[[Path], dict], str]] = {
    "corrupt": (corrupt_image, "undecodable image"),
    "truncated": (truncated_image, "undecodable image"),
    "missing image": (missing_image, "missing image"),
    "missing image file": (missing_image_file, "image file not found"),
    "label outside classes": (label_outside_classes, "'emu' not in data.classes"),
    "non-numeric value": (non_numeric_value, "non-numeric value 'abc' in column 'x'"),
}


def missing_column(tmp: Path) -> dict:
    pq.write_table(pa.table({"image": _images_with(png(noise_images(1)[0]))}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet"), "label_column": "species"}


def missing_vector_column(tmp: Path) -> dict:
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet"), "kind": "vector", "columns": ["x", "z"]}


def empty_dataset(tmp: Path) -> dict:
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}),
                   tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet")}


def only_bad_rows(tmp: Path) -> dict:
    pq.write_table(pa.table({"image": [b"junk", b"more junk"]}), tmp / "d.parquet")
    return {"source": str(tmp / "d.parquet")}


DATASET_FAULTS: dict[str, tuple[Callable[[Path], dict], str]] = {
    "missing column": (missing_column, "data.label_column: column 'species' not found"),
    "missing vector column": (missing_vector_column, "data.columns: column 'z' not found"),
    "empty dataset": (empty_dataset, "the dataset is empty"),
}


def ingest_in_process(config: Path) -> tuple[int, dict | None, str]:
    """`ganpipe ingest CONFIG --json` in this process (fast): exit code, JSON, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.run(["ingest", str(config), "--json"])
    return code, (last_json(stdout.getvalue()) if code == 0 else None), stderr.getvalue()


@pytest.mark.parametrize("fault", list(ROW_FAULTS))
def test_bad_row_with_policy_error_exits_2_naming_source_and_row(fault: str, tmp_path: Path) -> None:
    make, reason = ROW_FAULTS[fault]
    data = make(tmp_path)
    result = run_cli("ingest", str(write_data_config(tmp_path / "c.yaml", {**data, "resolution": 8})), "--json")
    errors = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert data["source"] in errors[0] and f"row {BAD_ROW}:" in errors[0] and reason in errors[0], errors[0]
    assert not list((tmp_path / "ganpipe-home" / "prepared").glob("*/meta.json"))  # nothing half-written


@pytest.mark.parametrize("fault", list(ROW_FAULTS))
def test_bad_row_with_policy_skip_is_dropped_counted_and_reported(fault: str, tmp_path: Path) -> None:
    make, reason = ROW_FAULTS[fault]
    data = {**make(tmp_path), "resolution": 8, "on_bad_record": "skip"}
    code, out, stderr = ingest_in_process(write_data_config(tmp_path / "c.yaml", data))
    assert code == 0, stderr
    assert (out["num_records"], out["num_skipped"]) == (ROWS - 1, 1)
    report = json.loads(Path(out["report"]).read_text())
    assert report["policy"] == "skip" and report["num_skipped"] == 1
    assert [s["row"] for s in report["skipped"]] == [BAD_ROW] and reason in report["skipped"][0]["reason"]

    prepared = open_prepared(out["location"])
    values, labels = prepared.load_all()
    good = [i for i in range(ROWS) if i != BAD_ROW]
    if data.get("kind") == "vector":
        assert values[:, 0].tolist() == [i + 0.5 for i in good] and values[:, 1].tolist() == [2 * i for i in good]
    else:
        kept = noise_images(ROWS)[good]
        if fault != "label outside classes":  # that one has a different image in the bad row only
            assert np.array_equal(values[..., 0], kept)
        assert len(values) == ROWS - 1
    if fault == "label outside classes":
        assert out["classes"] == ["cat", "dog"] and labels.tolist() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("fault", list(DATASET_FAULTS))
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_dataset_faults_exit_2_under_both_policies(fault: str, policy: str, tmp_path: Path) -> None:
    make, reason = DATASET_FAULTS[fault]
    data = {**make(tmp_path), "on_bad_record": policy}
    code, _, stderr = ingest_in_process(write_data_config(tmp_path / "c.yaml", data))
    errors = error_lines(stderr)
    assert code == 2 and len(errors) == 1, stderr
    assert data["source"] in errors[0] and reason in errors[0], errors[0]


def test_every_row_bad_under_skip_is_an_empty_dataset(tmp_path: Path) -> None:
    data = {**only_bad_rows(tmp_path), "on_bad_record": "skip"}
    code, _, stderr = ingest_in_process(write_data_config(tmp_path / "c.yaml", data))
    assert code == 2 and "the dataset is empty: all 2 rows are bad records" in stderr, stderr


def test_dataset_faults_through_the_cli_process(tmp_path: Path) -> None:
    """The in-process runs above use the same `cli.run`; one real process checks the exit code and
    that no traceback leaks."""
    data = {**empty_dataset(tmp_path), "on_bad_record": "skip"}
    result = run_cli("ingest", str(write_data_config(tmp_path / "c.yaml", data)), "--json")
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert "the dataset is empty" in result.stderr and str(tmp_path / "d.parquet") in result.stderr
