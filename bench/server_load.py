"""Load benchmark of the selective-generation server: throughput, latency and the verification share of end-to-end
time at several numbers of concurrent clients, against sequential serving. Prints one JSON line (progress on stderr).
The server runs with this script's Python: for ``--backend vllm``, run it from the environment that has vLLM.

    python bench/server_load.py --bundle runs/smollm2/bundle                       # 1, 4, 8, 16 clients
    python bench/server_load.py --bundle runs/smollm2/bundle --backend vllm
    python bench/server_load.py --bundle runs/tiny/bundle --concurrency 1,4 --requests-per-level 8 --max-tokens 8

The real server runs as a subprocess (``python -m server`` on a free local port; its log goes to a file in a
temporary folder, named in the output). Two servers are started, one after the other:

- sequential serving: ``--batch-size 1 --batch-wait-ms 0 --max-concurrent-requests 1``, driven by one client;
- the batched server with the server's batching settings (``--batch-size``, ``--batch-wait-ms``; the server's
  defaults unless given), driven by each concurrency level in turn.

Each level is closed-loop: N clients each post ``POST /generate`` (greedy, ``temperature`` 0, ``max_tokens`` fixed)
and send the next request as soon as the answer arrives, until ``--requests-per-level`` answers have come back;
every level sends the same prompts in the same order. Each level starts with warm-up requests that are not
measured (one round of N by default). Per level: requests/s and completion tokens/s over the measured wall time
and their ratio to sequential serving, client-side p50 / p95 end-to-end latency, and from each response's
``timings``: the verification share sum(verification_ms) / sum(total_ms), the generation share, p50 / p95 of
queue_ms, plus admitted / abstained / error counts, the mean backend batch size and the share of head inputs
pooled from the states generation captured (from ``/metrics``). The server's verification_ms runs from the end of
generation to the head's answer: with a separate hidden-state pass it includes the wait for the model (that batch
shares the model lock with generation batches); with captured states it is tokenising, pooling and the head.
``--hidden-states forward`` measures the separate pass.
``max_tokens`` defaults to the ``max_new_tokens`` the bundle was calibrated with.

Prompts: ``--prompts FILE.jsonl`` (records with a ``prompt`` field, or ``messages``), else the word-ordering test
split of the run the bundle was calibrated from (``bundle.json`` provenance), else a word-ordering test split built
with ``training.data`` into the temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.config import ServerConfig, env_name  # noqa: E402

VERIFICATION_TARGET = 0.15  # the target for the verification share at 8 concurrent clients
DEFAULT_MAX_TOKENS = 64
SEQUENTIAL_FLAGS = {"batch_size": 1, "batch_wait_ms": 0.0, "max_concurrent_requests": 1}


def log(message: str) -> None:
    print(f"[server_load] {message}", file=sys.stderr, flush=True)


# -- prompts ------------------------------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[dict]:
    """Request bodies' prompt part (``{"prompt": ...}`` or ``{"messages": [...]}``) from a JSONL file."""
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("prompt") is not None:
                prompts.append({"prompt": record["prompt"]})
            elif record.get("messages"):
                prompts.append({"messages": record["messages"]})
            else:
                raise SystemExit(f"{path}:{lineno}: the record has neither 'prompt' nor 'messages'")
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return prompts


def bundle_provenance(bundle: Path) -> dict:
    try:
        return json.loads((bundle / "bundle.json").read_text(encoding="utf-8")).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def bundle_max_tokens(bundle: Path) -> int | None:
    """The max_new_tokens the bundle's head was calibrated with (its generations were that long at most)."""
    value = (bundle_provenance(bundle).get("calibrate_config") or {}).get("max_new_tokens")
    return value if isinstance(value, int) and value > 0 else None


def bundle_test_split(bundle: Path) -> Path | None:
    """The word-ordering test split next to the calibration data of the run the bundle came from, if it exists."""
    provenance = bundle_provenance(bundle)
    candidates = []
    run = (provenance.get("calibrate_config") or {}).get("run")
    if run:
        candidates.append(Path(run) / "data" / "test.jsonl")
    calibration_file = provenance.get("calibration_file")
    if calibration_file:
        candidates.append(Path(calibration_file).with_name("test.jsonl"))
    candidates.append(bundle.resolve().parent / "run" / "data" / "test.jsonl")  # bench/finetune_preset.py's layout
    return next((c for c in candidates if c.is_file()), None)


