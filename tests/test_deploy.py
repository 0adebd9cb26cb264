"""The image and the deploy manifests agree with the code: probe paths and ports, the
shutdown budget, the service account, the scrape target. Docker and a cluster are not
available to the tests; these are the checks that can be made without them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.app import CLEANUP_TIMEOUT_S
from worker.http import DEFAULT_PORT, HEALTHZ_PATH, METRICS_PATH, READYZ_PATH
from worker.settings import Settings, load_settings

from .helpers import REPO

K8S = REPO / "deploy" / "k8s"
CLOUDRUN = REPO / "deploy" / "cloudrun"
# Cloud Run sends SIGKILL this long after SIGTERM.
CLOUD_RUN_KILL_AFTER_S = 10


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def _settings_in(container: dict[str, Any]) -> Settings:
    """What the container's command line and environment amount to."""
    args = container["args"]
    config = args[args.index("--config") + 1]
    assert (REPO / config).is_file(), config
    env = {k: v for k, v in _env(container).items() if k.startswith("WORKER_")}
    return load_settings(REPO / config, env=env)


def test_pubsub_config_serves_probes_on_the_default_port() -> None:
    settings = load_settings(REPO / "config" / "pubsub.toml", env={})
    assert settings.http.port == DEFAULT_PORT == 8080
    assert Settings().http.port == 0, "off by default for worker run"


def test_every_manifest_parses_and_kustomization_lists_real_files() -> None:
    for path in [*K8S.glob("*.yaml"), *CLOUDRUN.glob("*.yaml")]:
        for doc in _docs(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            assert doc["kind"] == "Kustomization" or "metadata" in doc, path
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_deployment_probes_grace_identity_and_resources() -> None:
    objs = _all_k8s()
    deployment = objs[("Deployment", "image-describer-worker")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = _settings_in(container)
    assert ports["http"] == settings.http.port == DEFAULT_PORT

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == (HEALTHZ_PATH, DEFAULT_PORT)
    assert probe("startupProbe") == (HEALTHZ_PATH, DEFAULT_PORT)
    assert probe("readinessProbe") == (READYZ_PATH, DEFAULT_PORT)
    # The kubelet's SIGKILL must come after the drain and the bounded flush.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > settings.worker.shutdown_grace_s + CLEANUP_TIMEOUT_S
    # Liveness must not restart a worker whose jobs are merely slow.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] < settings.http.stall_timeout_s
    assert settings.worker.source.startswith("pubsub:")
    # Workload Identity, no key file.
    account = objs[("ServiceAccount", pod["serviceAccountName"])]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in _env(container)
    assert not any(v.get("secretKeyRef") for e in container.get("env", []) for v in [e])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


def test_keda_scales_the_deployment_on_the_subscription_backlog() -> None:
    objs = _all_k8s()
    scaled = objs[("ScaledObject", "image-describer-worker")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "image-describer-worker"
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "gcp-pubsub"]
    assert trigger["type"] == "gcp-pubsub"
    assert trigger["metadata"]["mode"] == "SubscriptionSize"
    deployment = objs[("Deployment", "image-describer-worker")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    source = _env(container)["WORKER_WORKER__SOURCE"]
    assert source == "pubsub:" + trigger["metadata"]["subscriptionName"]
    assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in objs


def test_monitors_scrape_metrics_from_the_worker_pods() -> None:
    objs = _all_k8s()
    labels = objs[("Deployment", "image-describer-worker")]["spec"]["template"]["metadata"][
        "labels"
    ]
    pm = objs[("PodMonitoring", "image-describer-worker")]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [(e["port"], e["path"]) for e in pm["spec"]["endpoints"]] == [("http", METRICS_PATH)]
    service = objs[("Service", "image-describer-worker-metrics")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    sm = objs[("ServiceMonitor", "image-describer-worker")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["path"] == METRICS_PATH


@pytest.mark.parametrize(
    ("name", "command"), [("worker-pull.yaml", "run"), ("push-service.yaml", "serve")]
)
def test_cloud_run_services(name: str, command: str) -> None:
    (service,) = _docs(CLOUDRUN / name)
    assert service["kind"] == "Service"
    template = service["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["args"][0] == command
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT
    for kind in ("startupProbe", "livenessProbe"):
        assert container[kind]["httpGet"] == {"path": HEALTHZ_PATH, "port": DEFAULT_PORT}
    settings = _settings_in(container)
    # Drain, then flush acks, inside Cloud Run's 10 s.
    assert settings.worker.shutdown_grace_s + 3 <= CLOUD_RUN_KILL_AFTER_S
    assert template["spec"]["serviceAccountName"].endswith(".iam.gserviceaccount.com")
    if command == "run":
        # The worker works between requests: CPU must stay allocated.
        assert template["metadata"]["annotations"]["run.googleapis.com/cpu-throttling"] == "false"
        assert settings.http.port == DEFAULT_PORT
    else:
        assert settings.pubsub.push_audience, "push tokens are verified"


def _final_stage(dockerfile: str) -> list[str]:
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.startswith("#")]
    starts = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    assert len(starts) >= 2, "multi-stage build"
    return lines[starts[-1] :]


def test_dockerfile_runs_the_worker_as_non_root_from_the_lock() -> None:
    text = (REPO / "Dockerfile").read_text()
    final = _final_stage(text)
    assert 'ENTRYPOINT ["worker"]' in final
    assert 'CMD ["run", "--config", "config/pubsub.toml"]' in final
    (user,) = [ln for ln in final if ln.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    assert re.search(r"FROM python:3\.11-slim|ARG PYTHON_IMAGE=python:3\.11-slim", text)
    assert "--require-hashes" in text and "requirements.lock" in text
    # No credentials baked in.
    for line in text.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS", line, re.I), line
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*", "everything is excluded unless listed"
    assert "!.venv" not in ignore and "!tests/" not in ignore


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = (REPO / "requirements.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==\S+(.*?)(?=^\S|\Z)", lock, re.M | re.S)
    assert entries
    pinned = {_norm(name) for name, _ in entries}
    for name, body in entries:
        assert "--hash=sha256:" in body, name
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["fast"]]
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert name is not None
        assert _norm(name.group(0)) in pinned, requirement
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^lock:", makefile, re.M) and "--generate-hashes" in makefile
