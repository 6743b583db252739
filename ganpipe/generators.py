"""Loading a trained generator, from a run directory or a registered version, and what is known
about where it came from.

Safety: a generator is read from `spec.json` (plain JSON) and `generator.safetensors` only;
nothing is unpickled and no code from the artifact store runs. A registered version carries the
sha256 of its weights as a tag (SHA_TAG), and loading checks the downloaded weights against it.
Downloads are cached under $GANPIPE_HOME/cache/models/<sha256>.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from ganpipe import runs, storage, tracking
from ganpipe.data import PreparedData
from ganpipe.errors import UserError
from ganpipe.networks import FAMILIES, NetworkSpec, build_generator

SHA_TAG = "ganpipe.generator_sha256"


def is_model_ref(src: str) -> bool:
    """A MODEL (models:/... or a run directory), as opposed to a dataset source."""
    return src.startswith("models:/") or runs.is_run_dir(storage.local_path(src))


# --- reading a generator: JSON + safetensors, never a pickle --------------------------------------

@dataclass
class LoadedGenerator:
    generator: torch.nn.Module
    spec: NetworkSpec
    source: dict[str, Any]  # model_uri, name, version, run_id, run_dir, generator_sha256 (what is known)


def read_generator(folder: Path) -> tuple[torch.nn.Module, NetworkSpec, str]:
    """(network in eval mode, spec, sha256 of the exact weight bytes loaded) from a folder holding
    spec.json and generator.safetensors. Anything else in their place is refused, not executed."""
    spec_file, weights_file = folder / "spec.json", folder / "generator.safetensors"
    try:
        spec = NetworkSpec.from_json(json.loads(spec_file.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{spec_file}: not a ganpipe network spec ({exc})") from None
    if spec.family not in FAMILIES:
        raise UserError(f"{spec_file}: unknown network family {spec.family!r}")
    data = weights_file.read_bytes()
    try:
        weights = load(data)
    except SafetensorError as exc:
        raise UserError(f"{weights_file}: not a safetensors file ({exc}); refusing to load it") from None
    generator = build_generator(spec)
    try:
        generator.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"{weights_file}: weights do not fit spec.json ({str(exc).splitlines()[0]})") from None
    return generator.eval(), spec, hashlib.sha256(data).hexdigest()


# --- loading a MODEL reference ------------------------------------------------------------------

def parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    name, sep, version = body.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise UserError(f"--model {ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or a run directory")
    return name, None, version


def resolve_version(ref: str) -> Any:
    """The registry's ModelVersion for models:/NAME@ALIAS or models:/NAME/VERSION."""
    from mlflow import MlflowClient  # mlflow costs seconds to import: only when a registry is used
    from mlflow.exceptions import MlflowException

    tracking.configure_mlflow()
    name, alias, version = parse_model_uri(ref)
    client = MlflowClient()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise  # the registry is unreachable or broken: not the user's input
        raise UserError(f"--model {ref}: not found in the registry at {tracking.tracking_uri()} "
                        f"({exc.message.splitlines()[0]})") from None


def load_generator(ref: str, device: str | torch.device = "cpu") -> LoadedGenerator:
    """A generator from the registry (its safetensors and spec only: no artifact code runs) or
    from a local run directory."""
    if ref.startswith("models:/"):
        version = resolve_version(ref)
        expected = (version.tags or {}).get(SHA_TAG)
        generator, spec, sha = read_generator(download_version(version, expected))
        if expected and sha != expected:  # the local cache was altered after the download
            raise UserError(f"{ref}: cached weights (sha256 {sha[:12]}) are not the ones registered "
                            f"({expected[:12]}); delete {storage.ganpipe_home() / 'cache' / 'models'}")
        source = {"model_uri": f"models:/{version.name}/{version.version}", "name": version.name,
                  "version": int(version.version), "run_id": version.run_id,
                  "run_dir": (version.tags or {}).get("ganpipe.run_dir")}
    else:
        run_dir = storage.local_path(ref).resolve()
        folder = runs.generator_dir(run_dir)
        if not (folder / "generator.safetensors").exists():
            raise UserError(f"--model {ref}: no finished generator in that directory "
                            "(expected a run directory after `ganpipe train`)")
        generator, spec, sha = read_generator(folder)
        source = {"model_uri": str(run_dir), "run_dir": str(run_dir),
                  "run_id": runs.read_info(run_dir).get("mlflow_run_id")}
    return LoadedGenerator(generator.to(device), spec, source | {"generator_sha256": sha})


def download_version(version: Any, expected_sha: str | None) -> Path:
    """The version's spec.json + generator.safetensors in a local folder, checked against the
    sha256 the version was registered with. Downloads are cached by that sha256 (not by
    name/version, which another store may reuse for other weights)."""
    import mlflow  # deferred: seconds to import, and only registry references need it

    cache_root = storage.ganpipe_home() / "cache" / "models"
    if expected_sha and (cache_root / expected_sha / "spec.json").exists():
        return cache_root / expected_sha
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=tmp))
        found = next(iter(local.rglob("generator.safetensors")), None)
        if found is None or not (found.parent / "spec.json").exists():
            raise UserError(f"models:/{version.name}/{version.version} is not a ganpipe generator")
        sha = storage.sha256_file(found)
        if expected_sha and sha != expected_sha:
            raise UserError(f"models:/{version.name}/{version.version}: the stored weights (sha256 {sha[:12]}) "
                            f"are not the ones registered ({expected_sha[:12]}); refusing to load them")
        cache = cache_root / sha
        if not (cache / "spec.json").exists():
            with storage.atomic_directory(cache) as target:
                shutil.copyfile(found, target / "generator.safetensors")
                shutil.copyfile(found.parent / "spec.json", target / "spec.json")
    return cache


def label_weights(data: PreparedData, spec: NetworkSpec) -> np.ndarray | None:
    """Class frequencies of the real data, for generating classes in the same proportions (so
    class-aware metrics compare like with like); None when unconditional or the classes differ."""
    counts = data.meta.get("class_counts")
    if not spec.conditional or not counts or len(counts) != spec.num_classes:
        return None
    return np.asarray(list(counts.values()), dtype=np.float64)
