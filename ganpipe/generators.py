"""Loading a trained generator, from a run directory or a registered version, and what is known
about where it came from.

Safety: a generator is read from `spec.json` (plain JSON) and `generator.safetensors` only;
nothing is unpickled and no code from the artifact store runs. A registered version carries the
sha256 of its weights (SHA_TAG) and of its spec.json (SPEC_SHA_TAG) as tags, and loading checks
the downloaded files against them (versions registered before SPEC_SHA_TAG existed: the weights
only). Before any network is built, the spec is checked against the weights file's header
(tensor names and shapes) and loading against the memory available. Downloads are cached under
$GANPIPE_HOME/cache/models/ by those sha256s.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from ganpipe import runs, storage, tracking
from ganpipe.data import PreparedData
from ganpipe.errors import UserError
from ganpipe.footprint import check_generator_fits, meta_network, state_shapes
from ganpipe.networks import FAMILIES, NetworkSpec, build_generator

SHA_TAG = "ganpipe.generator_sha256"
# The sha256 of spec.json: the spec decides how the weights are used (shapes, classes, the vector
# statistics), so it is covered like them. Versions registered before it have only SHA_TAG.
SPEC_SHA_TAG = "ganpipe.spec_sha256"
# The best mix of the version's uplift measurement (synthetic rows per real row): `augment --ratio auto`.
BEST_RATIO_TAG = "ganpipe.metric.uplift.best_ratio"
MAX_SPEC_BYTES = 16 << 20  # a spec is a few kB, even with thousands of columns or classes
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def is_model_ref(src: str) -> bool:
    """A MODEL (models:/... or a run directory), as opposed to a dataset source."""
    return src.startswith("models:/") or runs.is_run_dir(storage.local_path(src))


# --- reading a generator: JSON + safetensors, never a pickle --------------------------------------

@dataclass
class LoadedGenerator:
    generator: torch.nn.Module
    spec: NetworkSpec
    source: dict[str, Any]  # model_uri, name, version, run_id, run_dir, generator_sha256 (what is known)


class GeneratorFiles(NamedTuple):
    """What `read_generator` read: the network, its spec, and the sha256 of the exact bytes of
    generator.safetensors and spec.json it was built from."""

    generator: torch.nn.Module
    spec: NetworkSpec
    weights_sha256: str
    spec_sha256: str


def read_generator(folder: Path) -> GeneratorFiles:
    """The generator in a folder holding spec.json and generator.safetensors, in eval mode.
    Anything else in their place is refused, not executed; a spec that does not describe the
    weights file, or a network too large for memory, is refused before anything is allocated."""
    spec_file, weights_file = folder / "spec.json", folder / "generator.safetensors"
    try:
        if spec_file.stat().st_size > MAX_SPEC_BYTES:
            raise ValueError(f"{spec_file.stat().st_size:,} bytes; a spec is a few kB")
        spec_bytes = spec_file.read_bytes()
        spec = NetworkSpec.from_json(json.loads(spec_bytes))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{spec_file}: not a ganpipe network spec ({str(exc)[:200]})") from None
    if not isinstance(spec.family, str) or spec.family not in FAMILIES:
        raise UserError(f"{spec_file}: unknown network family {str(spec.family)[:100]!r}")
    check_spec_against_weights(spec, spec_file, weights_file)
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
    return GeneratorFiles(generator.eval(), spec, hashlib.sha256(data).hexdigest(),
                          hashlib.sha256(spec_bytes).hexdigest())


def weights_header(weights_file: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes) of every tensor in a safetensors file, from its header alone: no
    tensor is read, and the file is not mapped (safetensors' safe_open maps it whole, which fails
    for a file larger than the address space allows). The header must describe the whole file."""
    try:
        size = weights_file.stat().st_size
        with open(weights_file, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
        entries = sorted(((entry["data_offsets"], name, entry) for name, entry in header.items()
                          if name != "__metadata__"), key=lambda item: [int(n) for n in item[0]])
        tensors, end = {}, 0
        for (start, stop), name, entry in entries:
            shape = tuple(int(n) for n in entry["shape"])
            nbytes = math.prod(shape) * DTYPE_BYTES[entry["dtype"]]
            if min(shape, default=0) < 0 or start != end or stop - start != nbytes:
                raise ValueError(f"tensor {name[:100]!r}: offsets do not match its shape")
            tensors[name], end = (shape, nbytes), stop
        if end != size - 8 - length:
            raise ValueError(f"the header describes {end:,} bytes of data, the file holds {size - 8 - length:,}")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise UserError(f"{weights_file}: not a safetensors file ({str(exc)[:200]}); refusing to load it") from None
    return tensors


def check_spec_against_weights(spec: NetworkSpec, spec_file: Path, weights_file: Path) -> None:
    """The spec's network, built on the meta device (no memory), must have exactly the tensors and
    shapes of the weights file's header, and loading it must fit in memory: a spec that says
    g_width 4096 beside 8-wide weights is refused here, not after allocating gigabytes."""
    header = weights_header(weights_file)
    if spec.family == "mlp" and isinstance(spec.mlp_layers, int) and spec.mlp_layers > len(header):
        raise UserError(f"{spec_file} does not match {weights_file}: mlp_layers {spec.mlp_layers} implies more "
                        f"tensors than the file's {len(header)}")
    try:
        meta = meta_network(spec, "generator")
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise UserError(f"{spec_file}: no network can be built from this spec ({str(exc).splitlines()[0][:200]})") \
            from None
    mismatch = shape_mismatch(state_shapes(meta), {key: shape for key, (shape, _) in header.items()})
    if mismatch:
        raise UserError(f"{spec_file} does not match {weights_file}: {mismatch}")
    check_generator_fits(meta, spec, sum(size for _, size in header.values()), str(weights_file))


def shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """How a weights file's tensors differ from a spec's (None when they do not), in a few hundred
    characters at most."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [key for key in expected if key in found and expected[key] != found[key]]
    if not (missing or unexpected or wrong):
        return None
    values = {side: sum(math.prod(shape) for shape in shapes.values())
              for side, shapes in (("spec", expected), ("file", found))}
    parts = [f"the spec implies {values['spec']:,} values in {len(expected)} tensors, "
             f"the file holds {values['file']:,} in {len(found)}"]
    parts += [f"{key}: spec {list(expected[key])}, file {list(found[key])}" for key in wrong[:2]]
    if missing:
        parts.append(f"not in the file: {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"not in the spec: {', '.join(unexpected[:3])}")
    text = "; ".join(parts)
    return text if len(text) <= 600 else text[:597] + "..."


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
        expected, expected_spec = (version.tags or {}).get(SHA_TAG), (version.tags or {}).get(SPEC_SHA_TAG)
        folder = download_version(version, expected, expected_spec)
        generator, spec, sha, spec_sha = read_generator(folder)
        # The local cache was altered after the download (between the check and the read):
        if expected and sha != expected:
            raise UserError(f"{ref}: cached weights (sha256 {sha[:12]}) are not the ones registered "
                            f"({expected[:12]}); delete {folder}")
        if expected_spec and spec_sha != expected_spec:
            raise UserError(f"{ref}: cached spec.json (sha256 {spec_sha[:12]}) is not the one registered "
                            f"({expected_spec[:12]}); delete {folder}")
        source = {"model_uri": f"models:/{version.name}/{version.version}", "name": version.name,
                  "version": int(version.version), "run_id": version.run_id,
                  "run_dir": (version.tags or {}).get("ganpipe.run_dir")}
    else:
        run_dir = storage.local_path(ref).resolve()
        folder = runs.generator_dir(run_dir)
        if not (folder / "generator.safetensors").exists():
            raise UserError(f"--model {ref}: no finished generator in that directory "
                            "(expected a run directory after `ganpipe train`)")
        generator, spec, sha, _ = read_generator(folder)
        source = {"model_uri": str(run_dir), "run_dir": str(run_dir),
                  "run_id": runs.read_info(run_dir).get("mlflow_run_id")}
    return LoadedGenerator(generator.to(device), spec, source | {"generator_sha256": sha})


def cache_folder(weights_sha: str, spec_sha: str | None) -> Path:
    """Where a download is cached: by what it is (the weights' sha256 and, for versions registered
    with one, the spec's), not by name/version, which another store may reuse for other files."""
    name = f"{weights_sha}-{spec_sha[:16]}" if spec_sha else weights_sha
    return storage.ganpipe_home() / "cache" / "models" / name


def check_spec_digest(spec_file: Path, expected: str | None, label: str, remedy: str) -> None:
    """spec.json must be the one registered (when the version was registered with its sha256)."""
    if expected is None:
        return
    actual = storage.sha256_file(spec_file)
    if actual != expected:
        raise UserError(f"{label}: spec.json (sha256 {actual[:12]}) is not the one registered "
                        f"({expected[:12]}); {remedy}")


def download_version(version: Any, expected_sha: str | None, expected_spec_sha: str | None = None) -> Path:
    """The version's spec.json + generator.safetensors in a local folder, checked against the
    sha256s the version was registered with (cached by them)."""
    import mlflow  # deferred: seconds to import, and only registry references need it

    label = f"models:/{version.name}/{version.version}"
    if expected_sha and (cache_folder(expected_sha, expected_spec_sha) / "spec.json").exists():
        cached = cache_folder(expected_sha, expected_spec_sha)
        check_spec_digest(cached / "spec.json", expected_spec_sha, label, f"the cached copy was altered; delete {cached}")
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=label, dst_path=tmp))
        found = next(iter(local.rglob("generator.safetensors")), None)
        if found is None or not (found.parent / "spec.json").exists():
            raise UserError(f"{label} is not a ganpipe generator")
        sha = storage.sha256_file(found)
        if expected_sha and sha != expected_sha:
            raise UserError(f"{label}: the stored weights (sha256 {sha[:12]}) "
                            f"are not the ones registered ({expected_sha[:12]}); refusing to load them")
        check_spec_digest(found.parent / "spec.json", expected_spec_sha, label, "refusing to load it")
        cache = cache_folder(sha, expected_spec_sha)
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
