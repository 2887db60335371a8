"""The container side of cluster mode: docker-compose.yml, the Dockerfiles and .env.example, read
as files (no Docker engine here), and checked against each other and the repository."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENV_EXAMPLE = dict(
    line.split("=", 1)
    for line in (ROOT / ".env.example").read_text().splitlines()
    if line and not line.startswith("#")
)

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*)|:?\?[^}]*)?\}")


def strings(node: object) -> list[str]:
    """Every string value in a parsed YAML tree: what compose interpolates."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def with_defaults(value: str) -> str:
    """The value compose sees with no .env: ${VAR:-default} becomes its default, ${VAR} nothing."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def compose_variables() -> dict[str, str | None]:
    """Every variable the compose file reads, with its default (None if it has none)."""
    text = "\n".join(strings(COMPOSE)).replace("$$", "")  # $$: a $ for the container's shell
    found: dict[str, str | None] = {}
    for m in INTERPOLATION.finditer(text):
        if found.get(m.group(1)) is None:
            found[m.group(1)] = m.group(2)
    found.update({name: None for name in re.findall(r"\$(\w+)", text) if name not in found})
    return found


def test_the_three_services_exist():
    # PostgreSQL for Optuna, the MLflow server and the workers, and the check of .env before
    assert set(SERVICES) == {"env-check", "postgres", "mlflow", "worker"}


def test_a_placeholder_or_weak_password_stops_compose_before_the_database_starts(tmp_path):
    import subprocess

    check = SERVICES["env-check"]
    # the database waits for the check to pass; mlflow and the workers wait for the database
    assert SERVICES["postgres"]["depends_on"]["env-check"]["condition"] == (
        "service_completed_successfully"
    )
    assert check["image"] == SERVICES["postgres"]["image"]  # nothing more to pull
    shell, flag, script = check["entrypoint"]
    script = script.replace("$$", "$")  # what compose hands the container's shell

    def run(password: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": password}
        return subprocess.run([shell, flag, script], env=env, capture_output=True, text=True)

    # .env.example's own value, as it is: refused in one line that says what to do
    refused = run(ENV_EXAMPLE["POSTGRES_PASSWORD"])
    assert refused.returncode == 1
    assert refused.stderr == (
        "POSTGRES_PASSWORD is the placeholder of .env.example: set a long random one in .env\n"
    )
    # short, or with a character that a URL would need escaped
    assert "at least 16" in run("short-one").stderr
    assert "letters, digits" in run("a-long-password-with@sign").stderr
    # a long random one passes, silently
    passed = run("Xk3_9vQz-Lm2pR7tWb8s")
    assert passed.returncode == 0 and passed.stderr == ""


def test_no_credential_is_written_in_the_compose_file():
    env = SERVICES["postgres"]["environment"]
    # the password is required from the environment, the user and database default to autotune
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", env["POSTGRES_PASSWORD"])
    assert with_defaults(env["POSTGRES_USER"]) == with_defaults(env["POSTGRES_DB"]) == "autotune"
    # every URL with a password takes it from ${POSTGRES_PASSWORD...}, nothing literal
    named = [INTERPOLATION.sub(r"<\1>", s) for s in strings(COMPOSE)]
    passwords = [m.group(1) for s in named if (m := re.search(r"://[^:/@]+:([^@]+)@", s))]
    assert passwords == ["<POSTGRES_PASSWORD>"] * 2  # MLflow's backend store, the workers' storage


def test_postgres_keeps_its_data_checks_its_health_and_stays_on_loopback():
    postgres = SERVICES["postgres"]
    # a major version pinned, the data directory on a named volume
    assert re.fullmatch(r"postgres:\d+", postgres["image"])
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    # healthy once it accepts TCP connections (the init scripts run on a socket-only server)
    assert "pg_isready -h 127.0.0.1" in " ".join(postgres["healthcheck"]["test"])
    # published on 127.0.0.1 unless configured
    assert all(with_defaults(port).startswith("127.0.0.1:") for port in postgres["ports"])


def test_mlflow_stores_runs_in_postgres_and_artifacts_in_a_volume():
    mlflow = SERVICES["mlflow"]
    command = mlflow["command"]
    # the backend store is its own database on the postgres service
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql") and store.endswith("@postgres:5432/mlflow")
    # that database is created by an init script the postgres service mounts
    init = "\n".join(p.read_text() for p in (ROOT / "docker" / "postgres-init").glob("*.sql"))
    assert re.search(r"CREATE DATABASE mlflow\b", init)
    # the image has the driver the URL names (the official image has none)
    driver = re.match(r"postgresql\+(\w+)://", store).group(1)
    assert f'"{driver}[binary]' in (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    # artifacts go through the server to a named volume
    assert "--serve-artifacts" in command
    destination = next(a.split("=", 1)[1] for a in command if a.startswith("--artifacts-dest"))
    assert f"mlartifacts:{destination}" in mlflow["volumes"]
    # the UI on 127.0.0.1 unless configured, a health check, and postgres healthy first
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_workers_get_gpus_the_storage_and_the_tracking_server():
    worker = SERVICES["worker"]
    env = worker["environment"]
    # every GPU of the host: Docker's count: 1 would give every replica GPU 0
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == "all"
    assert worker["deploy"]["replicas"] == "${WORKER_REPLICAS:-1}"
    # they start once postgres and the MLflow server are healthy
    assert {name: d["condition"] for name, d in worker["depends_on"].items()} == {
        "postgres": "service_healthy",
        "mlflow": "service_healthy",
    }
    # the study on the postgres service, the runs on the MLflow server
    storage = env["AUTOTUNE_STORAGE"]
    assert re.fullmatch(r"postgresql://.+@postgres:5432/\$\{POSTGRES_DB:-autotune\}", storage)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the server accepts the Host header the workers send (MLflow 3 answers 403 otherwise)
    allowed = with_defaults(SERVICES["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"])
    assert "mlflow:5000" in allowed.split(",")
    # `autotune run <spec> --workers N`, the spec from the mounted folder
    command = worker["command"]
    assert command[0] == "run" and command[1].startswith("/spec/")
    assert command[command.index("--workers") + 1] == "${WORKERS_PER_CONTAINER:-1}"


def test_every_variable_is_in_env_example_with_the_same_default():
    variables = compose_variables()
    # .env.example lists exactly the variables the compose file reads
    assert set(ENV_EXAMPLE) == set(variables)
    # and where compose has a default, the example says the same, so copying it changes nothing
    for name, default in variables.items():
        if default is not None:
            assert ENV_EXAMPLE[name] == default, name
    # the password is a placeholder to change, not an empty one
    assert "change" in ENV_EXAMPLE["POSTGRES_PASSWORD"]


def test_every_named_volume_is_declared():
    mounts = [
        with_defaults(v).split(":")[0] for s in SERVICES.values() for v in s.get("volumes", [])
    ]
    named = {source for source in mounts if not source.startswith((".", "/"))}
    # used and declared are the same set
    assert named == set(COMPOSE["volumes"])


def test_every_file_the_containers_use_exists():
    # build contexts and their Dockerfiles
    for service in SERVICES.values():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file()
    # bind-mounted folders, at their defaults
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = with_defaults(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_dir(), source
    # the spec the workers run by default is in the folder mounted by default
    spec = with_defaults(SERVICES["worker"]["command"][1]).removeprefix("/spec/")
    assert (ROOT / ENV_EXAMPLE["SPEC_DIR"] / spec).is_file()
    # what the Dockerfile copies
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line


def test_the_dockerfile_installs_torch_then_the_project_and_runs_autotune_unprivileged():
    lines = DOCKERFILE.splitlines()
    torch = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install $TORCH"))
    project = next(i for i, line in enumerate(lines) if ".[postgres,redis]" in line)
    # Python 3.12, torch pinned and installed before the project, whose extras leave out dev
    assert re.search(r"^FROM python:3\.12", DOCKERFILE, re.M)
    assert 'ARG TORCH="torch==2.13.0"' in DOCKERFILE
    assert torch < project and "dev" not in lines[project]
    # a user of its own, in /work, and `autotune` as the entrypoint
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert "WORKDIR /work\n" in DOCKERFILE
    assert 'ENTRYPOINT ["autotune"]' in DOCKERFILE
    # the build context leaves out the local environment and the .env with the password
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".env", ".venv", ".git", "runs"} <= set(ignored)
