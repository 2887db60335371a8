"""The Kubernetes side of cluster mode: deploy/kubernetes/, read as files (there is no cluster
here), validated against Kubernetes' own schemas and checked against each other and the rest of
the repository, as test_compose.py does for docker-compose.yml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from autotune.core.names import EXIT_BAD_INPUT, STORAGE_ENV, TRACKING_ENV

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in FOLDER.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
KUBERNETES = "1.33.0"  # the schemas checked against; indexed Jobs and podFailurePolicy are GA


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in DOCS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict:
    [doc] = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def containers() -> list[dict]:
    """Every container of every workload."""
    found = []
    for doc in DOCS:
        spec = doc.get("spec", {})
        template = spec.get("template", {}).get("spec", {})
        found += template.get("containers", [])
    return found


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_kubernetes(doc: dict):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    # strict: a field Kubernetes does not know (a typo, one at the wrong depth) fails too
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)


def test_postgres_mlflow_and_gpu_workers_are_there():
    assert {d["kind"] for d in DOCS} >= {"StatefulSet", "Deployment", "Job", "Service"}
    postgres = named("StatefulSet", "autotune-postgres")
    # the data on a volume of its own, kept when the pod is replaced
    assert postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    workers = named("Job", "autotune-workers")["spec"]
    # an indexed Job: a pod a worker, each with a GPU of its own
    assert workers["completionMode"] == "Indexed"
    assert workers["parallelism"] == workers["completions"] >= 1
    [worker] = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"] == ["run", "/spec/spec.yaml"]


def test_no_service_is_exposed_outside_the_cluster_by_default():
    services = of_kind("Service")
    assert services and all(s["spec"]["type"] == "ClusterIP" for s in services)
    assert not of_kind("Ingress")
    # nor a port on a node
    for container in containers():
        assert all("hostPort" not in port for port in container.get("ports", []))


def test_every_password_comes_from_the_secret():
    text = "\n".join(path.read_text() for path in MANIFESTS)
    assert "kind: Secret" not in text  # made by kubectl create secret, never in a file
    for container in containers():
        env = env_of(container)
        for name, item in env.items():
            if "PASSWORD" in name:
                assert item["valueFrom"]["secretKeyRef"] == {
                    "name": "autotune-postgres",
                    "key": "password",
                }, name
        # a URL with a password takes it from the variable, defined before it (Kubernetes
        # expands $(VAR) only for variables listed earlier)
        names = list(env)
        for name, item in env.items():
            value = item.get("value", "")
            if "@" in value:
                assert re.search(r"://autotune:\$\(POSTGRES_PASSWORD\)@", value), name
                assert names.index("POSTGRES_PASSWORD") < names.index(name)


def test_the_urls_point_at_the_services():
    ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in of_kind("Service")}
    [worker] = named("Job", "autotune-workers")["spec"]["template"]["spec"]["containers"]
    env = env_of(worker)
    # the two variables that override the spec's storage and tracking URI
    storage = env[STORAGE_ENV]["value"]
    assert storage.endswith(f"@autotune-postgres:{ports['autotune-postgres']}/autotune")
    assert env[TRACKING_ENV]["value"] == f"http://autotune-mlflow:{ports['autotune-mlflow']}"
    [mlflow] = named("Deployment", "autotune-mlflow")["spec"]["template"]["spec"]["containers"]
    mlflow_env = env_of(mlflow)
    backend = mlflow_env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert backend.endswith(f"@autotune-postgres:{ports['autotune-postgres']}/mlflow")
    # MLflow 3 answers 403 to a Host it does not know: the one the workers ask for is allowed
    allowed = mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"autotune-mlflow:{ports['autotune-mlflow']}" in allowed
    assert "--serve-artifacts" in mlflow["command"]


def test_bad_input_fails_the_job_and_an_eviction_does_not_count():
    rules = named("Job", "autotune-workers")["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    # the CLI's exit code for bad input: trying again would fail the same way
    assert fail["onExitCodes"]["values"] == [EXIT_BAD_INPUT]
    ignored = next(r for r in rules if r["action"] == "Ignore")
    assert ignored["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # podFailurePolicy needs pods that are not restarted in place
    spec = named("Job", "autotune-workers")["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    # time for the running trial to stop at its next batch and the outputs to be written
    assert spec["terminationGracePeriodSeconds"] >= 60


def test_postgres_creates_mlflow_s_database_as_compose_does():
    init = named("ConfigMap", "autotune-postgres-init")["data"]
    compose = ROOT / "docker" / "postgres-init"
    assert init == {p.name: p.read_text() for p in compose.glob("*.sql")}
    # the images are the compose file's and the Dockerfiles'
    compose_services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    [postgres] = named("StatefulSet", "autotune-postgres")["spec"]["template"]["spec"]["containers"]
    assert postgres["image"] == compose_services["postgres"]["image"]
    mlflow_version = re.search(
        r"ARG MLFLOW_VERSION=(\S+)", (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    ).group(1)
    [mlflow] = named("Deployment", "autotune-mlflow")["spec"]["template"]["spec"]["containers"]
    assert mlflow["image"] == f"autotune-mlflow:{mlflow_version}"
