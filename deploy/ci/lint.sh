#!/usr/bin/env bash
# Lint, format check and type check, as .ci/run runs them before the tests. ruff and mypy come from the dev extra
# (deploy/setup.sh installs it into .venv); their settings live in pyproject.toml. Runs every check, then fails if
# any failed, so one run reports everything.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
status=0
echo "== ruff check"
"$PYTHON" -m ruff check . || status=1
echo "== ruff format --check"
"$PYTHON" -m ruff format --check . || status=1
echo "== mypy (sdm_core)"
"$PYTHON" -m mypy || status=1
if [ "$status" -ne 0 ]; then
  echo "lint failed: fix the findings above (ruff check --fix and ruff format fix most of them)" >&2
fi
exit "$status"
