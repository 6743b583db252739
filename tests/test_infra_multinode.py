"""Multi-machine training as the Kubernetes Job runs it (infra/k8s/train-node in every pod), with two
"machines" on this host: two `ganpipe train` processes, each with its machine rank and one CPU rank,
meeting at torchrun's static rendezvous on 127.0.0.1 and training one run on a shared GANPIPE_HOME."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_DIGITS, free_port, last_json, run_cli, write_config

TRAIN_NODE = str(ROOT / "infra" / "k8s" / "train-node")


def generator_sha256(run_dir: str) -> str:
    return hashlib.sha256((Path(run_dir) / "generator" / "generator.safetensors").read_bytes()).hexdigest()


def communicate_all(machines: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Every machine's (stdout, stderr), read concurrently; as soon as one machine fails the others
    are killed (they would wait at the rendezvous until the timeout), so a failure costs seconds."""
    with ThreadPoolExecutor(len(machines)) as pool:
        futures = [pool.submit(machine.communicate, timeout=timeout) for machine in machines]
        deadline = time.monotonic() + timeout
        while not all(future.done() for future in futures) and time.monotonic() < deadline:
            if any(machine.poll() not in (None, 0) for machine in machines):
                for machine in machines:
                    if machine.poll() is None:
                        os.killpg(machine.pid, signal.SIGKILL)
            time.sleep(0.5)
        return [future.result() for future in futures]


@pytest.mark.slow
def test_two_machines_train_one_run(tmp_path: Path, ganpipe_home: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)
    env = {**os.environ, "PYTHON": sys.executable, "GANPIPE_HOME": str(ganpipe_home), "GANPIPE_CONFIG": str(config),
           "RUN_NAME": "tiny-2x1", "NUM_MACHINES": "2", "PROCS_PER_MACHINE": "1",
           "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": str(free_port())}
    machines = [subprocess.Popen([TRAIN_NODE, "--set", "train.cpu=true", "--json"],
                                 env={**env, "JOB_COMPLETION_INDEX": str(rank)}, cwd=tmp_path, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                for rank in (0, 1)]
    try:
        outputs = communicate_all(machines, timeout=600)
    finally:
        for machine in machines:  # one machine failing leaves the other waiting at the rendezvous
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
                machine.wait()
    for machine, (_, stderr) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, stderr[-3000:]
    assert "machine 0 of 2: 1 ranks, rendezvous at 127.0.0.1:" in outputs[0][1]
    assert "machine 1 of 2: 1 ranks, rendezvous at 127.0.0.1:" in outputs[1][1]

    # Both machines report the same run: one run directory, two ranks in step.
    first, second = (last_json(stdout) for stdout, _ in outputs)
    assert first == second
    assert first["status"] == "completed" and first["steps"] == 20 and first["num_processes"] == 2
    assert first["run_dir"] == str(ganpipe_home / "runs" / "tiny-2x1")
    assert len(set(first["rank_generator_checksums"])) == 1

    # The same arithmetic as one machine with two ranks: the same weights, bit for bit.
    single = run_cli("train", str(config), "--num-processes", "2", "--set", "train.cpu=true",
                     "--set", "train.run_name=tiny-1x2", "--json")
    assert single.returncode == 0, single.stderr[-3000:]
    one_machine = last_json(single.stdout)
    assert one_machine["rank_generator_checksums"] == first["rank_generator_checksums"]
    assert generator_sha256(one_machine["run_dir"]) == generator_sha256(first["run_dir"])
