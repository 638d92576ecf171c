"""What recording an answer costs the request, and how fast the background writer drains (prints one JSON line).

    python bench/traffic_overhead.py                      # SQLite in a temporary folder, h of 576 values (SmolLM2-135M)
    python bench/traffic_overhead.py --dim 2048 --records 20000 --store postgresql+psycopg://sdm@db/sdm

The request path only builds a record (copying h to bytes) and puts it on the writer's queue
(server.traffic.make_record + TrafficRecorder.submit): this measures that per answer, in microseconds, with the
writer running. Then it measures the writer's sustained rate (records written per second into the store), which
bounds the answers per second a server can record without dropping (beyond it the queue fills and records are
dropped and counted). Compare the request-path cost with a request's latency (bench/server_load.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from sdm_core.traffic import TrafficStore, redact_url, sqlite_url  # noqa: E402
from server.backends.base import GenerationResult  # noqa: E402
from server.pipeline import Attempt, VerificationResult  # noqa: E402
from server.traffic import TrafficRecorder, TrafficSettings, make_record  # noqa: E402
from server.traffic_metrics import TrafficMetrics  # noqa: E402


def _result(h: torch.Tensor) -> VerificationResult:
    """An admitted answer with the head input ``h``: what make_record reads."""
    text = "the dog barked loudly\n<verified>"
    attempt = Attempt(
        generation=GenerationResult(text, 12, 8, "stop", "<verified>"),
        verification_text=text,
        embedding=h,
        prediction=1,
        verified="Yes",
        text=text + "Yes</verified>",
        probability=0.95,
        probability_lower=0.9,
        head_admitted=True,
        admitted=True,
        abstention_reason=None,
        region_alpha=0.9,
        q=12,
        q_prime=9.5,
        d=0.7,
        exemplars=[],
        generation_ms=0.0,
        verification_ms=0.0,
    )
    return VerificationResult(best=attempt, all_attempts=[attempt], alpha=0.9, withheld=False, prompt_tokens=12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/traffic_overhead.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="a SQLAlchemy URL (default: SQLite in a temporary folder)")
    parser.add_argument("--dim", type=int, default=576, help="width of the head's input h [576]")
    parser.add_argument("--records", type=int, default=5000, help="answers to record [5000]")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sdm-traffic-bench-"))
    url = args.store or sqlite_url(tmp / "traffic.sqlite3")
    metrics = TrafficMetrics(CollectorRegistry())
    recorder = TrafficRecorder(TrafficSettings(url=url, queue_size=args.records + 10), metrics)
    recorder.start()
    deadline = time.monotonic() + 60
    while not recorder.available:
        if time.monotonic() > deadline:
            print(f"error: the store did not come up: {recorder.error}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    facts = {"bundle": "/bundles/bench", "bundle_sha256": "0" * 16, "head_version": "1" * 16}
    result = _result(torch.randn(args.dim))  # built before the clock: the server has its result already
    costs = []
    started = time.perf_counter()
    ids = []
    for i in range(args.records):
        t0 = time.perf_counter()
        record = make_record(f"gen-bench-{i}", "/generate", facts, result, "Put the words in order: dog the barked")
        recorder.submit(record)
        costs.append((time.perf_counter() - t0) * 1e6)
        ids.append(record.id)
    submitted = time.perf_counter()
    recorder.wait_written(ids, timeout_s=600)
    drained = time.perf_counter()
    recorder.close()
    stored = TrafficStore(url).count()
    costs.sort()
    print(
        json.dumps(
            {
                "benchmark": "traffic_overhead",
                "store": redact_url(url).split("://")[0],
                "dim": args.dim,
                "records": args.records,
                "stored": stored,
                "request_path_us": {
                    "mean": round(statistics.fmean(costs), 1),
                    "p50": round(costs[len(costs) // 2], 1),
                    "p99": round(costs[int(len(costs) * 0.99) - 1], 1),
                },
                "writer_records_per_s": round(args.records / (drained - started), 1),
                "submit_seconds": round(submitted - started, 3),
                "drain_seconds": round(drained - started, 3),
                "python": platform.python_version(),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
