"""Run directories: where one training run keeps its config, checkpoints, samples and results.

    runs/<name>/
      config.yaml      the effective config of the latest invocation
      run.json         identity, data fingerprint and location, MLflow run id
      checkpoints/     step-XXXXXXXX/ (see ganpipe.checkpoint), latest, best
      samples/         preview grids
      registry/vN/     samples.png: the grid logged with registered version N (image data)
      generator/       the run's EMA generator (the last, or the best checkpoint's: train.final_generator):
                       generator.safetensors, spec.json, info.json
      result.json      what the last invocation achieved

The run name is derived from what determines the training trajectory (seed, data, model, train
minus bookkeeping such as steps and logging intervals): the same config with `--resume auto`
continues the same run, and raising `train.steps` extends it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ganpipe import schedules, storage
from ganpipe.config import Config
from ganpipe.config_files import config_from_yaml_text
from ganpipe.errors import UserError, shorten

# `final_generator` only picks which saved EMA becomes the run's generator; `prefetch` and
# `data_on_device_fraction` change how batches reach the device, never which (ganpipe.batches).
BOOKKEEPING = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "run_name",
               "final_generator", "prefetch", "data_on_device_fraction"}


# The keys of each section when run identities were first defined. Any key added since counts
# only when set to something other than its default: a config that does not use it names the
# same run it named before the key existed (tests/test_compat.py resumes such a run). Never edit.
FIRST_FORMAT_KEYS = {
    "data": {"cache", "channels", "classes", "columns", "config_name", "image_column", "kind", "label_column",
             "max_records", "on_bad_record", "resize", "resolution", "revision", "shard_size", "source", "split"},
    "model": {"conditional", "d_conditioning", "d_norm", "d_width", "family", "g_conditioning", "g_width",
              "latent_dim", "mlp_layers", "pack", "spectral_norm"},
    "train": {"accelerate_config", "adaptive_d_threshold", "adaptive_g_threshold", "batch_size", "best_metric",
              "best_num_samples", "betas", "channels_last", "checkpoint_every", "compile", "cpu", "d_lr", "d_steps",
              "ema_decay", "final_generator", "g_lr", "gp_weight", "grad_accum", "keep_checkpoints", "log_every",
              "loss", "lr_decay", "lr_decay_start", "mixed_precision", "num_machines", "num_processes", "r1_gamma",
              "run_name", "sample_every", "schedule", "steps"},
}


def run_identity(cfg: Config) -> str:
    raw = cfg.to_dict()
    defaults = Config(data={"source": cfg.data.source}).to_dict()
    # A schedule that follows train.steps makes the steps part of the trajectory.
    bookkeeping = BOOKKEEPING - ({"steps"} if schedules.follows_steps(cfg.train) else set())
    sections = {
        "data": raw["data"],
        "model": {**raw["model"], "g_conditioning": cfg.model.g_conditioning_used()},  # `auto`: what it builds
        "train": {k: v for k, v in raw["train"].items() if k not in bookkeeping},
    }
    for name, section in sections.items():
        for key in set(section) - FIRST_FORMAT_KEYS[name]:
            if section[key] == defaults[name][key]:
                del section[key]
    identity = {"seed": raw["seed"], **sections}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def runs_root() -> Path:
    return storage.ganpipe_home() / "runs"


def run_dir_for(cfg: Config, resume: str) -> Path:
    """`auto`: the run this config belongs to (new or existing). `never`: always a fresh directory,
    created here (an atomic mkdir, so two `--resume never` started together get one each)."""
    base = cfg.train.run_name or f"{_slug(cfg.registry.name)}-{run_identity(cfg)}"
    path = runs_root() / base
    if resume == "never":
        n = 1
        while True:
            inside_runs_root(path)
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                path = runs_root() / f"{base}-{n}"
    return inside_runs_root(path)


def inside_runs_root(path: Path) -> Path:
    """`path`, when it is one folder directly under runs_root(). train.run_name is validated as a
    name when the config loads; this is the second line of defence, where the path is made, so
    that no run folder is ever created or overwritten outside GANPIPE_HOME/runs."""
    root = runs_root()
    if Path(os.path.normpath(path)).parent != root or path.name in ("", ".", ".."):
        raise UserError(f"train.run_name: the run folder {shorten(str(path))} would be outside {root}")
    return path


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def read_info(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / "run.json")


def update_info(run_dir: Path, **fields: Any) -> dict[str, Any]:
    info = read_info(run_dir)
    info.update(fields)
    storage.write_json_atomic(str(run_dir / "run.json"), info)
    return info


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    return config_from_yaml_text(path.read_text(), str(path))


# A run's generators by stage: `final` (the last EMA, every run) and, for super-resolution runs
# with train.pretrain_steps, `psnr` (the EMA at the end of pretraining: the PSNR model). Each has
# its own evaluation file, so a registration is judged on the weights it registers.
STAGES = ("final", "psnr")
STAGE_FOLDERS = {"final": "generator", "psnr": "generator-psnr"}
EVALUATION_FILES = {"final": "evaluation.json", "psnr": "evaluation-psnr.json"}


def generator_dir(run_dir: Path, stage: str = "final") -> Path:
    return run_dir / STAGE_FOLDERS[stage]


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").exists() and (path / "config.yaml").exists()
