"""What the OpenAI-compatible routes share: the OpenAI features this server refuses (400 naming the field), and the
answer streamed as server-sent events or returned whole."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar

from starlette.requests import Request

from server.bodies import parse_request, read_json
from server.errors import APIError, invalid_request, not_found
from server.execution import Completed, Plan, RequestExecutor
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.streaming import stream_answer

__all__ = ["OpenAIServing", "unsupported"]


def unsupported(param: str, message: str) -> APIError:
    return invalid_request(f"{param}: {message}", param, "unsupported_parameter")


class OpenAIServing(ABC):
    """One OpenAI-compatible route; subclasses name the route and request model, check their own unsupported fields,
    and write the response and the stream chunks (:class:`server.streaming.ChunkWriter`)."""

    route: ClassVar[str]
    request_model: ClassVar[type[CompletionRequest] | type[ChatCompletionRequest]]

    def __init__(self, executor: RequestExecutor) -> None:
        self.executor = executor

    async def handle(self, request: Request):
        started = time.perf_counter()
        body = parse_request(self.request_model, await read_json(request))
        self.check_supported(body)
        plan = self.executor.plan(self.route, body.to_verification(self.executor.config.default_max_tokens))
        if body.stream:  # the stream releases the model when it ends
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_answer(self.executor, plan, request, started, self, include_usage)
        try:
            done = await self.executor.execute(plan, request, started)
        finally:
            self.executor.release(plan)
        return self.response(plan, done)

    def check_supported(self, body) -> None:
        """404 for another model's name; 400 for the OpenAI features both routes refuse."""
        name = self.executor.config.served_model_name
        if body.model and body.model != name:
            raise not_found(
                f"the model {body.model!r} does not exist; this server serves {name!r} (GET /v1/models)",
                "model",
                "model_not_found",
            )
        if body.n != 1:
            raise unsupported("n", "only n = 1 is supported (use max_attempts to resample until admitted)")
        if body.logit_bias:
            raise unsupported("logit_bias", "is not supported")
        if body.presence_penalty or body.frequency_penalty:
            raise unsupported(
                "presence_penalty" if body.presence_penalty else "frequency_penalty", "is not supported (only 0)"
            )

    @abstractmethod
    def response(self, plan: Plan, done: Completed):
        """The route's whole (not streamed) response."""

    @property
    def model_name(self) -> str:
        return self.executor.config.served_model_name
