#!/usr/bin/env bash
# Install Debian's prometheus package (prometheus + promtool) when promtool is missing. Idempotent; needs root
# (CI runs as root) or sudo. It starts no daemon: the tests start their own Prometheus on 127.0.0.1.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "prometheus present: $(promtool --version 2>&1 | head -n 1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package may enable a service on systems with an init; the tests never rely on it.
echo "prometheus installed: $(promtool --version 2>&1 | head -n 1)"
