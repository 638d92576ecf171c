"""``python -m server`` / ``sdm-serve``: validate the configuration, then serve with uvicorn.

SIGTERM (or Ctrl+C) stops accepting connections, lets in-flight requests finish (up to ``--drain-timeout-s``),
closes the model, and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from server.config import ConfigError, ServerConfig

    try:
        config = ServerConfig.from_sources(argv)
        config.check_runtime()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging

    configure_logging(config.log_level)
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_config=None,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(max(1, round(config.drain_timeout_s))),
        )
    )
    drained: list[int] = []

    def after_drain(signum: int, frame) -> None:
        # uvicorn handles the signal itself (stop accepting, drain, shutdown) and re-raises it afterwards; this
        # handler receives that re-raise so the process exits 0 instead of dying by the signal.
        drained.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, after_drain)
    server.run()
    logging.getLogger("sdm.server").info("stopped", extra={"signal": drained[0] if drained else None})
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
