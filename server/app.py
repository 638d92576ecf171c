"""The FastAPI application: :func:`create_app` builds one app (its own metrics registry, model manager, admission
controller; no global state). The lifespan loads the bundle in the background, so ``/health`` answers at once and
``/ready`` turns 200 once the model and head are loaded and a warm-up request passed.

Routes: ``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /v1/models``, ``POST /generate``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` for server-sent events) and
``POST /admin/reload``, and ``POST /v1/feedback`` (labels for served answers, kept in the traffic store with every
verification; see server/traffic.py and server/feedback.py). Every error is the OpenAI envelope with its HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from sdm_core import __version__
from server.admission import AdmissionController
from server.backends import Backend, make_backend
from server.config import ServerConfig, traffic_url
from server.errors import APIError, internal_error, invalid_request, method_not_allowed, not_found, permission_error
from server.feedback import FeedbackHandler, feedback_body_schema
from server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from server.middleware import RequestContextMiddleware
from server.model_manager import ModelManager
from server.protocol import (
    BUNDLE_NAME_PATTERN,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    ReloadRequest,
)
from server.service import ClientDisconnected, GenerationService, parse_request, read_json
from server.traffic import TrafficRecorder, TrafficSettings, make_record

__all__ = ["create_app", "ServerState", "ROUTES"]

ROUTES = ("/health", "/ready", "/metrics", "/v1/models", "/generate", "/v1/completions", "/v1/chat/completions", "/admin/reload", "/v1/feedback")
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 500, 503, 504)}
_GET_ERRORS = {status: {"model": ErrorResponse} for status in (401, 500, 503)}
_ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 413, 415, 500, 503)}
_STREAMED = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events (stream: true): chunks, then data: [DONE]"}}}


@dataclass
class ServerState:
    """Everything one app owns (``app.state.server``)."""

    config: ServerConfig
    metrics: ServerMetrics
    manager: ModelManager
    admission: AdmissionController
    service: GenerationService
    logger: logging.Logger
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    traffic: TrafficRecorder | None = None

    def begin_drain(self) -> None:
        """SIGTERM arrived (callable from any thread): what still runs after --drain-timeout-s is answered with 503."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        timeout = self.config.drain_timeout_s
        loop.call_soon_threadsafe(lambda: loop.call_later(timeout, self.service.abort_in_flight))


def _route_label(path: str) -> str:
    return path if path in ROUTES else "other"


def _body_schema(model, components: dict, required: bool = True) -> dict:
    """OpenAPI request body for a route that parses its body itself (for exact 400s); the models go to components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def _set_maximum(schema: dict, value: int) -> None:
    """Set ``maximum`` on an integer property schema (or its integer branch)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = value


def _bundle_name(config: ServerConfig, path: str) -> str:
    """How responses name a bundle: its folder name (never a host path)."""
    return Path(path).name