def build_test_split(folder: Path, size: int) -> Path:
    from training.data import WordOrderConfig, build_word_order

    build_word_order(folder, WordOrderConfig(train=0, calibration=0, test=size, length_shift=0, quiet=True))
    return folder / "test.jsonl"


def choose_prompts(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[dict]]:
    if args.prompts:
        path = Path(args.prompts)
    else:
        path = bundle_test_split(Path(args.bundle))
        if path is None:
            log("no test split found next to the bundle's run; building a word-ordering test split with training.data")
            path = build_test_split(tmp / "word-order", max(64, args.requests_per_level))
    prompts = read_prompts(path)
    log(f"{len(prompts)} prompts from {path}")
    return path, prompts


# -- the server subprocess --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment() -> dict[str, str]:
    """This process's environment without any ``SDM_*`` server setting (every setting comes from our flags)."""
    settings = {env_name(name) for name in ServerConfig.__dataclass_fields__}
    env = {k: v for k, v in os.environ.items() if k not in settings}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


class ServerProcess:
    """``python -m server`` on a free port; stderr and stdout to ``log_path``. Always stop it (``with`` block).
    Subclasses that start another server override :meth:`argv` and ``ready_path`` (polled until it answers 200)."""

    ready_path = "/ready"

    def __init__(self, flags: dict, log_path: Path, ready_timeout_s: float) -> None:
        self.flags = flags
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        for name, value in self.flags.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        return argv

    def __enter__(self) -> ServerProcess:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv(), cwd=ROOT, env=server_environment(), stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        assert self.process is not None
        started = time.monotonic()
        last = ""
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise RuntimeError(
                        f"the server exited with status {code} before it was ready; its log ({self.log_path}) "
                        f"ends:\n{self._log_tail()}"
                    )
                try:
                    response = client.get(self.url + self.ready_path)
                    if response.status_code == 200:
                        log(f"server ready on port {self.port} after {time.monotonic() - started:.1f} s")
                        return
                    last = response.text
                    if '"failed' in last or "not ready: failed" in last:
                        raise RuntimeError(
                            f"the server failed to load: {last}; its log ({self.log_path}) ends:\n{self._log_tail()}"
                        )
                except httpx.TransportError:
                    pass
                if time.monotonic() - started > self.ready_timeout_s:
                    raise RuntimeError(
                        f"the server was not ready after {self.ready_timeout_s:.0f} s (last /ready: {last[:300]}); "
                        f"log: {self.log_path}"
                    )
                time.sleep(0.25)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the server drains and exits 0
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.process is not None:
            self.returncode = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None


# -- the load -----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    latency_ms: float
    status: int
    body: dict | None = None
    error: str | None = None


@dataclass
class LevelRun:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    batches: dict = field(default_factory=dict)


async def post(client: httpx.AsyncClient, body: dict, path: str = "/generate") -> Sample:
    started = time.perf_counter()
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return Sample((time.perf_counter() - started) * 1000.0, 0, error=f"{type(exc).__name__}: {exc}")
    latency = (time.perf_counter() - started) * 1000.0
    if response.status_code != 200:
        return Sample(latency, response.status_code, error=response.text[:300])
    return Sample(latency, 200, body=response.json())


async def closed_loop(
    client: httpx.AsyncClient, bodies: list[dict], clients: int, send=post
) -> tuple[list[Sample], float]:
    """``clients`` workers each send the next body as soon as their previous answer arrives (``send(client, body)``,
    default: POST /generate); returns the samples (in body order) and the wall time from the first send to the last
    answer."""
    samples: list[Sample | None] = [None] * len(bodies)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(bodies):
            i = next_index
            next_index += 1
            samples[i] = await send(client, bodies[i])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return [s for s in samples if s is not None], time.perf_counter() - started


