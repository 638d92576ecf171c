"""Benchmark of sdm_core on the CPU: fit time, batched and single-document scoring, and memory at 100k support.

Prints one JSON line. Each case runs in its own subprocess so that peak resident memory is per case.

    python bench/sdm_core_bench.py                 # all cases, the issue's sizes (fit: 200 epochs)
    python bench/sdm_core_bench.py --fit-epochs 20 # quicker; reports seconds per epoch too
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdm_core import SDMConfig, SDMEstimator  # noqa: E402

DIM = 1152  # SmolLM2: [mean; last] of two 576-d final-layer states


def synthetic(n: int, seed: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping Gaussian classes with 5 % label noise, roughly the geometry of LM embeddings."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(dim, generator=g) / dim**0.5
    x = torch.randn(n, dim, generator=g) + (2.0 * y.float() - 1.0).unsqueeze(1) * direction * 3.0
    noise = torch.rand(n, generator=g) < 0.05
    return x, torch.where(noise, 1 - y, y)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def case_fit(args: argparse.Namespace) -> dict:
    x_tr, y_tr = synthetic(args.support, 1)
    x_ca, y_ca = synthetic(args.calibration, 2)
    config = SDMConfig(epochs=args.fit_epochs, progress=False, backend=args.backend)
    started = time.perf_counter()
    est = SDMEstimator(config).fit(x_tr, y_tr, x_ca, y_ca)
    seconds = time.perf_counter() - started
    return {
        "fit_seconds": round(seconds, 2),
        "fit_epochs": args.fit_epochs,
        "fit_seconds_per_epoch": round(seconds / args.fit_epochs, 3),
        "fit_support": args.support,
        "fit_calibration": args.calibration,
        "fit_peak_rss_mb": round(peak_rss_mb(), 1),
        "fit_best_epoch": est.metadata["best_epoch"],
    }


def _estimator(support: int, backend: str) -> SDMEstimator:
    x_tr, y_tr = synthetic(support, 1)
    x_ca, y_ca = synthetic(1000, 2)
    return SDMEstimator(SDMConfig(epochs=2, progress=False, backend=backend)).fit(x_tr, y_tr, x_ca, y_ca)


def case_score(args: argparse.Namespace) -> dict:
    est = _estimator(args.support, args.backend)
    queries, _ = synthetic(args.queries, 3)
    est.predict_scores(queries[:100])  # warm-up
    started = time.perf_counter()
    est.predict_scores(queries)
    batched = time.perf_counter() - started
    latencies = []
    for i in range(args.single):
        t = time.perf_counter()
        est.predict_scores(queries[i : i + 1])
        latencies.append((time.perf_counter() - t) * 1000.0)
    return {
        "score_support": args.support,
        "score_queries": args.queries,
        "score_batched_docs_per_s": round(args.queries / batched, 1),
        "score_single_p50_ms": round(statistics.median(latencies), 3),
        "score_single_p95_ms": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3),
        "score_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def case_large(args: argparse.Namespace) -> dict:
    est = _estimator(2000, args.backend)
    added = 0
    chunk = 10_000
    while len(est.support) < args.large_support:
        n = min(chunk, args.large_support - len(est.support))
        x, y = synthetic(n, 100 + added)
        est.add_exemplars(x, y.tolist(), [f"extra-{added + i}" for i in range(n)])
        added += n
    queries, _ = synthetic(2000, 4)
    started = time.perf_counter()
    est.predict_scores(queries)
    seconds = time.perf_counter() - started
    return {
        "large_support": len(est.support),
        "large_queries": 2000,
        "large_docs_per_s": round(2000 / seconds, 1),
        "large_peak_rss_mb": round(peak_rss_mb(), 1),
    }


CASES = {"fit": case_fit, "score": case_score, "large": case_large}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process (internal)")
    parser.add_argument("--cases", default="score,large,fit", help="comma-separated cases to run")
    parser.add_argument("--support", type=int, default=5000)
    parser.add_argument("--calibration", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--single", type=int, default=200, help="one-at-a-time queries for the latency figures")
    parser.add_argument("--large-support", type=int, default=100_000)
    parser.add_argument("--fit-epochs", type=int, default=200)
    parser.add_argument("--backend", choices=("torch", "faiss"), default="torch")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(CASES[args.case](args)))
        return
    result = {"threads": torch.get_num_threads(), "dim": DIM, "backend": args.backend}
    passthrough = [
        f"--support={args.support}",
        f"--calibration={args.calibration}",
        f"--queries={args.queries}",
        f"--single={args.single}",
        f"--large-support={args.large_support}",
        f"--fit-epochs={args.fit_epochs}",
        f"--backend={args.backend}",
    ]
    for case in args.cases.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--case", case, *passthrough], capture_output=True, text=True, check=True
        )
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
