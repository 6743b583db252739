"""The servers of infra/docker-compose.yml as local processes, without Docker.

    infra/local-stack start    # start whatever is not running yet, then print the exports
    infra/local-stack env      # print the exports again:  eval "$(infra/local-stack env)"
    infra/local-stack status
    infra/local-stack stop     # stop everything; the databases stay in the state directory

- PostgreSQL from Debian's packages (`apt-get install postgresql`): its own cluster (initdb) in the
  state directory, listening on 127.0.0.1 only, no Unix socket, password authentication; the
  `prefect` and `mlflow` databases are made by infra/postgres/init-databases.sh, as in Docker.
- `prefect server start` on that Postgres (asyncpg), with its services and UI.
- `mlflow server` on that Postgres (psycopg 3), artifacts proxied to s3://BUCKET/mlflow.
- moto's S3 server, with the bucket. moto keeps objects in memory: they go when the stack stops.

Everything binds 127.0.0.1. Ports: GANPIPE_STACK_{POSTGRES,PREFECT,MLFLOW,S3}_PORT when set, else
the ones the previous start used, else the usual ones (5432, 4200, 5000, 9000) when free, else any
free port. The state directory is GANPIPE_STACK_DIR (default ./.ganpipe/stack): the Postgres
cluster, the database passwords (secrets.env, mode 600, never printed), logs, pid files and
stack.env with the exports. Run as root, Postgres runs as the `postgres` user the Debian package
creates (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

INFRA = Path(__file__).resolve().parent
DEFAULT_PORTS = {"postgres": 5432, "prefect": 4200, "mlflow": 5000, "s3": 9000}
BUCKET = os.environ.get("GANPIPE_STACK_BUCKET", "ganpipe")
# moto accepts any credentials; these are not secrets, only what clients must send.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ganpipe-local", "AWS_SECRET_ACCESS_KEY": "ganpipe-local",
                  "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT = float(os.environ.get("GANPIPE_STACK_TIMEOUT", "300"))


class StackError(Exception):
    """Something the user can fix (a missing package, a port in use): one `error:` line, exit 2."""


# --- the state directory ---------------------------------------------------------------------------

@dataclass
class State:
    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "run"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"  # owned by the postgres user when we run as root

    @property
    def pgdata(self) -> Path:
        return self.postgres / "data"

    def ports(self) -> dict[str, int]:
        path = self.root / "ports.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_ports(self, ports: dict[str, int]) -> None:
        (self.root / "ports.json").write_text(json.dumps(ports, indent=2) + "\n")

    def secrets(self) -> dict[str, str]:
        """Database passwords, made once and kept (mode 600): the cluster outlives a stop."""
        path = self.root / "secrets.env"
        if not path.exists():
            values = {name: secrets.token_urlsafe(24)
                      for name in ("POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD")}
            write_private(path, "".join(f"{k}={v}\n" for k, v in values.items()))
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def state_dir() -> State:
    root = Path(os.environ.get("GANPIPE_STACK_DIR", ".ganpipe/stack")).expanduser().resolve()
    for folder in (root, root / "logs", root / "run"):
        folder.mkdir(parents=True, exist_ok=True)
    return State(root)


# --- ports -----------------------------------------------------------------------------------------

def port_free(port: int) -> bool:
    """Nothing listens there (connections of a stopped server lingering in TIME_WAIT do not count:
    the servers bind with SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_ports(state: State, running: set[str]) -> dict[str, int]:
    """A running service keeps its port; otherwise configured > previous > usual > any free one."""
    previous = state.ports()
    ports = {}
    for name, usual in DEFAULT_PORTS.items():
        configured = os.environ.get(f"GANPIPE_STACK_{name.upper()}_PORT")
        if name in running and name in previous:
            ports[name] = previous[name]
        elif configured:
            ports[name] = int(configured)
            if not port_free(ports[name]):
                raise StackError(f"GANPIPE_STACK_{name.upper()}_PORT={configured}: port in use on 127.0.0.1")
        elif previous.get(name) and port_free(previous[name]):
            ports[name] = previous[name]
        else:
            ports[name] = usual if port_free(usual) else free_port()
    state.save_ports(ports)
    return ports


# --- PostgreSQL --------------------------------------------------------------------------------------

def postgres_tool(name: str) -> str:
    """initdb, pg_ctl and psql: GANPIPE_PG_BIN, else PATH, else the newest Debian cluster version."""
    if os.environ.get("GANPIPE_PG_BIN"):
        return str(Path(os.environ["GANPIPE_PG_BIN"]) / name)
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return str(versions[-1])
    raise StackError(f"PostgreSQL's {name} was not found: install the server "
                     "(Debian: apt-get install -y postgresql) or set GANPIPE_PG_BIN to its bin directory")


def as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: hand its commands to the `postgres` user instead."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise StackError("running as root needs runuser (util-linux) to start PostgreSQL as `postgres`")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root needs the `postgres` user (apt-get install -y postgresql)") from None
    return ["runuser", "-u", "postgres", "--", *cmd]


