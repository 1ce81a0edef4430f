"""Offline checks of the deployment deliverables under deploy/.

* The Kubernetes manifests are checked in three forms: the raw base files (always; the
  ConfigMap generator is expanded by hand), and the output of `kubectl kustomize` for the
  base and the dev overlay (skipped, with a reason, when neither kubectl nor kustomize is
  installed).
* Each form must keep the structural promises of deploy/README.md (non-root, read-only root
  filesystem, probes, resources, secrets only as files, drain time, KEDA on the worker only)
  and core objects must pass kubernetes-validate --strict against its bundled schemas (no
  network). CRDs (KEDA) have no bundled schema and are skipped by that check only.
* compose.yaml and the Dockerfile get lighter checks (no Docker on the test machines).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "k8s" / "base"
DEV = DEPLOY / "k8s" / "overlays" / "dev"
CONSOLE = DEPLOY / "k8s" / "overlays" / "console"
CONSOLE_SECRET = "postroom-console"

APP_UID = 10001
HEALTH_PORT = 9000
SECRET_NAME = "postroom-secrets"
SECRET_KEYS = {"database-url", "amqp-url"}

# The settings postroom accepts (unknown POSTROOM_* variables are a start-up error).
KNOWN_SETTINGS = {
    "POSTROOM_DATABASE_URL",
    "POSTROOM_AMQP_URL",
    "POSTROOM_SCHEMA",
    "POSTROOM_EXCHANGE",
    "POSTROOM_LOG_FORMAT",
    "POSTROOM_LOG_LEVEL",
    "POSTROOM_HEALTH_PORT",
    "POSTROOM_SHUTDOWN_TIMEOUT",
    "POSTROOM_WORKER_PREFETCH",
    "POSTROOM_WORKER_CONCURRENCY",
    "POSTROOM_RELAY_BATCH_SIZE",
    "POSTROOM_POLL_INTERVAL",
    "POSTROOM_CONSOLE_HOST",
    "POSTROOM_CONSOLE_PORT",
    "POSTROOM_CONSOLE_TOKEN",
    "POSTROOM_CONSOLE_READ_TOKEN",
    "POSTROOM_CONSOLE_TRUSTED_HEADER",
    "POSTROOM_CONSOLE_OPERATORS",
}
KNOWN_VARIABLES = KNOWN_SETTINGS | {f"{name}_FILE" for name in KNOWN_SETTINGS}
SECRET_SETTINGS = {"POSTROOM_DATABASE_URL", "POSTROOM_AMQP_URL"}
SECRETISH_NAME = re.compile(r"URL|DSN|PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|KEY", re.I)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")

# Kinds with no schema in kubernetes-validate (CustomResourceDefinitions of KEDA).
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
# Oldest Kubernetes we promise (all fields used are GA there) and the newest bundled schema.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


# --------------------------------------------------------------------------- loading


def _load_all(text: str, source: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{source}: a YAML document is not a mapping"
        for field in ("apiVersion", "kind", "metadata"):
            assert field in doc, f"{source}: object without {field}: {doc!r:.200}"
        assert doc["metadata"].get("name"), f"{source}: {doc['kind']} without a name"
    return docs


def _raw_base() -> list[dict[str, Any]]:
    """The base without kustomize: its resources plus the generated ConfigMap (no hash)."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = BASE / resource
        objects += _load_all(path.read_text(), str(path))
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return objects


def _kustomize_command(directory: Path) -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(directory)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(directory)]
    return None


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    command = _kustomize_command(directory)
    if command is None:
        pytest.skip(
            "neither kubectl nor kustomize is installed: the kustomize build is not checked "
            "(the raw base files still are)"
        )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return _load_all(result.stdout, " ".join(command))


SOURCES = {
    "raw-base": _raw_base,
    "kustomize-base": lambda: _kustomize(BASE),
    "kustomize-dev": lambda: _kustomize(DEV),
    "kustomize-console": lambda: _kustomize(CONSOLE),
}


