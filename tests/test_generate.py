"""`ganpipe generate --model MODEL --num-images N [--seed S] [--labels L,..] --out FILE`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ganpipe import cli
from ganpipe.generators import load_generator
from ganpipe.networks import generate
from ganpipe.registry import register_run
from ganpipe.synthetic_rows import row_seed
from tests.conftest import error_lines, last_json, run_cli
from tests.test_registry import copy_run


def generate_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`ganpipe generate ARGS` in this process (the argument parsing, checks and writing are the
    CLI's own; one test runs it as a real process)."""
    code = cli.run(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected(run_dir: Path, num_images: int, seed: int, labels: list[int] | None = None) -> np.ndarray:
    """What row i must hold: the sample of seed `row_seed(seed, i)` (and label i), as export makes it."""
    loaded = load_generator(str(run_dir))
    seeds = row_seed(seed, np.arange(num_images)).tolist()
    cycled = [labels[i % len(labels)] for i in range(num_images)] if labels else None
    return generate(loaded.generator, loaded.spec, seeds, cycled).numpy()


def test_generate_conditional_formats(tiny_conditional_run: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    run = str(tiny_conditional_run)
    code, out, err = generate_cli(capsys, "--model", run, "--num-images", "12", "--seed", "3", "--labels", "2,7",
                                  "--out", str(tmp_path / "a.npy"), "--json")
    assert code == 0, err
    assert last_json(out) == {"out": str(tmp_path / "a.npy"), "num_images": 12,
                              "model": str(tiny_conditional_run.resolve())}
    images = np.load(tmp_path / "a.npy")
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 1)
    assert (images == expected(tiny_conditional_run, 12, 3, [2, 7])).all()

    # Same seed again: the same images; another seed: other images.
    assert generate_cli(capsys, "--model", run, "--num-images", "12", "--seed", "3", "--labels", "2,7",
                        "--out", str(tmp_path / "again.npy"))[0] == 0
    assert (np.load(tmp_path / "again.npy") == images).all()
    assert generate_cli(capsys, "--model", run, "--num-images", "12", "--seed", "4", "--labels", "2,7",
                        "--out", str(tmp_path / "other.npy"))[0] == 0
    assert not (np.load(tmp_path / "other.npy") == images).all()

    # Parquet: the same rows, with their label, seed and index; class names work as labels.
    names = load_generator(run).spec.classes
    assert generate_cli(capsys, "--model", run, "--num-images", "12", "--seed", "3", "--labels",
                        f"{names[2]},7", "--out", str(tmp_path / "a.parquet"))[0] == 0
    table = pq.read_table(tmp_path / "a.parquet").to_pydict()
    assert table["label"] == [2, 7] * 6
    assert table["index"] == list(range(12))
    assert table["seed"] == row_seed(3, np.arange(12)).tolist()
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(row["bytes"]))) for row in table["image"]])
    assert (decoded == images[:, :, :, 0]).all()

    # Without --labels every class in turn.
    assert generate_cli(capsys, "--model", run, "--num-images", "10", "--out", str(tmp_path / "all.parquet"))[0] == 0
    assert pq.read_table(tmp_path / "all.parquet").column("label").to_pylist() == list(range(10))

    # A PNG grid: 12 images of 16x16, 4 a row, 2 px apart.
    assert generate_cli(capsys, "--model", run, "--num-images", "12", "--seed", "3", "--labels", "2,7",
                        "--out", str(tmp_path / "grid.png"))[0] == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 18 + 2, 4 * 18 + 2)
    assert (grid[2:18, 20:36] == images[1, :, :, 0]).all()