def create_app(config: ServerConfig, backend: Backend | None = None) -> FastAPI:
    """The app for ``config``. ``backend`` (unloaded or loaded) replaces the one the config names (tests, tools)."""
    logger = logging.getLogger("sdm.server")
    metrics = ServerMetrics()
    if backend is None:
        backend = make_backend(
            config.backend, config.bundle, device=config.resolved_device(), dtype=config.dtype, batch_size=config.batch_size,
            batch_wait_ms=config.batch_wait_ms, verify=config.verify_bundle, observer=metrics.observe_batch,
            vllm=config.vllm_settings(), hidden_states=config.hidden_states,
        )
    elif getattr(backend, "observer", "missing") is None:
        backend.observer = metrics.observe_batch

    traffic_metrics = metrics.traffic
    traffic = TrafficRecorder(
        TrafficSettings(url=traffic_url(config), store_text=config.store_text, sample_rate=config.traffic_sample_rate,
                        queue_size=config.traffic_queue_size, retention_s=config.traffic_retention_days * 86400.0, max_rows=config.traffic_max_rows),
        traffic_metrics, logging.getLogger("sdm.server.traffic"),
    )
    feedback = FeedbackHandler(config, traffic, traffic_metrics)

    def loaded(facts: dict) -> None:
        metrics.set_bundle({k: v for k, v in facts.items() if k not in ("alphas", "certification")})
        metrics.set_certification(facts.get("certification"))
        traffic_metrics.set_ladder(facts.get("alphas", ()))
        certification = facts.get("certification")
        logger.info("certification", extra={"bundle": facts["bundle"], "certification": certification["summary"] if certification
                                             else "none recorded: the ladder was not checked on held-out documents"})
        metrics.ready.set(1)

    manager = ModelManager(backend, model_name=config.served_model_name, warmup=config.warmup,
                           warmup_max_tokens=min(4, config.max_tokens_cap), on_loaded=loaded, logger=logger)

    def queue_changed(active: int, waiting: int) -> None:
        metrics.in_flight.set(active)
        metrics.queue_depth.set(waiting)

    admission = AdmissionController(config.max_concurrent_requests, config.max_queue_size, queue_changed)
    service = GenerationService(config, manager, admission, metrics, logger)
    if traffic.enabled:
        service.on_answer = lambda rid, route, facts, prompt, result: traffic.submit(make_record(rid, route, facts, result, prompt))
    state = ServerState(config, metrics, manager, admission, service, logger, traffic=traffic)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("starting", extra={"config": config.to_dict()})
        state.loop = asyncio.get_running_loop()
        traffic.start()
        manager.start()
        try:
            yield
        finally:
            logger.info("shutting down")
            metrics.ready.set(0)
            await manager.close()
            await asyncio.to_thread(traffic.close)

    app = FastAPI(
        title="sdm-lm selective generation",
        version=__version__,
        description="Generations with a calibrated probability that they followed the instructions, or an abstention with its reason.",
        lifespan=lifespan,
    )
    app.state.server = state
    open_paths = {"/health"} | (set() if config.metrics_require_key else {"/metrics"})
    app.add_middleware(
        RequestContextMiddleware, api_keys=config.api_keys, admin_keys=config.admin_api_keys, open_paths=open_paths,
        max_body_bytes=config.max_body_bytes, drain_timeout_s=config.drain_timeout_s, on_error=metrics.observe_error,
        route_label=_route_label, logger=logging.getLogger("sdm.server.access"),
    )
    if config.cors_allow_origins:  # outside the key check: browsers send preflights without credentials
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_allow_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Client-Request-Id"],
            expose_headers=["X-Request-Id", "X-Client-Request-Id", "Retry-After"], max_age=600,
        )
    _install_error_handlers(app, state)
    components: dict = {}
    base_openapi = app.openapi

    def openapi() -> dict:
        schema = base_openapi()
        known = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, value in components.items():
            known.setdefault(name, value)
        # The limits this server enforces (they are settings, so they are not in the models).
        limits = {"max_tokens": config.max_tokens_cap, "max_completion_tokens": config.max_tokens_cap,
                  "return_exemplars": config.max_exemplars, "max_attempts": config.max_attempts_cap}
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            properties = body.get("properties", {})
            for name, value in limits.items():
                if name in properties:
                    _set_maximum(properties[name], value)
        return schema

    app.openapi = openapi

    # -- operations ----------------------------------------------------------------------------------------------
    @app.get("/health", summary="Liveness: 200 while the process runs")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model and head are loaded and warmed up", responses=_GET_ERRORS)
    async def ready() -> Response:
        if manager.ready:
            facts = manager.current.facts
            return JSONResponse({"status": "ready", "model": facts["model"], "bundle": _bundle_name(config, facts["bundle"]), "head_version": facts["head_version"],
                                 "traffic_store": traffic.status()})
        message = f"not ready: {manager.state}" + (f" ({manager.error})" if manager.error else "")
        error = APIError(503, message, "service_unavailable", None, manager.state, {"Retry-After": "5"})
        return JSONResponse(error.envelope(), status_code=503, headers=error.headers)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse, responses=_GET_ERRORS)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_GET_ERRORS)
    async def models() -> ModelList:
        served = manager.hold()
        try:
            facts = served.facts
            card = ModelCard(id=config.served_model_name, created=int(served.loaded_at), root=Path(facts["bundle"]).name,
                             max_model_len=served.backend.max_model_len, sdm={k: v for k, v in facts.items() if k not in ("model", "bundle")})
            return ModelList(data=[card])
        finally:
            manager.release(served)

    # -- generation ----------------------------------------------------------------------------------------------
    @app.post("/generate", response_model=GenerateResponse, responses=_ERRORS, openapi_extra=_body_schema(GenerateRequest, components),
              summary="Generate, verify, and return the text with its calibrated probability or an abstention")
    async def generate(request: Request) -> GenerateResponse:
        return await service.generate(request)

    @app.post("/v1/completions", responses={**_ERRORS, 200: {"model": CompletionResponse, "content": _STREAMED}},
              openapi_extra=_body_schema(CompletionRequest, components), summary="OpenAI-compatible completions (+ sdm)")
    async def completions(request: Request):
        return await service.completions(request)

    @app.post("/v1/chat/completions", responses={**_ERRORS, 200: {"model": ChatCompletionResponse, "content": _STREAMED}},
              openapi_extra=_body_schema(ChatCompletionRequest, components), summary="OpenAI-compatible chat completions (+ sdm)")
    async def chat_completions(request: Request):
        return await service.chat_completions(request)

    @app.post("/v1/feedback", responses={**_ERRORS, 503: {"model": ErrorResponse}},
              openapi_extra=feedback_body_schema(config, components),
              summary="Label served answers (correct, wrong, ood) by response id; one object or a list")
    async def post_feedback(request: Request) -> dict:
        return await feedback.handle(request)

    @app.post("/admin/reload", responses=_ADMIN_ERRORS, openapi_extra=_body_schema(ReloadRequest, components, required=False),
              summary="Swap in a bundle (by name, under --bundles-root; default: re-read the served one) without dropping in-flight requests")
    async def reload(request: Request) -> dict:
        if not config.admin_enabled:  # the middleware refuses first; this keeps the route closed whatever the middleware
            raise permission_error("POST /admin/reload is disabled without admin keys: set SDM_ADMIN_API_KEYS (or --admin-api-keys)")
        previous = manager.current.facts if manager.current is not None else None
        try:
            raw = await request.body()
            body = parse_request(ReloadRequest, await read_json(request)) if raw.strip() else ReloadRequest()
            served = await manager.reload(_reload_target(config, body.bundle))
        except APIError:
            metrics.reloads.labels(result="failed").inc()
            raise
        metrics.reloads.labels(result="ok").inc()
        return {"status": "reloaded", "model": served.facts["model"], "bundle": _bundle_name(config, served.facts["bundle"]),
                "head_version": served.facts["head_version"], "previous_bundle": _bundle_name(config, previous["bundle"]) if previous else None}

    return app


