"""Container health check: exit 0 when the server's ``GET /ready`` answers 200, else 1.

Used by the Dockerfiles' HEALTHCHECK and by the Kubernetes readiness and startup probes (deploy/k8s/). It sends
the first configured API key (``SDM_API_KEYS`` or ``SDM_API_KEY_FILE``), because ``/ready`` needs one when keys
are configured; it reads ``SDM_PORT`` and ``SDM_HOST`` like the server. Standard library only.

    python3 deploy/docker/healthcheck.py [PATH]     # PATH defaults to /ready (/health for liveness)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0  # below the HEALTHCHECK --timeout and the probes' timeoutSeconds


def api_key() -> str | None:
    keys = [k.strip() for k in os.environ.get("SDM_API_KEYS", "").split(",") if k.strip()]
    if keys:
        return keys[0]
    path = os.environ.get("SDM_API_KEY_FILE", "")
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line and not line.startswith("#"):
                    return line
    return None


def url(path: str) -> str:
    host = os.environ.get("SDM_HOST", "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('SDM_PORT', '8000').strip() or '8000'}{path}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/ready"
    request = urllib.request.Request(url(path))
    key = api_key()
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        print(f"{path}: HTTP {exc.code}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