def give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def postgres_running(state: State) -> bool:
    if not (state.pgdata / "PG_VERSION").exists():
        return False
    status = subprocess.run(as_postgres_user([postgres_tool("pg_ctl"), "status", "-D", str(state.pgdata)]),
                            capture_output=True, text=True)
    return status.returncode == 0


def init_postgres(state: State, password: str) -> None:
    """A new cluster whose superuser `postgres` logs in with `password` (over TCP, scram)."""
    state.postgres.mkdir(mode=0o700, exist_ok=True)
    give_to_postgres(state.postgres)
    if os.geteuid() == 0:
        check = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(state.postgres)])
        if check.returncode != 0:
            raise StackError(f"the postgres user cannot write {state.postgres}: put GANPIPE_STACK_DIR "
                             "where it can reach (every parent directory searchable by others)")
    pwfile = state.postgres / "initdb.pw"
    write_private(pwfile, password + "\n")
    give_to_postgres(pwfile)
    try:
        run_checked(as_postgres_user([
            postgres_tool("initdb"), "-D", str(state.pgdata), "--username", "postgres", "--pwfile", str(pwfile),
            "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C", "--no-instructions"]), "initdb")
    finally:
        pwfile.unlink(missing_ok=True)


def start_postgres(state: State, port: int, passwords: dict[str, str]) -> None:
    if not (state.pgdata / "PG_VERSION").exists():
        init_postgres(state, passwords["POSTGRES_PASSWORD"])
    # TCP on 127.0.0.1 only, no Unix socket (nothing to collide with a system cluster's).
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
    run_checked(as_postgres_user([
        postgres_tool("pg_ctl"), "start", "-D", str(state.pgdata), "-l", str(state.postgres / "server.log"),
        "-w", "-t", str(int(START_TIMEOUT)), "-o", options]), "pg_ctl start", log=state.postgres / "server.log")


def create_databases(port: int, passwords: dict[str, str]) -> None:
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGPASSWORD": passwords["POSTGRES_PASSWORD"],
           "POSTGRES_USER": "postgres", "PREFECT_DB_PASSWORD": passwords["PREFECT_DB_PASSWORD"],
           "MLFLOW_DB_PASSWORD": passwords["MLFLOW_DB_PASSWORD"],
           "PATH": f"{Path(postgres_tool('psql')).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_checked(["bash", str(INFRA / "postgres" / "init-databases.sh")], "init-databases.sh", env=env)


def stop_postgres(state: State) -> None:
    if postgres_running(state):
        run_checked(as_postgres_user([postgres_tool("pg_ctl"), "stop", "-D", str(state.pgdata), "-m", "fast", "-w"]),
                    "pg_ctl stop")


def run_checked(cmd: list[str], what: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        if log and log.exists():
            detail += "\n" + log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{detail}")


# --- the servers (moto, mlflow, prefect): processes we start and own ------------------------------

@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str


def servers(state: State, ports: dict[str, int], passwords: dict[str, str]) -> list[Server]:
    python = sys.executable
    postgres = f"127.0.0.1:{ports['postgres']}"
    s3 = f"http://127.0.0.1:{ports['s3']}"
    # The servers get a clean environment: no client settings of the user's leak into them.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    return [
        Server("s3", [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])], base, s3),
        Server("mlflow",
               [python, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
                "--workers", os.environ.get("GANPIPE_STACK_MLFLOW_WORKERS", "2"),
                "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
               {**base, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3,
                # The password stays out of the command line (and `ps`): mlflow reads it from here.
                "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://mlflow:{passwords['MLFLOW_DB_PASSWORD']}@{postgres}/mlflow",
                "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
               f"http://127.0.0.1:{ports['mlflow']}/health"),
        Server("prefect",
               [python, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])],
               {**base, "PREFECT_HOME": str(state.root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL":
                    f"postgresql+asyncpg://prefect:{passwords['PREFECT_DB_PASSWORD']}@{postgres}/prefect"},
               f"http://127.0.0.1:{ports['prefect']}/api/health"),
    ]


