"""The FastAPI application: :func:`create_app` builds one app (its own metrics registry, model manager, admission
controller; no global state). The lifespan loads the bundle in the background, so ``/health`` answers at once and
``/ready`` turns 200 once every served model and head are loaded and a warm-up request passed.

Routes: ``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /v1/models``, ``POST /generate``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` for server-sent events) and
``POST /admin/reload``, and ``POST /v1/feedback`` (labels for served answers, kept in the traffic store with every
verification; see server/traffic.py and server/feedback.py). Every error is the OpenAI envelope with its HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sdm_core import __version__
from server.admission import AdmissionController
from server.backends import Backend, make_backend
from server.config import ServerConfig, traffic_url
from server.errors import APIError, internal_error, invalid_request, method_not_allowed, not_found
from server.execution import ClientDisconnected, RequestExecutor
from server.feedback import FeedbackHandler
from server.metrics import ServerMetrics
from server.middleware import RequestContextMiddleware
from server.model_manager import ModelManager
from server.openapi import openapi_schema
from server.routes import admin, chat, completions, feedback, generate, models, operations
from server.routes.chat import ChatServing
from server.routes.completions import CompletionServing
from server.routes.generate import GenerateServing
from server.tracing import Tracing
from server.traffic import TrafficRecorder, TrafficSettings, make_record

__all__ = ["create_app", "ServerState", "ROUTES"]

ROUTES = (
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/admin/reload",
    "/v1/feedback",
)


@dataclass
class ServerState:
    """Everything one app owns (``app.state.server``)."""

    config: ServerConfig
    metrics: ServerMetrics
    manager: ModelManager
    admission: AdmissionController
    executor: RequestExecutor
    traffic: TrafficRecorder
    feedback: FeedbackHandler
    generate: GenerateServing
    completions: CompletionServing
    chat: ChatServing
    logger: logging.Logger
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def begin_drain(self) -> None:
        """SIGTERM arrived (callable from any thread): what still runs after --drain-timeout-s is answered with 503."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        timeout = self.config.drain_timeout_s
        loop.call_soon_threadsafe(lambda: loop.call_later(timeout, self.executor.abort_in_flight))


_ROUTERS = (
    operations.router,
    models.router,
    generate.router,
    completions.router,
    chat.router,
    feedback.router,
    admin.router,
)


def _route_label(path: str) -> str:
    """The metrics label of a path: the route, or "other" (unknown paths must not grow the label set)."""
    return path if path in ROUTES else "other"


def create_app(config: ServerConfig, backend: Backend | None = None, tracing: Tracing | None = None) -> FastAPI:
    """The app for ``config``. ``backend`` (unloaded or loaded) replaces the one the config names (tests, tools);
    ``tracing`` replaces the one ``--otlp-traces-endpoint`` configures (tests pass an in-memory exporter)."""
    state = _build_state(config, backend)
    state.executor.tracing = tracing or Tracing(config.otlp_traces_endpoint, config.otel_service_name)
    app = FastAPI(
        title="sdm-lm selective generation",
        version=__version__,
        description="Generations with a calibrated probability that they followed the instructions, or an abstention "
        "with its reason.",
        lifespan=_lifespan(state),
    )
    app.state.server = state
    open_paths = {"/health"} | (set() if config.metrics_require_key else {"/metrics"})
    app.add_middleware(
        RequestContextMiddleware,
        api_keys=config.api_keys,
        admin_keys=config.admin_api_keys,
        open_paths=open_paths,
        max_body_bytes=config.max_body_bytes,
        drain_timeout_s=config.drain_timeout_s,
        on_error=state.metrics.observe_error,
        route_label=_route_label,
        logger=logging.getLogger("sdm.server.access"),
    )
    if config.cors_allow_origins:  # outside the key check: browsers send preflights without credentials
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Client-Request-Id"],
            expose_headers=["X-Request-Id", "X-Client-Request-Id", "Retry-After"],
            max_age=600,
        )
    _install_error_handlers(app, state)
    for router in _ROUTERS:
        app.include_router(router)
    app.openapi = openapi_schema(app, config, _ROUTERS)  # type: ignore[method-assign]
    return app


