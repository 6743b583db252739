"""How long each client takes to give up on an endpoint that accepts connections and never
answers, with the default network budget (storage.timeout_s 30, storage.retries 2) or the one
given: wall time of the command, the seconds from its first connection to its exit (the network
part, without Python's start-up), the connections it made, and its `error:` line.

    PYTHONPATH=$PWD python benchmarks/network_timeouts.py [--services s3,mlflow,prefect,hub] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT
from tests.processes import SilentServer


def commands(service: str, url: str, work: Path) -> tuple[list[str], dict[str, str]]:
    """The command that meets `service` first, and the environment pointing it at `url`."""
    if service == "s3":
        config = work / "s3.yaml"
        config.write_text("data:\n  source: s3://bucket/images\n")
        return (["ingest", str(config), "--set", f"storage.endpoint_url={url}"],
                {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    if service == "mlflow":
        return (["generate", "--model", "models:/bench@champion", "--num-images", "1", "--out", str(work / "x.npy")],
                {"MLFLOW_TRACKING_URI": url})
    if service == "prefect":
        return ["deploy"], {"PREFECT_API_URL": f"{url}/api"}
    if service == "hub":
        config = work / "hub.yaml"
        config.write_text("data:\n  source: someone/some-dataset\n")
        return ["ingest", str(config)], {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                                         "HF_HOME": str(work / "hf-home")}
    raise SystemExit(f"unknown service {service!r}")


def measure(service: str, timeout: float | None) -> dict[str, object]:
    server = SilentServer()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            args, extra = commands(service, server.url, work)
            env = {**os.environ, "GANPIPE_HOME": str(work / "home"), "TQDM_DISABLE": "1", **extra}
            for variable in ("GANPIPE_NETWORK_TIMEOUT", "GANPIPE_NETWORK_RETRIES", "GANPIPE_NETWORK_DERIVED"):
                env.pop(variable, None)
            if timeout is not None:
                env["GANPIPE_NETWORK_TIMEOUT"] = f"{timeout:g}"
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "ganpipe.cli", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)
            end = time.monotonic()
        connections = server.connections()
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        return {"service": service, "exit": proc.returncode, "wall_s": round(end - start, 1),
                "network_s": round(end - server.accepted_at[0], 1) if server.accepted_at else None,
                "connections": connections, "error": errors}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="s3,mlflow,prefect,hub")
    parser.add_argument("--timeout", type=float, help="GANPIPE_NETWORK_TIMEOUT (default: the default budget)")
    args = parser.parse_args()
    results = [measure(service, args.timeout) for service in args.services.split(",")]
    for result in results:
        print(json.dumps(result))
    if any(result["wall_s"] >= 60 or result["exit"] != 1 for result in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
