"""infra/ checked without Docker or a cluster: the compose file against the Compose Specification,
the Kubernetes manifests against Kubernetes' own schemas (kubernetes-validate), the Dockerfile
through hadolint and BuildKit's parser, the Prefect work-pool template through the Kubernetes
worker's own job configuration, and the accelerate configs through accelerate's loader. Plus what
a schema cannot say: loopback-only ports, GPU reservations, non-root images, no committed secrets,
and versions that agree across files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from tests.conftest import ROOT

INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.33"  # a Kubernetes release every maintained distribution offers
PLACEHOLDER = "change-me"
SECRET_NAME = re.compile(r"PASSWORD|SECRET")


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# --- docker compose -----------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(INFRA / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host_ip, the whole mapping) for every published port, short or long syntax."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip"), json.dumps(port)))
        else:
            # HOST_IP:HOST_PORT:CONTAINER_PORT; a bare or two-part mapping binds every interface.
            parts = re.sub(r"\$\{[^}]*\}", "VAR", str(port)).split(":")
            found.append((parts[0] if len(parts) == 3 else None, str(port)))
    return found


def test_compose_publishes_ports_on_loopback_only() -> None:
    services = compose()["services"]
    ports = {name: published_ports(service) for name, service in services.items()}
    assert {name for name, found in ports.items() if found} == {"prefect-server", "mlflow", "minio"}
    for name, found in ports.items():
        for host_ip, mapping in found:
            assert host_ip == "127.0.0.1", f"{name} publishes {mapping} beyond 127.0.0.1"


def test_compose_runs_the_servers_on_postgres_and_s3() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert any(volume.startswith("./postgres/init-databases.sh:/docker-entrypoint-initdb.d/")
               for volume in postgres["volumes"])
    assert os.access(INFRA / "postgres" / "init-databases.sh", os.X_OK)  # the image runs it, not sources it

    for name in ("prefect-server", "prefect-services"):
        env = services[name]["environment"]
        assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
        assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
        assert env["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"
    assert "--no-services" in services["prefect-server"]["command"]
    assert services["prefect-services"]["command"] == ["prefect", "server", "services", "start"]

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # inside the container; published on loopback
    assert command[command.index("--artifacts-destination") + 1] == "s3://${GANPIPE_BUCKET:-ganpipe}/mlflow"
    assert "mlflow:5000" in command[command.index("--allowed-hosts") + 1].split(",")
    # mlflow reads --backend-store-uri from MLFLOW_BACKEND_STORE_URI: no password on a command line.
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["bucket-init"] == {"condition": "service_completed_successfully"}

    bucket_init = services["bucket-init"]
    assert bucket_init["depends_on"]["minio"] == {"condition": "service_healthy"}
    assert 'mc mb --ignore-existing "store/$$GANPIPE_BUCKET"' in bucket_init["command"][0]


def test_compose_worker_reserves_the_gpus_behind_a_profile() -> None:
    worker = compose()["services"]["worker"]
    assert worker["profiles"] == ["gpu"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == "all"
    assert worker["build"]["target"] == "worker" and worker["build"]["dockerfile"] == "infra/Dockerfile"
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "ganpipe-gpu"]
    env = worker["environment"]
    assert (env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"], env["AWS_ENDPOINT_URL"]) == \
        ("http://prefect-server:4200/api", "http://mlflow:5000", "http://minio:9000")
    assert env["GANPIPE_HOME"] == "/data/ganpipe" and "ganpipe-home:/data" in worker["volumes"]


def interpolations(text: str) -> dict[str, str]:
    """${NAME}, ${NAME:-default}, ${NAME:?error}: the name and its operator ('' when none)."""
    return {m.group(1): m.group(2) or "" for m in re.finditer(r"(?<!\$)\$\{(\w+)(:[-?])?[^}]*\}", text)}


def test_compose_secrets_come_from_the_env_file() -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    example = env_example()
    used = interpolations(text)
    # Every variable the file needs without a default is in the example, and only those it uses.
    assert {name for name, op in used.items() if op != ":-"} <= set(example)
    assert set(example) <= set(used)
    for name, value in example.items():
        if SECRET_NAME.search(name):
            assert value == PLACEHOLDER, f"infra/.env.example: {name} must be a placeholder"
            assert used[name] == ":?", f"{name} must be required (${{{name}:?...}}), never defaulted"
    # A secret-looking setting in the compose file is always an interpolation, never a value.
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}.{key} is a literal"
            elif "://" in str(value) and "@" in str(value):  # credentials inside a URL
                assert re.search(r":\$\{\w*PASSWORD:\?[^}]*\}@", value), f"{name}.{key} embeds a literal password"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"


def test_no_credentials_are_committed() -> None:
    tracked = subprocess.run(["git", "ls-files", "infra", "configs"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "infra/.env" not in tracked
    patterns = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                                        r"(?i)(password|secret)[a-z_]*\s*[:=]\s*['\"]?(?!change-me)[A-Za-z0-9+/]{16,}")]
    for path in tracked:
        text = (ROOT / path).read_text(errors="replace")
        for pattern in patterns:
            assert not pattern.search(text), f"{path}: looks like a committed credential ({pattern.pattern})"
    [secret] = load_yaml_documents(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and set(secret["stringData"].values()) == {PLACEHOLDER}


# --- Dockerfile ---------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[Any]]:
    """The instructions of each stage, by stage name (BuildKit's own parser)."""
    stages: dict[str, list[Any]] = {}
    current: list[Any] = []
    for command in dockerfile.parse_file(str(INFRA / "Dockerfile")):
        if command.cmd == "FROM":
            current = stages.setdefault(command.value[-1], [])
        current.append(command)
    return stages


def dockerfile_args() -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in dockerfile.parse_file(str(INFRA / "Dockerfile"))
                if c.cmd == "ARG" and "=" in c.value[0])


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", "--failure-threshold", "info",
                             str(INFRA / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_run_as_an_unprivileged_user() -> None:
    stages = dockerfile_stages()
    assert set(stages) == {"server", "worker"}
    args = dockerfile_args()
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert stages["worker"][0].value[0] == "${CUDA_IMAGE}"
    for name, commands in stages.items():
        users = [c.value[0] for c in commands if c.cmd == "USER"]
        assert users, f"stage {name} runs as root"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) >= 1000, f"stage {name}: USER {users[-1]}"
    # The Kubernetes pods run as the image's user.
    [job] = [d for d in load_yaml_documents(K8S / "train-multinode.yaml") if d["kind"] == "Job"]
    pod_security = job["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] and str(pod_security["runAsUser"]) == users[-1].split(":")[0]


def test_images_pin_the_versions_of_this_environment() -> None:
    from importlib.metadata import version

    args = dockerfile_args()
    assert args["PREFECT_VERSION"] == version("prefect")
    assert args["MLFLOW_VERSION"] == version("mlflow")
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']} torchvision=={args['TORCHVISION_VERSION']}" in makefile
    worker = "\n".join(c.original for c in dockerfile_stages()["worker"])
    assert "pip install --no-cache-dir ." in worker  # ganpipe itself
    assert "COPY infra/k8s/train-node infra/k8s/train-node" in worker  # what the training Job runs
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {"**/.env", "**/.venv", "**/.ganpipe", "**/.git"} <= set(ignore)


# --- Kubernetes ---------------------------------------------------------------------------------------

def validate_kubernetes(resource: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{resource['kind']} {resource['metadata'].get('name')}: {exc.message} "
                    f"at {'/'.join(map(str, exc.path))}")


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_api_schemas(path: Path) -> None:
    documents = load_yaml_documents(path)
    assert documents
    for resource in documents:
        validate_kubernetes(resource)


def test_multinode_job_meets_at_machine_zero() -> None:
    documents = {d["kind"]: d for d in load_yaml_documents(K8S / "train-multinode.yaml")}
    job, service, config = documents["Job"], documents["Service"], documents["ConfigMap"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    machines = int(env["NUM_MACHINES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == machines > 1
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(env["PROCS_PER_MACHINE"])
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    # Machine 0's stable DNS name: <job>-0.<subdomain>, published by the headless Service.
    assert env["MAIN_PROCESS_IP"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert service["metadata"]["name"] == pod["subdomain"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["spec"]["ports"][0]["port"] == int(env["MAIN_PROCESS_PORT"])
    assert container["command"] == ["/opt/ganpipe/infra/k8s/train-node"]

    # The environment: endpoints from the shared ConfigMap, S3 keys from the Secret, GANPIPE_HOME
    # on the shared ReadWriteMany volume.
    sources = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {"configMapRef": "ganpipe-endpoints", "secretRef": "ganpipe-s3"}
    base = {d["kind"]: d for d in load_yaml_documents(K8S / "base.yaml")}
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"} <= set(base["ConfigMap"]["data"])
    assert base["ConfigMap"]["metadata"]["name"] == "ganpipe-endpoints"
    assert base["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    home_volume = volumes[mounts["/data"]]
    assert env["GANPIPE_HOME"].startswith("/data/")
    assert home_volume["persistentVolumeClaim"]["claimName"] == base["PersistentVolumeClaim"]["metadata"]["name"]

    # The training config it mounts is a valid ganpipe config whose batch splits over every rank.
    from ganpipe.config_files import config_from_yaml_text

    assert volumes[mounts["/etc/ganpipe"]]["configMap"]["name"] == config["metadata"]["name"]
    cfg = config_from_yaml_text(config["data"]["train.yaml"], "ganpipe-train-config")
    assert env["GANPIPE_CONFIG"] == "/etc/ganpipe/train.yaml"
    assert cfg.train.batch_size % (machines * int(env["PROCS_PER_MACHINE"])) == 0


def work_pool_template() -> dict[str, Any]:
    return json.loads((K8S / "work-pool-gpu.json").read_text())


def render_flow_run_job(values: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest the Prefect Kubernetes worker would submit for a flow run of this pool,
    through the worker's own job configuration (as `from_template_and_values` does, without the
    server round trip it makes for block references, which this template has none of)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = work_pool_template()
    defaults = {name: spec["default"] for name, spec in template["variables"]["properties"].items()
                if "default" in spec}
    configuration = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"],
                                                                    {**defaults, **values}))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="tiny-gan", flow_id=uuid.uuid4()))
    return configuration.job_manifest


def test_work_pool_template_is_accepted_by_prefect() -> None:
    from prefect.server.schemas.actions import WorkPoolCreate

    # The server's own check: every placeholder is a declared variable.
    pool = WorkPoolCreate(name="ganpipe-k8s", type="kubernetes", base_job_template=work_pool_template())
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_work_pool_jobs_request_gpus_and_validate() -> None:
    job = render_flow_run_job({"gpu_count": 8, "image": "registry.example/ganpipe-worker:1",
                               "env": {"GANPIPE_DEBUG": "1"}})
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["image"] == "registry.example/ganpipe-worker:1"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GANPIPE_HOME"] == "/data/ganpipe" and env["GANPIPE_DEBUG"] == "1" and "PREFECT__FLOW_RUN_ID" in env
    assert {next(iter(s.values()))["name"] for s in container["envFrom"]} == {"ganpipe-endpoints", "ganpipe-s3"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The worker insists on `parallelism`/`completions` inside the pod spec (its template quirk; the
    # API server drops them) and names the Job by generateName: strict validation without those.
    assert pod.pop("parallelism") == pod.pop("completions") == 1
    job["metadata"]["name"] = job["metadata"]["generateName"] + "x"
    validate_kubernetes(job)


# --- accelerate configs ---------------------------------------------------------------------------------

ACCELERATE = {  # file: (distributed type, processes, machines)
    "cpu.yaml": ("NO", 1, 1), "1gpu.yaml": ("NO", 1, 1),
    "8gpu.yaml": ("MULTI_GPU", 8, 1), "multinode.yaml": ("MULTI_GPU", 16, 2),
}


@pytest.mark.parametrize("name", sorted(ACCELERATE))
def test_accelerate_configs_load_and_are_documented(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == ACCELERATE[name]
    assert config.use_cpu == (name == "cpu.yaml")
    if config.num_machines > 1:
        assert config.main_process_port and config.rdzv_backend == "static"
    # Each one appears in a command of the README.
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^(ganpipe|accelerate|\s).*configs/accelerate/{re.escape(name)}", readme, re.MULTILINE), name