_METRIC_LINE = re.compile(r'^sdm_batch_size_(sum|count)\{kind="(\w+)"\}\s+(\S+)$')
_SOURCE_LINE = re.compile(r'^sdm_hidden_state_sources_total\{source="(\w+)"\}\s+(\S+)$')


async def batch_totals(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    """(kind, sum|count) -> value of the sdm_batch_size histogram; empty when /metrics cannot be read."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    totals = {}
    for line in response.text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            totals[(match.group(2), match.group(1))] = float(match.group(3))
        match = _SOURCE_LINE.match(line)
        if match:
            totals[("source", match.group(1))] = float(match.group(2))
    return totals


def mean_batches(before: dict, after: dict) -> dict:
    out = {}
    for kind in ("generate", "embed"):
        count = after.get((kind, "count"), 0.0) - before.get((kind, "count"), 0.0)
        total = after.get((kind, "sum"), 0.0) - before.get((kind, "sum"), 0.0)
        out[kind] = {"batches": int(count), "mean_size": round(total / count, 3) if count else None}
    reused, forward = (after.get(("source", s), 0.0) - before.get(("source", s), 0.0) for s in ("reused", "forward"))
    out["hidden_states_reused_share"] = round(reused / (reused + forward), 3) if reused + forward else None
    return out


async def run_level(
    url: str, prompts: list[dict], clients: int, requests: int, warmup: int, max_tokens: int, timeout_s: float
) -> LevelRun:
    def bodies(start: int, n: int) -> list[dict]:
        return [{**prompts[(start + i) % len(prompts)], "max_tokens": max_tokens, "temperature": 0.0} for i in range(n)]

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        if warmup:
            # Warm-up prompts come from the end of the list so the measured ones are the same at every level.
            warm, _ = await closed_loop(client, bodies(len(prompts) - warmup % len(prompts), warmup), clients)
            failed = [s for s in warm if s.status != 200]
            if failed:
                log(f"  warm-up: {len(failed)} of {len(warm)} failed (first: {failed[0].status} {failed[0].error})")
        before = await batch_totals(client)
        samples, wall_s = await closed_loop(client, bodies(0, requests), clients)
        after = await batch_totals(client)
    return LevelRun(samples, wall_s, mean_batches(before, after) if before and after else {})


# -- figures ------------------------------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolation percentile (numpy's default) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(clients: int, run: LevelRun, baseline: dict | None) -> dict:
    ok = [s for s in run.samples if s.status == 200 and s.body is not None]
    errors = [s for s in run.samples if s.status != 200 or s.body is None]
    timings = [s.body["timings"] for s in ok]
    total_ms = sum(t["total_ms"] for t in timings)
    tokens = sum(s.body["usage"]["completion_tokens"] for s in ok)
    latencies = [s.latency_ms for s in ok]
    queue = [t["queue_ms"] for t in timings]
    rps = len(ok) / run.wall_s if run.wall_s > 0 else 0.0
    tps = tokens / run.wall_s if run.wall_s > 0 else 0.0
    error_kinds: dict[str, int] = {}
    for s in errors:
        error_kinds[str(s.status)] = error_kinds.get(str(s.status), 0) + 1
    figures = {
        "concurrency": clients,
        "requests": len(run.samples),
        "answered": len(ok),
        "admitted": sum(1 for s in ok if s.body["admitted"]),
        "abstained": sum(1 for s in ok if s.body["abstained"]),
        "errors": len(errors),
        "error_statuses": error_kinds,
        "wall_s": round(run.wall_s, 3),
        "requests_per_s": round(rps, 4),
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tps, 3),
        "mean_completion_tokens": _r(tokens / len(ok) if ok else None, 2),
        "latency_p50_ms": _r(percentile(latencies, 50), 1),
        "latency_p95_ms": _r(percentile(latencies, 95), 1),
        "latency_mean_ms": _r(statistics.fmean(latencies) if latencies else None, 1),
        "verification_share": _r(sum(t["verification_ms"] for t in timings) / total_ms if total_ms > 0 else None, 4),
        "generation_share": _r(sum(t["generation_ms"] for t in timings) / total_ms if total_ms > 0 else None, 4),
        "queue_share": _r(sum(t["queue_ms"] for t in timings) / total_ms if total_ms > 0 else None, 4),
        "queue_p50_ms": _r(percentile(queue, 50), 1),
        "queue_p95_ms": _r(percentile(queue, 95), 1),
        "server_total_p50_ms": _r(percentile([t["total_ms"] for t in timings], 50), 1),
        "verification_p50_ms": _r(percentile([t["verification_ms"] for t in timings], 50), 1),
        "generation_p50_ms": _r(percentile([t["generation_ms"] for t in timings], 50), 1),
        "backend_batches": run.batches,
    }
    if errors:
        figures["first_error"] = (errors[0].error or "")[:300]
    if baseline is not None:
        figures["requests_per_s_vs_sequential"] = _r(
            rps / baseline["requests_per_s"] if baseline["requests_per_s"] else None, 3
        )
        figures["tokens_per_s_vs_sequential"] = _r(
            tps / baseline["completion_tokens_per_s"] if baseline["completion_tokens_per_s"] else None, 3
        )
    return figures


def describe_level(figures: dict) -> str:
    share = figures["verification_share"]
    return (
        f"{figures['answered']}/{figures['requests']} answered in {figures['wall_s']:.1f} s: "
        f"{figures['requests_per_s']:.3f} req/s, "
        f"{figures['completion_tokens_per_s']:.1f} tok/s, p50 {figures['latency_p50_ms']} ms, p95 "
        f"{figures['latency_p95_ms']} ms, "
        f"verification {'n/a' if share is None else f'{share:.1%}'}"
        + (f", {figures['errors']} errors" if figures["errors"] else "")
    )


def device_info(device: str) -> dict:
    import torch

    return {
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- main ---------------------------------------------------------------------------------------------------------
def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError(f"--concurrency needs integers >= 1, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="the bundle to serve")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--device", default="cpu", help="the server's --device (the issue's figures are on CPU)")
    parser.add_argument(
        "--concurrency", type=parse_levels, default=[1, 4, 8, 16], help="comma-separated numbers of concurrent clients"
    )
    parser.add_argument(
        "--requests-per-level",
        type=int,
        default=64,
        help="measured requests at each level (and for sequential serving)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="unmeasured requests before each level (default: one per client)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="max_tokens of every request (default: the bundle's calibration max_new_tokens, else "
        f"{DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument("--prompts", default=None, help="JSONL with a 'prompt' (or 'messages') field per line")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="the batched server's --batch-size (default: the server's)"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=None, help="the batched server's --batch-wait-ms (default: the server's)"
    )
    parser.add_argument(
        "--request-timeout-s", type=float, default=1800.0, help="the server's and the client's per-request limit"
    )
    parser.add_argument("--ready-timeout-s", type=float, default=900.0, help="how long to wait for /ready")
    parser.add_argument(
        "--hidden-states",
        default=None,
        choices=("auto", "reuse", "forward"),
        help="both servers' --hidden-states (transformers backend; default: the server's)",
    )
    parser.add_argument(
        "--vllm-block-size", type=int, default=0, help="the vllm server's KV block size (0: vLLM's default)"
    )
    parser.add_argument("--skip-sequential", action="store_true", help="leave out the sequential-serving baseline")
    parser.add_argument(
        "--traffic-store",
        default="sqlite",
        help="the servers' --traffic-store: sqlite (a file in the temporary folder: every answer recorded), off, or a "
        "SQLAlchemy URL [sqlite]",
    )
    parser.add_argument(
        "--keep-logs", default=None, help="copy the server logs into this folder and delete the temporary one"
    )
    args = parser.parse_args(argv)
    bundle = Path(args.bundle).expanduser().resolve()
    if not (bundle / "bundle.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (no bundle.json)")
    args.bundle = str(bundle)
    if args.max_tokens is None:
        args.max_tokens = bundle_max_tokens(bundle) or DEFAULT_MAX_TOKENS
    if args.requests_per_level < 1 or args.max_tokens < 1:
        parser.error("--requests-per-level and --max-tokens must be >= 1")

    defaults = ServerConfig.__dataclass_fields__
    top = max(args.concurrency)
    common = {
        "bundle": str(bundle),
        "backend": args.backend,
        "device": args.device,
        "max_tokens_cap": max(args.max_tokens, defaults["max_tokens_cap"].default),
        "max_queue_size": max(defaults["max_queue_size"].default, 2 * top),
        "request_timeout_s": args.request_timeout_s,
        "log_level": "info",
    }
    if args.hidden_states is not None:
        common["hidden_states"] = args.hidden_states
    if args.backend == "vllm" and args.vllm_block_size:
        common["vllm_block_size"] = args.vllm_block_size
    batched = {
        **common,
        "batch_size": args.batch_size if args.batch_size is not None else defaults["batch_size"].default,
        "batch_wait_ms": args.batch_wait_ms if args.batch_wait_ms is not None else defaults["batch_wait_ms"].default,
        "max_concurrent_requests": max(defaults["max_concurrent_requests"].default, top),
    }
    sequential = {**common, **SEQUENTIAL_FLAGS}

    tmp = Path(tempfile.mkdtemp(prefix="sdm-server-load-"))
    # Both servers record their traffic (the server's default) into the temporary folder, or not at all.
    for flags in (batched, sequential):
        flags["traffic_store"] = args.traffic_store
        flags["data_dir"] = str(tmp / "data")
    log(f"temporary folder (server logs{'' if args.keep_logs else ', kept'}): {tmp}")
    started = time.perf_counter()
    prompts_path, prompts = choose_prompts(args, tmp)

    def level(url: str, clients: int) -> LevelRun:
        warmup = clients if args.warmup is None else args.warmup
        return asyncio.run(
            run_level(url, prompts, clients, args.requests_per_level, warmup, args.max_tokens, args.request_timeout_s)
        )

    baseline = None
    levels = []
    logs = {}
    exit_codes = {}
    try:
        if not args.skip_sequential:
            log("sequential serving (batch size 1, one request at a time), 1 client")
            logs["sequential"] = str(tmp / "server-sequential.log")
            with ServerProcess(sequential, tmp / "server-sequential.log", args.ready_timeout_s) as server:
                baseline = summarize(1, level(server.url, 1), None)
            exit_codes["sequential"] = server.returncode
            log("  " + describe_level(baseline))
        logs["batched"] = str(tmp / "server-batched.log")
        with ServerProcess(batched, tmp / "server-batched.log", args.ready_timeout_s) as server:
            for clients in args.concurrency:
                log(f"{clients} concurrent client(s), {args.requests_per_level} requests")
                figures = summarize(clients, level(server.url, clients), baseline)
                levels.append(figures)
                log("  " + describe_level(figures))
        exit_codes["batched"] = server.returncode
    finally:
        if args.keep_logs:  # copy the logs (also after a failure), then drop the temporary folder
            keep = Path(args.keep_logs)
            keep.mkdir(parents=True, exist_ok=True)
            for name, path in list(logs.items()):
                if Path(path).is_file():
                    logs[name] = str(shutil.copy(path, keep / Path(path).name))
            shutil.rmtree(tmp, ignore_errors=True)

    at8 = next((f for f in levels if f["concurrency"] == 8), None)
    print(
        json.dumps(
            {
                "benchmark": "server_load",
                "backend": args.backend,
                "bundle": str(bundle),
                "device_info": device_info(args.device),
                "settings": {
                    "concurrency": args.concurrency,
                    "requests_per_level": args.requests_per_level,
                    "warmup": "one per client" if args.warmup is None else args.warmup,
                    "max_tokens": args.max_tokens,
                    "temperature": 0.0,
                    "prompts": str(prompts_path),
                    "n_prompts": len(prompts),
                    "server_batched": {k: v for k, v in batched.items() if k not in ("bundle", "data_dir")},
                    "server_sequential": None
                    if args.skip_sequential
                    else {k: v for k, v in sequential.items() if k not in ("bundle", "data_dir")},
                },
                "sequential": baseline,
                "levels": levels,
                "verification_share_at_8": at8["verification_share"] if at8 else None,
                "verification_share_target": VERIFICATION_TARGET,
                "server_logs": logs,
                "server_exit_codes": exit_codes,
                "total_seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:  # the server did not start: the message carries the end of its log
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
