"""One error type for every failure the API reports, rendered as the OpenAI error envelope
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status."""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = [
    "APIError",
    "invalid_request",
    "authentication_error",
    "permission_error",
    "not_found",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "shutting_down",
    "overloaded",
    "not_ready",
    "timeout_error",
    "internal_error",
    "error_body",
]


class APIError(Exception):
    """An error with its HTTP status and OpenAI envelope fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(error: APIError) -> bytes:
    return json.dumps(error.envelope()).encode("utf-8")


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def authentication_error(message: str) -> APIError:
    return APIError(401, message, "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def permission_error(message: str) -> APIError:
    return APIError(403, message, "permission_error", None, "forbidden")


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, "not_found_error", param, code)


def method_not_allowed(message: str) -> APIError:
    return APIError(405, message, "invalid_request_error", None, "method_not_allowed")


def payload_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body exceeds {limit} bytes (the server's --max-body-bytes)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def unsupported_media_type(given: str | None) -> APIError:
    what = f"Content-Type {given!r}" if given else "no Content-Type"
    return APIError(
        415,
        f"the request body has {what}; send JSON with 'Content-Type: application/json'",
        "invalid_request_error",
        None,
        "unsupported_media_type",
    )


def shutting_down(drain_s: float) -> APIError:
    return APIError(
        503,
        f"the server is shutting down and this request was still running after the drain timeout ({drain_s:g} s, "
        "--drain-timeout-s); retry it",
        "service_unavailable",
        None,
        "shutting_down",
        {"Retry-After": "1"},
    )


def overloaded(retry_after_s: int) -> APIError:
    return APIError(
        429,
        "the server is at its concurrency and queue limits; retry after the Retry-After seconds",
        "rate_limit_error",
        None,
        "server_overloaded",
        {"Retry-After": str(int(retry_after_s))},
    )


def not_ready(message: str = "the model is loading; retry when GET /ready answers 200") -> APIError:
    return APIError(503, message, "service_unavailable", None, "not_ready", {"Retry-After": "5"})


def timeout_error(seconds: float) -> APIError:
    return APIError(
        504,
        f"the request took longer than {seconds:g} s (the server's --request-timeout-s)",
        "timeout_error",
        None,
        "request_timeout",
    )


def internal_error(message: str = "internal server error") -> APIError:
    return APIError(500, message, "internal_server_error", None, "internal_error")
