"""Readiness, concurrency and lifecycle: /ready before and after load, 32 parallel requests, saturation (429),
timeouts (504), client disconnects, and reload under load."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from test_server_support import (
    API_KEY,
    MAX_TOKENS,
    TinyBundle,
    UvicornThread,
    family_a,
    make_config,
    metric_value,
    serve,
    slow_down,
    tiny_bundle,  # noqa: F401 - fixture
)


def _backend(bundle: TinyBundle, cls=None):
    from server.backends.transformers_backend import TransformersBackend

    return (cls or TransformersBackend)(str(bundle.path), device="cpu", batch_size=8, batch_wait_ms=5.0)


def test_ready_is_503_until_the_model_is_loaded_and_warmed_up(tiny_bundle) -> None:
    from server.app import create_app
    from server.backends.transformers_backend import TransformersBackend

    gate = asyncio.Event()

    class GatedBackend(TransformersBackend):
        async def load(self) -> None:
            await gate.wait()
            await super().load()

    async def run() -> None:
        app = create_app(make_config(tiny_bundle), backend=_backend(tiny_bundle, GatedBackend))
        async with serve(app, ready=False) as client:
            assert (await client.get("/health")).status_code == 200
            r = await client.get("/ready")
            assert (
                r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable" and r.headers["retry-after"]
            )
            assert r.json()["error"]["message"] == "not ready: loading"
            assert r.json()["models"] == [{"model": "tiny-sdm", "state": "loading"}]
            r = await client.post("/generate", json={"prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert metric_value((await client.get("/metrics")).text, "sdm_ready") == 0
            gate.set()
            deadline = time.monotonic() + 60
            while (await client.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            body = (await client.get("/ready")).json()
            assert body["status"] == "ready" and body["model"] == "tiny-sdm"
            # One bundle: the keys it always had, and "models" with the one model's state and facts.
            assert {"bundle", "head_version", "traffic_store"} <= set(body)
            [entry] = body["models"]
            assert (entry["model"], entry["state"], entry["bundle"]) == ("tiny-sdm", "ready", body["bundle"])
            assert entry["head_version"] == body["head_version"]
            assert metric_value((await client.get("/metrics")).text, "sdm_ready") == 1
            assert (await client.post("/generate", json={"prompt": "hi"})).status_code == 200

    asyncio.run(run())


def test_a_broken_bundle_keeps_ready_503_with_the_reason(tiny_bundle, tmp_path) -> None:
    import shutil

    from server.app import create_app

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle.path, broken)
    (broken / "head" / "manifest.json").write_text("{}")

    async def run() -> None:
        app = create_app(make_config(broken))
        async with serve(app, ready=False) as client:
            while app.state.server.manager.state in ("loading", "warming_up"):
                await asyncio.sleep(0.05)
            r = await client.get("/ready")
            assert r.status_code == 503 and "failed" in r.json()["error"]["message"]

    asyncio.run(run())


def test_32_parallel_requests_are_all_answered_and_not_mixed_up(tiny_bundle) -> None:
    from server.app import create_app

    def request(i: int) -> dict:
        return {"prompt": family_a(i) + " extra" * i, "temperature": 1.0, "seed": 1000 + i, "max_tokens": 1 + i % 6}

    async def run():
        app = create_app(make_config(tiny_bundle, max_concurrent_requests=32, batch_size=8, warmup=False))
        async with serve(app) as client:
            responses = await asyncio.gather(*(client.post("/generate", json=request(i)) for i in range(32)))
            alone = [await client.post("/generate", json=request(i)) for i in (0, 7, 13, 31)]
            metrics = (await client.get("/metrics")).text
        return responses, alone, metrics

    responses, alone, metrics = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    prompt_tokens = [b["usage"]["prompt_tokens"] for b in bodies]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 32  # each answer belongs to its prompt
    for i, body in enumerate(bodies):
        # max_tokens generated at most, plus the few tag tokens the server writes (usage counts the returned text)
        assert body["usage"]["completion_tokens"] <= 1 + i % 6 + 16
        assert body["text"].endswith("</verified>")
    assert len({r.headers["x-request-id"] for r in responses}) == 32
    for i, single in zip((0, 7, 13, 31), alone):
        assert single.json()["text"] == bodies[i]["text"]  # a seeded sample does not depend on its batch
    batches = metric_value(metrics, "sdm_batch_size_count", {"kind": "generate"})
    assert batches < 32  # requests were batched
    assert metric_value(metrics, "sdm_requests_total", {"route": "/generate", "outcome": "error"}) == 0


def test_saturation_answers_429_with_retry_after(tiny_bundle) -> None:
    from server.app import create_app

    async def run():
        app = create_app(make_config(tiny_bundle, max_concurrent_requests=1, max_queue_size=1, warmup=False))
        async with serve(app) as client:
            slow_down(app.state.server.manager.current.backend, 0.03)
            responses = await asyncio.gather(
                *(client.post("/generate", json={"prompt": f"hi {i}", "max_tokens": 10}) for i in range(5))
            )
            metrics = (await client.get("/metrics")).text
        return responses, metrics

    responses, metrics = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and 429 in statuses
    refused = [r for r in responses if r.status_code == 429][0]
    assert int(refused.headers["retry-after"]) >= 1
    assert (
        refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["error"]["code"] == "server_overloaded"
    )
    assert metric_value(metrics, "sdm_request_errors_total", {"route": "/generate", "status": "429"}) == statuses.count(
        429
    )
    assert metric_value(metrics, "sdm_in_flight_requests") == 0 and metric_value(metrics, "sdm_queue_depth") == 0


def test_timeout_answers_504_and_stops_the_generation(tiny_bundle) -> None:
    from server.app import create_app

    async def run():
        app = create_app(make_config(tiny_bundle, request_timeout_s=0.4, warmup=False))
        async with serve(app) as client:
            calls = slow_down(app.state.server.manager.current.backend, 0.05)
            r = await client.post("/generate", json={"prompt": "hi", "max_tokens": 60})
            at_timeout = calls["n"]
            await asyncio.sleep(0.5)
            ok = await client.post("/generate", json={"prompt": "hi", "max_tokens": 2})  # the model is free again
            return r, at_timeout, calls["n"], ok

    r, at_timeout, later, ok = asyncio.run(run())
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert at_timeout < 60 and later <= at_timeout + 4  # cancelled, not run to max_tokens
    assert ok.status_code == 200


def test_client_disconnect_cancels_the_generation(tiny_bundle) -> None:
    from server.app import create_app

    app = create_app(make_config(tiny_bundle, warmup=False))
    with UvicornThread(app) as running:
        calls = slow_down(app.state.server.manager.current.backend, 0.05)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.url}/generate", json={"prompt": "hi", "max_tokens": 60}, timeout=0.5)
        deadline = time.monotonic() + 10
        while (
            metric_value(
                httpx.get(f"{running.url}/metrics").text, "sdm_cancelled_requests_total", {"route": "/generate"}
            )
            < 1
        ):
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.05)
        stopped = calls["n"]
        time.sleep(0.3)
        assert stopped < 60 and calls["n"] <= stopped + 2
        # streams too: closing the stream cancels
        with httpx.stream(
            "POST",
            f"{running.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 60},
            timeout=5,
        ) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while (
            metric_value(
                httpx.get(f"{running.url}/metrics").text,
                "sdm_cancelled_requests_total",
                {"route": "/v1/chat/completions"},
            )
            < 1
        ):
            assert time.monotonic() < deadline, "the closed stream was not noticed"
            time.sleep(0.05)


def test_reload_under_load_drops_nothing(tiny_bundle) -> None:
    from server.app import create_app

    auth = {"Authorization": f"Bearer {API_KEY}-admin"}

    async def run():
        app = create_app(
            make_config(
                tiny_bundle,
                api_keys=(API_KEY,),
                admin_api_keys=(f"{API_KEY}-admin",),
                bundles_root=str(tiny_bundle.path.parent),
                max_concurrent_requests=4,
                warmup=True,
            )
        )
        async with serve(app, headers=auth) as client:
            manager = app.state.server.manager
            old = manager.current
            slow_down(old.backend, 0.02)
            requests = [
                asyncio.ensure_future(client.post("/generate", json={"prompt": f"{family_a(i)}", "max_tokens": 8}))
                for i in range(12)
            ]
            await asyncio.sleep(0.2)
            in_flight = old.in_flight
            reload = await client.post("/admin/reload", json={"bundle": tiny_bundle.path2.name})
            after = [await client.post("/generate", json={"prompt": "hi", "max_tokens": MAX_TOKENS}) for _ in range(2)]
            responses = await asyncio.gather(*requests)
            models = (await client.get("/v1/models")).json()
            for _ in range(100):
                if not old.backend.loaded:
                    break
                await asyncio.sleep(0.05)
            bad = await client.post("/admin/reload", json={"bundle": "/nonexistent/bundle"})
            still = await client.post("/generate", json={"prompt": "hi", "max_tokens": MAX_TOKENS})
            metrics = (await client.get("/metrics")).text
            return in_flight, reload, responses, after, models, old.backend.loaded, bad, still, metrics

    in_flight, reload, responses, after, models, old_loaded, bad, still, metrics = asyncio.run(run())
    assert in_flight > 0  # the reload happened under load
    assert reload.status_code == 200, reload.text
    assert reload.json()["bundle"].endswith("bundle2") and reload.json()["previous_bundle"].endswith("bundle")
    assert [r.status_code for r in responses] == [200] * 12
    assert all(r.status_code == 200 for r in after)
    assert models["data"][0]["root"].endswith("bundle2")
    assert old_loaded is False  # the old model was closed once its requests finished
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bundle"
    assert still.status_code == 200
    assert metric_value(metrics, "sdm_bundle_reloads_total", {"result": "ok"}) == 1
    assert metric_value(metrics, "sdm_bundle_reloads_total", {"result": "failed"}) == 1


def test_reload_needs_keys_and_metrics_can_be_open(tiny_bundle) -> None:
    from server.app import create_app

    async def run():
        no_keys = create_app(make_config(tiny_bundle, warmup=False))
        async with serve(no_keys, ready=False) as client:
            forbidden = await client.post("/admin/reload", json={})
        open_metrics = create_app(
            make_config(tiny_bundle, warmup=False, api_keys=(API_KEY,), metrics_require_key=False)
        )
        async with serve(open_metrics, ready=False) as client:
            metrics = await client.get("/metrics")
            models = await client.get("/v1/models")
        return forbidden, metrics, models

    forbidden, metrics, models = asyncio.run(run())
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
    assert metrics.status_code == 200 and "sdm_requests_total" in metrics.text
    assert models.status_code == 401
