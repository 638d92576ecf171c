"""The ASGI middleware in front of every route: request id (``X-Request-Id``), API-key check, body size limit,
and one access log line per request. Pure ASGI (no BaseHTTPMiddleware), so streaming and disconnects pass
through untouched."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Awaitable, Callable, Iterable

from server.errors import APIError, authentication_error, error_body, internal_error, payload_too_large
from server.logs import request_id_var

__all__ = ["RequestContextMiddleware", "new_request_id"]

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_QUIET_PATHS = {"/health", "/ready", "/metrics"}  # probes and scrapes: access lines at debug level

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(
        self,
        app,
        *,
        api_keys: Iterable[str],
        open_paths: Iterable[str],
        max_body_bytes: int,
        on_error: Callable[[str, int], None] | None = None,
        route_label: Callable[[str], str] = lambda path: path,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.api_keys = [k.encode("utf-8") for k in api_keys]
        self.open_paths = set(open_paths)
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error
        self.route_label = route_label
        self.logger = logger or logging.getLogger("sdm.server.access")

    def _check_key(self, scope: Scope) -> APIError | None:
        if not self.api_keys or scope.get("path") in self.open_paths:
            return None
        header = _header(scope, b"authorization")
        if not header:
            return authentication_error("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return authentication_error("malformed Authorization header: use 'Authorization: Bearer <key>'")
        given = token.strip().encode("utf-8")
        if not any(hmac.compare_digest(given, key) for key in self.api_keys):
            return authentication_error("invalid API key")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else new_request_id()
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            error = self._check_key(scope)
            if error is None and scope.get("method") in _BODY_METHODS:
                replay, error = await self._read_body(scope, receive)
                if replay is not None:
                    receive = replay
            if error is not None:
                if self.on_error is not None:
                    self.on_error(self.route_label(scope.get("path", "")), error.status)
                await self._send_error(send_with_id, error)
                return
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:  # noqa: BLE001 - answered here so that the 500 keeps the request id
                self.logger.error("unhandled error", exc_info=True)
                if self.on_error is not None:
                    self.on_error(self.route_label(scope.get("path", "")), 500)
                if not status["code"]:
                    await self._send_error(send_with_id, internal_error("internal server error; see the server log for this request id"))
        finally:
            quiet = scope.get("path") in _QUIET_PATHS and 0 < status["code"] < 400
            self.logger.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %s",
                scope.get("method"),
                scope.get("path"),
                status["code"] or "-",
                extra={"method": scope.get("method"), "path": scope.get("path"), "status": status["code"] or None,
                       "duration_ms": round((time.perf_counter() - started) * 1000.0, 2),
                       "client": (scope.get("client") or ("", 0))[0]},
            )
            request_id_var.reset(token)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive | None, APIError | None]:
        """Read the whole body (refusing it past the limit), then replay it to the app."""
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None, payload_too_large(self.max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                pending = [message]

                async def disconnected() -> Message:
                    return pending[0]

                return disconnected, None
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return None, payload_too_large(self.max_body_bytes)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = {"done": False}
        data = b"".join(chunks)

        async def replay() -> Message:
            if not replayed["done"]:
                replayed["done"] = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay, None

    @staticmethod
    async def _send_error(send: Send, error: APIError) -> None:
        body = error_body(error)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
