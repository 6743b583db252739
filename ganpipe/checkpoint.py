"""Checkpoints that survive a kill at any moment.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding the networks as safetensors and
everything else (optimisers, scaler, RNG states, data position) in `state.pt`, which holds only
tensors and plain values and loads with `weights_only=True`. It is written under a temporary
name, fsynced, and renamed into place: a directory with a final name is complete. `latest` and
`best` are small pointer files replaced atomically.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ganpipe import storage
from ganpipe.errors import UserError

NETWORKS = ("G", "D", "G_ema")
NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step_of(path: Path) -> int:
    match = NAME.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)), key=_step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Delete temporary directories left by a save that was killed."""
    root = checkpoint_root(run_dir)
    if root.exists():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (which needs contiguous CPU tensors that share no memory)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}, str(path))


def write_generator_folder(target: Path, weights: dict[str, torch.Tensor], spec: dict[str, Any],
                           info: dict[str, Any]) -> None:
    """A generator folder (generator.safetensors, spec.json, info.json), written atomically:
    what evaluation, registration and export read."""
    with storage.atomic_directory(target) as tmp:
        save_weights(weights, tmp / "generator.safetensors")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
        (tmp / "info.json").write_text(json.dumps(info, indent=2))


def save_checkpoint(run_dir: Path, step: int, networks: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], info: dict[str, Any], keep: int, score: float | None = None) -> Path:
    """Write a checkpoint atomically, point `latest` at it (and `best` when its `score` is the
    lowest so far), and prune to the last `keep` plus `best`."""
    target = checkpoint_root(run_dir) / f"step-{step:08d}"
    with storage.atomic_directory(target) as tmp:
        for name, weights in networks.items():
            save_weights(weights, tmp / f"{name}.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(
            {"step": step, "saved_at": time.time(), "score": score, **info}, indent=2))
    storage.write_bytes_atomic(str(checkpoint_root(run_dir) / "latest"), target.name.encode())
    best = best_score(run_dir)
    if score is not None and math.isfinite(score) and (best is None or score < best):
        mark_best(run_dir, target)
    prune(run_dir, keep)
    return target


def mark_best(run_dir: Path, checkpoint: Path) -> None:
    storage.write_bytes_atomic(str(checkpoint_root(run_dir) / "best"), checkpoint.name.encode())


def best_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / "best"
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def best_score(run_dir: Path) -> float | None:
    """The score of the `best` checkpoint (lower is better), None when there is none yet."""
    best = best_checkpoint(run_dir)
    if best is None:
        return None
    score = json.loads((best / "meta.json").read_text()).get("score")
    return float(score) if score is not None else None


def prune(run_dir: Path, keep: int) -> None:
    best = best_checkpoint(run_dir)
    for path in list_checkpoints(run_dir)[:-keep]:
        if path != best:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The networks' weights and the training state. Nothing is unpickled beyond plain values: a
    state.pt holding anything else, or a file that is not what its name says, is a UserError
    naming the file."""
    networks = {name: read_weights(path / f"{name}.safetensors") for name in NETWORKS
                if (path / f"{name}.safetensors").exists()}
    state_file = path / "state.pt"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{state_file}: not a weights-only checkpoint ({refusal(exc)}); refusing to unpickle it"
                        ) from None
    except (RuntimeError, EOFError, ValueError, FileNotFoundError) as exc:  # not a torch.save archive, or cut short
        raise UserError(f"{state_file}: not a readable checkpoint ({str(exc).splitlines()[0][:200]})") from None
    return networks, state


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; anything else (a pickle, a truncated file) is a UserError."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise UserError(f"{path}: not a safetensors file ({exc}); refusing to load it") from None


def refusal(exc: pickle.UnpicklingError) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line: the global (a class or
    function) the pickle wanted, when torch names it, not torch's page of advice."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    reason = f"it holds GLOBAL {found.group(1)}" if found else " ".join(str(exc).split())[:200]
    return f"torch.load(weights_only=True) refused it: {reason}"


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())
