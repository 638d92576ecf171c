"""``bench/server_load.py`` end to end on the tiny bundle: a sequential server and a batched one as real processes,
1 and 2 closed-loop clients, one JSON line with sane figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_server_support import ROOT, TinyBundle, tiny_bundle  # noqa: F401

pytestmark = pytest.mark.slow

LEVEL_KEYS = {
    "concurrency",
    "requests",
    "answered",
    "admitted",
    "abstained",
    "errors",
    "wall_s",
    "requests_per_s",
    "completion_tokens",
    "completion_tokens_per_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "verification_share",
    "generation_share",
    "queue_p50_ms",
    "backend_batches",
}


def test_server_load_benchmark_runs_end_to_end(tiny_bundle: TinyBundle, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in tiny_bundle.positive_prompts[:4]), encoding="utf-8"
    )
    argv = [
        sys.executable,
        str(ROOT / "bench" / "server_load.py"),
        "--bundle",
        str(tiny_bundle.path),
        "--concurrency",
        "1,2",
        "--requests-per-level",
        "4",
        "--max-tokens",
        "4",
        "--prompts",
        str(prompts),
        "--keep-logs",
        str(tmp_path / "logs"),
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    out = json.loads(lines[0])

    assert out["backend"] == "transformers" and out["bundle"] == str(tiny_bundle.path.resolve())
    assert out["device_info"]["cpu_count"] >= 1 and out["device_info"]["torch_threads"] >= 1
    assert (
        out["settings"]["server_sequential"]["batch_size"] == 1
        and out["settings"]["server_sequential"]["max_concurrent_requests"] == 1
    )
    assert out["settings"]["max_tokens"] == 4 and out["settings"]["n_prompts"] == 4
    assert out["server_exit_codes"] == {"sequential": 0, "batched": 0}
    assert [level["concurrency"] for level in out["levels"]] == [1, 2]

    for figures in [out["sequential"], *out["levels"]]:
        assert LEVEL_KEYS <= set(figures), LEVEL_KEYS - set(figures)
        assert figures["requests"] == figures["answered"] == 4 and figures["errors"] == 0
        assert figures["admitted"] + figures["abstained"] == 4
        assert figures["requests_per_s"] > 0 and figures["wall_s"] > 0
        assert 0 < figures["completion_tokens"] <= 4 * (4 + 16)  # max_tokens each, plus the tags the server writes
        assert 0 <= figures["verification_share"] <= 1 and 0 <= figures["generation_share"] <= 1
        assert figures["verification_share"] + figures["generation_share"] <= 1.0001
        assert 0 < figures["latency_p50_ms"] <= figures["latency_p95_ms"]
        assert figures["queue_p50_ms"] >= 0
        assert figures["backend_batches"]["generate"]["batches"] >= 1
        # The tiny model never writes <verified>, so every head input comes from the separate pass.
        assert figures["backend_batches"]["hidden_states_reused_share"] == 0.0
    for figures in out["levels"]:
        assert figures["requests_per_s_vs_sequential"] > 0
    assert out["sequential"]["backend_batches"]["generate"]["mean_size"] == 1.0
    assert out["verification_share_at_8"] is None and out["verification_share_target"] == 0.15
