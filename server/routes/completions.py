"""``POST /v1/completions``: OpenAI-compatible completions, each choice with its ``sdm`` verification."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request

from server.execution import Completed, Plan
from server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
)
from server.routes.common import ERRORS, STREAMED, body_schema, server_state
from server.routes.openai import OpenAIServing, unsupported

__all__ = ["router", "CompletionServing"]


class CompletionServing(OpenAIServing):
    route = "/v1/completions"
    request_model = CompletionRequest

    def check_supported(self, body: CompletionRequest) -> None:
        super().check_supported(body)
        if body.echo:
            raise unsupported("echo", "is not supported")
        if body.logprobs is not None:
            raise unsupported("logprobs", "is not supported")
        if body.best_of not in (None, 1):
            raise unsupported("best_of", "is not supported (use max_attempts)")
        if body.suffix:
            raise unsupported("suffix", "is not supported")

    def response(self, plan: Plan, done: Completed) -> CompletionResponse:
        r = done.result
        choice = CompletionChoice(index=0, text=r.text or "", finish_reason=r.finish_reason, sdm=done.verification())
        return CompletionResponse(id=plan.response_id, model=self.model_name, choices=[choice], usage=done.usage())

    # -- stream chunks (server.streaming.ChunkWriter) --
    def first_chunk(self, response_id: str, created: int) -> None:
        return None

    def text_chunk(self, response_id: str, created: int, text: str) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=response_id, created=created, model=self.model_name, choices=[CompletionStreamChoice(text=text)]
        )

    def final_chunk(
        self, response_id: str, created: int, done: Completed, include_usage: bool
    ) -> CompletionStreamResponse:
        choice = CompletionStreamChoice(text="", finish_reason=done.result.finish_reason, sdm=done.verification())
        return CompletionStreamResponse(
            id=response_id,
            created=created,
            model=self.model_name,
            choices=[choice],
            usage=done.usage() if include_usage else None,
        )


router = APIRouter()


@router.post(
    CompletionServing.route,
    responses={**ERRORS, 200: {"model": CompletionResponse, "content": STREAMED}},
    openapi_extra=body_schema(CompletionRequest),
    summary="OpenAI-compatible completions (+ sdm)",
)
async def completions(request: Request):
    return await server_state(request).completions.handle(request)
