"""``GET /health`` (liveness), ``GET /ready`` (readiness: the model and head loaded and warmed up) and
``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.errors import APIError
from server.metrics import CONTENT_TYPE_LATEST
from server.routes.common import GET_ERRORS, server_state

__all__ = ["router"]

router = APIRouter()


@router.get("/health", summary="Liveness: 200 while the process runs")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 200 once the model and head are loaded and warmed up", responses=GET_ERRORS)
async def ready(request: Request) -> Response:
    state = server_state(request)
    manager = state.manager
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
            }
        )
    message = f"not ready: {manager.state}" + (f" ({manager.error})" if manager.error else "")
    error = APIError(503, message, "service_unavailable", None, manager.state, {"Retry-After": "5"})
    return JSONResponse(error.envelope(), status_code=503, headers=error.headers)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=PlainTextResponse,
    responses=GET_ERRORS,
)
async def prometheus(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
