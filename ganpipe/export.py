"""Bulk synthetic data: a generator's samples as a Hugging Face-ready dataset (`ganpipe export`,
and the flows' export stage).

Row i is a pure function of (model version, export seed, i) (see ganpipe.synthetic_rows), and
`models.generate` makes every forward pass the same shape, so the row is bit-identical whether it
is generated alone or among millions. Any row can be regenerated from its seed, and an export
killed part way and run again produces exactly the same rows. The dataset's layout, shard
commits, records and resumption are ganpipe.shards'.

Work is split over `export.num_processes` ranks started with `accelerate launch` (one per GPU, or
CPU processes), each writing its own shards. In each rank the main thread generates while a writer
thread encodes PNGs and writes the previous batch, so encoding overlaps generation; memory is
bounded by a few batches whatever the number of rows.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganpipe import network, storage
from ganpipe.config import ExportConfig
from ganpipe.errors import UserError
from ganpipe.generators import LoadedGenerator, load_generator
from ganpipe.networks import NetworkSpec, generate
from ganpipe.progress import Progress, duration
from ganpipe.quality_gates import GateSettings, QualityGates, combine_summaries, prepare_gates
from ganpipe.shards import (
    PNG_LEVEL,
    SCRATCH_PREFIX,
    ImageFolderShard,
    ParquetShard,
    ShardLayout,
    check_ownership,
    dataset_card,
    finish_dataset,
    own_output,
    scratch_dir,
)
from ganpipe.synthetic_rows import LabelPlan, class_names, hf_features, label_plan, row_seed, shard_table
from ganpipe.workers import run_workers, worker_main

FORMAT_VERSION = 2  # 2: metadata.parquet in image folders, quality gates, candidate rows per shard
GENERATE_ROWS = 256  # rows per generated batch: the default (fixed) forward shape of models.generate
MAX_PENDING_BATCHES = 3  # batches generated but not yet written: bounds memory, keeps the writer busy
PROGRESS_TAG = "ganpipe-export-progress"
GATED_FILE = "gated_rows.jsonl"


def export_location(settings: ExportConfig, registered_name: str, label: str) -> str:
    """Where an export goes: `export.out`, else $GANPIPE_HOME/exports/<register.name>/<label>, where
    label is v<version> for a registered model, or a run directory's name."""
    return settings.out or str(storage.ganpipe_home() / "exports" / registered_name / label)


# --- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportPlan(ShardLayout):
    """The shards of an export; its `num_rows` are candidate rows, which quality gates may thin."""

    seed: int


@dataclass
class ExportJob:
    """Everything an export process needs; ranks read it as JSON."""

    model: str  # resolved: models:/NAME/VERSION or a run directory
    plan: ExportPlan
    labels: LabelPlan
    shards: list[int]  # the shards still to write
    endpoint_url: str | None = None
    gates: dict[str, Any] | None = None  # see ganpipe.quality_gates.prepare_gates

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "plan": asdict(self.plan), "labels": self.labels.to_json(),
                "shards": self.shards, "endpoint_url": self.endpoint_url, "gates": self.gates}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportJob:
        return cls(data["model"], ExportPlan(**data["plan"]), LabelPlan.from_json(data["labels"]), data["shards"],
                   data["endpoint_url"], data["gates"])


# --- one rank's work ----------------------------------------------------------------------------

def write_shards(job: ExportJob, rank: int, world: int, device: torch.device | str,
                 report: Callable[[int], None]) -> None:
    """Write this rank's share of the pending shards (round robin), each committed and recorded."""
    loaded = load_generator(job.model, device)
    gates = QualityGates.load(job.gates, loaded, device, job.endpoint_url) if job.gates else None
    with ThreadPoolExecutor(1, thread_name_prefix="export-writer") as writer:
        for k in job.shards[rank::world]:
            _write_shard(job, k, loaded, gates, writer, device, report)


