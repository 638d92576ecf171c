"""Issue 16, acceptance: oversized prompts do not stall the event loop. 40 clients send 1 MB prompts (under the
body limit) at once while a probe polls ``/health``: every probe answers within a second (a Kubernetes liveness
probe allows 5 s) and every prompt is refused with ``prompt_too_long``. A second wave sends prompts just short of
the cheap character check, so each one is really tokenized (off the event loop, under admission)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_server_support import TinyBundle, UvicornThread, make_config, tiny_bundle  # noqa: F401 - fixture

CLIENTS = 40
HEALTH_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle):
    from server.app import create_app

    config = make_config(tiny_bundle, warmup=False, max_prompt_tokens=2048, max_body_bytes=1_100_000)
    with UvicornThread(create_app(config)) as running:
        yield running


def flood(url: str, prompt: str) -> tuple[list[httpx.Response], list[float]]:
    """CLIENTS parallel /generate calls with ``prompt``; /health latencies measured meanwhile."""
    responses: list[httpx.Response] = []
    latencies: list[float] = []
    start = threading.Barrier(CLIENTS + 1)
    done = threading.Event()

    body = json.dumps({"prompt": prompt}).encode()  # encoded once: the clients share this process's GIL with the server

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            start.wait()
            responses.append(c.post(f"{url}/generate", content=body, headers={"Content-Type": "application/json"}))

    pending = {"since": None}

    def probe() -> None:
        with httpx.Client(timeout=120) as c:
            start.wait()
            while not done.is_set():
                pending["since"] = began = time.perf_counter()
                assert c.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - began)
                pending["since"] = None
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    prober = threading.Thread(target=probe)
    for t in [*threads, prober]:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    prober.join(timeout=5)
    if pending["since"] is not None:  # a probe still waiting counts with the time it has waited
        latencies.append(time.perf_counter() - pending["since"])
    return responses, latencies


def test_40_one_megabyte_prompts_leave_health_fast(server) -> None:
    responses, latencies = flood(server.url, "word " * 200_000)  # 1,000,000 characters
    assert len(responses) == CLIENTS
    assert all(r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long" for r in responses), responses[
        0
    ].text
    assert latencies and max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]


def test_40_prompts_that_must_be_tokenized_leave_health_fast(server) -> None:
    pipeline = server.app.state.server.manager.current.pipeline
    chars = 2048 * pipeline.max_chars_per_token - 10  # passes the character check: only tokenizing can tell
    responses, latencies = flood(server.url, ("word " * (chars // 5 + 1))[:chars])
    assert len(responses) == CLIENTS
    assert all(r.status_code == 400 and "tokens" in r.json()["error"]["message"] for r in responses), responses[0].text
    assert latencies and max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]
