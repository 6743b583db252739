"""`ganpipe train`: prepare the run, then start the training ranks (`accelerate launch -m
ganpipe.train RUN_DIR`) through ganpipe.workers and wait for them.

Everything that can be checked before a process starts is checked here (the data, the networks'
spec, that the networks and the batch fit in memory, the run directory), so bad input fails in
seconds with one `error:` line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ganpipe import locks, runs, storage
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
    lock: int | None  # the run directory's lock (ganpipe.locks) while the block runs; None on machines 1..N-1


def machine_rank(cfg: Config) -> int:
    """This machine's rank in a multi-machine run, read where accelerate reads it (the
    `machine_rank` of train.accelerate_config); 0 for a one-machine run."""
    if cfg.train.num_machines <= 1 or not cfg.train.accelerate_config:
        return 0
    path = Path(cfg.train.accelerate_config)
    try:
        settings = yaml.safe_load(path.read_text()) or {}
        return int(settings.get("machine_rank", 0)) if isinstance(settings, dict) else 0
    except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
        raise UserError(f"train.accelerate_config: {path}: cannot read machine_rank ({exc})") from None


@contextmanager
def prepared_run(cfg: Config, resume: str = "auto", wait: bool = False) -> Iterator[PreparedRun]:
    """Ingest (a cache hit when unchanged), check that the networks can be built for this data
    and fit in memory with the batch (a refused config leaves no run directory behind), choose
    the run directory and lock it (one writer per run: a second `ganpipe train` of the same
    config gets exit 2 naming the holder, or waits its turn with `wait`), then save the effective
    config. The lock is held for the block. In a multi-machine run only machine 0 locks: the other
    machines join its run (they write the same config), they are not second writers."""
    data = ingest(cfg.data, cfg.storage.endpoint_url)
    check_training_fits(cfg, network_spec(cfg, open_prepared(data.location, cfg.storage.endpoint_url)))
    run_dir = runs.run_dir_for(cfg, resume)
    owner = machine_rank(cfg) == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    with locks.hold_folder(run_dir, "ganpipe train", wait=wait) if owner else nullcontext(None) as lock:
        storage.write_bytes_atomic(str(run_dir / "config.yaml"), cfg.to_yaml().encode())
        runs.update_info(run_dir, name=run_dir.name, identity=runs.run_identity(cfg), config_hash=cfg.hash(),
                         data={"fingerprint": data.fingerprint, "location": data.location,
                               "num_records": data.num_records, "classes": data.classes})
        yield PreparedRun(run_dir, data, lock)


def launch_training(cfg: Config, resume: str = "auto", on_line: LineHandler | None = None,
                    wait: bool = False) -> dict[str, Any]:
    """`ganpipe train`: returns the contract's result (run_dir, steps, checkpoint, mlflow_run_id,
    resumed_from_step) or raises UserError / a Failure naming the workers' cause. The run
    directory stays locked until the last worker is gone (they inherit the lock)."""
    t = cfg.train
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 on CPU")
    if t.accelerate_config and not Path(t.accelerate_config).is_file():
        raise UserError(f"train.accelerate_config: file not found: {t.accelerate_config}")
    with prepared_run(cfg, resume, wait) as prepared:
        run_dir = prepared.run_dir
        (run_dir / "result.json").unlink(missing_ok=True)
        run_workers("ganpipe.train", [str(run_dir)], what="training", num_processes=t.num_processes,
                    num_machines=t.num_machines, mixed_precision=t.mixed_precision,
                    accelerate_config=t.accelerate_config, cpu=t.cpu, on_line=on_line,
                    log_file=run_dir / "train.log",
                    hold_fds=() if prepared.lock is None else (prepared.lock,))
        result = runs.read_json(run_dir / "result.json")
    if result.get("status") != "completed":
        raise TrainingFailed(f"training ended without a result (see {run_dir / 'train.log'})")
    return result
