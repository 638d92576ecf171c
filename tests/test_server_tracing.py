"""OpenTelemetry tracing: spans nest per request, carry their stage's attributes, record errors, and cost nothing
when tracing is off."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_server_support import tiny_bundle  # noqa: F401 - fixture

from server.tracing import Tracing


def test_tracing_is_off_by_default_and_spans_are_no_ops() -> None:
    tracing = Tracing()
    assert not tracing.enabled
    with tracing.span("request", route="/generate") as span:
        span.set(admitted=True)
    tracing.shutdown()


def test_stage_spans_are_children_of_the_request_span() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter=exporter)
    with tracing.span("request", route="/generate", request_id="r1"):
        with tracing.span("admission"):
            pass
        with tracing.span("attempt", attempt=0):
            with tracing.span("generation") as generation:
                generation.set(completion_tokens=7)
            with tracing.span("verification") as verification:
                verification.set(probability=0.93, admitted=True)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "admission", "attempt", "generation", "verification"}
    request = spans["request"]
    assert request.parent is None and request.attributes["sdm.route"] == "/generate"
    assert spans["admission"].parent.span_id == request.context.span_id
    assert spans["attempt"].parent.span_id == request.context.span_id
    assert spans["generation"].parent.span_id == spans["attempt"].context.span_id
    assert spans["generation"].attributes["sdm.completion_tokens"] == 7
    assert spans["verification"].attributes["sdm.admitted"] is True
    assert {s.context.trace_id for s in spans.values()} == {request.context.trace_id}
    assert request.resource.attributes["service.name"] == "sdm-lm"


def test_an_exception_is_recorded_on_its_span_and_re_raised() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter=exporter)
    with pytest.raises(TimeoutError):
        with tracing.span("request"):
            raise TimeoutError("request timed out after 1 s")
    (span,) = exporter.get_finished_spans()
    assert not span.status.is_ok and "TimeoutError" in span.status.description
    assert span.events[0].name == "exception"


def test_concurrent_requests_get_separate_traces() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter=exporter)

    async def request(name: str) -> None:
        with tracing.span("request", request_id=name):
            await asyncio.sleep(0.01)
            with tracing.span("generation"):
                await asyncio.sleep(0.01)

    async def main() -> None:
        await asyncio.gather(request("a"), request("b"))

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    requests = {s.attributes["sdm.request_id"]: s for s in spans if s.name == "request"}
    for generation in (s for s in spans if s.name == "generation"):
        parent = next(r for r in requests.values() if r.context.span_id == generation.parent.span_id)
        assert parent.context.trace_id == generation.context.trace_id
    assert requests["a"].context.trace_id != requests["b"].context.trace_id


def test_two_servers_in_one_process_do_not_share_spans() -> None:
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    one, other = Tracing(exporter=first), Tracing(exporter=second)
    with one.span("request"):
        pass
    with other.span("request"), other.span("generation"):
        pass
    assert [s.name for s in second.get_finished_spans()] == ["generation", "request"]
    assert len(first.get_finished_spans()) == 1


def test_a_served_request_exports_its_stages_as_one_trace(tiny_bundle) -> None:
    import httpx
    from test_server_support import UvicornThread, make_config

    from server.app import create_app

    exporter = InMemorySpanExporter()
    app = create_app(make_config(tiny_bundle), tracing=Tracing(exporter=exporter))
    with UvicornThread(app) as running, httpx.Client(base_url=running.url, timeout=120) as client:
        answer = client.post("/generate", json={"prompt": "b a c", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        plain = [s for s in exporter.get_finished_spans() if s.attributes.get("sdm.request_id") == answer.json()["id"]]
        assert len(plain) == 1, "one request span per answer"
        request = plain[0]
        trace = [s for s in exporter.get_finished_spans() if s.context.trace_id == request.context.trace_id]
        by_name = {s.name: s for s in trace}
        assert set(by_name) == {"request", "admission", "attempt", "generation", "verification"}
        assert by_name["admission"].parent.span_id == request.context.span_id
        assert by_name["attempt"].parent.span_id == request.context.span_id
        assert by_name["generation"].parent.span_id == by_name["attempt"].context.span_id
        assert by_name["verification"].parent.span_id == by_name["attempt"].context.span_id
        assert request.attributes["sdm.route"] == "/generate"
        assert request.attributes["sdm.admitted"] is answer.json()["admitted"]
        assert by_name["generation"].attributes["sdm.completion_tokens"] >= 1
        assert by_name["verification"].attributes["sdm.probability"] == pytest.approx(
            answer.json()["probability"], abs=1e-6
        )

        exporter.clear()
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "b a c"}], "max_tokens": 4, "stream": True},
        ) as streamed:
            assert streamed.status_code == 200
            assert "[DONE]" in "".join(streamed.iter_text())
        spans = exporter.get_finished_spans()
        (stream_request,) = [s for s in spans if s.name == "request"]
        assert stream_request.attributes["sdm.stream"] is True
        assert stream_request.attributes["sdm.route"] == "/v1/chat/completions"
        assert {s.name for s in spans if s.context.trace_id == stream_request.context.trace_id} >= {
            "attempt",
            "generation",
            "verification",
        }
