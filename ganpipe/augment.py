"""`ganpipe augment`: real and synthetic rows mixed at a chosen ratio, as one Hugging Face dataset.

- `--real SRC`: anything `data.source` accepts. It is prepared by ingest at the generator's
  resolution and channels, so every image in the mix has the same shape.
- `--synthetic`: a finished `ganpipe export` (local or s3://; its rows are taken in index order)
  or a MODEL (rows are generated exactly as `ganpipe export --seed S` would generate them, with
  labels drawn in the real data's class proportions).
- `--ratio R`: R synthetic rows per real row: every real row, plus round(R x real rows) synthetic.
  `--ratio auto`: the `best_ratio` of the version's uplift measurement (--synthetic a registered
  MODEL, evaluated with the `uplift` metric before it was registered); the version is pinned, so
  an alias that moves meanwhile changes nothing.

Real and synthetic rows are interleaved evenly (output row j is real when floor((j+1) n_real / n)
> floor(j n_real / n)), so each shard holds both in the chosen proportion and each shard's rows are
a pure function of its position: shards are committed and recorded like an export's, and a
rerun skips finished ones. Columns: image, label (ClassLabel, when the sources are labelled),
source ("real" | "synthetic"), seed (synthetic rows: their latent seed; real rows: null), index
(synthetic rows: their export row index; real rows: their row in the prepared real data).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ganpipe import storage
from ganpipe.errors import UserError
from ganpipe.export import generate_rows, weights_sha256
from ganpipe.networks import NetworkSpec
from ganpipe.shards import (
    PNG_LEVEL,
    SCRATCH_PREFIX,
    ShardLayout,
    check_ownership,
    dataset_card,
    dataset_features,
    encode_pngs,
    finish_dataset,
    image_column,
    own_output,
    scratch_dir,
)
from ganpipe.synthetic_rows import LabelPlan, class_names, label_plan

FORMAT_VERSION = 1


def features(classes: list[str] | None) -> Any:
    """image, label (when the sources are labelled), source, seed, index."""
    import datasets

    return dataset_features({"image": datasets.Image()}, classes, {"source": datasets.Value("string")})


# --- the synthetic side: an export directory or a model ------------------------------------------

class ExportedRows:
    """Rows of a finished export, by position (shard order, then index order)."""

    def __init__(self, uri: str, endpoint_url: str | None):
        manifest_uri = storage.join(uri, "manifest.json")
        if not storage.exists(manifest_uri, endpoint_url):
            raise UserError(f"--synthetic {uri}: not a MODEL nor a finished ganpipe export (no manifest.json)")
        self.uri, self.endpoint_url = uri.rstrip("/"), endpoint_url
        self.manifest = storage.read_json(manifest_uri, endpoint_url)
        self.spec = NetworkSpec.from_json(self.manifest["spec"])
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self.num_rows = int(self.offsets[-1])
        self._cached: tuple[int, Any] | None = None

    def identity(self) -> dict[str, Any]:
        return {"export": self.uri, "shards_sha256": [s["sha256"] for s in self.manifest["shards"]]}

    def _shard(self, k: int) -> Any:
        """Shard k as an arrow table (image bytes, label, seed, index); the last one is kept."""
        import pyarrow.parquet as pq

        if self._cached is None or self._cached[0] != k:
            record = self.manifest["shards"][k]
            fs, root = storage.filesystem(storage.join(self.uri, record["file"]), self.endpoint_url)
            if self.manifest["format"] == "parquet":
                table = pq.read_table(root, filesystem=fs)
            else:
                table = pq.read_table(f"{root}/metadata.parquet", filesystem=fs)
                files = [f"{root}/{name}" for name in table.column("file_name").to_pylist()]
                contents = fs.cat(files) if files else {}
                table = table.drop_columns(["file_name"]).add_column(
                    0, "image", image_column([contents[f] for f in files]))
            self._cached = (k, table)
        return self._cached[1]

    def rows(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray | None, np.ndarray, np.ndarray]:
        """(PNG bytes, labels, seeds, indices) of rows start..stop-1."""
        import pyarrow as pa

        parts = []
        for k in range(int(np.searchsorted(self.offsets, start, side="right")) - 1, len(self.offsets) - 1):
            first, last = int(self.offsets[k]), int(self.offsets[k + 1])
            if first >= stop:
                break
            lo, hi = max(start, first) - first, min(stop, last) - first
            if hi > lo:
                parts.append(self._shard(k).slice(lo, hi - lo))
        table = pa.concat_tables(parts) if parts else None
        if table is None:
            return [], None, np.empty(0, np.int64), np.empty(0, np.int64)
        labels = table.column("label").to_numpy() if "label" in table.column_names else None
        return (table.column("image").combine_chunks().field("bytes").to_pylist(), labels,
                table.column("seed").to_numpy(), table.column("index").to_numpy())


class GeneratedRows:
    """Rows generated on the fly, exactly as `ganpipe export --seed seed` would generate them."""

    def __init__(self, model: str, seed: int):
        from ganpipe.generators import load_generator

        self.loaded = load_generator(model)
        self.spec, self.seed = self.loaded.spec, seed
        self.labels: LabelPlan = label_plan(self.spec, 1, False, None, None)
        self.weights_sha = weights_sha256(self.loaded)
        self.num_rows = sys.maxsize

    def draw_labels_like(self, class_counts: dict[str, int] | None) -> None:
        """Draw labels in these proportions (the real data's), matched by class name."""
        if self.spec.conditional and class_counts:
            counts = {name: class_counts.get(name, 0) for name in class_names(self.spec)}
            self.labels = label_plan(self.spec, 1, False, None, counts)

    def identity(self) -> dict[str, Any]:
        return {"model_uri": self.loaded.source["model_uri"], "weights_sha256": self.weights_sha,
                "seed": self.seed, "labels": self.labels.to_json()}

    def rows(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray | None, np.ndarray, np.ndarray]:
        samples, labels, seeds, indices = generate_rows(self.loaded, self.labels, self.seed, start, stop)
        return encode_pngs(samples.numpy(), PNG_LEVEL["parquet"]), labels, seeds, indices


def open_synthetic(src: str, seed: int, endpoint_url: str | None) -> ExportedRows | GeneratedRows:
    from ganpipe.generators import is_model_ref

    if is_model_ref(src):
        return GeneratedRows(src, seed)
    return ExportedRows(src, endpoint_url)


# --- the mix ----------------------------------------------------------------------------------------

def real_rows_before(position: np.ndarray | int, num_real: int, total: int) -> np.ndarray:
    """How many of the first `position` output rows are real (even interleaving)."""
    return np.asarray(position, dtype=np.int64) * num_real // total


def auto_ratio(synthetic: str) -> tuple[float, str]:
    """`--ratio auto`: (the version's best uplift ratio, models:/NAME/VERSION of that version)."""
    from ganpipe.generators import BEST_RATIO_TAG, resolve_version

    if not synthetic.startswith("models:/"):
        raise UserError(f"--ratio auto: needs --synthetic to be a registered model (models:/NAME@ALIAS or "
                        f"models:/NAME/VERSION) with an uplift measurement; got {synthetic}")
    version = resolve_version(synthetic)
    pinned = f"models:/{version.name}/{version.version}"
    best = (version.tags or {}).get(BEST_RATIO_TAG)
    if best is None:
        raise UserError(f"--ratio auto: {pinned} has no uplift measurement (no {BEST_RATIO_TAG} tag); evaluate "
                        "its run with the uplift metric (eval.metrics) before registering it, or give --ratio R")
    return float(best), pinned


def augment(real: str, synthetic: str, ratio: float | str, out: str, shard_size: int = 10_000, seed: int = 0,
            endpoint_url: str | None = None, wait: bool = False) -> dict[str, Any]:
    """`ganpipe augment`: write (or finish writing) the mixed dataset; return the contract's result.
    `out` is owned and locked as an export's (ganpipe.shards.own_output; `wait` for its lock)."""
    import pyarrow as pa

    from ganpipe.config import DataConfig
    from ganpipe.data import ingest, open_prepared
    from ganpipe.generators import is_model_ref

    if ratio == "auto":
        ratio, synthetic = auto_ratio(synthetic)
        print(f"--ratio auto: {ratio:g} synthetic rows per real row, the best ratio of {synthetic}'s uplift",
              file=sys.stderr)
    if not isinstance(ratio, float | int) or not ratio > 0:
        raise UserError(f"--ratio: expected a positive number of synthetic rows per real row, got {ratio}")
    if shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    if is_model_ref(real):
        raise UserError("--real: expected a dataset (data.source, image folder), not a model")
    check_ownership(out.rstrip("/"), endpoint_url)  # before any data is read: fail in a second
    synth = open_synthetic(synthetic, seed, endpoint_url)
    spec = synth.spec
    if not spec.is_image:
        raise UserError("--synthetic: augment mixes image datasets; this generator makes vectors")
    channels, resolution, _ = spec.sample_shape
    prepared = ingest(DataConfig(source=real, resolution=resolution, channels=channels), endpoint_url)
    data = open_prepared(prepared.location, endpoint_url)
    if isinstance(synth, GeneratedRows):
        synth.draw_labels_like(data.meta.get("class_counts"))
    classes, real_map, synth_map, warnings = _label_maps(data.classes, class_names(spec) if spec.conditional
                                                         else None, real, synthetic)
    num_real = data.num_records
    num_synthetic = int(round(ratio * num_real))
    if num_synthetic < 1:
        raise UserError(f"--ratio {ratio}: less than one synthetic row for {num_real} real rows")
    if num_synthetic > synth.num_rows:
        raise UserError(f"--synthetic {synthetic}: has {synth.num_rows} rows; --ratio {ratio} x {num_real} real "
                        f"rows needs {num_synthetic}")
    total = num_real + num_synthetic
    out = out.rstrip("/")
    layout = ShardLayout(out, total, shard_size, "parquet")
    identity = {"kind": "ganpipe-augment", "format_version": FORMAT_VERSION, "real": real,
                "real_fingerprint": prepared.fingerprint, "synthetic": synth.identity(), "ratio": ratio,
                "num_real": num_real, "num_synthetic": num_synthetic, "shard_size": shard_size}
    with own_output(out, identity, endpoint_url, "ganpipe augment", wait=wait):
        shard_features = features(classes)
        schema = shard_features.arrow_schema
        pending = layout.pending(endpoint_url)
        for k in pending:
            start, stop = layout.shard_rows(k)
            real_lo, real_hi = (int(v) for v in real_rows_before(np.array([start, stop]), num_real, total))
            is_real = np.diff(real_rows_before(np.arange(start, stop + 1), num_real, total)) > 0
            real_table = _real_table(data, real_lo, real_hi, real_map, schema)
            synth_table = _synthetic_table(synth, start - real_lo, stop - real_hi, synth_map, schema)
            # Interleave: the j-th real (synthetic) row of the shard goes where the j-th True (False) is.
            order = np.empty(stop - start, dtype=np.int64)
            order[is_real] = np.arange(real_hi - real_lo)
            order[~is_real] = np.arange(stop - start - (real_hi - real_lo)) + (real_hi - real_lo)
            table = pa.concat_tables([real_table, synth_table]).take(pa.array(order))
            with tempfile.TemporaryDirectory(dir=scratch_dir(out), prefix=SCRATCH_PREFIX) as tmp:
                shard = layout.open_shard(Path(tmp), shard_features)
                for first in range(0, len(table), 1000):
                    shard.write(table.slice(first, 1000))
                checksum = shard.commit(storage.join(out, layout.shard_name(k)), endpoint_url)
            layout.write_record(k, {"file": layout.shard_name(k), "rows": stop - start, "first_index": start,
                                    "sha256": checksum, "real_rows": real_hi - real_lo,
                                    "synthetic_rows": (stop - start) - (real_hi - real_lo)}, endpoint_url)
        return _finish(layout, identity, classes, data, synth, endpoint_url, len(pending), warnings)


def _label_maps(real_classes: list[str] | None, synth_classes: list[str] | None, real: str, synthetic: str
                ) -> tuple[list[str] | None, np.ndarray | None, np.ndarray | None, list[str]]:
    """The output's class names, and maps from each side's label ids to them (None: unlabelled)."""
    if real_classes is None and synth_classes is None:
        return None, None, None, []
    if real_classes is not None and synth_classes is not None:
        if sorted(real_classes) != sorted(synth_classes):
            raise UserError(f"--synthetic {synthetic}: its classes ({', '.join(synth_classes)}) differ from "
                            f"the classes of --real {real} ({', '.join(real_classes)})")
        return real_classes, np.arange(len(real_classes)), \
            np.array([real_classes.index(name) for name in synth_classes]), []
    classes = real_classes or synth_classes
    unlabelled = "synthetic" if real_classes is not None else "real"
    warning = f"only the {'real' if unlabelled == 'synthetic' else 'synthetic'} rows are labelled: " \
              f"{unlabelled} rows get a null label"
    print(f"warning: {warning}", file=sys.stderr)
    identity = np.arange(len(classes))
    return classes, identity if real_classes else None, identity if synth_classes else None, [warning]


def _table(schema: Any, images: list[bytes], labels: np.ndarray | None, label_map: np.ndarray | None,
           source: str, seeds: np.ndarray | None, indices: np.ndarray) -> Any:
    import pyarrow as pa

    n = len(indices)
    columns: dict[str, Any] = {"image": image_column(images)}
    if "label" in schema.names:
        columns["label"] = pa.array(label_map[labels], pa.int64()) if label_map is not None and labels is not None \
            else pa.nulls(n, pa.int64())
    columns["source"] = pa.array([source] * n, pa.string())
    columns["seed"] = pa.array(seeds, pa.int64()) if seeds is not None else pa.nulls(n, pa.int64())
    columns["index"] = pa.array(indices, pa.int64())
    return pa.table(columns, schema=schema)


def _real_table(data: Any, start: int, stop: int, label_map: np.ndarray | None, schema: Any) -> Any:
    indices = np.arange(start, stop, dtype=np.int64)
    images, labels = data.gather(indices) if len(indices) else (np.empty((0, 1, 1, 1), np.uint8), None)
    return _table(schema, encode_pngs(np.ascontiguousarray(images), PNG_LEVEL["parquet"]), labels, label_map,
                  "real", None, indices)


def _synthetic_table(synth: ExportedRows | GeneratedRows, start: int, stop: int, label_map: np.ndarray | None,
                     schema: Any) -> Any:
    images, labels, seeds, indices = synth.rows(start, stop) if stop > start else \
        ([], None, np.empty(0, np.int64), np.empty(0, np.int64))
    return _table(schema, images, labels, label_map, "synthetic", seeds, indices)


def _finish(layout: ShardLayout, identity: dict[str, Any], classes: list[str] | None, data: Any,
            synth: ExportedRows | GeneratedRows, endpoint_url: str | None, written: int, warnings: list[str]
            ) -> dict[str, Any]:
    records = layout.records(endpoint_url)
    manifest = {**identity, "classes": classes, "num_rows": layout.num_rows, "num_shards": layout.num_shards,
                "shards": records, "real_class_counts": data.meta.get("class_counts"), "created_at": time.time(),
                "synthetic_source": synth.manifest.get("model_uri") if isinstance(synth, ExportedRows)
                else synth.loaded.source.get("model_uri"),
                "columns": list(features(classes)), "interleaving": "row j is real iff "
                "floor((j+1)*num_real/num_rows) > floor(j*num_real/num_rows)", "warnings": warnings}
    manifest_uri = finish_dataset(layout.out, manifest, augment_card(layout, manifest), endpoint_url)
    return {"out": layout.out, "num_images": layout.num_rows, "num_real": identity["num_real"],
            "num_synthetic": identity["num_synthetic"], "num_shards": layout.num_shards,
            "manifest": manifest_uri, "shards_written": written, "warnings": warnings, "ratio": identity["ratio"]}


def augment_card(layout: ShardLayout, manifest: dict[str, Any]) -> str:
    digest = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()[:16]
    return dataset_card(layout, ["synthetic", "augmentation", "ganpipe"],
                        f"Augmented dataset: {manifest['real']} + synthetic", f"""\
{manifest['num_real']} real rows from `{manifest['real']}` and {manifest['num_synthetic']} synthetic rows
(ratio {manifest['ratio']:g} synthetic per real) from `{manifest['synthetic_source']}`, interleaved evenly.
Columns: {', '.join(manifest['columns'])}; `source` says which rows are real.
Synthetic rows keep their export `seed` and `index`, so each can be regenerated.

Load with `datasets.load_dataset("parquet", data_files="{layout.data_files}")`.
Content digest {digest}; see manifest.json for per-shard counts and checksums.
""")
