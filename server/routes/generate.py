"""``POST /generate``: one prompt (or chat), its text and its verification in one flat object."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.requests import Request

from server.bodies import parse_request, read_json
from server.execution import RequestExecutor
from server.protocol import GenerateRequest, GenerateResponse
from server.routes.common import ERRORS, body_schema, server_state

__all__ = ["router", "GenerateServing"]

ROUTE = "/generate"


class GenerateServing:
    def __init__(self, executor: RequestExecutor) -> None:
        self.executor = executor

    async def handle(self, request: Request) -> GenerateResponse:
        started = time.perf_counter()
        body = parse_request(GenerateRequest, await read_json(request))
        plan = self.executor.plan(ROUTE, body.to_verification(self.executor.config.default_max_tokens), body.model)
        try:
            done = await self.executor.execute(plan, request, started)
        finally:
            self.executor.release(plan)
        return GenerateResponse(
            id=plan.response_id,
            model=plan.served.facts["model"],
            text=done.result.text,
            **done.verdict(),
            finish_reason=done.result.finish_reason,
            usage=done.usage(),
            timings=done.timings(),
        )


router = APIRouter()


@router.post(
    ROUTE,
    response_model=GenerateResponse,
    responses=ERRORS,
    openapi_extra=body_schema(GenerateRequest),
    summary="Generate, verify, and return the text with its calibrated probability or an abstention",
)
async def generate(request: Request) -> GenerateResponse:
    return await server_state(request).generate.handle(request)
