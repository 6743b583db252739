"""Ownership and locks (issue 19): one writer per run directory and export destination, exports
that never touch a folder ganpipe did not write, and a safe first use of the embedded MLflow
store. The probes are the issue's: real concurrent `ganpipe train` and `ganpipe export`
processes, a user's README.md and .tmp-notes/ in the target, a SIGKILLed holder."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ganpipe import cli
from ganpipe.locks import LOCK_FILE
from ganpipe.shards import MARKER, SCRATCH_PREFIX
from tests.conftest import GANPIPE, ROOT, TINY_DIGITS, error_lines, last_json, write_config

HOST = socket.gethostname()
STEPS, LOG_EVERY = 4, 2
TRAIN_FAST = [f"--set=train.steps={STEPS}", "--set=train.checkpoint_every=2", f"--set=train.log_every={LOG_EVERY}",
              "--set=train.sample_every=4", "--json"]


def start(*args: str, home: Path) -> subprocess.Popen:
    return subprocess.Popen([*GANPIPE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GANPIPE_HOME": str(home)})


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def in_use_line(path: Path, pid: int, command: str) -> re.Pattern[str]:
    """The one error line of a second writer."""
    return re.compile(rf"error: {re.escape(str(path))} is in use by pid {pid} on {re.escape(HOST)} "
                      rf"\({command}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d [^)]*\); wait for it or pass --wait")


def lock_holder(folder: Path) -> int | None:
    try:
        return json.loads((folder / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def wait_until_held(folder: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while lock_holder(folder) != pid:
        assert proc.poll() is None and time.time() < deadline, f"pid {pid} never locked {folder}"
        time.sleep(0.05)


def cli_code(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def mlflow_history(home: Path, run_id: str, metric: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    return [m.step for m in client.get_metric_history(run_id, metric)]


# --- two `ganpipe train` of one config at once ------------------------------------------------------

@pytest.fixture(scope="module")
def concurrent_trains(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two `ganpipe train` of one config started together on a fresh GANPIPE_HOME (the issue's
    probe: one died in the MLflow store's creation, or both trained one run directory)."""
    home = tmp_path_factory.mktemp("fresh-home")
    config = write_config(home / "tiny.yaml", TINY_DIGITS)
    procs = [start("train", str(config), *TRAIN_FAST, home=home) for _ in range(2)]
    return {"home": home, "procs": procs, "results": [finish(p) for p in procs]}


def test_a_second_train_of_one_run_exits_2_naming_the_holder(concurrent_trains: dict) -> None:
    procs, results = concurrent_trains["procs"], concurrent_trains["results"]
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-1500:] for _, _, err in results]
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    code, out, _ = results[winner]
    result = last_json(out)
    run_dir = Path(result["run_dir"])
    assert result["steps"] == STEPS and result["resumed_from_step"] is None
    loser_err = results[1 - winner][2]
    assert len(error_lines(loser_err)) == 1 and "Traceback" not in loser_err
    assert in_use_line(run_dir, procs[winner].pid, "ganpipe train").fullmatch(error_lines(loser_err)[0])
    # One trajectory, logged once: every metric step once, in the winner's MLflow run.
    assert mlflow_history(concurrent_trains["home"], result["mlflow_run_id"], "d_loss") == [2, 4]


def test_with_wait_both_trains_succeed_and_the_run_is_logged_once(tmp_path: Path) -> None:
    home = tmp_path / "fresh-home"
    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)
    procs = [start("train", str(config), *TRAIN_FAST, "--wait", home=home) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err[-1500:] for _, _, err in results]
    first, second = sorted((last_json(out) for _, out, _ in results),
                           key=lambda r: r["resumed_from_step"] is not None)
    # The one that waited found the run complete: it resumed at the last step and trained nothing.
    assert first["resumed_from_step"] is None and second["resumed_from_step"] == STEPS
    assert first["run_dir"] == second["run_dir"] and first["mlflow_run_id"] == second["mlflow_run_id"]
    waited = [err for _, _, err in results if "waiting for" in err]
    assert len(waited) == 1 and f"waiting for {first['run_dir']}: in use by pid " in waited[0]
    assert mlflow_history(home, first["mlflow_run_id"], "d_loss") == [2, 4]
    assert mlflow_history(home, first["mlflow_run_id"], "g_loss") == [2, 4]


def test_first_use_of_the_embedded_mlflow_store_by_concurrent_processes(tmp_path: Path) -> None:
    """The MLflow race of the issue without training around it: processes creating the fresh
    store at once (different configs, so no run lock orders them) all get the same experiment."""
    home = tmp_path / "fresh-home"
    code = "from ganpipe import tracking; print(tracking.experiment_id('race'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "GANPIPE_HOME": str(home)})
             for _ in range(2)]
    results = [finish(p, timeout=180) for p in procs]
    assert [(rc, out.strip()) for rc, out, _ in results] == [(0, "1"), (0, "1")], [e[-800:] for _, _, e in results]


# --- exports: ownership ----------------------------------------------------------------------------

def trained_run(concurrent_trains: dict) -> str:
    code, out, _ = next(r for r in concurrent_trains["results"] if r[0] == 0)
    return last_json(out)["run_dir"]


