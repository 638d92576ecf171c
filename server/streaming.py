"""Server-sent events for the OpenAI routes (``stream: true``): text deltas as they are generated (only when the
text cannot be withheld or replaced), the rest of the final text, a last chunk carrying ``sdm`` (and ``usage``
when asked), then ``data: [DONE]``. A comment line (``: keepalive``) goes out while there is nothing to send, so
proxies keep the stream open; errors after the first byte are an error event, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse

from server.errors import APIError, internal_error, shutting_down, timeout_error
from server.execution import Admitted, Completed, Plan, RequestExecutor
from server.pipeline import VerificationResult

__all__ = ["ChunkWriter", "stream_answer"]


class ChunkWriter(Protocol):
    """How a route writes its stream chunks (the completion and chat chunks differ)."""

    def first_chunk(self, response_id: str, created: int) -> BaseModel | None:
        """The chunk sent before any text (chat: the assistant role), or None."""

    def text_chunk(self, response_id: str, created: int, text: str) -> BaseModel:
        """A chunk carrying a piece of the text."""

    def final_chunk(self, response_id: str, created: int, done: Completed, include_usage: bool) -> BaseModel:
        """The last chunk: the finish reason, ``sdm``, and ``usage`` when asked."""


def _event(data: dict) -> str:
    return "data: " + json.dumps(data) + "\n\n"


def _chunk_event(payload: BaseModel) -> str:
    """A chunk as OpenAI sends it: no ``sdm`` or ``usage`` key until they are known, only the delta's set fields."""
    data = payload.model_dump(mode="json")
    for c in data["choices"]:
        if c.get("sdm") is None:
            c.pop("sdm", None)
        if "delta" in c:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    if data.get("usage") is None:
        data.pop("usage", None)
    return _event(data)


async def stream_answer(
    executor: RequestExecutor, plan: Plan, request: Request, started: float, writer: ChunkWriter, include_usage: bool
) -> StreamingResponse:
    """Take the admission slot (429 before any byte is sent), then answer as a stream. The stream gives back the slot
    and the held model when it ends; if it never starts, this does."""
    try:
        admitted = await executor.admit(plan, request, started)
    except BaseException:
        executor.release(plan)
        raise
    return _EventStream(executor, plan, admitted, started, writer, include_usage).response()


class _EventStream:
    """One streamed answer: the pipeline runs in a task of its own and posts its text and its end on a queue that
    the response body reads."""

    def __init__(
        self,
        executor: RequestExecutor,
        plan: Plan,
        admitted: Admitted,
        started: float,
        writer: ChunkWriter,
        include_usage: bool,
    ) -> None:
        self.executor = executor
        self.plan = plan
        self.admitted = admitted
        self.started = started
        self.writer = writer
        self.include_usage = include_usage
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def response(self) -> StreamingResponse:
        return _ClosingStreamingResponse(
            self.body(),
            on_close=self.close,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def close(self) -> None:
        self.admitted.release()
        self.executor.release(self.plan)

    def on_text(self, delta: str) -> None:
        """Called from the model thread with each piece of text."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", delta))
        except RuntimeError:  # the event loop is closing (shutdown): nobody is listening any more
            pass

    async def produce(self) -> None:
        """Run the pipeline; its result or its error ends the queue."""
        try:
            tracing = self.executor.tracing
            with tracing.span("request", route=self.plan.route, request_id=self.plan.response_id, stream=True) as span:
                span.set(queue_ms=round(self.admitted.queue_s * 1000.0, 3))
                async with asyncio.timeout(self.executor.remaining_s(self.started)):
                    result = await self.plan.served.pipeline.run(self.admitted.request, self.on_text, tracing)
                span.set(admitted=result.best.admitted, attempts=result.attempts)
            self.events.put_nowait(("done", result))
        except TimeoutError:
            self.events.put_nowait(("error", timeout_error(self.executor.config.request_timeout_s)))
        except asyncio.CancelledError:
            raise
        except APIError as exc:
            self.events.put_nowait(("error", exc))
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            self.executor.logger.error("streamed generation failed", exc_info=True)
            self.events.put_nowait(("error", internal_error(f"generation failed: {type(exc).__name__}")))

    def _error(self, error: APIError) -> str:
        self.executor.metrics.observe_error(self.plan.route, error.status)
        return _event(error.envelope())

    async def _next(self, aborted: asyncio.Future) -> tuple[str, Any]:
        """The next event: ("text" | "done" | "error", value), ("keepalive", None) after --sse-keepalive-s of
        nothing, or an error once the drain timeout ends."""
        config = self.executor.config
        got = asyncio.ensure_future(self.events.get())
        finished, _ = await asyncio.wait(
            {got, aborted}, timeout=config.sse_keepalive_s, return_when=asyncio.FIRST_COMPLETED
        )
        if got in finished:
            return got.result()
        got.cancel()
        if aborted in finished:
            return "error", shutting_down(config.drain_timeout_s)
        return "keepalive", None

    def _final(self, result: VerificationResult, streamed: str) -> list[str]:
        """The rest of the final text (what was not streamed yet), then the last chunk."""
        done = self.executor.completed(self.plan, result, self.admitted.queue_s, self.started)
        rid, created, out = self.plan.response_id, self.created, []
        final = done.result.text
        if final:
            if not final.startswith(streamed):
                self.executor.logger.warning(
                    "streamed text is not a prefix of the final text", extra={"streamed": streamed}
                )
            rest = final[len(streamed) :] if final.startswith(streamed) else ""
            if rest:
                out.append(_chunk_event(self.writer.text_chunk(rid, created, rest)))
        out.append(_chunk_event(self.writer.final_chunk(rid, created, done, self.include_usage)))
        return out

    async def body(self) -> AsyncIterator[str]:
        task = asyncio.ensure_future(self.produce())
        aborted = asyncio.ensure_future(self.executor.aborted.wait())
        streamed = ""
        try:
            first = self.writer.first_chunk(self.plan.response_id, self.created)
            if first is not None:
                yield _chunk_event(first)
            while True:
                kind, value = await self._next(aborted)
                if kind == "keepalive":
                    yield ": keepalive\n\n"
                elif kind == "text":
                    streamed += value
                    yield _chunk_event(self.writer.text_chunk(self.plan.response_id, self.created, value))
                elif kind == "error":
                    yield self._error(value)
                    break
                else:
                    for event in self._final(value, streamed):
                        yield event
                    break
            yield "data: [DONE]\n\n"
        finally:
            aborted.cancel()
            if not task.done():
                task.cancel()
                self.executor.metrics.cancelled.labels(route=self.plan.route).inc()
                self.executor.logger.info("stream closed before the answer; generation cancelled")
            await asyncio.gather(task, return_exceptions=True)


class _ClosingStreamingResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (even if the body never started)."""

    def __init__(self, content, *, on_close: Callable[[], Any], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
