"""OpenTelemetry tracing of requests: a span per request and one per stage (admission queue, each attempt's
generation and verification), exported over OTLP/HTTP. Off by default.

The tracer provider belongs to the server instance, not to the process-wide OpenTelemetry globals, so two servers
(or a test and a server) in one process never share spans. With tracing off every call is a no-op that costs
one attribute check, and the OpenTelemetry SDK is not imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

__all__ = ["Tracing", "SpanHandle"]


class SpanHandle:
    """What a stage may do to its span: add attributes, record an error. A no-op when tracing is off."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def set(self, **attributes: Any) -> None:
        if self._span is not None:
            self._span.set_attributes({f"sdm.{k}": _attribute(v) for k, v in attributes.items() if v is not None})

    def error(self, exc: BaseException) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _attribute(value: Any) -> Any:
    # OpenTelemetry attributes are str, bool, int, float or sequences of one of them.
    if isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


class Tracing:
    """Spans of one server. ``endpoint`` is an OTLP/HTTP traces URL (e.g. ``http://collector:4318/v1/traces``);
    empty turns tracing off. ``exporter`` replaces the OTLP exporter (tests pass an in-memory one); spans are
    then exported synchronously as they end."""

    def __init__(self, endpoint: str = "", service_name: str = "sdm-lm", exporter: SpanExporter | None = None) -> None:
        self.enabled = bool(endpoint) or exporter is not None
        self._provider: TracerProvider | None = None
        self._tracer = None
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Batched, in a background thread: a slow or absent collector never delays a request.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._provider = provider
        self._tracer = provider.get_tracer("sdm_lm.server")

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[SpanHandle]:
        """A span named ``name``, a child of the span current in this context (asyncio tasks and threads started
        with a copied context inherit it). Exceptions are recorded on the span and re-raised."""
        if self._tracer is None:
            yield SpanHandle(None)
            return
        with self._tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False) as span:
            handle = SpanHandle(span)
            handle.set(**attributes)
            try:
                yield handle
            except BaseException as exc:
                handle.error(exc)
                raise

    def shutdown(self) -> None:
        """Flush what is buffered and stop the exporter (at server shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()
