"""Bounded resources around networks and checkpoints, and worker errors users can read (issue 19).

Each test reproduces a probe of the issue as a user runs it and asserts the fixed behaviour: the
exit code, the one `error:` line and what it names, and, where they are the point, the time and
the peak memory measured in a process of its own."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ganpipe import checkpoint, cli, storage
from ganpipe.errors import UserError
from ganpipe.footprint import meta_network
from ganpipe.generators import SHA_TAG, SPEC_SHA_TAG, load_generator
from ganpipe.networks import NetworkSpec
from ganpipe.registry import register_run
from ganpipe.workers import WorkerOutput
from tests.conftest import TINY_DIGITS, error_lines, run_cli, write_config
from tests.processes import measured_commands
from tests.test_registry import copy_run, mlflow_client

MAX_SECONDS = 20  # per refused command: it fails on a header and a meta-device build, not on work
MAX_GROWTH_MIB = 500  # the probes reached 8.6 GB before any check


class Opaque:
    """An arbitrary object, as a checkpoint written by other code could hold. Unpickling it
    touches `marker`: proof that it was (or, as required, was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


def plant_opaque(path: Path, marker: Path) -> None:
    """torch.save an Opaque at `path`, after proving that an unsafe load really unpickles it."""
    torch.save(Opaque(marker), path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the object must unpickle for the test to mean anything"
    marker.unlink()


def edit_spec(run: Path, **changes: object) -> Path:
    spec_file = run / "generator" / "spec.json"
    spec_file.write_text(json.dumps(json.loads(spec_file.read_text()) | changes))
    return spec_file


def write_sparse_weights(run: Path, **changes: object) -> Path:
    """A run whose spec and weights header agree on a generator far too large for any machine:
    the header is real, the data a sparse file (no disk space, all zeros)."""
    spec_file = edit_spec(run, **changes)
    spec = NetworkSpec.from_json(json.loads(spec_file.read_text()))
    header, offset = {}, 0
    for name, tensor in meta_network(spec).state_dict().items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights = run / "generator" / "generator.safetensors"
    with open(weights, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return weights


def assert_refused_quickly(result: dict, *needles: str) -> str:
    errors = error_lines(result["stderr"])
    assert result["code"] == 2 and len(errors) == 1, result
    assert all(needle in errors[0] for needle in needles), (needles, errors[0])
    assert result["seconds"] < MAX_SECONDS and result["peak_growth_mib"] < MAX_GROWTH_MIB, result
    return errors[0]


# --- 1. a spec is checked against the weights file's header before any network is built ----------

def test_spec_that_does_not_match_its_weights_is_refused_before_allocation(tiny_run: Path, tmp_path: Path) -> None:
    wide = copy_run(tiny_run, tmp_path / "wide")
    edit_spec(wide, g_width=4096)  # the probe: 8.6 GB allocated before any check
    deep = copy_run(tiny_run, tmp_path / "deep")
    edit_spec(deep, latent_dim=10**12)  # exit 1 before, after trying to allocate 4 TB
    results = measured_commands(
        [["generate", "--model", str(run), "--num-images", "4", "--out", str(tmp_path / f"{run.name}.npy")]
         for run in (wide, deep)], preload=["torch", "ganpipe.generate"])
    for run, result, shape in zip((wide, deep), results, ("[16, 8192, 4, 4]", "[1000000000000, 16, 4, 4]"),
                                  strict=True):
        line = assert_refused_quickly(result, f"{run / 'generator' / 'spec.json'} does not match "
                                              f"{run / 'generator' / 'generator.safetensors'}",
                                      f"blocks.0.conv.weight: spec {shape}, file [16, 16, 4, 4]")
        assert len(line) < 700 and not (tmp_path / f"{run.name}.npy").exists()
    # The run the copies came from still loads: the check refuses mismatches, nothing else.
    assert load_generator(str(tiny_run)).spec.g_width == 8


# --- 2. the registered checksum covers spec.json --------------------------------------------------

def test_registered_spec_is_covered_by_the_checksum(tiny_run: Path, tmp_path: Path, ganpipe_home: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    run = copy_run(tiny_run, tmp_path / "run", fd=1.0)
    spec_bytes = (run / "generator" / "spec.json").read_bytes()
    assert register_run(run)["version"] == 1
    client = mlflow_client()
    assert client.get_model_version("tiny-digits", "1").tags[SPEC_SHA_TAG] == \
        storage.sha256_file(run / "generator" / "spec.json")
    out = str(tmp_path / "x.npy")

    # The stored spec is edited behind the registry's back, in a way the weights still fit.
    stored = next((ganpipe_home / "mlartifacts" / "models").rglob("spec.json"))
    stored.write_text(json.dumps(json.loads(spec_bytes) | {"d_width": 9}))
    assert cli.run(["generate", "--model", "models:/tiny-digits/1", "--num-images", "2", "--out", out]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "models:/tiny-digits/1: spec.json" in errors[0], errors
    assert "not the one registered" in errors[0] and not Path(out).exists()

    # Restored, it loads (and is cached); the cached copy edited is refused in turn.
    stored.write_bytes(spec_bytes)
    assert load_generator("models:/tiny-digits/1").spec.d_width == 8
    cached = next((ganpipe_home / "cache" / "models").rglob("spec.json"))
    cached.write_text(json.dumps(json.loads(spec_bytes) | {"d_width": 9}))
    with pytest.raises(UserError, match=r"models:/tiny-digits/1: spec.json .* not the one registered.*delete"):
        load_generator("models:/tiny-digits/1")

    # A version registered before specs were tagged loads as before (its weights are checked),
    # and registering the same generator again does not vouch for a spec it was not registered with.
    client.delete_model_version_tag("tiny-digits", "1", SPEC_SHA_TAG)
    assert load_generator("models:/tiny-digits/1").source["version"] == 1
    assert register_run(run)["version"] == 1
    tags = client.get_model_version("tiny-digits", "1").tags
    assert SPEC_SHA_TAG not in tags and tags[SHA_TAG] == storage.sha256_file(run / "generator" / "generator.safetensors")


# --- 3. a network or batch that cannot fit is refused before allocation ---------------------------

def test_network_or_batch_too_large_is_refused_before_allocation(tiny_run: Path, tmp_path: Path,
                                                                ganpipe_home: Path) -> None:
    config = str(write_config(tmp_path / "tiny.yaml", TINY_DIGITS))
    giant = copy_run(tiny_run, tmp_path / "giant")
    weights = write_sparse_weights(giant, g_width=65536)  # 550 GB of weights, consistent with the spec
    warm_up, batch, width, generate, export = measured_commands([
        ["ingest", config],  # the data is prepared (and its imports made) before anything is measured
        ["train", config, "--set", "train.batch_size=1000000000"],  # the probe: 8.6 GB, no output
        ["train", config, "--set", "model.g_width=1000000"],
        ["generate", "--model", str(giant), "--num-images", "4", "--out", str(tmp_path / "giant.npy")],
        ["export", "--model", str(giant), "--num-images", "4", "--out", str(tmp_path / "export")],
    ], preload=["torch", "ganpipe.launch", "ganpipe.generate", "ganpipe.export"])
    assert warm_up["code"] == 0, warm_up
    line = assert_refused_quickly(batch, "error: train.batch_size 1000000000 needs about ", " GiB (",
                                  "activations of 1,000,000,000 samples", "GiB of RAM available")
    needed, available = (float(x.replace(",", "")) for x in
                         (line.split("needs about ")[1].split(" GiB")[0], line.split("more than the ")[1].split(" ")[0]))
    assert needed > 1000 and needed > available > 0
    assert_refused_quickly(width, "error: model.g_width 1000000 needs about ", "weights, gradients and Adam state")
    assert not (ganpipe_home / "runs").exists() or not any((ganpipe_home / "runs").iterdir())  # no worker ran
    for result in (generate, export):
        assert_refused_quickly(result, f"error: {weights}: loading this generator", "GiB of RAM available")
    assert not (tmp_path / "giant.npy").exists() and not (tmp_path / "export").exists()


# --- 4. checkpoint files that are not what they claim --------------------------------------------

def test_checkpoint_files_that_are_not_what_they_claim_are_refused(tiny_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    saved = checkpoint.latest_checkpoint(tiny_run)
    assert saved is not None
    copy = tmp_path / "checkpoints" / saved.name
    shutil.copytree(saved, copy)

    marker = tmp_path / "unpickled"
    plant_opaque(copy / "state.pt", marker)
    with pytest.raises(UserError) as refused:
        checkpoint.load_checkpoint(copy)
    assert str(refused.value).startswith(f"{copy / 'state.pt'}: not a weights-only checkpoint")
    assert "it holds GLOBAL tests.test_resource_limits.Opaque" in str(refused.value)
    assert not marker.exists()

    shutil.copyfile(saved / "state.pt", copy / "state.pt")
    (copy / "state.pt").write_bytes((saved / "state.pt").read_bytes()[:1000])  # cut short
    with pytest.raises(UserError, match=f"^{re.escape(str(copy / 'state.pt'))}: not a readable checkpoint"):
        checkpoint.load_checkpoint(copy)

    shutil.copyfile(saved / "state.pt", copy / "state.pt")
    g = copy / "G.safetensors"
    g.write_bytes(g.read_bytes()[:-100])  # a corrupted (truncated) safetensors file
    with pytest.raises(UserError, match=f"^{re.escape(str(g))}: not a safetensors file"):
        checkpoint.load_checkpoint(copy)

    run = copy_run(tiny_run, tmp_path / "run")
    weights = run / "generator" / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert cli.run(["generate", "--model", str(run), "--num-images", "2", "--out", str(tmp_path / "x.npy")]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"error: {weights}: not a safetensors file"), errors


# --- 5. an input error inside the training worker reaches the user as one line ----------------------

def test_worker_input_error_reaches_the_user_as_one_line(tiny_run: Path, tmp_path: Path, ganpipe_home: Path) -> None:
    run_dir = ganpipe_home / "runs" / tiny_run.name  # the same config resumes this run
    shutil.copytree(tiny_run, run_dir)
    state = checkpoint.latest_checkpoint(run_dir) / "state.pt"
    marker = tmp_path / "unpickled"
    plant_opaque(state, marker)
    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)

    result = run_cli("train", str(config), "--set", "train.steps=30")
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: {state}: not a weights-only checkpoint"), errors
    assert "Traceback" not in result.stderr and not marker.exists()
    log = (run_dir / "train.log").read_text()
    assert "Traceback" in log and f"worker input error: {state}" in log
    assert load_file(str(checkpoint.latest_checkpoint(run_dir) / "G.safetensors"))  # the run is as it was


@pytest.mark.parametrize("debug", [False, True])
def test_worker_traceback_shows_only_with_debug(debug: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the launcher does with a worker's protocol lines: the log keeps everything, the user
    sees the traceback only with GANPIPE_DEBUG=1, and the cause says the input is at fault."""
    monkeypatch.setenv("GANPIPE_DEBUG", "1" if debug else "0")
    shown: list[str] = []
    output = WorkerOutput(shown.append, tmp_path / "train.log")
    for line in ["step 1/2", "worker traceback: Traceback (most recent call last):",
                 "worker traceback: ganpipe.errors.UserError: bad", "worker input error: x/state.pt: bad",
                 "Traceback (most recent call last):", "subprocess.CalledProcessError: ... exit status 2",
                 "worker error: collateral damage on another rank"]:
        output.line(line)
    output.close()
    assert output.input_error == "x/state.pt: bad"
    assert len((tmp_path / "train.log").read_text().splitlines()) == 7
    assert any("Traceback" in line for line in shown) is debug and shown[0] == "step 1/2"
    assert len(shown) == (7 if debug else 1)


def test_gpu_memory_is_read_without_a_cuda_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi's free memory of the visible GPUs (the least of them); unknown without nvidia-smi."""
    import subprocess

    from ganpipe import footprint

    monkeypatch.setattr(footprint.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(footprint.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="0, 80000\n1, 1200\n2, 40000\n"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert footprint.available_gpu_memory() == 40000 << 20
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert footprint.available_gpu_memory() == 1200 << 20
    monkeypatch.setattr(footprint.shutil, "which", lambda name: None)
    assert footprint.available_gpu_memory() is None
