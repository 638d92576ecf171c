"""``POST /v1/feedback``: labels for served answers (server/feedback.py handles them)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request

from server.feedback import feedback_body_schema
from server.protocol import ErrorResponse
from server.routes.common import ERRORS, server_state

__all__ = ["router"]

router = APIRouter()


@router.post(
    "/v1/feedback",
    responses={**ERRORS, 503: {"model": ErrorResponse}},
    openapi_extra=feedback_body_schema(),
    summary="Label served answers (correct, wrong, ood) by response id; one object or a list",
)
async def post_feedback(request: Request) -> dict:
    return await server_state(request).feedback.handle(request)
