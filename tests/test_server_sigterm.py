"""``python -m server`` as a real process: JSON logs with request ids, and SIGTERM drains in-flight requests
(the slow request still completes) before the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_server_support import ROOT, TinyBundle, free_port, metric_value, tiny_bundle  # noqa: F401


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_bundle: TinyBundle, tmp_path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    log_file = open(log_path, "w")  # a file, not a pipe: a full pipe would block the server
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SDM_BUNDLE": str(tiny_bundle.path),
        "SDM_PORT": str(port),
        "SDM_MAX_TOKENS_CAP": "256",
        "SDM_MODEL_NAME": "tiny-sdm",
        "SDM_DEVICE": "cpu",
        "SDM_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--log-level", "info"],
        cwd=str(ROOT),
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)

        result: dict = {}

        def slow_request() -> None:
            r = httpx.post(
                f"{url}/generate",
                json={"prompt": "hi", "max_tokens": 200},
                headers={"X-Request-Id": "slow-1"},
                timeout=120,
            )
            result["status"], result["body"] = r.status_code, r.json()

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 30
        while metric_value(httpx.get(f"{url}/metrics", timeout=5).text, "sdm_in_flight_requests") < 1:
            assert time.monotonic() < deadline, "the slow request never showed up as in flight"
            assert "status" not in result, "the slow request finished before SIGTERM could be sent"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections once draining
            httpx.get(f"{url}/health", timeout=2)
        thread.join(timeout=120)
        assert result.get("status") == 200, result
        assert result["body"]["usage"]["completion_tokens"] > 0 and result["body"]["text"].endswith("</verified>")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    logs = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert logs, "no JSON log lines"
    mine = [line for line in logs if line.get("client_request_id") == "slow-1"]
    assert any(line["message"] == "answered" for line in mine) and any(line.get("path") == "/generate" for line in mine)
    assert any(line["message"] == "stopped" for line in logs)
