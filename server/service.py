"""The generation service: turns a parsed request of any route into a pipeline run and the route's response.

It enforces the limits (max_tokens cap, prompt length, alpha on the ladder, ...), holds the served model for
the request's lifetime (so a reload never drops it), takes an admission slot (429 when the queue is full),
applies the per-request timeout (504), cancels the work when the client disconnects, records metrics, and
builds the ``/generate``, completion and chat-completion responses, streamed as server-sent events when asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse

from server.admission import AdmissionController, Overloaded
from server.config import ServerConfig
from server.errors import APIError, internal_error, invalid_request, not_found, overloaded, shutting_down, timeout_error
from server.metrics import ServerMetrics
from server.model_manager import ModelManager, ServedModel
from server.pipeline import VerificationRequest, VerificationResult
from server.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    Exemplar,
    GenerateRequest,
    GenerateResponse,
    SDMVerification,
    SelectiveParams,
    Timings,
    Usage,
)

__all__ = ["GenerationService", "ClientDisconnected", "read_json", "parse_request", "Completed"]

M = TypeVar("M", bound=BaseModel)


class ClientDisconnected(Exception):
    """The client went away before the answer; the work was cancelled."""


# -- request bodies --------------------------------------------------------------------------------------------
async def read_json(request: Request) -> Any:
    """The body as JSON: 400 for an empty body, bytes that are not UTF-8, or text that is not JSON."""
    body = await request.body()
    if not body.strip():
        raise invalid_request("the request body is empty; send a JSON object", code="empty_body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request(f"the request body is not valid UTF-8 (invalid byte at position {exc.start}); encode JSON as UTF-8", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", code="invalid_json") from None
    except RecursionError:
        raise invalid_request("the request body nests arrays or objects too deeply; send a flat JSON object", code="invalid_json") from None
    except ValueError as exc:  # an integer beyond Python's digit limit for int conversion
        del exc  # its text advises raising an interpreter limit, which is not the client's business
        raise invalid_request("the request body holds an integer too long to read (over 4300 digits); send numbers of ordinary size", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "nullable"}


def _is_type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union member (``str``, ``list[str]``, ...), not a field."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or any(c in part for c in "[]()") or part.startswith(("constrained-", "function-", "lax-", "strict-"))


def _pick_error(errors: list[dict]) -> dict:
    """The error to report: of the first field's errors, the deepest one that is not a union's 'should be None' branch."""
    first = errors[0].get("loc", ("",))[:1]
    same = [e for e in errors if e.get("loc", ())[:1] == first and not (e.get("loc") and e["loc"][-1] == "none")] or errors[:1]
    # deepest first; of equally deep ones, a broken constraint before a wrong type (the other union branch)
    return max(same, key=lambda e: (len([p for p in e.get("loc", ()) if not _is_type_tag(p)]), not str(e.get("type", "")).endswith("_type")))


def parse_request(model: type[M], data: Any) -> M:
    """Validate with pydantic; the first error becomes a 400 naming its field in ``param``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = _pick_error(exc.errors(include_url=False))
        loc = [str(part) for part in error.get("loc", ()) if not _is_type_tag(part)]
        param = ".".join(loc) if loc else getattr(model, "root_param", None)
        message = str(error.get("msg", "invalid value"))
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        if error.get("type") == "missing":
            message = "this field is required"
        if param and not message.startswith(param):  # "alpha must be ..." already names its field
            message = f"{param}: {message}"
        raise invalid_request(message, param, error.get("type")) from None


# -- results ---------------------------------------------------------------------------------------------------
@dataclass
class Completed:
    result: VerificationResult
    queue_ms: float
    total_ms: float

    def timings(self) -> Timings:
        r = self.result
        return Timings(queue_ms=round(self.queue_ms, 3), generation_ms=round(r.generation_ms, 3), verification_ms=round(r.verification_ms, 3), total_ms=round(self.total_ms, 3))

    def usage(self) -> Usage:
        r = self.result
        return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, total_tokens=r.prompt_tokens + r.completion_tokens)

    def verification(self) -> SDMVerification:
        r = self.result
        return SDMVerification(
            verified=r.verified, probability=r.probability, probability_lower=r.probability_lower, admitted=r.admitted,
            abstained=r.abstained, abstention_reason=r.abstention_reason, withheld=r.withheld, alpha=r.alpha,
            region_alpha=r.region_alpha, q=r.q, q_prime=r.q_prime, d=r.d, exemplars=[Exemplar(**e) for e in r.exemplars],
            attempts=r.attempts, timings=self.timings(),
        )


