"""deploy/kubernetes/: the production overlay is rendered with ``kubectl kustomize`` (or
``kustomize build``) when one is installed, else its base is read as it is; either way every
command, port, probe path, setting name, secret and security setting the manifests use is
checked against the code, as tests/deploy/test_deploy_files.py does for compose."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.cli.server import MULTIPROC_DIR
from auth.settings import Settings
from tests.deploy.test_deploy_files import (
    REPO,
    SETTINGS,
    assert_get_route,
    assert_real_settings,
    cli_command,
    dockerfile_stages,
    openapi_paths,
    option_value,
)

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAY = KUBERNETES / "overlays" / "production"
SECRETS_EXAMPLE = OVERLAY / "secrets" / "secrets.env.example"
SECRET_NAME = "modelgate-secrets"
# Settings whose value is key material or holds a password: never a literal in a manifest.
SECRET_SETTINGS = {
    "MODELGATE_KEY_PEPPER",
    "MODELGATE_JWT_SECRET",
    "MODELGATE_JWT_PREVIOUS_SECRETS",
    "MODELGATE_METRICS_TOKEN",
    "MODELGATE_DATABASE_URL",
    "MODELGATE_DATABASE_READ_URL",
    "MODELGATE_REDIS_URL",
}

__all__ = ["openapi_paths"]  # the fixture, shared with the compose tests


def _renderer() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def example_secrets() -> dict[str, str]:
    """The keys secrets.env.example names (commented-out ones too: they are optional)."""
    keys: dict[str, str] = {}
    for line in SECRETS_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([a-z0-9-]+)=(.*)", line.strip())
        if match:
            keys[match[1]] = match[2]
    return keys


def _documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The objects of the app and of the migration, rendered from the production overlay with
    a secrets.env of test values; the base's files as they are when no renderer is installed."""
    renderer = _renderer()
    if renderer is None:
        base = KUBERNETES / "base"
        app = [d for f in sorted(base.glob("*.yaml")) for d in _documents(f.read_text())]
        migrate = _documents((base / "migrate" / "job.yaml").read_text())
        return {"app": [d for d in app if d["kind"] != "Kustomization"], "migrate": migrate}
    copy = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    secrets_env = copy / "overlays" / "production" / "secrets" / "secrets.env"
    secrets_env.write_text("".join(f"{key}=test-{key}\n" for key in example_secrets()))
    out = {}
    for name, directory in (("app", "."), ("migrate", "migrate")):
        result = subprocess.run(
            [*renderer, str(copy / "overlays" / "production" / directory)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out[name] = _documents(result.stdout)
    return out


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def deployment(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return of_kind(rendered["app"], "Deployment")


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {name: item["value"] for name, item in env_of(container).items() if "value" in item}


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_every_file_parses_and_is_rendered_where_a_tool_is_present(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for path in KUBERNETES.rglob("*.yaml"):
        assert _documents(path.read_text()), f"{path}: empty"
    kinds = {o["kind"] for o in rendered["app"]}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceAccount",
    } <= kinds
    assert [o["kind"] for o in rendered["migrate"] if o["kind"] != "Secret"] == ["Job"]


def test_the_pods_run_the_real_serve_command_on_the_port_they_declare(
    deployment: dict[str, Any],
) -> None:
    container = container_of(deployment)
    argv = container["command"]
    assert cli_command(argv) == "serve"
    assert int(option_value(argv, "--port")) == port_number(container, "http")
    assert option_value(argv, "--host") == "0.0.0.0"  # noqa: S104 - the pod's own address
    # One worker per core requested (docs/capacity.md).
    assert int(option_value(argv, "--workers")) == int(container["resources"]["requests"]["cpu"])
    assert "memory" in container["resources"]["limits"]


def test_the_probes_ask_the_real_health_routes(
    deployment: dict[str, Any], openapi_paths: dict[str, Any]
) -> None:
    container = container_of(deployment)
    paths = {}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        port = port_number(container, get["port"])
        assert_get_route(openapi_paths, f"http://pod:{port}{get['path']}", str(port))
        paths[probe] = get["path"]
    # Liveness checks no dependency (an outage must not restart pods); readiness does.
    assert paths["livenessProbe"] == "/api/v1/health/live"
    assert paths["readinessProbe"] == paths["startupProbe"] == "/api/v1/health/ready"


def test_the_grace_period_outlasts_the_pause_and_the_drain(deployment: dict[str, Any]) -> None:
    container = container_of(deployment)
    env = literal_env(container)
    default = Settings.model_fields["shutdown_timeout_seconds"].default
    shutdown = int(env.get("MODELGATE_SHUTDOWN_TIMEOUT_SECONDS", default))
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The requests in flight get the shutdown timeout, closing gets as long again (api.services).
    assert grace > pause + 2 * shutdown


def test_every_setting_is_real_and_its_value_is_accepted(deployment: dict[str, Any]) -> None:
    container = container_of(deployment)
    env = env_of(container)
    assert_real_settings(list(env), "the Deployment")
    values = {
        name.removeprefix("MODELGATE_").lower(): value
        for name, value in literal_env(container).items()
        if name in SETTINGS
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert settings.is_production
    # Object storage, so that no volume is shared between pods (docs/models.md).
    assert settings.model_store.startswith("s3://")


def test_the_secrets_come_from_the_secret_and_every_key_is_provided(
    rendered: dict[str, list[dict[str, Any]]], deployment: dict[str, Any]
) -> None:
    example = example_secrets()
    for workload in (deployment, of_kind(rendered["migrate"], "Job")):
        for name, item in env_of(container_of(workload)).items():
            if name in SECRET_SETTINGS:
                assert "value" not in item, f"{name} is a literal in a manifest"
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            assert ref["name"].startswith(SECRET_NAME), ref
            assert ref["key"] in example, f"{ref['key']} is not in secrets.env.example"
    referenced = {
        item["valueFrom"]["secretKeyRef"]["key"]
        for item in env_of(container_of(deployment)).values()
        if "valueFrom" in item
    }
    assert referenced == set(example)
    required = {"MODELGATE_KEY_PEPPER", "MODELGATE_JWT_SECRET", "MODELGATE_DATABASE_URL"}
    env = env_of(container_of(deployment))
    for name in required:
        assert not env[name]["valueFrom"]["secretKeyRef"].get("optional", False)
    if _renderer() is not None:
        secret = of_kind(rendered["app"], "Secret")
        assert set(secret["data"]) == set(example)
        refs = {i["valueFrom"]["secretKeyRef"]["name"] for i in env.values() if "valueFrom" in i}
        assert refs == {secret["metadata"]["name"]}  # the generated name, hash included
    assert "secrets.env" in (REPO / ".gitignore").read_text()


def test_the_pods_are_non_root_on_a_read_only_root_and_write_only_to_their_own_volumes(
    deployment: dict[str, Any],
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    uid = re.search(r"--uid (\d+)", " ".join(dockerfile_stages()[-1].all("RUN")))
    assert uid is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid[1])  # the image's own user
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = [Path(m["mountPath"]) for m in container["volumeMounts"]]
    env = literal_env(container)
    # Where the process writes: the model cache, its var directory, the workers' metrics
    # (the variable `modelgate serve` reads, api.cli.server).
    for written in ("MODELGATE_MODEL_DIR", "MODELGATE_VAR_DIR", MULTIPROC_DIR):
        path = Path(env[written])
        assert any(path == m or m in path.parents for m in mounts), f"{written} is read-only"
    # Nothing shared between pods: every volume is the pod's own.
    assert all(set(volume) == {"name", "emptyDir"} for volume in pod["volumes"])


def test_the_migration_job_runs_the_real_upgrade_with_the_same_image(
    rendered: dict[str, list[dict[str, Any]]], deployment: dict[str, Any]
) -> None:
    job = of_kind(rendered["migrate"], "Job")
    container = container_of(job)
    assert cli_command(container["command"]) == "db upgrade"
    assert container["image"] == container_of(deployment)["image"]
    assert set(env_of(container)) == {"MODELGATE_ENV", "MODELGATE_DATABASE_URL"}
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_service_budget_autoscaler_and_policy_find_the_pods(
    rendered: dict[str, list[dict[str, Any]]], deployment: dict[str, Any]
) -> None:
    objects = rendered["app"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    container = container_of(deployment)
    service = of_kind(objects, "Service")
    assert _selects(service["spec"]["selector"], labels)
    [port] = service["spec"]["ports"]
    assert port_number(container, port["targetPort"]) == port_number(container, "http")
    budget = of_kind(objects, "PodDisruptionBudget")
    assert _selects(budget["spec"]["selector"]["matchLabels"], labels)
    scaler = of_kind(objects, "HorizontalPodAutoscaler")
    target = scaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert scaler["spec"]["minReplicas"] >= 2  # the budget lets one go, one keeps serving
    policy = of_kind(objects, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    [ingress] = policy["spec"]["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [port_number(container, "http")]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5432, 6379, 443} <= egress_ports


def test_prometheus_scrapes_each_pod_on_the_metrics_route(
    deployment: dict[str, Any], openapi_paths: dict[str, Any]
) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    container = container_of(deployment)
    assert annotations["prometheus.io/scrape"] == "true"
    port = port_number(container, "http")
    assert int(annotations["prometheus.io/port"]) == port
    assert_get_route(openapi_paths, f"http://pod:{port}{annotations['prometheus.io/path']}")
    scrape = yaml.safe_load((KUBERNETES / "prometheus-scrape.yaml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    # The pods have MODELGATE_METRICS_TOKEN set: the scrape must carry it.
    assert "MODELGATE_METRICS_TOKEN" in env_of(container)
    assert "credentials_file" in job["authorization"]
