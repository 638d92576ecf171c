"""``POST /v1/chat/completions``: OpenAI-compatible chat completions, each choice with its ``sdm`` verification and,
when the text was withheld, the abstention in words in ``message.refusal``."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request

from server.execution import Completed, Plan
from server.pipeline import VerificationResult
from server.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
)
from server.routes.common import ERRORS, STREAMED, body_schema, server_state
from server.routes.openai import OpenAIServing, unsupported

__all__ = ["router", "ChatServing", "refusal"]

_REASONS = {
    "ood": "the output is unlike every example the verifier was trained on (out of distribution)",
    "no_region": "the verifier has no calibrated high-reliability region at this alpha",
    "low_similarity": "the output is too unlike the verifier's training examples for its high-reliability region",
    "below_threshold": "the verifier's probability is below the admission threshold",
    "predicted_no": "the verifier predicts that the output did not follow the instructions",
}


def refusal(result: VerificationResult) -> str:
    """``message.refusal`` of a withheld answer: the abstention in words (OpenAI clients have no other field for it)."""
    reason = result.best.abstention_reason or "below_threshold"
    return (
        f"abstained ({reason}): {_REASONS.get(reason, reason)}; the answer was withheld "
        f"(probability {result.best.probability:.3f} at alpha {result.alpha:g}; see choices[0].sdm)"
    )


class ChatServing(OpenAIServing):
    route = "/v1/chat/completions"
    request_model = ChatCompletionRequest

    def check_supported(self, body: ChatCompletionRequest) -> None:
        super().check_supported(body)
        if body.logprobs or body.top_logprobs:
            raise unsupported("logprobs", "is not supported")
        if body.tools or body.functions or body.tool_choice not in (None, "none"):
            raise unsupported("tools", "tool calls are not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "only the text format is supported")

    def response(self, plan: Plan, done: Completed) -> ChatCompletionResponse:
        r = done.result
        message = ChatCompletionMessage(content=r.text, refusal=refusal(r) if r.withheld else None)
        choice = ChatCompletionChoice(index=0, message=message, finish_reason=r.finish_reason, sdm=done.verification())
        return ChatCompletionResponse(id=plan.response_id, model=self.model_name, choices=[choice], usage=done.usage())

    # -- stream chunks (server.streaming.ChunkWriter) --
    def _chunk(self, response_id: str, created: int, delta: DeltaMessage, **choice) -> ChatCompletionStreamResponse:
        usage = choice.pop("usage", None)
        return ChatCompletionStreamResponse(
            id=response_id,
            created=created,
            model=self.model_name,
            choices=[ChatCompletionStreamChoice(delta=delta, **choice)],
            usage=usage,
        )

    def first_chunk(self, response_id: str, created: int) -> ChatCompletionStreamResponse:
        return self._chunk(response_id, created, DeltaMessage(role="assistant", content=""))

    def text_chunk(self, response_id: str, created: int, text: str) -> ChatCompletionStreamResponse:
        return self._chunk(response_id, created, DeltaMessage(content=text))

    def final_chunk(
        self, response_id: str, created: int, done: Completed, include_usage: bool
    ) -> ChatCompletionStreamResponse:
        r = done.result
        delta = DeltaMessage(content=None, refusal=refusal(r) if r.withheld else None)
        return self._chunk(
            response_id,
            created,
            delta,
            finish_reason=r.finish_reason,
            sdm=done.verification(),
            usage=done.usage() if include_usage else None,
        )


router = APIRouter()


@router.post(
    ChatServing.route,
    responses={**ERRORS, 200: {"model": ChatCompletionResponse, "content": STREAMED}},
    openapi_extra=body_schema(ChatCompletionRequest),
    summary="OpenAI-compatible chat completions (+ sdm)",
)
async def chat_completions(request: Request):
    return await server_state(request).chat.handle(request)
