#!/usr/bin/env bash
# Everything the deploy tests need beyond deploy/setup.sh: promtool/prometheus (Debian) and the Python tools of
# deploy/ci/requirements.txt in .venv. Idempotent. Call it from .ci/run after deploy/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/ci/install_prometheus.sh
.venv/bin/python -m pip install -q -r deploy/ci/requirements.txt
echo "deploy test tools ready"
