"""Ingest from local sources: parquet (file, glob, folder), image folders, save_to_disk folders;
schema detection, label mapping, vectors, image modes, the parallel path, and the cache.

Every test reads the prepared data back and compares pixels, labels and values with what was
written. The helpers here are shared by test_ingest_bad_records.py and test_ingest_s3.py.
"""

from __future__ import annotations

import importlib
import io
import json
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ganpipe.config import DataConfig
from ganpipe.data import IngestResult, ingest, open_prepared
from ganpipe.errors import UserError
from tests.conftest import last_json, run_cli

# --- helpers ----------------------------------------------------------------------------------------

def noise_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """n distinct greyscale images, uint8 (n, size, size)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def image_table(images: np.ndarray, labels: list | None = None, label_feature: Any = None) -> datasets.Dataset:
    """A datasets.Dataset with an HF `Image` column (PNG bytes) and optional labels."""
    columns: dict[str, Any] = {"image": [{"bytes": png(a), "path": None} for a in images]}
    features: dict[str, Any] = {"image": datasets.Image()}
    if labels is not None:
        columns["label"] = labels
        features["label"] = label_feature or datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_parquet(path: Path, images: np.ndarray, labels: list | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_table(images, labels).to_parquet(str(path))
    return path


def write_image_folder(root: Path, images_by_class: dict[str, np.ndarray]) -> Path:
    for name, images in images_by_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            (root / name / f"{i:03d}.png").write_bytes(png(image))
    return root


def run_ingest(source: str | Path, workers: int | None = None, **data: Any) -> IngestResult:
    return ingest(DataConfig(source=str(source), **data), workers=workers)


def read_back(result: IngestResult) -> tuple[np.ndarray, np.ndarray | None]:
    return open_prepared(result.location).load_all()


def as_batch(images: np.ndarray) -> np.ndarray:
    """(n, h, w) greyscale -> the prepared layout (n, h, w, 1)."""
    return images[..., None]


def write_data_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def report_of(result: IngestResult | dict) -> dict:
    report = result.report if isinstance(result, IngestResult) else result["report"]
    return json.loads(Path(report).read_text())


# --- sources ----------------------------------------------------------------------------------------

def test_parquet_file_glob_and_folder(tmp_path: Path) -> None:
    images = noise_images(30)
    labels = [i % 3 for i in range(30)]
    write_parquet(tmp_path / "data/part-0.parquet", images[:20], labels[:20])
    write_parquet(tmp_path / "data/part-1.parquet", images[20:], labels[20:])

    one = run_ingest(tmp_path / "data/part-0.parquet", resolution=8)
    got, got_labels = read_back(one)
    assert (one.num_records, one.num_skipped, one.cached) == (20, 0, False)
    assert np.array_equal(got, as_batch(images[:20])) and got_labels.tolist() == labels[:20]
    assert one.classes == ["0", "1", "2"]

    for source in (tmp_path / "data/part-*.parquet", tmp_path / "data"):
        both = run_ingest(source, resolution=8)
        got, got_labels = read_back(both)
        assert both.num_records == 30
        assert np.array_equal(got, as_batch(images)) and got_labels.tolist() == labels
    meta = open_prepared(both.location).meta
    assert meta["class_counts"] == {"0": 10, "1": 10, "2": 10}
    assert meta["channels"] == 1 and meta["resolution"] == 8


def test_image_folder_labels_from_subfolders(tmp_path: Path) -> None:
    cats, dogs = noise_images(4, seed=1), noise_images(3, seed=2)
    root = write_image_folder(tmp_path / "pets", {"cat": cats, "dog": dogs})
    result = run_ingest(root, resolution=8)
    got, labels = read_back(result)
    assert result.classes == ["cat", "dog"]
    assert result.num_records == 7 and sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1]
    assert np.array_equal(got[labels == 0], as_batch(cats)) and np.array_equal(got[labels == 1], as_batch(dogs))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    images = noise_images(12)
    names = datasets.ClassLabel(names=["zero", "one"])
    train = image_table(images[:8], [0, 1] * 4, names)
    test = image_table(images[8:], [1, 1, 0, 1], names)
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))

    single = run_ingest(tmp_path / "single", resolution=8)
    got, labels = read_back(single)
    assert single.classes == ["zero", "one"] and labels.tolist() == [0, 1] * 4
    assert np.array_equal(got, as_batch(images[:8]))

    split = run_ingest(tmp_path / "dict", resolution=8, split="test")
    got, labels = read_back(split)
    assert split.num_records == 4 and labels.tolist() == [1, 1, 0, 1]
    assert np.array_equal(got, as_batch(images[8:]))
    assert split.fingerprint != run_ingest(tmp_path / "dict", resolution=8).fingerprint  # train split


def test_unknown_source_and_hub_id_offline_are_clear_errors(tmp_path: Path) -> None:
    config = write_data_config(tmp_path / "hub.yaml", {"source": "someone/some-dataset"})
    result = run_cli("ingest", str(config), "--json", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                            "HF_HOME": str(tmp_path / "hf")})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "someone/some-dataset" in errors[0] and "HF_HUB_OFFLINE" in errors[0], errors
    assert "Traceback" not in result.stderr

    with pytest.raises(Exception, match="not an existing path"):
        run_ingest(tmp_path / "does-not-exist.parquet")


# --- schema detection -------------------------------------------------------------------------------

def test_image_column_detected_from_bytes_and_paths_explicit_config_wins(tmp_path: Path) -> None:
    images = noise_images(6)
    other = noise_images(6, seed=9)
    (tmp_path / "files").mkdir()
    for i, image in enumerate(images):
        (tmp_path / "files" / f"{i}.png").write_bytes(png(image))
    # Raw bytes without any HF metadata; a second bytes column only when asked for by name.
    pq.write_table(pa.table({"id": list(range(6)), "pixels": [png(a) for a in images],
                             "thumb": [png(a) for a in other]}), tmp_path / "raw.parquet")
    # Relative file paths in a table are relative to the table's folder.
    pq.write_table(pa.table({"file": [f"files/{i}.png" for i in range(6)], "kind": ["a", "b"] * 3}),
                   tmp_path / "paths.parquet")

    raw = run_ingest(tmp_path / "raw.parquet", resolution=8)
    assert np.array_equal(read_back(raw)[0], as_batch(images))
    assert open_prepared(raw.location).meta["image_column"] == "pixels"
    explicit = run_ingest(tmp_path / "raw.parquet", resolution=8, image_column="thumb")
    assert np.array_equal(read_back(explicit)[0], as_batch(other))

    paths = run_ingest(tmp_path / "paths.parquet", resolution=8)
    got, labels = read_back(paths)
    assert np.array_equal(got, as_batch(images)) and labels is None  # `kind` is no label name
    labelled = run_ingest(tmp_path / "paths.parquet", resolution=8, label_column="kind")
    assert labelled.classes == ["a", "b"] and read_back(labelled)[1].tolist() == [0, 1] * 3


def test_labels_map_to_contiguous_ids_with_names_kept(tmp_path: Path) -> None:
    images = noise_images(6)
    sparse_ints = [9, 3, 7, 3, 9, 9]
    strings = ["dog", "cat", "emu", "cat", "dog", "dog"]
    write_parquet(tmp_path / "ints.parquet", images, sparse_ints)
    pq.write_table(pa.table({"image": [png(a) for a in images], "category": strings}), tmp_path / "str.parquet")
    # A ClassLabel keeps its own order, even when it is not sorted.
    image_table(images, [2, 0, 1, 0, 2, 2], datasets.ClassLabel(names=["zebra", "ant", "moth"])).save_to_disk(
        str(tmp_path / "classlabel"))

    ints = run_ingest(tmp_path / "ints.parquet", resolution=8)
    assert ints.classes == ["3", "7", "9"] and read_back(ints)[1].tolist() == [2, 0, 1, 0, 2, 2]
    assert open_prepared(ints.location).meta["class_counts"] == {"3": 2, "7": 1, "9": 3}
    named = run_ingest(tmp_path / "str.parquet", resolution=8)
    assert named.classes == ["cat", "dog", "emu"] and read_back(named)[1].tolist() == [1, 0, 2, 0, 1, 1]
    classlabel = run_ingest(tmp_path / "classlabel", resolution=8)
    assert classlabel.classes == ["zebra", "ant", "moth"] and read_back(classlabel)[1].tolist() == [2, 0, 1, 0, 2, 2]
    # Declared classes win: their order, and classes absent from the data are kept.
    declared = run_ingest(tmp_path / "str.parquet", resolution=8, classes=["emu", "dog", "cat", "yak"])
    assert declared.classes == ["emu", "dog", "cat", "yak"]
    assert read_back(declared)[1].tolist() == [1, 2, 0, 2, 1, 1]
    assert open_prepared(declared.location).meta["class_counts"]["yak"] == 0


def test_max_per_class_keeps_the_first_rows_of_each_class(tmp_path: Path) -> None:
    """data.max_per_class: a class-balanced subset, the first N rows of each class in source order
    (across Arrow batches), images and vectors alike; bad records are not counted; the cap is part
    of the prepared data's identity; data without labels is refused naming the key."""
    labels = [2, 0, 0, 1, 0, 2, 2, 0, 1, 2, 1, 1] * 3
    images = noise_images(len(labels))
    path = write_parquet(tmp_path / "d.parquet", images, labels)
    full = run_ingest(path, resolution=8)
    capped = run_ingest(path, resolution=8, max_per_class=3)
    kept = [i for i, label in enumerate(labels) if labels[:i].count(label) < 3]
    got, got_labels = read_back(capped)
    assert np.array_equal(got, as_batch(images[kept])) and got_labels.tolist() == [labels[i] for i in kept]
    assert capped.num_records == 9 and capped.num_skipped == 0
    assert open_prepared(capped.location).meta["class_counts"] == {"0": 3, "1": 3, "2": 3}
    assert capped.fingerprint != full.fingerprint
    assert capped.fingerprint != run_ingest(path, resolution=8, max_per_class=4).fingerprint
    again = run_ingest(path, resolution=8, max_per_class=3)
    assert (again.fingerprint, again.cached) == (capped.fingerprint, True)
    # A cap above every class's count keeps everything.
    assert run_ingest(path, resolution=8, max_per_class=100).num_records == len(labels)

    # Rows with a bad label are skipped and do not use up their class's quota; vectors, too.
    values = np.arange(len(labels), dtype=np.float64)
    tagged: list[str | None] = [str(v) for v in labels]
    tagged[1] = None  # the first 0 has no label
    pq.write_table(pa.table({"x": values, "label": tagged}), tmp_path / "v.parquet")
    vectors = run_ingest(tmp_path / "v.parquet", kind="vector", columns=["x"], max_per_class=2,
                         on_bad_record="skip")
    x, vector_labels = open_prepared(vectors.location).load_all()
    assert x[:, 0].tolist() == [0, 2, 3, 4, 5, 8] and vector_labels.tolist() == [2, 0, 1, 0, 2, 1]
    assert [s["row"] for s in report_of(vectors)["skipped"]] == [1]
    # The counts carry across the source's Arrow batches (512 rows each).
    many = [i % 2 for i in range(1000)] + [2] * 100
    pq.write_table(pa.table({"x": np.arange(1100.0), "label": many}), tmp_path / "many.parquet")
    x, many_labels = open_prepared(run_ingest(tmp_path / "many.parquet", kind="vector", columns=["x"],
                                              max_per_class=400).location).load_all()
    assert x[:, 0].tolist() == list(range(800)) + list(range(1000, 1100))
    assert np.bincount(many_labels).tolist() == [400, 400, 100]

    write_parquet(tmp_path / "unlabelled.parquet", images)
    with pytest.raises(UserError, match=r"^.*unlabelled\.parquet.*: data\.max_per_class: the data has no label"):
        run_ingest(tmp_path / "unlabelled.parquet", resolution=8, max_per_class=3)


