"""``GET /health`` (liveness), ``GET /ready`` (readiness: every served model and head loaded and warmed up, with
each model's state and facts) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.errors import APIError
from server.metrics import CONTENT_TYPE_LATEST
from server.routes.common import GET_ERRORS, server_state

if TYPE_CHECKING:
    from server.model_manager import ModelManager

__all__ = ["router"]

router = APIRouter()


@router.get("/health", summary="Liveness: 200 while the process runs")
async def health() -> dict:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: 200 once every served model and head are loaded and warmed up",
    responses=GET_ERRORS,
)
async def ready(request: Request) -> Response:
    state = server_state(request)
    manager = state.manager
    models = _models(manager)
    if manager.ready:
        facts = manager.current.facts
        # A bundle is named by its folder name, never by a host path.
        return JSONResponse(
            {
                "status": "ready",
                "model": facts["model"],
                "bundle": Path(facts["bundle"]).name,
                "head_version": facts["head_version"],
                "traffic_store": state.traffic.status(),
                "models": models,
            }
        )
    message = f"not ready: {manager.state}" + (f" ({manager.error})" if manager.error else "")
    pending = [m for m in models if m["state"] in ("waiting", "loading", "warming_up")]
    if len(models) > 1 and manager.state in ("loading", "warming_up") and pending:
        message += "; still loading: " + ", ".join(f"{m['model']!r} ({m['state']})" for m in pending)
    error = APIError(503, message, "service_unavailable", None, manager.state, {"Retry-After": "5"})
    return JSONResponse(error.envelope() | {"models": models}, status_code=503, headers=error.headers)


def _models(manager: ModelManager) -> list[dict]:
    """Every served model, the default first: its state (server/model_manager.py) and, once loaded, its bundle's
    facts (those /v1/models shows, the certification as its one-line summary)."""
    models = []
    for name in manager.names:
        entry: dict = {"model": name, "state": manager.model_states[name]}
        served = manager.served.get(name)
        if served is not None:
            facts = served.facts
            certification = facts.get("certification")
            entry |= {
                "bundle": Path(facts["bundle"]).name,
                "bundle_sha256": facts["bundle_sha256"],
                "head_version": facts["head_version"],
                "model_kind": facts["model_kind"],
                "default_alpha": facts["default_alpha"],
                "certification": certification["summary"] if certification else None,
            }
        models.append(entry)
    return models


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=PlainTextResponse,
    responses=GET_ERRORS,
)
async def prometheus(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
