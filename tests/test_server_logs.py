"""server.logs: JSON log lines carry the request id of the request being served."""

from __future__ import annotations

import io
import json
import logging
import threading


def test_json_logs_carry_the_request_id() -> None:
    from server.logs import JsonFormatter, RequestIdFilter, request_id_var

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("sdm.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        token = request_id_var.set("req-abc")
        logger.info("inside", extra={"route": "/generate"})
        request_id_var.reset(token)
        logger.info("outside")
        thread = threading.Thread(target=lambda: logger.info("thread"))
        thread.start()
        thread.join()
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["request_id"] == "req-abc" and lines[0]["route"] == "/generate" and lines[0]["message"] == "inside"
    assert lines[1]["request_id"] is None and lines[1]["message"] == "outside"
    assert lines[2]["request_id"] is None and lines[2]["message"] == "thread"  # another thread serves no request