def test_mixed_image_modes_are_converted(tmp_path: Path) -> None:
    grey = np.full((8, 8), 100, dtype=np.uint8)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[...] = (200, 50, 10)
    rgba = np.dstack([rgb, np.full((8, 8), 7, dtype=np.uint8)])  # nearly transparent: colour is kept
    sixteen = np.full((8, 8), 65535, dtype=np.uint16)
    sixteen[0, 0] = 0
    palette = Image.fromarray(rgb).quantize(colors=4)  # an adaptive palette holds the colour exactly
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    encoded = [png(grey), png(rgb), png(rgba), buffer.getvalue(), png(sixteen), png(np.dstack([grey, grey]), "LA")]
    pq.write_table(pa.table({"image": encoded}), tmp_path / "modes.parquet")

    colour = run_ingest(tmp_path / "modes.parquet", resolution=8)  # some inputs are colour: 3 channels
    got = read_back(colour)[0]
    assert colour.num_records == 6 and got.shape == (6, 8, 8, 3)
    assert (got[0] == 100).all() and (got[5] == 100).all()
    for i in (1, 2, 3):
        assert got[i, 4, 4].tolist() == [200, 50, 10]
    assert got[4, 0, 0].tolist() == [0, 0, 0] and got[4, 4, 4].tolist() == [255, 255, 255]  # 16-bit scaled

    grey_out = read_back(run_ingest(tmp_path / "modes.parquet", resolution=8, channels=1))[0]
    luma = round(200 * 0.299 + 50 * 0.587 + 10 * 0.114)
    assert grey_out.shape == (6, 8, 8, 1) and abs(int(grey_out[1, 4, 4, 0]) - luma) <= 1
    assert grey_out[4, 4, 4, 0] == 255