def _build_state(config: ServerConfig, backend: Backend | None) -> ServerState:
    """The app's objects: metrics, backend, traffic recorder, model manager, admission, executor and route servings."""
    logger = logging.getLogger("sdm.server")
    metrics = ServerMetrics()
    backend, extra, engine = _backends(config, backend, metrics)
    traffic = TrafficRecorder(
        TrafficSettings(
            url=traffic_url(config),
            store_text=config.store_text,
            sample_rate=config.traffic_sample_rate,
            queue_size=config.traffic_queue_size,
            retention_s=config.traffic_retention_days * 86400.0,
            max_rows=config.traffic_max_rows,
        ),
        metrics.traffic,
        logging.getLogger("sdm.server.traffic"),
    )
    manager = ModelManager(
        backend,
        model_name=config.served_model_name,
        extra=extra,
        engine=engine,
        warmup=config.warmup,
        warmup_max_tokens=min(4, config.max_tokens_cap),
        on_loaded=_on_loaded(metrics, logger, config.served_model_name),
        on_ready=lambda ready: metrics.ready.set(1 if ready else 0),
        logger=logger,
    )

    def queue_changed(active: int, waiting: int) -> None:
        metrics.in_flight.set(active)
        metrics.queue_depth.set(waiting)

    admission = AdmissionController(config.max_concurrent_requests, config.max_queue_size, queue_changed)
    executor = RequestExecutor(config, manager, admission, metrics, logger)
    if traffic.enabled:
        executor.on_answer = lambda rid, route, facts, prompt, result: traffic.submit(
            make_record(rid, route, facts, result, prompt)
        )
    return ServerState(
        config,
        metrics,
        manager,
        admission,
        executor,
        traffic,
        FeedbackHandler(config, traffic, metrics.traffic),
        GenerateServing(executor),
        CompletionServing(executor),
        ChatServing(executor),
        logger,
    )


def _engine_settings(config: ServerConfig, metrics: ServerMetrics) -> dict:
    """The settings every backend takes from the config, whichever backend serves."""
    return {
        "device": config.resolved_device(),
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "batch_wait_ms": config.batch_wait_ms,
        "batch_rejoin_ms": config.batch_rejoin_ms,
        "verify": config.verify_bundle,
        "observer": metrics.observe_batch,
        "hidden_states": config.hidden_states,
    }


def _backend(config: ServerConfig, backend: Backend | None, metrics: ServerMetrics) -> Backend:
    """The backend the config names, or the given one; either reports its batches to ``metrics``."""
    if backend is None:
        return make_backend(
            config.backend, config.bundle, vllm=config.vllm_settings(), **_engine_settings(config, metrics)
        )
    if getattr(backend, "observer", "missing") is None:
        backend.observer = metrics.observe_batch
    return backend


def _backends(
    config: ServerConfig, backend: Backend | None, metrics: ServerMetrics
) -> tuple[Backend, dict[str, Backend], Backend | None]:
    """(the default model's backend, the extra models' backends by name, the engine they share or None). Without
    --extra-bundles: the one backend :func:`_backend` makes; with them: one adapter engine and a view per bundle."""
    extras = config.extra_bundle_paths
    if not extras:
        return _backend(config, backend, metrics), {}, None
    if backend is not None:
        raise ValueError("create_app: pass no backend with --extra-bundles (the app builds the shared engine)")
    engine = make_backend(
        config.backend,
        config.bundle,
        vllm=config.vllm_settings(),
        adapters=True,
        adapter_bundles=tuple(extras.values()),
        **_engine_settings(config, metrics),
    )
    from server.backends.adapters import AdapterBackend

    views = {name: AdapterBackend(engine, path) for name, path in extras.items()}  # type: ignore[arg-type]
    return AdapterBackend(engine, config.bundle), dict(views), engine  # type: ignore[arg-type]


def _on_loaded(metrics: ServerMetrics, logger: logging.Logger, default: str) -> Callable[[dict], None]:
    """What the model manager calls with the facts of each loaded bundle: the metrics' bundle facts (every model)
    and the certification, baseline and ladder (the default model's). Readiness is not a bundle's: sdm_ready
    follows the manager's :attr:`~server.model_manager.ModelManager.ready` (``on_ready``)."""

    def loaded(facts: dict) -> None:
        metrics.set_bundle({k: v for k, v in facts.items() if k not in ("alphas", "certification")})
        if facts.get("model") == default:
            metrics.set_baseline(facts)
            metrics.set_certification(facts.get("certification"))
            metrics.traffic.set_ladder(facts.get("alphas", ()))
        certification = facts.get("certification")
        logger.info(
            "certification",
            extra={
                "bundle": facts["bundle"],
                "certification": certification["summary"]
                if certification
                else "none recorded: the ladder was not checked on held-out documents",
            },
        )

    return loaded


def _lifespan(state: ServerState):
    """Load the bundle in the background at start (``/health`` answers at once); close everything at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.logger.info("starting", extra={"config": state.config.to_dict()})
        state.loop = asyncio.get_running_loop()
        state.traffic.start()
        state.manager.start()
        try:
            yield
        finally:
            state.logger.info("shutting down")
            state.metrics.ready.set(0)
            await state.manager.close()
            await asyncio.to_thread(state.traffic.close)
            await asyncio.to_thread(state.executor.tracing.shutdown)

    return lifespan


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
            error = not_found(
                f"no route {request.method} {request.url.path}; see GET /docs for the API", code="route_not_found"
            )
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
        return respond(
            request,
            invalid_request(
                f"{param}: {first.get('msg', 'invalid request')}"
                if param
                else str(first.get("msg", "invalid request")),
                param,
                first.get("type"),
            ),
        )

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)
