"""Shared helpers for the deploy tests (imported by tests/test_deploy_*.py; holds no tests itself): a small
Dockerfile parser, the settings the server accepts, and starting a server process from a container's start
command outside the container."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"gpu": ROOT / "Dockerfile", "cpu": DEPLOY / "docker" / "Dockerfile.cpu"}
# SDM_* variables that are not server flags but are read elsewhere in the project.
NON_FLAG_SDM_VARIABLES = {"SDM_CACHE_DIR"}  # sdm_core.lm.models: where converted models are cached


# -- Dockerfiles -------------------------------------------------------------------------------------------------
@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments), in order

    def all(self, name: str) -> list[str]:
        return [args for inst, args in self.instructions if inst == name.upper()]

    def last(self, name: str) -> str | None:
        found = self.all(name)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # legacy form: ENV KEY value with spaces
                out[tokens[0]] = args.split(None, 1)[1].strip() if len(tokens) > 1 else ""
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                out[key] = value
        return out

    def exec_form(self, name: str) -> list[str] | None:
        """ENTRYPOINT / CMD in exec (JSON) form; None when absent. Shell form is refused (signals would not reach
        the server: SIGTERM must drain)."""
        args = self.last(name)
        if args is None:
            return None
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
            f"{self.path.name}: {name} must be exec form"
        )
        return value

    @property
    def start_command(self) -> list[str]:
        """What the container runs: ENTRYPOINT followed by CMD (exec forms)."""
        return (self.exec_form("ENTRYPOINT") or []) + (self.exec_form("CMD") or [])

    def copy_sources(self) -> list[str]:
        sources: list[str] = []
        for args in self.all("COPY") + self.all("ADD"):
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            sources.extend(tokens[:-1])
        return sources


def parse_dockerfile(path: Path) -> Dockerfile:
    result = Dockerfile(path)
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are skipped by Docker
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line:
            continue
        instruction, _, args = line.partition(" ")
        result.instructions.append((instruction.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return result


# -- the server ----------------------------------------------------------------------------------------------------
def require_server() -> None:
    """The deploy tests start ``python -m server``: its app and configuration are imported here first, so that a
    broken import fails the test with its own traceback (never a skip, never a start-up timeout)."""
    import server.app  # noqa: F401
    import server.config  # noqa: F401


def server_settings() -> set[str]:
    """Every SDM_* variable python -m server accepts."""
    from dataclasses import fields

    from server.config import ServerConfig, env_name

    return {env_name(f.name) for f in fields(ServerConfig)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log: Path
    env: dict

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


def start_server(command: list[str], env: dict, log: Path, cwd: Path = ROOT) -> ServerProcess:
    """Start ``command`` (a container start command with the interpreter replaced) and wait until /health answers."""
    import httpx

    handle = open(log, "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(command, cwd=str(cwd), env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    url = f"http://127.0.0.1:{env['SDM_PORT']}"
    process = ServerProcess(proc, url, log, env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{process.log_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise AssertionError(f"the server did not answer /health within 120 s:\n{process.log_text()[-4000:]}")
        time.sleep(0.2)


def wait_ready(process: ServerProcess, headers: dict | None = None, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.proc.poll() is None, process.log_text()[-4000:]
        r = httpx.get(f"{process.url}/ready", headers=headers or {}, timeout=5)
        if r.status_code == 200:
            return
        assert r.status_code == 503, (r.status_code, r.text)
        assert time.monotonic() < deadline, f"not ready after {timeout} s: {r.text}\n{process.log_text()[-4000:]}"
        time.sleep(0.25)


def stop_server(process: ServerProcess, timeout: float = 60.0) -> int:
    if process.proc.poll() is None:
        process.proc.send_signal(signal.SIGTERM)
        try:
            process.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait(timeout=10)
    return process.proc.returncode


def outside_container(command: list[str]) -> list[str]:
    """The container's start command for this machine: its Python interpreter becomes this test's."""
    assert command, "no start command"
    head = Path(command[0]).name
    assert head in ("python", "python3") or head.startswith("python3."), (
        f"the start command should run Python, got {command}"
    )
    return [sys.executable, *command[1:]]


def container_env(dockerfile: Dockerfile, bundle: Path, tmp: Path, **overrides: str) -> dict:
    """The environment the container would get from its ENV lines, with container paths mapped into ``tmp``
    (the bundle mount onto ``bundle``) and the address on 127.0.0.1 and a free port."""
    env = dict(os.environ)
    for key, value in dockerfile.env.items():
        if value.startswith("/bundles"):
            value = str(bundle) if value.rstrip("/") == "/bundles/default" else str(tmp / value.lstrip("/"))
        elif key == "SDM_CACHE_DIR" and os.environ.get("SDM_CACHE_DIR"):
            value = os.environ["SDM_CACHE_DIR"]  # reuse this machine's model cache
        elif value.startswith(("/cache", "/home", "/opt", "/data")):
            value = str(tmp / value.lstrip("/"))
        env[key] = value
    env.update({"SDM_HOST": "127.0.0.1", "SDM_PORT": str(free_port()), "PYTHONPATH": str(ROOT)})
    env.update(overrides)
    return env


def which(name: str) -> str | None:
    return shutil.which(name) or (shutil.which(name, path=str(Path(sys.executable).parent)))


def exported_metric_names() -> set[str]:
    """Every sample name server/metrics.py can export (counters as *_total, histograms as *_bucket/_sum/_count,
    infos as *_info), whether or not a sample has been recorded yet."""
    from server.metrics import ServerMetrics

    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "gauge": ("",),
        "summary": ("_sum", "_count", ""),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    names: set[str] = set()
    for family in ServerMetrics().registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names