def test_plain_png_fast_path_matches_pil() -> None:
    """PNGs decoded without Image.open (decode.plain_png) have PIL's pixels; other PNGs go to PIL."""
    from ganpipe.data.decode import plain_png

    rng = np.random.default_rng(3)
    smooth = np.add.outer(np.arange(20), np.arange(30)).astype(np.uint8) * 4  # filters other than noise's
    for array, mode in [(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L"), (smooth, "L"),
                        (rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB"),
                        (rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA"),
                        (rng.integers(0, 256, (20, 30, 2), dtype=np.uint8), "LA")]:
        encoded = png(array, mode)
        fast = plain_png(encoded)
        assert fast is not None and fast.mode == mode
        assert np.array_equal(np.asarray(fast), np.asarray(Image.open(io.BytesIO(encoded)))), mode
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="PNG", transparency=0)
    palette = io.BytesIO()
    Image.fromarray(smooth).convert("P").save(palette, format="PNG")
    for other in (buffer.getvalue(), palette.getvalue(), png(smooth.astype(np.uint16) * 200),
                  png(smooth)[:-20], b"\xff\xd8 a JPEG header"):
        assert plain_png(other) is None


def test_resize_policies(tmp_path: Path) -> None:
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, :4] = 255  # a white band on the left, cropped away by center_crop, padded by pad
    pq.write_table(pa.table({"image": [png(wide)]}), tmp_path / "wide.parquet")
    crop = read_back(run_ingest(tmp_path / "wide.parquet", resolution=8))[0][0, ..., 0]
    pad = read_back(run_ingest(tmp_path / "wide.parquet", resolution=8, resize="pad"))[0][0, ..., 0]
    stretch = read_back(run_ingest(tmp_path / "wide.parquet", resolution=8, resize="stretch"))[0][0, ..., 0]
    assert (crop == 0).all()
    assert (pad[:2] == 0).all() and (pad[6:] == 0).all() and pad[4, 0] > 200 and pad[4, 7] == 0
    assert stretch[:, 0].min() > 200 and (stretch[:, 3:] < 30).all()


def test_vector_columns_statistics_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 3.0, 200)  # a large offset: the statistics must not cancel
    y = rng.integers(-5, 5, 200)
    target = rng.normal(size=200)
    pq.write_table(pa.table({"x": x, "y": y, "target": target, "group": ["a", "b"] * 100}),
                   tmp_path / "table.parquet")
    result = run_ingest(tmp_path / "table.parquet", kind="vector", columns=["x", "y"], label_column="group",
                        shard_size=64)
    data = open_prepared(result.location)
    values, labels = data.load_all()
    assert values.dtype == np.float32 and values.shape == (200, 2)
    assert np.allclose(values[:, 0], x.astype(np.float32)) and np.array_equal(values[:, 1], y)
    assert np.allclose(data.meta["mean"], [x.mean(), y.mean()], rtol=0, atol=1e-6)
    assert np.allclose(data.meta["std"], [x.std(), y.std()], rtol=1e-9)
    assert result.classes == ["a", "b"] and labels.tolist() == [0, 1] * 100
    assert [s["rows"] for s in data.meta["shards"] if s["file"].startswith("vectors")] == [64, 64, 64, 8]
    # Neither a float `target` nor a data column (`y`) is taken for a label; an integer `y` is.
    assert run_ingest(tmp_path / "table.parquet", kind="vector", columns=["x", "y"]).classes is None
    assert run_ingest(tmp_path / "table.parquet", kind="vector", columns=["x"]).classes == [str(v) for v in range(-5, 5)]