def _reload_target(config: ServerConfig, name: str | None) -> str | None:
    """The folder a reload names: a sub-folder of --bundles-root, by name (never a path the client chose)."""
    if name is None:
        return None
    if not config.bundles_root:
        raise invalid_request("naming a bundle needs a bundles root on the server (--bundles-root / SDM_BUNDLES_ROOT); "
                              "without one, send no bundle to re-read the served bundle", "bundle", "invalid_bundle")
    if not re.fullmatch(BUNDLE_NAME_PATTERN, name):
        raise invalid_request(f"bundle must be the name of a folder under the bundles root (letters, digits, '.', '_', '-'; "
                              f"not starting with '.'), not a path; got {name!r}", "bundle", "invalid_bundle")
    path = Path(config.bundles_root).expanduser() / name
    if not (path / "bundle.json").is_file():
        raise invalid_request(f"there is no bundle named {name!r} under the bundles root (a folder holding a bundle.json)", "bundle", "invalid_bundle")
    return str(path)


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    metrics, logger = state.metrics, state.logger

    def respond(request: Request, error: APIError) -> JSONResponse:
        metrics.observe_error(_route_label(request.url.path), error.status)
        return JSONResponse(error.envelope(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("request failed: %s", exc.message)
        return respond(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = not_found(f"no route {request.method} {request.url.path}; see GET /docs for the API", code="route_not_found")
        elif exc.status_code == 405:
            error = method_not_allowed(f"{request.method} is not allowed on {request.url.path}")
        elif exc.status_code < 500:
            error = APIError(exc.status_code, str(exc.detail), "invalid_request_error")
        else:
            error = internal_error(str(exc.detail))
        if exc.headers:
            error.headers.update(exc.headers)
        return respond(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return respond(request, invalid_request(f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", "invalid request")), param, first.get("type")))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)
