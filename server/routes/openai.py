"""What the OpenAI-compatible routes share: the OpenAI features this server refuses (400 naming the field), and the
answer streamed as server-sent events or returned whole."""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from typing import ClassVar

from starlette.requests import Request

from server.bodies import parse_request, read_json
from server.errors import APIError, invalid_request
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
    answered_by: str | None = None  # the served model a copy bound to one answer names (:meth:`bound`)

    def __init__(self, executor: RequestExecutor) -> None:
        self.executor = executor

    async def handle(self, request: Request):
        started = time.perf_counter()
        body = parse_request(self.request_model, await read_json(request))
        self.check_supported(body)
        # The body's model picks the served bundle (404 for a name this server does not serve).
        draft = body.to_verification(self.executor.config.default_max_tokens)
        plan = self.executor.plan(self.route, draft, body.model or None)
        serving = self.bound(plan)
        if body.stream:  # the stream releases the model when it ends
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_answer(self.executor, plan, request, started, serving, include_usage)
        try:
            done = await self.executor.execute(plan, request, started)
        finally:
            self.executor.release(plan)
        return serving.response(plan, done)

    def bound(self, plan: Plan) -> OpenAIServing:
        """This serving for one answer: its response and chunks name the served model that answers ``plan``."""
        serving = copy.copy(self)
        serving.answered_by = plan.served.facts["model"]
        return serving

    def check_supported(self, body) -> None:
        """400 for the OpenAI features both routes refuse."""
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
        """The model responses name: the served model that answers (a bound copy), else the default one."""
        return self.answered_by if self.answered_by is not None else self.executor.config.served_model_name