def _write_shard(job: ExportJob, k: int, loaded: LoadedGenerator, gates: QualityGates | None,
                 writer: ThreadPoolExecutor, device: torch.device | str, report: Callable[[int], None]) -> None:
    plan, spec = job.plan, loaded.spec
    start, stop = plan.shard_rows(k)
    level = PNG_LEVEL[plan.fmt]
    per_class = np.zeros(max(spec.num_classes, 1), dtype=np.int64)
    gated: list[dict[str, Any]] = []
    gate_summary: dict[str, Any] | None = None
    rows = 0
    with tempfile.TemporaryDirectory(dir=scratch_dir(plan.out), prefix=SCRATCH_PREFIX) as tmp:
        shard = plan.open_shard(Path(tmp), hf_features(spec))
        pending: deque[Future] = deque()
        for begin in range(start, stop, GENERATE_ROWS):
            samples, labels, seeds, indices = generate_rows(loaded, job.labels, plan.seed, begin,
                                                            min(stop, begin + GENERATE_ROWS), device)
            candidates = len(indices)
            if gates is not None:
                keep, judged, summary = gates.judge(samples, labels, indices, seeds)
                gated += judged
                gate_summary = combine_summaries(gate_summary, summary)
                samples, seeds, indices = samples[torch.from_numpy(keep)], seeds[keep], indices[keep]
                labels = labels[keep] if labels is not None else None
            if labels is not None:
                per_class += np.bincount(labels, minlength=spec.num_classes)
            rows += len(indices)
            # Encoding and writing happen on the writer thread while the next batch generates.
            pending.append(writer.submit(_encode_and_write, shard, spec, samples, labels, seeds, indices, level))
            while len(pending) > MAX_PENDING_BATCHES:
                pending.popleft().result()
            report(candidates)
        while pending:
            pending.popleft().result()
        checksum = shard.commit(storage.join(plan.out, plan.shard_name(k)), job.endpoint_url)
    record = {"file": plan.shard_name(k), "rows": rows, "candidates": stop - start, "first_index": start,
              "sha256": checksum, "per_class_counts": {str(i): int(c) for i, c in enumerate(per_class)}
              if spec.conditional else {}, "gated": gated}
    if gate_summary is not None:
        record["gate_summary"] = gate_summary
    plan.write_record(k, record, job.endpoint_url)


def _encode_and_write(shard: ParquetShard | ImageFolderShard, spec: NetworkSpec, samples: torch.Tensor,
                      labels: np.ndarray | None, seeds: np.ndarray, indices: np.ndarray, level: int) -> None:
    shard.write(shard_table(spec, samples, labels, seeds, indices, level=level))


def generate_rows(loaded: LoadedGenerator, labels: LabelPlan, seed: int, start: int, stop: int,
                  device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray, np.ndarray]:
    """Rows start..stop-1 of an export with this seed and label plan: (samples, labels, seeds, indices)."""
    indices = np.arange(start, stop, dtype=np.int64)
    seeds = row_seed(seed, indices)
    row_labels = labels.labels(seed, indices)
    samples = generate(loaded.generator, loaded.spec, seeds.tolist(),
                       row_labels.tolist() if row_labels is not None else None, device=device)
    return samples, row_labels, seeds, indices


