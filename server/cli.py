"""``python -m server`` / ``sdm-serve``: validate the configuration, then serve with uvicorn.

SIGTERM (or Ctrl+C) stops accepting connections, lets in-flight requests finish (up to ``--drain-timeout-s``;
those still running then get a 503 envelope, streams an error event and ``[DONE]``), closes the model, and exits 0.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from server.config import ServerConfig

__all__ = ["main", "build_server"]

# uvicorn's own drain limit runs this much longer than the app's, so the app answers what still runs (503) before
# uvicorn cancels it.
_BACKSTOP_S = 2


def build_server(app: FastAPI, config: ServerConfig, *, port: int | None = None) -> uvicorn.Server:
    """The uvicorn server for ``app``: on the first SIGTERM / SIGINT it starts the app's drain clock."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit:
                app.state.server.begin_drain()
            super().handle_exit(sig, frame)

    return DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port if port is None else port,
            log_config=None,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(math.ceil(config.drain_timeout_s)) + _BACKSTOP_S,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    from server.config import ConfigError, ServerConfig

    try:
        config = ServerConfig.from_sources(argv)
        config.check_runtime()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from server.app import create_app
    from server.logs import configure_logging

    configure_logging(config.log_level)
    app = create_app(config)
    server = build_server(app, config)
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
