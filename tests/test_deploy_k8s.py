"""deploy/k8s/, validated offline: built-in kinds against the Kubernetes OpenAPI JSON schemas that the PyPI
package kubernetes-validate ships (strict: unknown fields fail), for the oldest and newest Kubernetes versions
it knows; the ServiceMonitor (a CRD, no schema there) and the Kustomization with a schema-lite check; and the
references between objects (selectors, ports, probes, Secret and ConfigMap keys, the HPA target, graceful
termination)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from test_deploy_support import DEPLOY, NON_FLAG_SDM_VARIABLES, ROOT, parse_dockerfile, require_server, server_settings

K8S = DEPLOY / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml"))
VERSIONS = ("1.30.0", "1.37.0")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_all() -> list[dict]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    out = {}
    for doc in load_all():
        key = doc["kind"]
        assert key not in out, f"two {key} objects: keep one per kind in deploy/k8s"
        out[key] = doc
    return out


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__file__"}


def test_expected_objects(objects) -> None:
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Kustomization",
    } <= set(objects)
    for kind, doc in objects.items():
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        if kind != "Kustomization":
            assert NAME.match(doc["metadata"]["name"]), f"{kind} name"


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_kinds_match_the_kubernetes_schemas(objects, version: str) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip(
            "kubernetes-validate is not installed (pip install -r deploy/ci/requirements.txt); the schema-lite checks "
            "below still run"
        )
    import kubernetes_validate

    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret", "PersistentVolumeClaim"):
        try:
            kubernetes_validate.validate(strip(objects[kind]), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{objects[kind]['__file__']} ({kind}) against Kubernetes {version}: {exc.message} at {list(exc.path)}"
            ) from None


def test_schema_validation_catches_mistakes(objects) -> None:
    """The validator is not a no-op: a typo in a field name and a wrong type are refused."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed")
    import copy

    import kubernetes_validate

    bad = copy.deepcopy(strip(objects["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(strip(objects["Deployment"]))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def _container(objects) -> dict:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_deployment_gpu_probes_and_graceful_termination(objects) -> None:
    deployment = objects["Deployment"]
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), "the selector must match the pod template labels"
    container = _container(objects)
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 1
        and container["resources"]["requests"]["nvidia.com/gpu"] == 1
    )
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = objects["ConfigMap"]["data"]
    assert port_names["http"] == int(config["SDM_PORT"]), "containerPort is the server's SDM_PORT"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["port"] in port_names
    healthcheck = parse_dockerfile(ROOT / "Dockerfile")
    workdir = Path(healthcheck.last("WORKDIR"))
    for probe in ("readinessProbe", "startupProbe"):
        command = container[probe]["exec"]["command"]
        assert command[-1] == "/ready", (probe, command)
        script = ROOT / Path(command[1]).relative_to(workdir)
        assert script.is_file(), f"{probe} runs {command[1]}, which the image does not have"
        assert container[probe]["timeoutSeconds"] >= 5, "the health check script waits up to 4 s"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "give a large model 10 minutes to load"
    pre_stop = container["lifecycle"]["preStop"]
    sleep = int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else int(pre_stop["sleep"]["seconds"])
    drain = float(config["SDM_DRAIN_TIMEOUT_S"])
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= sleep + drain + 5, (
        f"terminationGracePeriodSeconds ({grace}) must cover preStop ({sleep}) + drain ({drain})"
    )
    security = spec["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    user = healthcheck.last("USER").split(":")[0]
    assert str(security["runAsUser"]) == user, "the pod runs as the image's user"
    mounts = {m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert mounts <= set(volumes), f"mounts without volumes: {mounts - set(volumes)}"
    bundle_mount = next(m for m in container["volumeMounts"] if m["name"] == "bundles")
    assert config["SDM_BUNDLE"].startswith(bundle_mount["mountPath"] + "/") and bundle_mount["readOnly"]
    assert (
        volumes["bundles"]["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]
    )


def test_config_and_secret_references(objects) -> None:
    container = _container(objects)
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == [objects["ConfigMap"]["metadata"]["name"]]
    secret = objects["Secret"]
    for env in container.get("env", []):
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], env
    assert any(e["name"] == "SDM_API_KEYS" for e in container["env"])
    config = objects["ConfigMap"]["data"]
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values are strings"
    metrics_key = secret["stringData"]["metrics-key"]
    assert metrics_key in secret["stringData"]["api-keys"].split(","), "Prometheus' key must be one the server accepts"


def test_settings_are_server_settings(objects) -> None:
    require_server()
    known = server_settings() | NON_FLAG_SDM_VARIABLES
    names = set(objects["ConfigMap"]["data"]) | {e["name"] for e in _container(objects).get("env", [])}
    unknown = sorted(n for n in names if n.startswith("SDM_") and n not in known)
    assert not unknown, f"deploy/k8s sets SDM_* variables the server does not know: {unknown}"


def test_service_selects_the_pods_and_names_the_port(objects) -> None:
    service = objects["Service"]
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in _container(objects)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names or isinstance(port["targetPort"], int)


def test_hpa_targets_the_deployment_on_server_metrics(objects) -> None:
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    deployment = objects["Deployment"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods and set(pods) <= {"sdm_queue_depth", "sdm_in_flight_requests"}, pods
    adapter = yaml.safe_load((K8S / "helm" / "prometheus-adapter-values.yaml").read_text())
    exposed = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert set(pods) <= exposed, "prometheus-adapter must expose every metric the HPA reads"
    in_flight = next(
        (
            m
            for m in hpa["spec"]["metrics"]
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] == "sdm_in_flight_requests"
        ),
        None,
    )
    if in_flight:
        target = float(in_flight["pods"]["target"]["averageValue"])
        assert target <= int(objects["ConfigMap"]["data"]["SDM_MAX_CONCURRENT_REQUESTS"]), (
            "scale before every slot is busy"
        )


def test_servicemonitor_schema_lite(objects) -> None:
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) - {"__file__"} <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {
        "selector",
        "endpoints",
        "jobLabel",
        "namespaceSelector",
        "targetLabels",
        "podTargetLabels",
        "sampleLimit",
    }
    service = objects["Service"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(), (
        "the ServiceMonitor must select the Service"
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    allowed = {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "authorization",
        "scheme",
        "tlsConfig",
        "relabelings",
        "metricRelabelings",
        "honorLabels",
    }
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= allowed, set(endpoint) - allowed
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+[smh]", endpoint[key]), endpoint[key]
        auth = endpoint["authorization"]
        assert auth["type"] == "Bearer"
        secret = objects["Secret"]
        assert (
            auth["credentials"]["name"] == secret["metadata"]["name"]
            and auth["credentials"]["key"] in secret["stringData"]
        )
    # The job label is the Service name: the alert rules and recording rules expect job="sdm-lm".
    alerts = (DEPLOY / "prometheus" / "rules" / "alerts.yml").read_text()
    assert f'job="{service["metadata"]["name"]}"' in alerts


def test_kustomization_lists_existing_manifests(objects) -> None:
    kustomization = objects["Kustomization"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    listed = set(kustomization["resources"])
    expected = {p.name for p in MANIFESTS} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == expected, f"kustomization.yaml lists {sorted(listed)}, the folder has {sorted(expected)}"
