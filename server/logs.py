"""JSON logs, one object a line, each with the request id of the request being served (``null`` outside one), and,
inside a request, the id of the API key it used (``key_id``, never the key) and the client's own request id
(``client_request_id``) when it sent one."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

__all__ = [
    "request_id_var",
    "client_request_id_var",
    "key_id_var",
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "LOGGER_NAME",
]

LOGGER_NAME = "sdm.server"
request_id_var: ContextVar[str | None] = ContextVar("sdm_request_id", default=None)
client_request_id_var: ContextVar[str | None] = ContextVar("sdm_client_request_id", default=None)
key_id_var: ContextVar[str | None] = ContextVar("sdm_key_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id (a handler filter, so third-party loggers get it too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        for name, var in (("client_request_id", client_request_id_var), ("key_id", key_id_var)):
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = (
                    value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
                )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "info", stream=None) -> None:
    """Route the root, uvicorn and server loggers to one JSON handler (called by the CLI, not by create_app)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # The server writes its own access line (with the request id); uvicorn's would duplicate it without one.
    logging.getLogger("uvicorn.access").disabled = True
    try:  # transformers logs through its own handler and draws progress bars: route it through ours, no bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
