"""``POST /admin/reload`` (admin keys only): swap in a bundle, by name under --bundles-root, or re-read the served
one, without dropping requests in flight. ``model`` names which served model to swap (default: the default one);
the others keep serving. Responses name bundles by folder name, never by host path."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request

from server.bodies import parse_request, read_json
from server.config import ServerConfig
from server.errors import APIError, invalid_request, permission_error
from server.protocol import BUNDLE_NAME_PATTERN, ReloadRequest
from server.routes.common import ADMIN_ERRORS, body_schema, server_state

__all__ = ["router", "reload_target"]

router = APIRouter()


@router.post(
    "/admin/reload",
    responses=ADMIN_ERRORS,
    openapi_extra=body_schema(ReloadRequest, required=False),
    summary="Swap in a bundle (by name, under --bundles-root; default: re-read the served one) without dropping "
    "in-flight requests",
)
async def reload(request: Request) -> dict:
    state = server_state(request)
    config, manager, metrics = state.config, state.manager, state.metrics
    if not config.admin_enabled:  # the middleware refuses first; this keeps the route closed whatever the middleware
        raise permission_error(
            "POST /admin/reload is disabled without admin keys: set SDM_ADMIN_API_KEYS (or --admin-api-keys)"
        )
    previous = None
    try:
        raw = await request.body()
        body = parse_request(ReloadRequest, await read_json(request)) if raw.strip() else ReloadRequest()
        old = manager.served.get(body.model or manager.model_name)
        previous = old.facts if old is not None else None
        served = await manager.reload(reload_target(config, body.bundle), name=body.model)
    except APIError:
        metrics.reloads.labels(result="failed").inc()
        raise
    metrics.reloads.labels(result="ok").inc()
    return {
        "status": "reloaded",
        "model": served.facts["model"],
        "bundle": Path(served.facts["bundle"]).name,
        "head_version": served.facts["head_version"],
        "previous_bundle": Path(previous["bundle"]).name if previous else None,
    }


def reload_target(config: ServerConfig, name: str | None) -> str | None:
    """The folder a reload names: a sub-folder of --bundles-root, by name (never a path the client chose)."""
    if name is None:
        return None
    if not config.bundles_root:
        raise invalid_request(
            "naming a bundle needs a bundles root on the server (--bundles-root / SDM_BUNDLES_ROOT); "
            "without one, send no bundle to re-read the served bundle",
            "bundle",
            "invalid_bundle",
        )
    if not re.fullmatch(BUNDLE_NAME_PATTERN, name):
        raise invalid_request(
            f"bundle must be the name of a folder under the bundles root (letters, digits, '.', '_', '-'; "
            f"not starting with '.'), not a path; got {name!r}",
            "bundle",
            "invalid_bundle",
        )
    path = Path(config.bundles_root).expanduser() / name
    if not (path / "bundle.json").is_file():
        raise invalid_request(
            f"there is no bundle named {name!r} under the bundles root (a folder holding a bundle.json)",
            "bundle",
            "invalid_bundle",
        )
    return str(path)