@pytest.fixture(params=list(SOURCES), scope="module")
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return SOURCES[request.param]()


# --------------------------------------------------------------------------- helpers


def _find(objects: list[dict[str, Any]], kind: str, name_prefix: str) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)
    ]
    assert len(found) == 1, f"expected one {kind} named {name_prefix}*, found {len(found)}"
    return found[0]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return _find(objects, "ConfigMap", "postroom-config")["data"]


def _effective_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's POSTROOM_* environment: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    configmaps = {
        o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"
    }
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"{container['name']}: envFrom unknown ConfigMap {name}"
            env.update(configmaps[name])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def _main_container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = _pod_spec(obj)["containers"]
    assert len(containers) == 1, f"{obj['metadata']['name']}: expected one container"
    return containers[0]


# --------------------------------------------------------------------------- k8s: generic


def test_expected_objects_exist(manifests: list[dict[str, Any]]) -> None:
    job = _find(manifests, "Job", "postroom-migrate")
    relay = _find(manifests, "Deployment", "postroom-relay")
    worker = _find(manifests, "Deployment", "postroom-worker")
    assert _main_container(job)["args"] == ["migrate"]
    assert _main_container(relay)["args"] == ["relay"]
    worker_args = _main_container(worker)["args"]
    assert worker_args[0] == "worker" and len(worker_args) == 2 and ":" in worker_args[1]
    assert relay["spec"].get("replicas", 1) >= 1
    for init in _pod_spec(relay).get("initContainers", []) + _pod_spec(worker).get(
        "initContainers", []
    ):
        assert init["args"] == ["check"], "init containers only run the pre-flight check"


def test_base_is_namespace_agnostic_and_holds_no_secret() -> None:
    objects = _raw_base()
    for command_objects in [objects] + ([_kustomize(BASE)] if _kustomize_command(BASE) else []):
        for obj in command_objects:
            assert "namespace" not in obj["metadata"], f"{obj['kind']} pins a namespace"
            assert obj["kind"] not in {"Namespace", "Secret"}, (
                f"the base must not create a {obj['kind']}: `{SECRET_NAME}` is provided out of band"
            )


def test_pod_and_container_security(manifests: list[dict[str, Any]]) -> None:
    for obj in _workloads(manifests):
        name = obj["metadata"]["name"]
        pod = _pod_spec(obj)
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, name
        assert pod_sc.get("runAsUser") == APP_UID, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        # Service links would inject POSTROOM_*_SERVICE_HOST/_PORT for a Service named
        # postroom-*, which postroom rejects as unknown settings.
        assert pod.get("enableServiceLinks") is False, name
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == APP_UID, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resources.get(section, {}).get(resource), (
                        f"{where}: {section}.{resource}"
                    )
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{where}: /tmp must be an emptyDir"
            assert container.get("image"), where


