"""What the route modules declare alike in OpenAPI: their error responses and the request bodies of routes that
parse their bodies themselves (for exact 400s), and how a handler finds its app's state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel
from starlette.requests import Request

from server.protocol import ErrorResponse

if TYPE_CHECKING:
    from server.app import ServerState

__all__ = ["ERRORS", "GET_ERRORS", "ADMIN_ERRORS", "STREAMED", "body_schema", "server_state"]

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 500, 503, 504)}
GET_ERRORS = {status: {"model": ErrorResponse} for status in (401, 500, 503)}
ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 500, 503)}
STREAMED = {
    "text/event-stream": {
        "schema": {"type": "string", "description": "server-sent events (stream: true): chunks, then data: [DONE]"}
    }
}


def body_schema(model: type[BaseModel], required: bool = True) -> dict:
    """OpenAPI request body (``openapi_extra``) for a route that parses its body itself. The models it refers to stay
    in its ``$defs``; the app moves them to the components (server/app.py)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def server_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server
