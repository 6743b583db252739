"""`ganpipe train`: prepare the run, then start the training ranks (`accelerate launch -m
ganpipe.train RUN_DIR`) through ganpipe.workers and wait for them.

Everything that can be checked before a process starts is checked here (the data, the networks'
spec, that the networks and the batch fit in memory, the run directory), so bad input fails in
seconds with one `error:` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ganpipe import runs, storage
from ganpipe.config import Config
from ganpipe.data import IngestResult, ingest, open_prepared
from ganpipe.errors import Failure, UserError
from ganpipe.footprint import check_training_fits
from ganpipe.recipe import network_spec
from ganpipe.workers import LineHandler, run_workers


class TrainingFailed(Failure):
    pass


@dataclass
class PreparedRun:
    run_dir: Path
    data: IngestResult


def prepare_run(cfg: Config, resume: str = "auto") -> PreparedRun:
    """Ingest (a cache hit when unchanged), check that the networks can be built for this data
    and fit in memory with the batch, then choose the run directory and save the effective config:
    a refused config leaves no run directory behind."""
    data = ingest(cfg.data, cfg.storage.endpoint_url)
    check_training_fits(cfg, network_spec(cfg, open_prepared(data.location, cfg.storage.endpoint_url)))
    run_dir = runs.run_dir_for(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(run_dir / "config.yaml"), cfg.to_yaml().encode())
    runs.update_info(run_dir, name=run_dir.name, identity=runs.run_identity(cfg), config_hash=cfg.hash(),
                     data={"fingerprint": data.fingerprint, "location": data.location,
                           "num_records": data.num_records, "classes": data.classes})
    return PreparedRun(run_dir, data)


def launch_training(cfg: Config, resume: str = "auto", on_line: LineHandler | None = None) -> dict[str, Any]:
    """`ganpipe train`: returns the contract's result (run_dir, steps, checkpoint, mlflow_run_id,
    resumed_from_step) or raises UserError / a Failure naming the workers' cause."""
    t = cfg.train
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 on CPU")
    if t.accelerate_config and not Path(t.accelerate_config).is_file():
        raise UserError(f"train.accelerate_config: file not found: {t.accelerate_config}")
    run_dir = prepare_run(cfg, resume).run_dir
    (run_dir / "result.json").unlink(missing_ok=True)
    run_workers("ganpipe.train", [str(run_dir)], what="training", num_processes=t.num_processes,
                num_machines=t.num_machines, mixed_precision=t.mixed_precision,
                accelerate_config=t.accelerate_config, cpu=t.cpu, on_line=on_line, log_file=run_dir / "train.log")
    result = runs.read_json(run_dir / "result.json")
    if result.get("status") != "completed":
        raise TrainingFailed(f"training ended without a result (see {run_dir / 'train.log'})")
    return result