def test_probes_and_metrics(manifests: list[dict[str, Any]]) -> None:
    for prefix in ("postroom-relay", "postroom-worker"):
        deployment = _find(manifests, "Deployment", prefix)
        container = _main_container(deployment)
        env = _effective_env(manifests, container)
        assert int(env["POSTROOM_HEALTH_PORT"]) == HEALTH_PORT
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert HEALTH_PORT in ports.values(), f"{prefix}: health port not declared"

        for probe, path in (
            ("livenessProbe", "/livez"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/livez"),
        ):
            assert probe in container, f"{prefix}: no {probe}"
            assert container[probe]["httpGet"]["path"] == path, f"{prefix}: {probe}"
            port = container[probe]["httpGet"]["port"]
            assert ports.get(port, port) == HEALTH_PORT, f"{prefix}: {probe} port"
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", prefix
        assert annotations.get("prometheus.io/port") == str(HEALTH_PORT), prefix
        assert annotations.get("prometheus.io/path") == "/metrics", prefix


def test_drain_time_exceeds_shutdown_timeout(manifests: list[dict[str, Any]]) -> None:
    for obj in _workloads(manifests):
        pod = _pod_spec(obj)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for container in pod["containers"]:
            timeout = float(
                _effective_env(manifests, container).get("POSTROOM_SHUTDOWN_TIMEOUT", 25)
            )
            assert grace > timeout, (
                f"{obj['metadata']['name']}: terminationGracePeriodSeconds {grace} must exceed "
                f"POSTROOM_SHUTDOWN_TIMEOUT {timeout}, or the kubelet kills a draining process"
            )


def test_settings_are_known_and_secrets_are_files(manifests: list[dict[str, Any]]) -> None:
    config = _config(manifests)
    for name, value in config.items():
        assert name in KNOWN_VARIABLES, f"ConfigMap sets unknown setting {name}"
        if SECRETISH_NAME.search(name):
            assert name.endswith("_FILE"), f"ConfigMap carries a secret value in {name}"
        assert not CREDENTIALS_IN_URL.search(str(value)), f"ConfigMap {name} holds credentials"

    for obj in _workloads(manifests):
        pod = _pod_spec(obj)
        secret_mounts: dict[str, str] = {}  # mount path -> secret name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in _containers(pod):
            where = f"{obj['metadata']['name']}/{container['name']}"
            for item in container.get("env", []):
                name = item["name"]
                if name.startswith("POSTROOM_"):
                    assert name in KNOWN_VARIABLES, f"{where}: unknown setting {name}"
                if "value" in item and SECRETISH_NAME.search(name) and not name.endswith("_FILE"):
                    pytest.fail(f"{where}: env {name} carries a value; mount a secret file instead")
                if "value" in item:
                    assert not CREDENTIALS_IN_URL.search(item["value"]), f"{where}: {name}"
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "secret" in volume:
                    secret_mounts[mount["mountPath"]] = volume["secret"]["secretName"]
            env = _effective_env(manifests, container)
            for setting in SECRET_SETTINGS:
                assert setting not in env, f"{where}: {setting} given as a value"
                path = env.get(f"{setting}_FILE")
                assert path, f"{where}: {setting}_FILE is not set"
                directory, _, key = path.rpartition("/")
                assert secret_mounts.get(directory) == SECRET_NAME, (
                    f"{where}: {path} is not inside a mount of Secret {SECRET_NAME}"
                )
                assert key in SECRET_KEYS, f"{where}: {path} names an undocumented key"


def test_disruption_budgets_select_relay_and_worker(manifests: list[dict[str, Any]]) -> None:
    pdbs = [o for o in manifests if o["kind"] == "PodDisruptionBudget"]
    for prefix in ("postroom-relay", "postroom-worker"):
        labels = _find(manifests, "Deployment", prefix)["spec"]["template"]["metadata"]["labels"]
        matching = [
            p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, f"{prefix}: expected one PodDisruptionBudget"


def test_only_the_worker_is_autoscaled(manifests: list[dict[str, Any]]) -> None:
    worker = _find(manifests, "Deployment", "postroom-worker")
    relay = _find(manifests, "Deployment", "postroom-relay")
    scaled = [o for o in manifests if o["kind"] == "ScaledObject"]
    hpas = [o for o in manifests if o["kind"] == "HorizontalPodAutoscaler"]
    for hpa in hpas:
        assert hpa["spec"]["scaleTargetRef"]["name"] != relay["metadata"]["name"]
    auths = {o["metadata"]["name"]: o for o in manifests if o["kind"] == "TriggerAuthentication"}
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        assert target["name"] == worker["metadata"]["name"], "KEDA may scale the worker only"
        assert obj["spec"]["minReplicaCount"] >= 1
        assert obj["spec"]["maxReplicaCount"] <= 10
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "rabbitmq"
            assert "host" not in trigger["metadata"], "broker URL must come from the Secret"
            auth = auths[trigger["authenticationRef"]["name"]]
            refs = auth["spec"]["secretTargetRef"]
            assert {(r["parameter"], r["name"], r["key"]) for r in refs} == {
                ("host", SECRET_NAME, "amqp-url")
            }
    if scaled:
        # KEDA owns the replica count; a value in the manifest is reset on each apply.
        assert "replicas" not in worker["spec"]


def test_base_autoscales_worker_with_keda() -> None:
    kinds = {o["kind"] for o in _raw_base()}
    assert {"ScaledObject", "TriggerAuthentication"} <= kinds


def test_dev_overlay_secret_is_marked_dev_only() -> None:
    objects = _kustomize(DEV)
    secret = _find(objects, "Secret", SECRET_NAME)
    assert secret["metadata"]["name"] == SECRET_NAME
    assert secret["metadata"]["labels"].get("postroom.dev/dev-only") == "true"
    assert set(secret["data"]) == SECRET_KEYS
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "postroom-dev"
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_pass_strict_schema_validation(
    manifests: list[dict[str, Any]], version: str
) -> None:
    checked = 0
    for obj in manifests:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no bundled schema for CRDs
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {error.message}")
        checked += 1
    assert checked >= 6


# --------------------------------------------------------------------------- compose, Dockerfile


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "rabbitmq", "migrate", "relay", "worker", "demo"} <= services.keys()
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    for infra in ("postgres", "rabbitmq"):
        assert "healthcheck" in services[infra], infra
    commands = {"migrate": "migrate", "relay": "relay", "worker": "worker", "demo": "demo"}
    for name, command in commands.items():
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert service["command"][0] == command, name
        for var in service["environment"]:
            assert var in KNOWN_VARIABLES, f"compose {name}: unknown setting {var}"
        assert "postgres:5432" in service["environment"]["POSTROOM_DATABASE_URL"]
        assert "rabbitmq:5672" in service["environment"]["POSTROOM_AMQP_URL"]
    for name in ("relay", "worker", "demo"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        ), name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("relay", "worker"):
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert services[name]["read_only"] is True


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage build expected"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    final = text[text.rfind("\nFROM ") :]
    assert re.search(r"^USER 10001(:10001)?$", final, re.M)
    assert 'ENTRYPOINT ["postroom"]' in final
    assert 'CMD ["relay"]' in final
    assert re.search(r"^EXPOSE 9000$", final, re.M)
    assert "PYTHONDONTWRITEBYTECODE=1" in final and "PYTHONUNBUFFERED=1" in final
    assert "--from=builder" in final
    assert not re.search(r"apt-get install|build-essential|gcc", final), "no build tools at runtime"
    # Allow-list context filter: everything out, then the few inputs of the build back in.
    rules = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!src/", "!migrations/"} <= set(rules)


# --------------------------------------------------------------------------- console overlay


def test_console_overlay_serves_one_authenticated_replica() -> None:
    objects = _kustomize(CONSOLE)
    console = _find(objects, "Deployment", "postroom-console")
    service = _find(objects, "Service", "postroom-console")
    container = _main_container(console)
    assert container["args"] == ["console"]
    assert console["spec"]["replicas"] == 1, "sessions are signed with a per-process key"
    assert service["spec"]["type"] == "ClusterIP", "reach it through a port-forward or a proxy"
    env = _effective_env(objects, container)
    assert env["POSTROOM_CONSOLE_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["POSTROOM_CONSOLE_PORT"])
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    labels = console["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/livez"
    # Authentication is configured, and the token is a file from the console's own Secret.
    token = env.get("POSTROOM_CONSOLE_TOKEN_FILE")
    assert token or env.get("POSTROOM_CONSOLE_TRUSTED_HEADER")
    volumes = {v["name"]: v for v in _pod_spec(console)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    directory = token.rpartition("/")[0]
    assert mounts[directory]["secret"]["secretName"] == CONSOLE_SECRET
    # Only the console pod reads the console's settings: a token file path in the shared
    # ConfigMap would make every other process fail to start (it cannot read the file).
    assert not [name for name in _config(objects) if name.startswith("POSTROOM_CONSOLE_")]