def pid_file(state: State, name: str) -> Path:
    return state.pids / f"{name}.pid"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`: tells our process from a later one that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def running_pid(state: State, name: str) -> int | None:
    path = pid_file(state, name)
    if not path.exists():
        return None
    pid, started = path.read_text().split()
    return int(pid) if process_start_time(int(pid)) == started else None


def spawn(state: State, server: Server) -> subprocess.Popen:
    log = open(state.logs / f"{server.name}.log", "a")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(server.command, env=server.env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=state.root, start_new_session=True)
    log.close()
    pid_file(state, server.name).write_text(f"{proc.pid} {process_start_time(proc.pid)}\n")
    return proc


def wait_healthy(server: Server, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {proc.returncode}:\n{tail(log)}")
        if responds(server.health_url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} did not answer {server.health_url} in {START_TIMEOUT:.0f}s:\n{tail(log)}")


def responds(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)  # noqa: S310 - 127.0.0.1 only
        return True
    except urllib.error.HTTPError:
        return True  # an HTTP status: the server is up
    except OSError:
        return False


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def stop_process_group(pid: int, grace: float = 30.0) -> None:
    """SIGTERM the server's whole process group (uvicorn workers included), SIGKILL after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            reap(pid)
            time.sleep(0.2)


def reap(pid: int) -> None:
    """Collect `pid` if it is our own child (a server this process started): a zombie still counts
    as alive to kill(0). Any other process is reaped by its parent."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def create_bucket(endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


# --- commands ----------------------------------------------------------------------------------------

def exports(ports: dict[str, int]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", **S3_CREDENTIALS,
            "GANPIPE_BUCKET": BUCKET}


def export_lines(ports: dict[str, int]) -> str:
    return "".join(f"export {name}={value}\n" for name, value in exports(ports).items())


def start(state: State) -> dict[str, int]:
    passwords = state.secrets()
    running = {name for name in ("s3", "mlflow", "prefect") if running_pid(state, name)}
    if postgres_running(state):
        running.add("postgres")
    ports = choose_ports(state, running)
    started: list[tuple[Server, subprocess.Popen]] = []
    try:
        if "postgres" not in running:
            say(f"postgres: starting on 127.0.0.1:{ports['postgres']} ({state.pgdata})")
            start_postgres(state, ports["postgres"], passwords)
        create_databases(ports["postgres"], passwords)
        for server in servers(state, ports, passwords):
            if server.name in running:
                say(f"{server.name}: already running ({server.health_url})")
            else:
                say(f"{server.name}: starting ({server.health_url})")
                started.append((server, spawn(state, server)))
        for server, proc in started:
            wait_healthy(server, proc, state.logs / f"{server.name}.log")
            if server.name == "s3":
                create_bucket(server.health_url)
            say(f"{server.name}: up")
        if "s3" in running:
            create_bucket(f"http://127.0.0.1:{ports['s3']}")
    except BaseException:
        for server, proc in started:  # leave nothing half-started behind
            stop_process_group(proc.pid)
            pid_file(state, server.name).unlink(missing_ok=True)
        if "postgres" not in running:
            stop_postgres(state)
        raise
    write_private(state.root / "stack.env", export_lines(ports))
    return ports


def stop(state: State) -> None:
    for name in ("prefect", "mlflow", "s3"):
        pid = running_pid(state, name)
        if pid:
            say(f"{name}: stopping (pid {pid})")
            stop_process_group(pid)
        pid_file(state, name).unlink(missing_ok=True)
    if (state.pgdata / "PG_VERSION").exists() and postgres_running(state):
        say("postgres: stopping")
        stop_postgres(state)


def status(state: State) -> bool:
    ports = state.ports()
    up = {"postgres": postgres_running(state) if (state.pgdata / "PG_VERSION").exists() else False}
    up.update({name: running_pid(state, name) is not None for name in ("s3", "mlflow", "prefect")})
    for name, is_up in up.items():
        where = f"127.0.0.1:{ports[name]}" if name in ports else "-"
        print(f"{name:9} {'running' if is_up else 'stopped':8} {where}")
    return all(up.values())


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    args = parser.parse_args(argv)
    state = state_dir()
    try:
        if args.command == "start":
            print(export_lines(start(state)), end="")
        elif args.command == "stop":
            stop(state)
        elif args.command == "status":
            return 0 if status(state) else 3
        elif args.command == "env":
            if not state.ports():
                raise StackError(f"no stack in {state.root}: run `infra/local-stack start` first")
            print(export_lines(state.ports()), end="")
        return 0
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
