"""The app's OpenAPI schema: FastAPI's, with the request bodies' models in the components and the limits this server
enforces (they are settings, so the request models cannot carry them) written in, so the schema equals behaviour."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from fastapi import APIRouter, FastAPI

from server.config import ServerConfig
from server.feedback import set_feedback_limits

__all__ = ["openapi_schema"]

# The limits this server enforces on generation requests (they are settings, so they are not in the models).
_LIMITED_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


def _set_maximum(schema: dict, value: int) -> None:
    """Set ``maximum`` on an integer property schema (or its integer branch)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = value


def _json_body(operation: dict) -> dict:
    """The JSON request body schema of an OpenAPI operation ({} when it has none)."""
    return operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})


def openapi_schema(app: FastAPI, config: ServerConfig, routers: Sequence[APIRouter]) -> Callable[[], dict]:
    """The app's OpenAPI schema: FastAPI's, with the request bodies' models moved to the components and this
    server's limits written in. Built once per app, on a copy (the routers' declarations are shared by every app)."""
    base = app.openapi
    built: dict = {}

    def openapi() -> dict:
        if built:
            return built
        schema = copy.deepcopy(base())
        known = schema.setdefault("components", {}).setdefault("schemas", {})
        for route in (route for router in routers for route in router.routes):
            extra = getattr(route, "openapi_extra", None) or {}
            # As declared (FastAPI's rendering of the operation drops the models' null defaults).
            for name, value in _json_body(extra).get("$defs", {}).items():
                known.setdefault(name, copy.deepcopy(value))
        for operations_ in schema["paths"].values():
            for operation in operations_.values():
                _json_body(operation).pop("$defs", None)
        limits = {
            "max_tokens": config.max_tokens_cap,
            "max_completion_tokens": config.max_tokens_cap,
            "return_exemplars": config.max_exemplars,
            "max_attempts": config.max_attempts_cap,
        }
        for path in _LIMITED_PATHS:
            properties = _json_body(schema["paths"][path]["post"]).get("properties", {})
            for name, value in limits.items():
                if name in properties:
                    _set_maximum(properties[name], value)
        set_feedback_limits(_json_body(schema["paths"]["/v1/feedback"]["post"]), known["FeedbackItem"], config)
        built.update(schema)
        return built

    return openapi