# --- the parallel path and memory bound ---------------------------------------------------------------

@pytest.mark.slow
def test_parallel_decode_matches_inline_and_keeps_row_ids(tmp_path: Path) -> None:
    """Above PARALLEL_MIN_RECORDS rows, worker processes decode; results, order and the skipped
    row ids are the same as decoding inline."""
    n = 3000
    images = noise_images(n, size=6)
    encoded = [png(a) for a in images]
    bad_rows = [5, 1500, 2999]
    for row in bad_rows:
        encoded[row] = b"\x89PNG but not really"
    pq.write_table(pa.table({"image": encoded, "label": [i % 10 for i in range(n)]}), tmp_path / "big.parquet",
                   row_group_size=700)
    common = {"resolution": 6, "on_bad_record": "skip", "shard_size": 1000}
    parallel = run_ingest(tmp_path / "big.parquet", workers=2, **common)
    inline = ingest(DataConfig(source=str(tmp_path / "big.parquet"), max_records=n, **common), workers=1)
    good = np.setdiff1d(np.arange(n), bad_rows)
    for result in (parallel, inline):
        got, labels = read_back(result)
        assert result.num_records == n - 3 and result.num_skipped == 3
        assert np.array_equal(got, as_batch(images[good])) and np.array_equal(labels, good % 10)
        assert [s["row"] for s in report_of(result)["skipped"]] == bad_rows
        shards = open_prepared(result.location).meta["shards"]
        assert [s["rows"] for s in shards if s["file"].startswith("images")] == [1000, 1000, 997]


