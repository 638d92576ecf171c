#!/usr/bin/env bash
# Everything the deploy and traffic-store tests need beyond deploy/setup.sh: promtool/prometheus and postgresql (Debian), and the Python tools of
# deploy/ci/requirements.txt in .venv. Idempotent. Call it from .ci/run after deploy/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/ci/install_prometheus.sh
# PostgreSQL's initdb/pg_ctl: the traffic-store tests start a server of their own (tests/pg_support.py).
bash deploy/ci/install_postgresql.sh
.venv/bin/python -m pip install -q -r deploy/ci/requirements.txt
echo "deploy test tools ready"
