"""The ASGI middleware in front of every route: request id (``X-Request-Id``), API-key check (client keys for the
API, admin keys for ``/admin/*``), JSON-only bodies, body size limit, and one access log line per request. Pure
ASGI (no BaseHTTPMiddleware), so streaming and disconnects pass through untouched.

The request id is always the server's own (clients cannot make two requests share one); an id the client sends in
``X-Request-Id`` or ``X-Client-Request-Id`` is kept apart as ``client_request_id`` (log field and
``X-Client-Request-Id`` response header). The access line names the key by ``key_id`` (the first 12 hex digits of
its SHA-256), never by the key."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

from server.errors import (
    APIError,
    authentication_error,
    error_body,
    internal_error,
    payload_too_large,
    permission_error,
    shutting_down,
    unsupported_media_type,
)
from server.logs import client_request_id_var, key_id_var, request_id_var

__all__ = ["RequestContextMiddleware", "new_request_id", "key_id", "ADMIN_PREFIX"]

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_QUIET_PATHS = {"/health", "/ready", "/metrics"}  # probes and scrapes: access lines at debug level
ADMIN_PREFIX = "/admin/"

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def key_id(key: str) -> str:
    """What logs call a key: the first 12 hex digits of its SHA-256 (``printf %s KEY | sha256sum | cut -c1-12``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json"


class RequestContextMiddleware:
    def __init__(
        self,
        app,
        *,
        api_keys: Iterable[str],
        open_paths: Iterable[str],
        max_body_bytes: int,
        admin_keys: Iterable[str] = (),
        drain_timeout_s: float = 0.0,
        on_error: Callable[[str, int], None] | None = None,
        route_label: Callable[[str], str] = lambda path: path,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.api_keys = [(k.encode("utf-8"), key_id(k)) for k in api_keys]
        self.admin_keys = [(k.encode("utf-8"), key_id(k)) for k in admin_keys]
        self.open_paths = set(open_paths)
        self.max_body_bytes = max_body_bytes
        self.drain_timeout_s = drain_timeout_s
        self.on_error = on_error
        self.route_label = route_label
        self.logger = logger or logging.getLogger("sdm.server.access")

    @staticmethod
    def _match(given: bytes, keys: list[tuple[bytes, str]]) -> str | None:
        found = None
        for key, kid in keys:  # every key compared (timing does not tell which one matched)
            if hmac.compare_digest(given, key):
                found = kid
        return found

    def _check_key(self, scope: Scope) -> tuple[APIError | None, str | None]:
        """(error, key id): 401 without a valid key, 403 for a client key on an admin route."""
        path = scope.get("path") or ""
        admin = path.startswith(ADMIN_PREFIX)
        if admin and not self.admin_keys and not self.api_keys:
            return permission_error(
                f"{path} is disabled: the server has no admin keys; set SDM_ADMIN_API_KEYS (or --admin-api-keys)"
            ), None
        if not admin and (path in self.open_paths or not self.api_keys):
            return None, None
        header = _header(scope, b"authorization")
        if not header:
            return authentication_error("missing API key: send the header 'Authorization: Bearer <key>'"), None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return authentication_error("malformed Authorization header: use 'Authorization: Bearer <key>'"), None
        given = token.strip().encode("utf-8")
        admin_id = self._match(given, self.admin_keys)
        client_id = self._match(given, self.api_keys)
        if admin_id is not None:
            return None, admin_id
        if client_id is None:
            return authentication_error("invalid API key"), None
        if admin:
            if not self.admin_keys:
                return permission_error(
                    f"{path} is refused: the server has client keys but no admin keys; set SDM_ADMIN_API_KEYS (or "
                    "--admin-api-keys)"
                ), client_id
            return permission_error(f"{path} needs an admin key; this is a client key"), client_id
        return None, client_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-client-request-id") or _header(scope, b"x-request-id")
        client_id = incoming if incoming and _SAFE_ID.match(incoming) else None
        request_id = new_request_id()
        tokens = [
            (request_id_var, request_id_var.set(request_id)),
            (client_request_id_var, client_request_id_var.set(client_id)),
        ]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_id
        started = time.perf_counter()
        status = {"code": 0, "sse": False, "complete": False}
        kid: str | None = None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                drop = {b"x-request-id", b"x-client-request-id"}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
                status["sse"] = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                if client_id:
                    headers.append((b"x-client-request-id", client_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["complete"] = True
            await send(message)

        try:
            error, kid = self._check_key(scope)
            if kid is not None:
                tokens.append((key_id_var, key_id_var.set(kid)))
                state["key_id"] = kid
            if error is None and scope.get("method") in _BODY_METHODS:
                replay, error, body = await self._read_body(scope, receive)
                if replay is not None:
                    receive = replay
                if error is None and body and body.strip() and not _is_json(_header(scope, b"content-type")):
                    # Browsers send text/plain (and forms) cross-origin without a CORS preflight; JSON needs one.
                    error = unsupported_media_type(_header(scope, b"content-type"))
            if error is not None:
                if self.on_error is not None:
                    self.on_error(self.route_label(scope.get("path", "")), error.status)
                await self._send_error(send_with_id, error)
                return
            try:
                await self.app(scope, receive, send_with_id)
            except asyncio.CancelledError:
                # The server cancels what still runs when the drain timeout ends: answer it in the API's terms.
                await self._answer_cancelled(send_with_id, status)
                raise
            except Exception:  # noqa: BLE001 - answered here so that the 500 keeps the request id
                self.logger.error("unhandled error", exc_info=True)
                if self.on_error is not None:
                    self.on_error(self.route_label(scope.get("path", "")), 500)
                if not status["code"]:
                    await self._send_error(
                        send_with_id, internal_error("internal server error; see the server log for this request id")
                    )
        finally:
            quiet = scope.get("path") in _QUIET_PATHS and 0 < status["code"] < 400
            self.logger.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %s",
                scope.get("method"),
                scope.get("path"),
                status["code"] or "-",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status["code"] or None,
                    "duration_ms": round((time.perf_counter() - started) * 1000.0, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                    "request_id": request_id,
                    "client_request_id": client_id,
                    "key_id": kid,
                },
            )
            for var, token in reversed(tokens):
                var.reset(token)

    async def _answer_cancelled(self, send: Send, status: dict) -> None:
        error = shutting_down(self.drain_timeout_s)
        try:
            if not status["code"]:
                await self._send_error(send, error)
            elif status["sse"] and not status["complete"]:
                events = "data: " + json.dumps(error.envelope()) + "\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": events.encode("utf-8"), "more_body": False})
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive | None, APIError | None, bytes]:
        """Read the whole body (refusing it past the limit), then replay it to the app."""
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None, payload_too_large(self.max_body_bytes), b""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                pending = [message]

                async def disconnected() -> Message:
                    return pending[0]  # noqa: B023 - returned at once; the loop never rebinds it

                return disconnected, None, b""
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return None, payload_too_large(self.max_body_bytes), b""
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

        return replay, None, data

    @staticmethod
    async def _send_error(send: Send, error: APIError) -> None:
        body = error_body(error)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