# --- fingerprint and cache --------------------------------------------------------------------------

def test_cache_hit_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_parquet(tmp_path / "d.parquet", noise_images(10), list(range(10)))
    first = run_ingest(tmp_path / "d.parquet", resolution=8)
    meta_file = Path(first.location) / "meta.json"
    written = meta_file.stat().st_mtime_ns

    # The module, not the function `ganpipe.data.ingest` that the package exports under its name.
    ingest_module = importlib.import_module("ganpipe.data.ingest")
    pool_module = importlib.import_module("ganpipe.data.pool")
    decode_module = importlib.import_module("ganpipe.data.decode")

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit opened or decoded the data")

    monkeypatch.setattr(ingest_module, "open_dataset", must_not_run)
    monkeypatch.setattr(pool_module, "decode_chunk", must_not_run)
    monkeypatch.setattr(decode_module, "open_image", must_not_run)
    again = run_ingest(tmp_path / "d.parquet", resolution=8)
    assert again.cached and again.fingerprint == first.fingerprint and again.location == first.location
    assert (again.num_records, again.classes) == (10, first.classes)
    assert meta_file.stat().st_mtime_ns == written


def test_changed_byte_or_parameter_gives_a_new_fingerprint(tmp_path: Path) -> None:
    images = noise_images(10)
    path = write_parquet(tmp_path / "d.parquet", images)
    first = run_ingest(path, resolution=8)

    assert run_ingest(path, resolution=6).fingerprint != first.fingerprint
    assert run_ingest(path, resolution=8, on_bad_record="skip").fingerprint != first.fingerprint

    images[3, 2, 2] ^= 1  # one pixel of one image
    write_parquet(path, images)
    changed = run_ingest(path, resolution=8)
    assert changed.fingerprint != first.fingerprint and not changed.cached
    assert np.array_equal(read_back(changed)[0], as_batch(images))
    assert not np.array_equal(read_back(first)[0], as_batch(images))  # the old prepared data is intact

    from ganpipe.data.sources import resolve_source

    before = resolve_source(DataConfig(source=str(path))).fingerprint
    flipped = bytearray(path.read_bytes())  # any single byte of the file counts, not only pixels
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert resolve_source(DataConfig(source=str(path))).fingerprint != before


def test_fingerprint_is_stable_across_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image_folder(tmp_path / "folder", {"a": noise_images(3), "b": noise_images(2, seed=5)})
    fingerprints = []
    for home in ("home-1", "home-2"):
        monkeypatch.setenv("GANPIPE_HOME", str(tmp_path / home))
        fingerprints.append((run_ingest(tmp_path / "folder", resolution=8).fingerprint,
                             run_ingest("builtin:digits", resolution=8).fingerprint))
        assert (tmp_path / home / "prepared" / fingerprints[-1][0] / "meta.json").exists()
    assert fingerprints[0] == fingerprints[1]


def test_cli_ingest_json_contract(tmp_path: Path, ganpipe_home: Path) -> None:
    write_image_folder(tmp_path / "folder", {"x": noise_images(3), "y": noise_images(2, seed=5)})
    config = write_data_config(tmp_path / "c.yaml", {"source": str(tmp_path / "folder"), "resolution": 8})
    first = run_cli("ingest", str(config), "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    out = last_json(first.stdout)
    assert {"fingerprint", "num_records", "num_skipped", "classes", "location", "cached"} <= out.keys()
    assert (out["num_records"], out["num_skipped"], out["classes"], out["cached"]) == (5, 0, ["x", "y"], False)
    assert Path(out["location"]).parent == ganpipe_home / "prepared"
    second = last_json(run_cli("ingest", str(config), "--json").stdout)
    assert second == {**out, "cached": True}
    assert os.path.exists(out["report"])