def calibration_rows(loaded: LoadedGenerator, seed: int, n: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """n samples for calibrating quality gates: the latent seeds of rows 0..n-1, labels balanced
    (so every class is calibrated whatever the export's label plan)."""
    spec = loaded.spec
    balanced = LabelPlan(spec.num_classes, "balanced") if spec.conditional else LabelPlan(0, "none")
    samples, labels, _, _ = generate_rows(loaded, balanced, seed, 0, n)
    return samples, labels


# --- the export ---------------------------------------------------------------------------------

def export_progress_line(progress: Progress, _: dict[str, float] | None) -> str:
    percent = 100.0 * progress.position / progress.total if progress.total else 100.0
    return (f"export: {progress.position:,}/{progress.total:,} rows ({percent:.0f}%), "
            f"{progress.rate:,.0f} images/s, ETA {duration(progress.eta())}")


def _identity(source: dict[str, Any], plan: ExportPlan, labels: LabelPlan, weights_sha: str,
              gates: GateSettings) -> dict[str, Any]:
    """What the output location's marker holds (ganpipe.shards.own_output): keys and values
    stay as they are, so an export started by an earlier version is recognised and resumed."""
    return {"format_version": FORMAT_VERSION, "model_uri": source.get("model_uri"), "weights_sha256": weights_sha,
            "num_images": plan.num_rows, "shard_size": plan.shard_size, "format": plan.fmt, "seed": plan.seed,
            "labels": {"mode": labels.mode, "counts": list(labels.counts), "weights": list(labels.weights)},
            "gate_settings": gates.to_json()}


def weights_sha256(loaded: LoadedGenerator) -> str:
    """A digest of the generator's weights: which generator made a dataset."""
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_class_counts(loaded: LoadedGenerator, endpoint_url: str | None) -> dict[str, int] | None:
    """Class counts of the data the model was trained on, when its run directory is known."""
    from ganpipe import runs

    run_dir = loaded.source.get("run_dir")
    if not loaded.spec.conditional or not run_dir or not Path(run_dir).is_dir():
        return None
    location = runs.read_info(Path(run_dir)).get("data", {}).get("location")
    try:
        return storage.read_json(storage.join(location, "meta.json"), endpoint_url).get("class_counts") \
            if location else None
    except (OSError, ValueError) as exc:
        network.reraise_if_unreachable(exc)  # a store that does not answer would fail the export later anyway
        return None


def export(model: str, settings: ExportConfig, endpoint_url: str | None = None, progress: bool = True,
           training_counts: dict[str, int] | None = None, wait: bool = False) -> dict[str, Any]:
    """Write (or finish writing) `settings.num_images` rows of MODEL to `settings.out`; return the
    contract's result. `training_counts` (class -> rows of the training data) steer the labels
    when neither class_balance nor class_counts is set; by default they come from the model's run.
    The output is locked while we write (UserError naming the holder when another process is
    writing it, unless `wait`); a folder holding anything ganpipe did not write is refused."""
    if settings.num_images < 1:
        raise UserError("--num-images (export.num_images) must be at least 1")
    if not settings.out:
        raise UserError("--out (export.out): say where to write the dataset")
    check_ownership(settings.out.rstrip("/"), endpoint_url)  # before the model loads: fail in a second
    gates = GateSettings.from_config(settings)
    loaded = load_generator(model)
    spec = loaded.spec
    if spec.image_to_image:
        raise UserError(f"--num-images: {model} is a {spec.family} generator, which super-resolves images rather than "
                        "sampling them; give --input SOURCE (the dataset to super-resolve) and no --num-images")
    if settings.format == "imagefolder" and not spec.is_image:
        raise UserError("--format imagefolder needs an image model")
    plan = ExportPlan(settings.out.rstrip("/"), settings.num_images, settings.shard_size, settings.format,
                      settings.seed)
    counts = training_counts if training_counts is not None else training_class_counts(loaded, endpoint_url)
    labels = label_plan(spec, plan.num_rows, settings.class_balance, settings.class_counts, counts)
    identity = _identity(loaded.source, plan, labels, weights_sha256(loaded), gates)
    with own_output(plan.out, identity, endpoint_url, "ganpipe export", wait=wait) as lock:
        gate_plan = prepare_gates(gates, loaded, plan.out, endpoint_url,
                                  lambda n: calibration_rows(loaded, plan.seed, n)) if gates.enabled else None
        pending = plan.pending(endpoint_url)
        if pending:
            job = ExportJob(loaded.source["model_uri"], plan, labels, pending, endpoint_url, gate_plan)
            todo = sum(plan.shard_rows(k)[1] - plan.shard_rows(k)[0] for k in pending)
            meter = Progress(todo, "export", "img", export_progress_line, enabled=progress, every=2.0)
            try:
                processes = min(settings.num_processes, len(pending))
                if processes == 1:
                    write_shards(job, 0, 1, "cuda" if torch.cuda.is_available() else "cpu", meter.advance)
                else:
                    launch_ranks(job, processes, meter, () if lock is None else (lock,))
            finally:
                meter.close()
        return write_manifest(plan, loaded, labels, identity, gate_plan, endpoint_url, written=len(pending))


def write_manifest(plan: ExportPlan, loaded: LoadedGenerator, labels: LabelPlan, identity: dict[str, Any],
                   gate_plan: dict[str, Any] | None, endpoint_url: str | None, written: int) -> dict[str, Any]:
    """Check every shard is committed, then write the gated-rows list, the card and manifest.json."""
    spec = loaded.spec
    records, per_class = plan.records(endpoint_url), np.zeros(max(spec.num_classes, 1), dtype=np.int64)
    gated_lines: list[str] = []
    gate_totals: dict[str, Any] | None = None
    for record in records:
        gated_lines += [json.dumps(row) for row in record.pop("gated", [])]
        gate_totals = combine_summaries(gate_totals, record.get("gate_summary"))
        for name, count in record["per_class_counts"].items():
            per_class[int(name)] += count
    num_rows = sum(r["rows"] for r in records)
    manifest = {
        **identity, "model": {k: loaded.source.get(k) for k in ("name", "version", "run_id", "run_dir")},
        "spec": spec.to_json(), "num_rows": num_rows, "num_shards": plan.num_shards,
        "per_class_counts": {str(i): int(c) for i, c in enumerate(per_class)} if spec.conditional else {},
        "requested_per_class_counts": labels.per_class(plan.seed, plan.num_rows),
        "classes": class_names(spec) if spec.conditional else [], "shards": records, "created_at": time.time(),
        "columns": list(hf_features(spec)), "row_seed": "seed * 2**32 + index",
        "png_compression_level": PNG_LEVEL[plan.fmt] if spec.is_image else None,
        "generated_on": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if gate_plan is not None:
        manifest["gates"] = {**gate_plan, "totals": gate_totals or {},
                             "gated_rows": GATED_FILE, "num_dropped": plan.num_rows - num_rows}
        storage.write_bytes_atomic(storage.join(plan.out, GATED_FILE),
                                   "".join(line + "\n" for line in gated_lines).encode(), endpoint_url)
    manifest_uri = finish_dataset(plan.out, manifest, export_card(plan, manifest, spec), endpoint_url)
    return {"out": plan.out, "num_images": num_rows, "num_shards": plan.num_shards, "manifest": manifest_uri,
            "per_class_counts": manifest["per_class_counts"], "num_dropped": plan.num_rows - num_rows,
            "shards_written": written}


def export_card(plan: ExportPlan, manifest: dict[str, Any], spec: NetworkSpec) -> str:
    counts = "\n".join(f"| {manifest['classes'][int(k)]} | {v} |" for k, v in manifest["per_class_counts"].items())
    class_table = f"\n## Classes\n| class | rows |\n|---|---|\n{counts}\n" if counts else ""
    model = manifest["model"]
    gates = manifest.get("gates")
    gate_text = (f"\n## Quality gates\n{manifest['num_images'] - manifest['num_rows']} of {manifest['num_images']} "
                 f"candidate rows were dropped (settings: `{json.dumps(gates['settings'])}`); every gated row, "
                 f"with its reason, is listed in `{gates['gated_rows']}`. Indices of dropped rows are "
                 "missing from the `index` column.\n") if gates else ""
    load = (f'load_dataset("parquet", data_files="{plan.data_files}")' if plan.fmt == "parquet"
            else 'load_dataset("imagefolder", data_dir=".")')
    label = ', "label": [label]' if spec.conditional else ""
    return dataset_card(plan, ["synthetic", "ganpipe"], f"Synthetic data from {manifest['model_uri']}", f"""\
{manifest['num_rows']} samples generated by ganpipe from model `{manifest['model_uri']}`
(registered name {model.get('name') or '-'}, version {model.get('version') or '-'}, MLflow run
{model.get('run_id') or '-'}), export seed {manifest['seed']}.

Columns: {', '.join(manifest['columns'])}. Row `index` was generated from latent seed `seed`
(= export seed * 2**32 + index); regenerate it exactly (same kind of device:
{manifest['generated_on']}) with
`mlflow.pyfunc.load_model(MODEL).predict(pd.DataFrame({{"seed": [seed]{label}}}))`.
{class_table}{gate_text}
Load with `datasets.{load}`. See manifest.json for per-shard row counts and checksums.
""")


# --- several processes: accelerate launch, each rank writing its own shards ---------------------

def launch_ranks(job: ExportJob, processes: int, meter: Progress, hold_fds: tuple[int, ...] = ()) -> None:
    """Run `processes` ranks under `accelerate launch` (their own process group, killed with us on
    SIGTERM/Ctrl-C; on SIGKILL their watchdog stops them: ganpipe.workers). Their progress lines feed
    `meter`; they inherit `hold_fds` (the output's lock), so it is held until the last one is gone."""
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise UserError(f"--num-processes {processes}: only {torch.cuda.device_count()} GPU(s) here")

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_TAG):
            meter.advance(int(line.split()[1]))
            return
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="ganpipe-export-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job.to_json()))
        run_workers("ganpipe.export", [str(job_file)], what="export", num_processes=processes,
                    cpu=not torch.cuda.is_available(), on_line=on_line, hold_fds=hold_fds)


def main(argv: list[str] | None = None) -> int:
    """One rank: `accelerate launch -m ganpipe.export JOB.json` (started by `ganpipe export`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ganpipe.export JOB.json (started by `ganpipe export --num-processes P`)",
              file=sys.stderr)
        return 2
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    job = ExportJob.from_json(json.loads(Path(argv[0]).read_text()))

    def report(rows: int) -> None:
        print(f"{PROGRESS_TAG} {rows}", flush=True)

    return worker_main(lambda: write_shards(job, state.process_index, state.num_processes, state.device, report))


if __name__ == "__main__":
    sys.exit(main())
