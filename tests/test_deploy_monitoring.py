"""Monitoring end to end: the server (started with the CPU image's start command, outside the container, on a
tiny bundle, with API keys) and a real Prometheus (Debian's package, on 127.0.0.1, temporary storage, 1 s scrape
and rule intervals, deploy/prometheus/prometheus.yml and its rule files) scraping it with a key. After admitted,
abstained and failed requests (400, 401, 429) and labels for the answers (POST /v1/feedback), every dashboard panel
query and every recording and alerting rule expression is evaluated through Prometheus' HTTP API: all must succeed,
every rule must evaluate without error, and the panels must return data (the abstention, probability and latency
panels among them)."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_deploy_support import (
    DEPLOY,
    DOCKERFILES,
    container_env,
    free_port,
    outside_container,
    parse_dockerfile,
    require_server,
    start_server,
    stop_server,
    wait_ready,
)

pytestmark = pytest.mark.slow

PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sdm.json"
RATE_INTERVAL = "1m"  # what $__rate_interval becomes (Grafana: max(4 x scrape interval, the step))
# Panels that may legitimately be empty after this traffic (no client disconnects and no reloads happen).
MAY_BE_EMPTY = {"Cancelled requests and reloads"}
# Panels the issue names as having to return data.
MUST_HAVE_DATA = {
    "Admitted vs abstained",
    "Abstention rate by reason",
    "Calibrated probability distribution",
    "Calibrated probability heatmap",
    "Latency by stage (p50 / p95 / p99)",
}
# Recording rules that need traffic this test cannot make: 5xx errors; out-of-distribution answers (the tiny
# bundle may or may not give one).
RECORDS_MAY_BE_EMPTY = {
    "instance:sdm_error_ratio:rate5m",
    "instance:sdm_ood_ratio:rate5m",
    "instance:sdm_ood_ratio:rate1h",
}


class Prometheus:
    def __init__(self, binary: str, port: int, config: Path, data: Path, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        handle = open(log, "w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        self.log = log

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"Prometheus did not start:\n{self.log.read_text()}"
            time.sleep(0.2)

    def api(self, path: str, **params) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"{path} {params}: HTTP {r.status_code} {body}"
        return body["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def has_finite_value(data: dict) -> bool:
    if data["resultType"] == "matrix":
        return any(math.isfinite(float(v)) for series in data["result"] for _, v in series["values"])
    if data["resultType"] == "vector":
        return any(math.isfinite(float(s["value"][1])) for s in data["result"])
    if data["resultType"] == "scalar":
        return math.isfinite(float(data["result"][1]))
    return False


def test_dashboard_queries_and_rules_against_a_live_server_and_prometheus(tmp_path: Path) -> None:
    require_server()
    binary, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if binary is None or promtool is None:
        pytest.skip("Prometheus is not installed: bash deploy/ci/install_prometheus.sh (Debian's prometheus package)")
    import httpx
    from test_server_support import API_KEY, tiny_bundle_cached

    bundle = tiny_bundle_cached()
    dockerfile = parse_dockerfile(DOCKERFILES["cpu"])
    # One processing slot and one queue place: a burst of requests is answered with 429s.
    env = container_env(
        dockerfile,
        bundle.path,
        tmp_path,
        SDM_DEVICE="cpu",
        SDM_API_KEYS=API_KEY,
        SDM_DEFAULT_MAX_TOKENS="4",
        SDM_MAX_TOKENS_CAP="64",
        SDM_MODEL_NAME="tiny-sdm",
        SDM_MAX_CONCURRENT_REQUESTS="1",
        SDM_MAX_QUEUE_SIZE="1",
    )
    headers = {"Authorization": f"Bearer {API_KEY}"}
    server = start_server(outside_container(dockerfile.start_command), env, tmp_path / "server.log")
    prometheus: Prometheus | None = None
    try:
        wait_ready(server, headers=headers)
        target = f"127.0.0.1:{env['SDM_PORT']}"

        # -- Prometheus: the shipped configuration, pointed at this server, with short intervals ------------------
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str((PROM / f).resolve()) for f in config["rule_files"]]
        key_file = tmp_path / "sdm_api_key"
        key_file.write_text(API_KEY + "\n")
        prometheus_port = free_port()
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        for job in jobs.values():
            job.update(scrape_interval="1s", scrape_timeout="1s")
        jobs["sdm-lm"]["static_configs"][0]["targets"] = [target]
        jobs["sdm-lm"]["authorization"] = {"type": "Bearer", "credentials_file": str(key_file)}
        if "prometheus" in jobs:
            jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        check = subprocess.run(
            [promtool, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        prometheus = Prometheus(binary, prometheus_port, config_path, tmp_path / "tsdb", tmp_path / "prometheus.log")
        prometheus.wait_ready()

        # -- traffic: admitted, abstained, failed ------------------------------------------------------------
        start = time.time()
        outcomes = {"admitted": 0, "abstained": 0}
        answers: list[dict] = []
        url = server.url
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            for _ in range(6):
                for prompt in (bundle.admitted_prompt, bundle.abstained_prompt, bundle.predicted_no_prompt):
                    body = client.post("/generate", json={"prompt": prompt}).json()
                    outcomes["admitted" if body["admitted"] else "abstained"] += 1
                    answers.append(body)
                r = client.post(
                    "/v1/chat/completions",
                    json={"model": "tiny-sdm", "messages": [{"role": "user", "content": bundle.admitted_prompt}]},
                )
                assert r.status_code == 200, r.text
                for bad, expected in (
                    (dict(prompt="x", alpha=0.123), 400),
                    (dict(max_tokens=4), 400),
                    (dict(prompt="x", max_tokens=0), 400),
                ):
                    r = client.post("/generate", json=bad)
                    assert r.status_code == expected, (bad, r.status_code, r.text)
                r = httpx.post(
                    f"{url}/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}, timeout=30
                )
                assert r.status_code == 401
                time.sleep(1.0)
            # Labels for the answers (the live-accuracy rules and panel): alternately correct and wrong.
            feedback = [{"id": a["id"], "label": ("correct", "wrong")[n % 2]} for n, a in enumerate(answers)]
            r = client.post("/v1/feedback", json=feedback)
            assert r.status_code == 200, r.text
            # A burst larger than one slot + one queue place: some requests are rejected with 429.
            results: list[int] = []

            def one() -> None:
                results.append(
                    httpx.post(
                        f"{url}/generate",
                        json={"prompt": bundle.admitted_prompt, "max_tokens": 32},
                        headers=headers,
                        timeout=60,
                    ).status_code
                )

            for _ in range(3):  # a burst that happens to serialise is tried again
                threads = [threading.Thread(target=one) for _ in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=120)
                if 429 in results:
                    break
            assert 429 in results and 200 in results, results
        assert outcomes["admitted"] and outcomes["abstained"], outcomes

        # -- wait until Prometheus has scraped the final counts and evaluated the rules on them -------------------
        from prometheus_client.parser import text_string_to_metric_families

        exposed = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
        total = sum(
            s.value
            for f in text_string_to_metric_families(exposed)
            for s in f.samples
            if s.name == "sdm_requests_total"
        )
        deadline = time.monotonic() + 60
        while True:
            result = prometheus.api("query", query="sum(sdm_requests_total)")["result"]
            if result and float(result[0]["value"][1]) >= total:
                break
            assert time.monotonic() < deadline, f"Prometheus never saw the final counts ({total}): {result}"
            time.sleep(0.5)
        time.sleep(3)  # a few rule evaluations on the final data
        end = time.time()

        targets = prometheus.api("targets")["activeTargets"]
        sdm = [t for t in targets if t["labels"]["job"] == "sdm-lm"]
        assert sdm and sdm[0]["health"] == "up", sdm  # scraped with the API key (credentials_file)

        # -- template variables ----------------------------------------------------------------------------
        models = prometheus.api("label/model/values", **{"match[]": "sdm_bundle_info"})
        assert models == ["tiny-sdm"], models
        instances = prometheus.api("label/instance/values", **{"match[]": 'sdm_bundle_info{model=~"tiny-sdm"}'})
        assert instances == [target], instances

        def substitute(expr: str) -> str:
            return (
                expr.replace("${instance}", instances[0])
                .replace("$instance", instances[0])
                .replace("${model}", models[0])
                .replace("$model", models[0])
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$__interval", "2s")
                .replace("$__range", "2m")
            )

        # -- every panel query ----------------------------------------------------------------------------------
        import json

        dashboard = json.loads(DASHBOARD.read_text())
        panels = [p for p in dashboard["panels"] for p in [p, *p.get("panels", [])] if p["type"] != "row"]
        empty = []
        for panel in panels:
            data_found = False
            for target_query in panel["targets"]:
                expr = substitute(target_query["expr"])
                assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
                if target_query.get("instant"):
                    data = prometheus.api("query", query=expr, time=f"{end:.3f}")
                else:
                    data = prometheus.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="2")
                data_found = data_found or has_finite_value(data)
            if not data_found:
                empty.append(panel["title"])
        assert MUST_HAVE_DATA <= {p["title"] for p in panels}
        assert not (set(empty) & MUST_HAVE_DATA), f"panels without data: {empty}"
        assert set(empty) <= MAY_BE_EMPTY, f"panels without data: {empty}"

        # -- every rule: evaluated by Prometheus without error, and its expression evaluates through the API ---
        deadline = time.monotonic() + 30
        while True:
            groups = prometheus.api("rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(rule.get("health") == "ok" for rule in rules):
                break
            bad = [
                (rule["name"], rule.get("health"), rule.get("lastError"))
                for rule in rules
                if rule.get("health") != "ok"
            ]
            assert time.monotonic() < deadline and not any(h == "err" for _, h, _ in bad), f"rules failing: {bad}"
            time.sleep(0.5)
        shipped = [
            rule
            for path in sorted((PROM / "rules").glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]
        ]
        assert len(rules) == len(shipped), "Prometheus loaded every shipped rule"
        for rule in shipped:
            prometheus.api("query", query=rule["expr"], time=f"{end:.3f}")
            if "record" in rule and rule["record"] not in RECORDS_MAY_BE_EMPTY:
                # A series that first appeared in the final scrapes (the 429 burst) needs a second sample and a rule
                # evaluation after it; on a loaded machine that can land after `end`, so wait for it (bounded).
                rule_deadline = time.monotonic() + 30
                while True:
                    recorded = prometheus.api(
                        "query_range", query=rule["record"], start=f"{start:.3f}", end=f"{time.time():.3f}", step="2"
                    )
                    if has_finite_value(recorded) or time.monotonic() > rule_deadline:
                        break
                    time.sleep(1.0)
                assert has_finite_value(recorded), (
                    f"recording rule {rule['record']} produced no data from the live metrics"
                )
    finally:
        if prometheus is not None:
            prometheus.stop()
        code = stop_server(server)
    assert code == 0, server.log_text()[-3000:]