def test_export_refuses_a_folder_with_foreign_files_and_touches_nothing(
        concurrent_trains: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = trained_run(concurrent_trains)
    target = tmp_path / "mine"
    (target / ".tmp-notes").mkdir(parents=True)
    (target / ".tmp-notes" / "todo.txt").write_text("my notes")
    (target / "README.md").write_text("my readme")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.rglob("*") if p.is_file()}
    code, _, err = cli_code(capsys, "export", "--model", model, "--num-images", "10", "--out", str(target))
    assert code == 2 and error_lines(err) == [
        f"error: --out {target}: holds files ganpipe did not write: .tmp-notes/, README.md; "
        "choose an empty or new folder"]
    code, _, err = cli_code(capsys, "augment", "--real", "builtin:digits", "--synthetic", model, "--ratio", "1",
                            "--out", str(target))
    assert code == 2 and error_lines(err)[0].startswith(f"error: --out {target}: holds files ganpipe did not write")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in target.iterdir()) == [".tmp-notes", "README.md"]  # no lock, no marker

    many = tmp_path / "many"
    many.mkdir()
    for name in "abcde":
        (many / f"{name}.txt").write_text(name)
    code, _, err = cli_code(capsys, "export", "--model", model, "--num-images", "10", "--out", str(many))
    assert code == 2 and "holds files ganpipe did not write: a.txt, b.txt, c.txt and 2 more;" in err

    code, _, err = cli_code(capsys, "export", "--model", model, "--num-images", "10",
                            "--out", str(target / "README.md"))
    assert code == 2 and error_lines(err) == [
        f"error: --out: {target / 'README.md'} is a file, not a folder"]
    assert (target / "README.md").read_text() == "my readme"


def test_stale_scratch_cleanup_removes_only_ganpipes_scratch(
        concurrent_trains: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = trained_run(concurrent_trains)
    out = tmp_path / "export"
    args = ["export", "--model", model, "--num-images", "40", "--shard-size", "20", "--out", str(out), "--json"]
    assert cli_code(capsys, *args)[0] == 0
    # Our own export folder: a killed run's scratch, and a folder of the user's with a similar name.
    (out / f"{SCRATCH_PREFIX}killed").mkdir()
    (out / f"{SCRATCH_PREFIX}killed" / "shard.parquet").write_bytes(b"half a shard")
    (out / ".tmp-notes").mkdir()
    (out / ".tmp-notes" / "todo.txt").write_text("my notes")
    code, stdout, err = cli_code(capsys, *args)
    assert code == 0, err
    assert last_json(stdout)["shards_written"] == 0
    assert not (out / f"{SCRATCH_PREFIX}killed").exists()
    assert (out / ".tmp-notes" / "todo.txt").read_text() == "my notes"
    assert json.loads((out / MARKER).read_text())["num_images"] == 40


# --- exports: one writer at a time ---------------------------------------------------------------------

def test_a_second_export_to_one_place_exits_2_and_the_first_completes_intact(
        concurrent_trains: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ganpipe.storage import sha256_file

    model = trained_run(concurrent_trains)
    out = tmp_path / "shared"
    args = ["export", "--model", model, "--num-images", "6000", "--shard-size", "1500", "--out", str(out)]
    first = start(*args, "--json", home=concurrent_trains["home"])
    wait_until_held(out, first.pid, first)
    code, _, err = cli_code(capsys, *args)
    assert code == 2 and len(error_lines(err)) == 1
    assert in_use_line(out, first.pid, "ganpipe export").fullmatch(error_lines(err)[0])
    assert first.poll() is None, "the first export must still be running for this test to mean anything"
    # --wait: the second waits its turn, then finds every shard written.
    code, stdout, err = cli_code(capsys, *args, "--wait", "--json")
    assert code == 0, err
    assert f"waiting for {out}: in use by pid {first.pid} on {HOST} (ganpipe export, since " in err
    assert last_json(stdout)["shards_written"] == 0
    code, stdout, err = finish(first)
    assert code == 0 and "error" not in err, err[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_rows"] == 6000 and last_json(stdout)["shards_written"] == 4
    assert [sha256_file(out / s["file"]) for s in manifest["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert not list(out.glob(f"{SCRATCH_PREFIX}*"))


def test_a_sigkilled_holder_does_not_block(concurrent_trains: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """The kernel drops a flock when its holder dies, SIGKILL included: no stale lock to clear."""
    model = trained_run(concurrent_trains)
    out = tmp_path / "killed-holder"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom ganpipe.locks import hold_folder\n"
         "with hold_folder(Path(sys.argv[1]), 'ganpipe export'):\n    print('held', flush=True)\n    time.sleep(600)",
         str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    args = ["export", "--model", model, "--num-images", "10", "--out", str(out), "--json"]
    code, _, err = cli_code(capsys, *args)
    assert code == 2 and in_use_line(out, holder.pid, "ganpipe export").fullmatch(error_lines(err)[0])
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    code, stdout, err = cli_code(capsys, *args)
    assert code == 0, err
    assert last_json(stdout)["num_images"] == 10
    assert lock_holder(out) == os.getpid()  # the file stays (never unlinked); it names the last holder