@pytest.mark.parametrize("args, message", [
    (["--labels", "2,12"], "--labels: '12' is not a class of this model"),
    (["--labels", "-1"], "--labels: '-1' is not a class"),
    (["--labels", "cat"], "--labels: 'cat' is not a class"),
    (["--labels", ","], "--labels: no labels given"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--seed", "-5"], "--seed -5"),
    (["--truncation", "0"], "--truncation 0"),
    (["--out", "x.txt"], "expected a .png, .npy or .parquet file"),
    (["--model", "models:/nothing-here@champion"], "not found in the registry"),
    (["--model", "models:/bad"], "expected models:/NAME@ALIAS"),
])
def test_generate_bad_input(tiny_conditional_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                            args: list[str], message: str) -> None:
    options = {"--model": str(tiny_conditional_run), "--num-images": "4", "--out": str(tmp_path / "x.npy")}
    for key, value in zip(args[::2], args[1::2], strict=True):
        options[key] = value
    code, _, err = generate_cli(capsys, *[item for pair in options.items() for item in pair])
    assert code == 2
    assert len(error_lines(err)) == 1 and message in error_lines(err)[0], err
    assert not (tmp_path / "x.npy").exists() and "Traceback" not in err


def test_generate_from_registry_in_a_process(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """As a user runs it: the champion of the embedded registry gives the run directory's images."""
    run = copy_run(tiny_run, tmp_path / "run", fd=2.0)
    register_run(run)
    result = run_cli("generate", "--model", "models:/tiny-digits@champion", "--num-images", "5", "--seed", "1",
                     "--out", str(tmp_path / "champion.npy"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_json(result.stdout)["model"] == "models:/tiny-digits/1"
    images = np.load(tmp_path / "champion.npy")
    assert images.shape == (5, 16, 16, 1) and (images == expected(run, 5, 1)).all()

    # An unconditional model takes no labels.
    code, _, err = generate_cli(capsys, "--model", str(run), "--num-images", "2", "--labels", "1",
                                "--out", str(tmp_path / "x.npy"))
    assert code == 2 and error_lines(err) == ["error: --labels: this model is unconditional"]


def test_generate_streams_in_chunks(tiny_conditional_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are generated and written a chunk at a time (parquet: one row group each), and the
    file equals the one written in a single chunk, row for row."""
    from ganpipe import generate as generate_module

    run = str(tiny_conditional_run)
    assert generate_cli(capsys, "--model", run, "--num-images", "23", "--seed", "4",
                        "--out", str(tmp_path / "whole.npy"))[0] == 0
    assert generate_cli(capsys, "--model", run, "--num-images", "23", "--seed", "4",
                        "--out", str(tmp_path / "whole.parquet"))[0] == 0
    monkeypatch.setattr(generate_module, "CHUNK_ROWS", 5)
    assert generate_cli(capsys, "--model", run, "--num-images", "23", "--seed", "4",
                        "--out", str(tmp_path / "chunked.npy"))[0] == 0
    assert generate_cli(capsys, "--model", run, "--num-images", "23", "--seed", "4",
                        "--out", str(tmp_path / "chunked.parquet"))[0] == 0
    assert np.array_equal(np.load(tmp_path / "chunked.npy"), np.load(tmp_path / "whole.npy"))
    assert np.array_equal(np.load(tmp_path / "whole.npy"), expected(tiny_conditional_run, 23, 4, list(range(10))))
    chunked = pq.ParquetFile(tmp_path / "chunked.parquet")
    assert chunked.metadata.num_row_groups == 5  # 5 + 5 + 5 + 5 + 3 rows
    assert chunked.read().equals(pq.read_table(tmp_path / "whole.parquet"))
    assert not list(tmp_path.glob(".*.tmp"))  # no staging file left


PEAK_RSS = """
import resource, sys
from pathlib import Path
from ganpipe.generate import generate_to_file
generate_to_file(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_generate_memory_does_not_grow_with_rows(tiny_run: Path, tmp_path: Path) -> None:
    """Peak memory of 10x the rows stays within a few MB of 1x (it grew by the whole output before)."""
    import subprocess
    import sys

    peaks = {}
    for rows in (20_000, 200_000):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tiny_run), str(tmp_path / f"{rows}.npy"), str(rows)],
                             capture_output=True, text=True, check=True, timeout=300)
        peaks[rows] = int(out.stdout.split()[-1])
    array = np.load(tmp_path / "200000.npy", mmap_mode="r")
    assert array.shape[0] == 200_000 and array.nbytes > 45 << 20
    loaded = load_generator(str(tiny_run))
    last_seeds = row_seed(0, np.arange(199_997, 200_000)).tolist()
    assert np.array_equal(array[-3:], generate(loaded.generator, loaded.spec, last_seeds).numpy())
    # The whole output is ~51 MB; holding it (twice, before) would add 50-100 MB to the peak.
    assert peaks[200_000] - peaks[20_000] < 20, peaks