@dataclass
class _Draft:
    """A request checked for everything but its token count: the prompt is rendered and tokenized only once the
    request holds an admission slot (:meth:`GenerationService._finish`)."""

    prompt: str | list[dict]
    prompt_param: str
    max_tokens: int
    tokens_param: str
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    alpha: float
    on_abstain: str
    return_exemplars: int
    max_attempts: int


@dataclass
class _Plan:
    """A validated request: what to run, against which model, and how to answer."""

    route: str
    served: ServedModel
    draft: _Draft
    stream: bool = False
    include_usage: bool = False
    # The response's id, known before the answer so the traffic record and the response carry the same one.
    response_id: str = ""

    def __post_init__(self) -> None:
        if not self.response_id:
            prefix = {"/generate": "gen-", "/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}.get(self.route, "req-")
            self.response_id = prefix + uuid.uuid4().hex


def _messages(messages: Sequence[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        try:
            content = m.text()
        except ValueError as exc:
            raise invalid_request(f"messages.{i}.content: {exc}", f"messages.{i}.content", "unsupported_content") from None
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


class GenerationService:
    def __init__(self, config: ServerConfig, manager: ModelManager, admission: AdmissionController, metrics: ServerMetrics,
                 logger: logging.Logger | None = None) -> None:
        self.config = config
        self.manager = manager
        self.admission = admission
        self.metrics = metrics
        self.logger = logger or logging.getLogger("sdm.server")
        # Called with (plan's response id, route, served model's facts, prompt, result) for every answer; set by the
        # app when the traffic store is on (server/traffic.py). It must not block.
        self.on_answer: Callable[[str, str, dict, Any, VerificationResult], None] | None = None
        self._aborted = asyncio.Event()  # set when the drain timeout ends: what still runs is answered with 503

    def abort_in_flight(self) -> None:
        """End every running request with a 503 (streams: an error event, then ``[DONE]``): the drain timeout is over."""
        if not self._aborted.is_set():
            self.logger.warning("drain timeout reached; answering the requests still running with 503")
        self._aborted.set()

    # -- validation --------------------------------------------------------------------------------------------
    def _plan(self, route: str, served: ServedModel, prompt: str | list[dict], prompt_param: str, max_tokens: int | None,
              temperature: float, top_p: float, seed: int | None, stop: Sequence[str], sdm: SelectiveParams,
              tokens_param: str = "max_tokens") -> _Draft:
        """Every check that needs no tokenizing (cheap, on the event loop), so bad requests never wait for a slot."""
        config = self.config
        pipeline = served.pipeline
        tokens = config.default_max_tokens if max_tokens is None else int(max_tokens)
        if tokens < 1:
            raise invalid_request(f"{tokens_param} must be >= 1, got {tokens}", tokens_param, "invalid_max_tokens")
        if tokens > config.max_tokens_cap:
            raise invalid_request(f"{tokens_param} {tokens} exceeds this server's cap of {config.max_tokens_cap}", tokens_param, "max_tokens_too_large")
        try:
            alpha = pipeline.resolve_alpha(sdm.alpha)
        except ValueError:
            raise invalid_request(
                f"alpha {sdm.alpha} is not on the bundle's calibrated ladder {list(pipeline.alphas)}; use one of them (or recalibrate the head)",
                "alpha", "alpha_not_on_ladder",
            ) from None
        if sdm.return_exemplars > config.max_exemplars:
            raise invalid_request(f"return_exemplars {sdm.return_exemplars} exceeds this server's limit of {config.max_exemplars}", "return_exemplars", "too_many_exemplars")
        if sdm.max_attempts > config.max_attempts_cap:
            raise invalid_request(f"max_attempts {sdm.max_attempts} exceeds this server's limit of {config.max_attempts_cap}", "max_attempts", "too_many_attempts")
        if sdm.max_attempts > 1 and temperature <= 0:
            raise invalid_request("max_attempts > 1 needs temperature > 0: greedy decoding gives the same output at every attempt", "max_attempts", "attempts_need_sampling")
        texts = [(prompt_param, prompt)] if isinstance(prompt, str) else [(f"{prompt_param}.{i}.content", m["content"]) for i, m in enumerate(prompt)]
        chars = sum(len(text) for _, text in texts)
        bound = config.max_prompt_tokens * pipeline.max_chars_per_token
        if chars > bound:
            raise invalid_request(
                f"the prompt has {chars} characters, more than {config.max_prompt_tokens} tokens (this server's --max-prompt-tokens) can hold; shorten it",
                prompt_param, "prompt_too_long",
            )
        for param, text in texts:
            token = pipeline.special_token_in(text)
            if token is not None:
                raise invalid_request(
                    f"{param}: contains {token!r}, a special token of the model's chat format; a user's text cannot hold control tokens "
                    "(they would forge turns), so remove or rewrite it", param, "special_token_in_content",
                )
        return _Draft(prompt=prompt, prompt_param=prompt_param, max_tokens=tokens, tokens_param=tokens_param, temperature=float(temperature),
                      top_p=float(top_p), seed=seed, stop=tuple(stop), alpha=alpha, on_abstain=sdm.on_abstain,
                      return_exemplars=int(sdm.return_exemplars), max_attempts=int(sdm.max_attempts))

    async def _finish(self, served: ServedModel, draft: _Draft) -> VerificationRequest:
        """Render and tokenize the prompt off the event loop (the caller holds an admission slot), then the token limits."""
        try:
            prepared = await served.pipeline.prepare_async(draft.prompt)
        except Exception as exc:  # noqa: BLE001 - a chat template rejecting the messages
            raise invalid_request(f"{draft.prompt_param}: the chat template could not render it: {exc}", draft.prompt_param, "invalid_prompt") from None
        n = len(prepared.ids)
        if n > self.config.max_prompt_tokens:
            raise invalid_request(f"the prompt has {n} tokens (chat template included); this server accepts at most {self.config.max_prompt_tokens}",
                                  draft.prompt_param, "prompt_too_long")
        limit = served.backend.max_model_len
        if n + draft.max_tokens > limit:
            raise invalid_request(f"the prompt ({n} tokens) plus {draft.tokens_param} ({draft.max_tokens}) exceeds the model's context of {limit} tokens",
                                  draft.tokens_param, "context_length_exceeded")
        return VerificationRequest(
            prompt=prepared, max_tokens=draft.max_tokens, temperature=draft.temperature, top_p=draft.top_p, seed=draft.seed, stop=draft.stop,
            alpha=draft.alpha, on_abstain=draft.on_abstain, return_exemplars=draft.return_exemplars, max_attempts=draft.max_attempts,
        )

    def _check_model(self, name: str | None) -> None:
        if name and name != self.config.served_model_name:
            raise not_found(f"the model {name!r} does not exist; this server serves {self.config.served_model_name!r} (GET /v1/models)", "model", "model_not_found")

    @staticmethod
    def _refuse(param: str, message: str) -> APIError:
        return invalid_request(f"{param}: {message}", param, "unsupported_parameter")

    def _check_openai(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self._check_model(body.model)
        if body.n != 1:
            raise self._refuse("n", "only n = 1 is supported (use max_attempts to resample until admitted)")
        if body.logit_bias:
            raise self._refuse("logit_bias", "is not supported")
        if body.presence_penalty or body.frequency_penalty:
            raise self._refuse("presence_penalty" if body.presence_penalty else "frequency_penalty", "is not supported (only 0)")
        if isinstance(body, CompletionRequest):
            if body.echo:
                raise self._refuse("echo", "is not supported")
            if body.logprobs is not None:
                raise self._refuse("logprobs", "is not supported")
            if body.best_of not in (None, 1):
                raise self._refuse("best_of", "is not supported (use max_attempts)")
            if body.suffix:
                raise self._refuse("suffix", "is not supported")
        else:
            if body.logprobs or body.top_logprobs:
                raise self._refuse("logprobs", "is not supported")
            if body.tools or body.functions or body.tool_choice not in (None, "none"):
                raise self._refuse("tools", "tool calls are not supported")
            if body.response_format and body.response_format.get("type", "text") != "text":
                raise self._refuse("response_format", "only the text format is supported")

    # -- running -----------------------------------------------------------------------------------------------
    async def _until_disconnect(self, request: Request, work: asyncio.Future) -> Any:
        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        aborted = asyncio.ensure_future(self._aborted.wait())
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

    async def _execute(self, plan: _Plan, request: Request, started: float) -> Completed:
        """Admission, pipeline, timeout and disconnect handling for a non-streamed answer."""

        async def work() -> tuple[VerificationResult, float]:
            queue_s = await self.admission.acquire()
            held = time.perf_counter()
            try:
                vreq = await self._finish(plan.served, plan.draft)
                return await plan.served.pipeline.run(vreq), queue_s
            finally:
                self.admission.release(time.perf_counter() - held)

        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                result, queue_s = await self._until_disconnect(request, asyncio.ensure_future(work()))
        except Overloaded as exc:
            raise overloaded(exc.retry_after_s) from None
        except TimeoutError:
            raise timeout_error(self.config.request_timeout_s) from None
        except ClientDisconnected:
            self.metrics.cancelled.labels(route=plan.route).inc()
            self.logger.info("client disconnected; generation cancelled")
            raise
        return self._completed(plan.route, result, queue_s, started, plan)

    def _completed(self, route: str, result: VerificationResult, queue_s: float, started: float, plan: _Plan | None = None) -> Completed:
        done = Completed(result, queue_s * 1000.0, (time.perf_counter() - started) * 1000.0)
        if plan is not None and self.on_answer is not None:
            try:
                self.on_answer(plan.response_id, route, plan.served.facts, plan.draft.prompt, result)
            except Exception:  # noqa: BLE001 - recording must never fail an answer
                self.logger.error("recording the answer failed", exc_info=True)
        self.metrics.observe_result(route, result)
        self.metrics.latency.labels(stage="queue").observe(queue_s)
        self.metrics.latency.labels(stage="total").observe(done.total_ms / 1000.0)
        self.logger.info(
            "answered",
            extra={"id": plan.response_id if plan is not None else None, "route": route, "admitted": result.admitted, "abstention_reason": result.abstention_reason, "probability": round(result.probability, 6),
                   "attempts": result.attempts, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                   "total_ms": round(done.total_ms, 2)},
        )
        return done

    # -- routes ------------------------------------------------------------------------------------------------
    async def generate(self, request: Request) -> GenerateResponse:
        started = time.perf_counter()
        body = parse_request(GenerateRequest, await read_json(request))
        prompt, param = (body.prompt, "prompt") if body.prompt is not None else (_messages(body.messages or []), "messages")
        served = self.manager.hold()
        try:
            draft = self._plan("/generate", served, prompt, param, body.max_tokens, body.temperature, body.top_p, body.seed, body.stop or [], body)
            plan = _Plan("/generate", served, draft)
            done = await self._execute(plan, request, started)
        finally:
            self.manager.release(served)
        r = done.result
        return GenerateResponse(
            id=plan.response_id, model=self.config.served_model_name, text=r.text, verified=r.verified, probability=r.probability,
            probability_lower=r.probability_lower, admitted=r.admitted, abstained=r.abstained, abstention_reason=r.abstention_reason,
            withheld=r.withheld, alpha=r.alpha, region_alpha=r.region_alpha, q=r.q, q_prime=r.q_prime, d=r.d,
            exemplars=[Exemplar(**e) for e in r.exemplars], attempts=r.attempts, finish_reason=r.finish_reason,
            usage=done.usage(), timings=done.timings(),
        )

    async def completions(self, request: Request):
        started = time.perf_counter()
        body = parse_request(CompletionRequest, await read_json(request))
        self._check_openai(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise invalid_request("prompt: send one prompt per request (a string, or a list holding one string)", "prompt", "unsupported_parameter")
            prompt = prompt[0]
        return await self._openai("/v1/completions", request, body, prompt, "prompt", body.max_tokens, started, chat=False)

    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        body = parse_request(ChatCompletionRequest, await read_json(request))
        self._check_openai(body)
        tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self._openai("/v1/chat/completions", request, body, _messages(body.messages), "messages", max_tokens, started, chat=True,
                                  tokens_param=tokens_param)

    async def _openai(self, route: str, request: Request, body, prompt, param: str, max_tokens: int | None, started: float, chat: bool,
                      tokens_param: str = "max_tokens"):
        temperature = 0.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        served = self.manager.hold()
        released = False
        try:
            draft = self._plan(route, served, prompt, param, max_tokens, temperature, top_p, body.seed, body.stop or [], body, tokens_param)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            plan = _Plan(route, served, draft, body.stream, include_usage)
            if body.stream:
                response = await self._stream(plan, request, started, chat)
                released = True  # the stream releases the model when it ends
                return response
            done = await self._execute(plan, request, started)
        finally:
            if not released:
                self.manager.release(served)
        r = done.result
        name = self.config.served_model_name
        if chat:
            message = ChatCompletionMessage(content=r.text, refusal=refusal(r) if r.withheld else None)
            choice = ChatCompletionChoice(index=0, message=message, finish_reason=r.finish_reason, sdm=done.verification())
            return ChatCompletionResponse(id=plan.response_id, model=name, choices=[choice], usage=done.usage())
        choice = CompletionChoice(index=0, text=r.text or "", finish_reason=r.finish_reason, sdm=done.verification())
        return CompletionResponse(id=plan.response_id, model=name, choices=[choice], usage=done.usage())

    # -- streaming ---------------------------------------------------------------------------------------------
    async def _stream(self, plan: _Plan, request: Request, started: float, chat: bool) -> StreamingResponse:
        """Take the admission slot (429 before any byte is sent), then stream: text deltas as they are generated
        (only when the text cannot be withheld or replaced), the rest of the final text, and a last chunk
        carrying ``sdm`` (and ``usage`` when asked), then ``data: [DONE]``."""
        stack = AsyncExitStack()
        stack.callback(self.manager.release, plan.served)
        acquire = asyncio.ensure_future(self.admission.acquire())
        try:
            try:
                queue_s = await asyncio.wait_for(self._until_disconnect(request, acquire), self.config.request_timeout_s)
            except Overloaded as exc:
                raise overloaded(exc.retry_after_s) from None
            except (TimeoutError, asyncio.TimeoutError):
                raise timeout_error(self.config.request_timeout_s) from None
            except ClientDisconnected:
                self.metrics.cancelled.labels(route=plan.route).inc()
                raise
            held = time.perf_counter()
            stack.callback(lambda: self.admission.release(time.perf_counter() - held))
            try:
                async with asyncio.timeout(max(0.001, self.config.request_timeout_s - (time.perf_counter() - started))):
                    vreq = await self._until_disconnect(request, asyncio.ensure_future(self._finish(plan.served, plan.draft)))
            except TimeoutError:
                raise timeout_error(self.config.request_timeout_s) from None
            except ClientDisconnected:
                self.metrics.cancelled.labels(route=plan.route).inc()
                raise
        except BaseException:
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None and "held" not in locals():
                self.admission.release(None)  # granted at the very moment we gave up
            await stack.aclose()
            raise
        response_id = plan.response_id
        created = int(time.time())
        name = self.config.served_model_name
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(delta: str) -> None:  # called from the model thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ("text", delta))
            except RuntimeError:  # the event loop is closing (shutdown): nobody is listening any more
                pass

        async def produce() -> None:
            try:
                async with asyncio.timeout(max(0.001, self.config.request_timeout_s - (time.perf_counter() - started))):
                    result = await plan.served.pipeline.run(vreq, on_text)
                events.put_nowait(("done", result))
            except TimeoutError:
                events.put_nowait(("error", timeout_error(self.config.request_timeout_s)))
            except asyncio.CancelledError:
                raise
            except APIError as exc:
                events.put_nowait(("error", exc))
            except Exception as exc:  # noqa: BLE001 - reported in the stream
                self.logger.error("streamed generation failed", exc_info=True)
                events.put_nowait(("error", internal_error(f"generation failed: {type(exc).__name__}")))

        def chunk(text: str | None = None, *, role: bool = False, finish: str | None = None, sdm: SDMVerification | None = None, usage: Usage | None = None,
                  refused: str | None = None) -> str:
            if chat:
                delta = DeltaMessage(role="assistant" if role else None, content=text, refusal=refused)
                payload = ChatCompletionStreamResponse(id=response_id, created=created, model=name, choices=[ChatCompletionStreamChoice(delta=delta, finish_reason=finish, sdm=sdm)], usage=usage)
            else:
                payload = CompletionStreamResponse(id=response_id, created=created, model=name, choices=[CompletionStreamChoice(text=text or "", finish_reason=finish, sdm=sdm)], usage=usage)
            data = payload.model_dump(mode="json")
            for c in data["choices"]:
                if c.get("sdm") is None:
                    c.pop("sdm", None)
                if "delta" in c:
                    c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            if data.get("usage") is None:
                data.pop("usage", None)
            return "data: " + json.dumps(data) + "\n\n"

        async def body() -> AsyncIterator[str]:
            task = asyncio.ensure_future(produce())
            aborted = asyncio.ensure_future(self._aborted.wait())
            streamed = ""
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    # A comment line now and then, so that proxies do not drop a stream that has nothing to send yet.
                    got = asyncio.ensure_future(events.get())
                    finished, _ = await asyncio.wait({got, aborted}, timeout=self.config.sse_keepalive_s, return_when=asyncio.FIRST_COMPLETED)
                    if got not in finished:
                        got.cancel()
                        if aborted in finished:
                            error = shutting_down(self.config.drain_timeout_s)
                            self.metrics.observe_error(plan.route, error.status)
                            yield "data: " + json.dumps(error.envelope()) + "\n\n"
                            break
                        yield ": keepalive\n\n"
                        continue
                    kind, value = got.result()
                    if kind == "text":
                        streamed += value
                        yield chunk(value)
                        continue
                    if kind == "error":
                        self.metrics.observe_error(plan.route, value.status)
                        yield "data: " + json.dumps(value.envelope()) + "\n\n"
                        break
                    done = self._completed(plan.route, value, queue_s, started, plan)
                    final = done.result.text
                    if final:
                        if not final.startswith(streamed):
                            self.logger.warning("streamed text is not a prefix of the final text", extra={"streamed": streamed})
                        rest = final[len(streamed) :] if final.startswith(streamed) else ""
                        if rest:
                            yield chunk(rest)
                    yield chunk(None if chat else "", finish=done.result.finish_reason, sdm=done.verification(), usage=done.usage() if plan.include_usage else None,
                                refused=refusal(done.result) if chat and done.result.withheld else None)
                    break
                yield "data: [DONE]\n\n"
            finally:
                aborted.cancel()
                if not task.done():
                    task.cancel()
                    self.metrics.cancelled.labels(route=plan.route).inc()
                    self.logger.info("stream closed before the answer; generation cancelled")
                await asyncio.gather(task, return_exceptions=True)

        return _ClosingStreamingResponse(body(), on_close=stack.aclose, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_REASONS = {
    "ood": "the output is unlike every example the verifier was trained on (out of distribution)",
    "no_region": "the verifier has no calibrated high-reliability region at this alpha",
    "low_similarity": "the output is too unlike the verifier's training examples for its high-reliability region",
    "below_threshold": "the verifier's probability is below the admission threshold",
    "predicted_no": "the verifier predicts that the output did not follow the instructions",
}


def refusal(result: VerificationResult) -> str:
    """``message.refusal`` of a withheld answer: the abstention in words (OpenAI clients have no other field for it)."""
    reason = result.abstention_reason or "below_threshold"
    return (f"abstained ({reason}): {_REASONS.get(reason, reason)}; the answer was withheld "
            f"(probability {result.probability:.3f} at alpha {result.alpha:g}; see choices[0].sdm)")


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
