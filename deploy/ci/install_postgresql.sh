#!/usr/bin/env bash
# Install Debian's postgresql package (initdb, pg_ctl) when it is missing, for the traffic-store tests
# (tests/pg_support.py starts a throw-away server of its own). Idempotent; needs root (CI runs as root) or sudo.
# It starts no daemon.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  echo "postgresql present: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | head -n 1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# Debian's package may create and start a cluster on systems with an init; the tests never use it.
echo "postgresql installed: $(ls -d /usr/lib/postgresql/*/bin | head -n 1)"
