"""Running one request of any route: the checks against this server's limits, the served model held for the
request's lifetime (so a reload never drops it), an admission slot (429 when the queue is full), the per-request
timeout (504), cancellation when the client disconnects or the drain timeout ends (503), and the metrics, log
line and traffic record of every answer. The routes (server/routes/) build their responses from a
:class:`Completed`; streams (server/streaming.py) take their slot with :meth:`RequestExecutor.admit`.

Size: the lifecycle of one request, from limits to the traffic record, reads best in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from server.admission import AdmissionController, Overloaded
from server.config import ServerConfig
from server.errors import invalid_request, overloaded, shutting_down, timeout_error
from server.metrics import ServerMetrics
from server.model_manager import ModelManager, ServedModel
from server.pipeline import SelectivePipeline, VerificationDraft, VerificationRequest, VerificationResult
from server.protocol import Exemplar, SDMVerification, Timings, Usage
from server.tracing import Tracing

__all__ = ["RequestExecutor", "Plan", "Admitted", "Completed", "ClientDisconnected"]

# The prefix of each route's response ids.
_ID_PREFIXES = {"/generate": "gen-", "/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}


class ClientDisconnected(Exception):
    """The client went away before the answer; the work was cancelled."""


@dataclass
class Plan:
    """A checked request: what to run, against which held model, and the response's id (known before the answer,
    so the traffic record and the response carry the same one)."""

    route: str
    served: ServedModel
    draft: VerificationDraft
    response_id: str = ""

    def __post_init__(self) -> None:
        if not self.response_id:
            self.response_id = _ID_PREFIXES.get(self.route, "req-") + uuid.uuid4().hex


@dataclass
class Admitted:
    """A request holding an admission slot, its prompt prepared: ``release`` gives the slot back (call it once)."""

    queue_s: float
    request: VerificationRequest
    release: Callable[[], None]


@dataclass
class Completed:
    """An answer with its times, as every route reports them."""

    result: VerificationResult
    queue_ms: float
    total_ms: float

    def timings(self) -> Timings:
        r = self.result
        return Timings(
            queue_ms=round(self.queue_ms, 3),
            generation_ms=round(r.generation_ms, 3),
            verification_ms=round(r.verification_ms, 3),
            total_ms=round(self.total_ms, 3),
        )

    def usage(self) -> Usage:
        r = self.result
        return Usage(
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            total_tokens=r.prompt_tokens + r.completion_tokens,
        )

    def verdict(self) -> dict:
        """The verification fields every route returns (``/generate`` flat, the OpenAI routes under ``sdm``)."""
        r, best = self.result, self.result.best
        return dict(
            verified=best.verified,
            probability=best.probability,
            probability_lower=best.probability_lower,
            admitted=best.admitted,
            abstained=r.abstained,
            abstention_reason=best.abstention_reason,
            withheld=r.withheld,
            alpha=r.alpha,
            region_alpha=best.region_alpha,
            q=best.q,
            q_prime=best.q_prime,
            d=best.d,
            exemplars=[Exemplar(**e) for e in best.exemplars],
            attempts=r.attempts,
        )

    def verification(self) -> SDMVerification:
        return SDMVerification(**self.verdict(), timings=self.timings())


class RequestExecutor:
    """What every generation route shares between parsing its body and building its response."""

    def __init__(
        self,
        config: ServerConfig,
        manager: ModelManager,
        admission: AdmissionController,
        metrics: ServerMetrics,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.manager = manager
        self.admission = admission
        self.metrics = metrics
        self.logger = logger or logging.getLogger("sdm.server")
        # Called with (plan's response id, route, served model's facts, prompt, result) for every answer; set by the
        # app when the traffic store is on (server/traffic.py). It must not block.
        self.on_answer: Callable[[str, str, dict, Any, VerificationResult], None] | None = None
        self.aborted = asyncio.Event()  # set when the drain timeout ends: what still runs is answered with 503
        self.tracing = Tracing()  # off unless the app sets one (--otlp-traces-endpoint)

    def abort_in_flight(self) -> None:
        """End every running request with a 503 (streams: an error event, then ``[DONE]``): the drain timeout is
        over."""
        if not self.aborted.is_set():
            self.logger.warning("drain timeout reached; answering the requests still running with 503")
        self.aborted.set()

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self, route: str, draft: VerificationDraft, model: str | None = None) -> Plan:
        """Hold the served model ``model`` names (None: the default; 404 for one not served) and check ``draft``
        against it; the caller releases the model (:meth:`release`)."""
        served = self.manager.hold(model)
        try:
            return Plan(route, served, self.check(draft, served.pipeline))
        except BaseException:
            self.manager.release(served)
            raise

    def release(self, plan: Plan) -> None:
        self.manager.release(plan.served)

    def check(self, draft: VerificationDraft, pipeline: SelectivePipeline) -> VerificationDraft:
        """Every check that needs no tokenizing (cheap, on the event loop), so bad requests never wait for a slot.
        Returns the draft with its alpha resolved on the bundle's ladder."""
        config = self.config
        tokens, tokens_param = draft.max_tokens, draft.tokens_param
        if tokens < 1:
            raise invalid_request(f"{tokens_param} must be >= 1, got {tokens}", tokens_param, "invalid_max_tokens")
        if tokens > config.max_tokens_cap:
            raise invalid_request(
                f"{tokens_param} {tokens} exceeds this server's cap of {config.max_tokens_cap}",
                tokens_param,
                "max_tokens_too_large",
            )
        try:
            alpha = pipeline.resolve_alpha(draft.alpha)
        except ValueError:
            raise invalid_request(
                f"alpha {draft.alpha} is not on the bundle's calibrated ladder {list(pipeline.alphas)}; use one of "
                "them (or recalibrate the head)",
                "alpha",
                "alpha_not_on_ladder",
            ) from None
        if draft.return_exemplars > config.max_exemplars:
            raise invalid_request(
                f"return_exemplars {draft.return_exemplars} exceeds this server's limit of {config.max_exemplars}",
                "return_exemplars",
                "too_many_exemplars",
            )
        if draft.max_attempts > config.max_attempts_cap:
            raise invalid_request(
                f"max_attempts {draft.max_attempts} exceeds this server's limit of {config.max_attempts_cap}",
                "max_attempts",
                "too_many_attempts",
            )
        if draft.max_attempts > 1 and draft.temperature <= 0:
            raise invalid_request(
                "max_attempts > 1 needs temperature > 0: greedy decoding gives the same output at every attempt",
                "max_attempts",
                "attempts_need_sampling",
            )
        self._check_prompt(draft, pipeline)
        return dataclasses.replace(draft, alpha=alpha)

    def _check_prompt(self, draft: VerificationDraft, pipeline: SelectivePipeline) -> None:
        """A prompt too long to fit even at the tokenizer's longest token, or holding a special token: 400."""
        prompt, param = draft.prompt, draft.prompt_param
        texts = (
            [(param, prompt)]
            if isinstance(prompt, str)
            else [(f"{param}.{i}.content", m["content"]) for i, m in enumerate(prompt)]
        )
        chars = sum(len(text) for _, text in texts)
        if chars > self.config.max_prompt_tokens * pipeline.max_chars_per_token:
            raise invalid_request(
                f"the prompt has {chars} characters, more than {self.config.max_prompt_tokens} tokens (this server's "
                "--max-prompt-tokens) can hold; shorten it",
                param,
                "prompt_too_long",
            )
        for where, text in texts:
            token = pipeline.special_token_in(text)
            if token is not None:
                raise invalid_request(
                    f"{where}: contains {token!r}, a special token of the model's chat format; a user's text cannot "
                    "hold control tokens "
                    "(they would forge turns), so remove or rewrite it",
                    where,
                    "special_token_in_content",
                )

    async def prepare(self, plan: Plan) -> VerificationRequest:
        """Render and tokenize the prompt off the event loop (the caller holds an admission slot), then check the
        token limits."""
        draft, served = plan.draft, plan.served
        try:
            prepared = await served.pipeline.prepare_async(draft.prompt)
        except Exception as exc:  # noqa: BLE001 - a chat template rejecting the messages
            raise invalid_request(
                f"{draft.prompt_param}: the chat template could not render it: {exc}",
                draft.prompt_param,
                "invalid_prompt",
            ) from None
        n = len(prepared.ids)
        if n > self.config.max_prompt_tokens:
            raise invalid_request(
                f"the prompt has {n} tokens (chat template included); this server accepts at most "
                f"{self.config.max_prompt_tokens}",
                draft.prompt_param,
                "prompt_too_long",
            )
        limit = served.backend.max_model_len
        if n + draft.max_tokens > limit:
            raise invalid_request(
                f"the prompt ({n} tokens) plus {draft.tokens_param} ({draft.max_tokens}) exceeds the model's context "
                f"of {limit} tokens",
                draft.tokens_param,
                "context_length_exceeded",
            )
        return draft.prepared(prepared)

    # -- running -----------------------------------------------------------------------------------------------
    def remaining_s(self, started: float) -> float:
        """What is left of the request timeout for a request that arrived at ``started`` (perf_counter)."""
        return max(0.001, self.config.request_timeout_s - (time.perf_counter() - started))

    @contextmanager
    def _reported(self, route: str, log_disconnect: bool = False) -> Iterator[None]:
        """Turns a full queue into 429 and a timeout into 504, and counts a disconnect as a cancelled request."""
        try:
            yield
        except Overloaded as exc:
            raise overloaded(exc.retry_after_s) from None
        except TimeoutError:
            raise timeout_error(self.config.request_timeout_s) from None
        except ClientDisconnected:
            self.metrics.cancelled.labels(route=route).inc()
            if log_disconnect:
                self.logger.info("client disconnected; generation cancelled")
            raise

    async def until_disconnect(self, request: Request, work: asyncio.Future) -> Any:
        """``work``'s result; ClientDisconnected when the client goes first, 503 when the drain timeout ends first."""

        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        aborted = asyncio.ensure_future(self.aborted.wait())
        try:
            await asyncio.wait({work, watcher, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            if aborted.done():
                raise shutting_down(self.config.drain_timeout_s)
            raise ClientDisconnected()
        finally:
            for task in (work, watcher, aborted):
                if not task.done():
                    task.cancel()
            await asyncio.gather(work, watcher, aborted, return_exceptions=True)

    async def execute(self, plan: Plan, request: Request, started: float) -> Completed:
        """Admission, pipeline, timeout and disconnect handling for a non-streamed answer."""

        async def work() -> tuple[VerificationResult, float]:
            with self.tracing.span("admission"):
                queue_s = await self.admission.acquire()
            held = time.perf_counter()
            try:
                return await plan.served.pipeline.run(await self.prepare(plan), tracing=self.tracing), queue_s
            finally:
                self.admission.release(time.perf_counter() - held)

        with self.tracing.span("request", route=plan.route, request_id=plan.response_id) as span:
            with self._reported(plan.route, log_disconnect=True):
                async with asyncio.timeout(self.config.request_timeout_s):
                    # The task copies this context, so the stages' spans are children of the request's.
                    result, queue_s = await self.until_disconnect(request, asyncio.ensure_future(work()))
            span.set(admitted=result.best.admitted, attempts=result.attempts, queue_ms=round(queue_s * 1000.0, 3))
        return self.completed(plan, result, queue_s, started)

    async def admit(self, plan: Plan, request: Request, started: float) -> Admitted:
        """Take an admission slot and prepare the prompt, for a stream: every refusal (429, 504, 400) comes before any
        byte is sent. The caller gives the slot back with ``Admitted.release``."""
        acquire = asyncio.ensure_future(self.admission.acquire())
        try:
            with self._reported(plan.route):
                queue_s = await asyncio.wait_for(self.until_disconnect(request, acquire), self.config.request_timeout_s)
        except BaseException:
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                self.admission.release(None)  # granted at the very moment we gave up
            raise
        held = time.perf_counter()

        def release() -> None:
            self.admission.release(time.perf_counter() - held)

        try:
            with self._reported(plan.route):
                async with asyncio.timeout(self.remaining_s(started)):
                    prepared = await self.until_disconnect(request, asyncio.ensure_future(self.prepare(plan)))
        except BaseException:
            release()
            raise
        return Admitted(queue_s, prepared, release)

    def completed(self, plan: Plan, result: VerificationResult, queue_s: float, started: float) -> Completed:
        """Record an answer (traffic store, metrics, log line) and time it."""
        done = Completed(result, queue_s * 1000.0, (time.perf_counter() - started) * 1000.0)
        if self.on_answer is not None:
            try:
                self.on_answer(plan.response_id, plan.route, plan.served.facts, plan.draft.prompt, result)
            except Exception:  # noqa: BLE001 - recording must never fail an answer
                self.logger.error("recording the answer failed", exc_info=True)
        self.metrics.observe_result(plan.route, result)
        self.metrics.observe_token_times(plan.route, result, started)
        self.metrics.latency.labels(stage="queue").observe(queue_s)
        self.metrics.latency.labels(stage="total").observe(done.total_ms / 1000.0)
        self.logger.info(
            "answered",
            extra={
                "id": plan.response_id,
                "route": plan.route,
                "admitted": result.best.admitted,
                "abstention_reason": result.best.abstention_reason,
                "probability": round(result.best.probability, 6),
                "attempts": result.attempts,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_ms": round(done.total_ms, 2),
            },
        )
        return done
