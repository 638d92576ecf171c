"""Prometheus metrics (prefix ``sdm_``) on a per-app ``CollectorRegistry``: nothing is registered globally, so
several apps (tests, reloads) never collide."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Metric,
    generate_latest,
)

from server.traffic_metrics import TrafficMetrics

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST", "OUTCOMES", "STAGES"]

OUTCOMES = ("admitted", "abstained", "error")
STAGES = ("queue", "generation", "verification", "total")
_PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
_ALPHA_BUCKETS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0)
_Q_PRIME_BUCKETS = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 16)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _latency_histograms(r: CollectorRegistry) -> tuple[Histogram, Histogram, Histogram]:
    """Latency by stage, time to first token and time per output token."""
    stages = Histogram(
        "sdm_stage_latency_seconds",
        "Latency by stage (queue, generation, verification, total)",
        ["stage"],
        buckets=_LATENCY_BUCKETS,
        registry=r,
    )
    first_token = Histogram(
        "sdm_time_to_first_token_seconds",
        "From the request's arrival (queue included) to its first generated token",
        ["route"],
        buckets=_LATENCY_BUCKETS,
        registry=r,
    )
    per_token = Histogram(
        "sdm_time_per_output_token_seconds",
        "Mean time between generated tokens after the first, per attempt",
        ["route"],
        buckets=_TOKEN_BUCKETS,
        registry=r,
    )
    return stages, first_token, per_token


class _EngineMetrics:
    """The ``vllm:`` families of prometheus_client's process-wide registry, where vLLM's stat logger writes; no
    other family of that registry (process, platform, ...) is exposed."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


class ServerMetrics:
    """Every metric the server exports; one instance per app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sdm_requests",
            "Requests by route and outcome (admitted, abstained, error)",
            ["route", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "sdm_request_errors", "Failed requests by route and HTTP status", ["route", "status"], registry=r
        )
        self.abstentions = Counter("sdm_abstentions", "Abstentions by reason", ["reason"], registry=r)
        self._add_output_metrics(r)
        self.latency, self.time_to_first_token, self.time_per_output_token = _latency_histograms(r)
        self.prompt_tokens = Counter("sdm_prompt_tokens", "Prompt tokens processed (once per attempt)", registry=r)
        self.completion_tokens = Counter(
            "sdm_completion_tokens", "Completion tokens of all attempts, written tags included", registry=r
        )
        self.in_flight = Gauge("sdm_in_flight_requests", "Requests holding a processing slot", registry=r)
        self.queue_depth = Gauge("sdm_queue_depth", "Requests waiting for a processing slot", registry=r)
        self.attempts = Histogram(
            "sdm_attempts", "Generation attempts per request", buckets=_ATTEMPT_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "sdm_batch_size",
            "Requests per backend batch (generate, embed)",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "sdm_cancelled_requests", "Requests whose client disconnected before the answer", ["route"], registry=r
        )
        self.hidden_state_sources = Counter(
            "sdm_hidden_state_sources",
            "Head inputs by source: states captured while generating (reused) or a separate forward pass (forward)",
            ["source"],
            registry=r,
        )
        for source in ("reused", "forward"):  # exported at 0 from the start, so ratios exist before the first request
            self.hidden_state_sources.labels(source=source)
        self._add_bundle_metrics(r)
        for outcome in OUTCOMES:
            for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
                self.requests.labels(route=route, outcome=outcome)
        for stage in STAGES:
            self.latency.labels(stage=stage)
        # The traffic store and feedback (server/traffic.py, server/feedback.py).
        self.traffic = TrafficMetrics(r)

    def _add_output_metrics(self, r: CollectorRegistry) -> None:
        """What the head said of each returned output: probability, q', region alpha."""
        self.probability = Histogram(
            "sdm_probability",
            "Calibrated SDM probability of the verified class",
            buckets=_PROBABILITY_BUCKETS,
            registry=r,
        )
        self.q_prime = Histogram(
            "sdm_q_prime", "Rescaled similarity q' of returned outputs", buckets=_Q_PRIME_BUCKETS, registry=r
        )
        self.region_alpha = Histogram(
            "sdm_region_alpha",
            "Highest ladder alpha whose region admits the output (outputs in no region are not observed)",
            buckets=_ALPHA_BUCKETS,
            registry=r,
        )
        self.no_region = Counter("sdm_outputs_without_region", "Outputs that no ladder region admits", registry=r)

    def _add_bundle_metrics(self, r: CollectorRegistry) -> None:
        """The served bundle: reloads, readiness, its facts and its certification."""
        self.reloads = Counter("sdm_bundle_reloads", "Bundle reloads by result", ["result"], registry=r)
        self.ready = Gauge("sdm_ready", "1 when every served model and head are loaded and warmed up", registry=r)
        self.bundle = Info(
            "sdm_bundle",
            "The bundles served, one series per model: bundle, head version, default alpha, calibration admitted "
            "proportion",
            ["model"],
            registry=r,
        )
        self.certified = Gauge(
            "sdm_region_certified",
            "1 when the region at alpha is certified on the bundle's held-out split, "
            "0 when it is not (too little evidence, none admitted, no region), -1 when certification withdrew it",
            ["alpha"],
            registry=r,
        )
        self.certified_lower = Gauge(
            "sdm_certified_accuracy_lower_bound",
            "95 % Clopper-Pearson lower bound of the accuracy of "
            "answers admitted at alpha on the bundle's certification split",
            ["alpha"],
            registry=r,
        )
        self.baseline = Gauge(
            "sdm_calibration_admitted_proportion",
            "Calibration-set admitted proportion at the default alpha (the drift baseline)",
            registry=r,
        )

    def observe_result(self, route: str, result) -> None:
        """Record a served answer (a :class:`server.pipeline.VerificationResult`)."""
        best = result.best
        self.requests.labels(route=route, outcome="admitted" if best.admitted else "abstained").inc()
        if not best.admitted and best.abstention_reason:
            self.abstentions.labels(reason=best.abstention_reason).inc()
        self.probability.observe(best.probability)
        self.q_prime.observe(best.q_prime)
        if best.region_alpha is None:
            self.no_region.inc()
        else:
            self.region_alpha.observe(best.region_alpha)
        self.attempts.observe(result.attempts)
        self.prompt_tokens.inc(result.prompt_tokens * result.attempts)
        self.completion_tokens.inc(result.completion_tokens_all_attempts)
        self.latency.labels(stage="generation").observe(result.generation_ms / 1000.0)
        self.latency.labels(stage="verification").observe(result.verification_ms / 1000.0)

    def observe_token_times(self, route: str, result, started: float) -> None:
        """TTFT of the request (its first attempt's first token, from ``started``, a perf_counter time) and the time
        per output token of every attempt."""
        first = result.all_attempts[0].generation
        if first.first_token_at is not None:
            self.time_to_first_token.labels(route=route).observe(max(0.0, first.first_token_at - started))
        for attempt in result.all_attempts:
            g = attempt.generation
            if g.first_token_at is not None and g.last_token_at is not None and g.completion_tokens > 1:
                per_token = (g.last_token_at - g.first_token_at) / (g.completion_tokens - 1)
                self.time_per_output_token.labels(route=route).observe(per_token)

    def observe_error(self, route: str, status: int) -> None:
        self.requests.labels(route=route, outcome="error").inc()
        self.errors.labels(route=route, status=str(status)).inc()

    def observe_batch(self, kind: str, size: int) -> None:
        """A backend batch ("generate", "embed") or head inputs served from captured states ("reused")."""
        if kind == "reused":
            self.hidden_state_sources.labels(source="reused").inc(size)
            return
        if kind == "embed":
            self.hidden_state_sources.labels(source="forward").inc(size)
        self.batch_size.labels(kind=kind).observe(size)

    def set_bundle(self, facts: dict) -> None:
        """The facts of a served model's bundle (its sdm_bundle_info series)."""
        self.bundle.labels(model=str(facts.get("model", ""))).info(
            {k: str(v) for k, v in facts.items() if k != "model"}
        )

    def set_baseline(self, facts: dict) -> None:
        """The default model's calibration baseline (the drift alerts read it)."""
        proportion = facts.get("calibration_admitted_proportion")
        if proportion is not None:
            self.baseline.set(float(proportion))

    def set_certification(self, certification: dict | None) -> None:
        """Per-alpha certification gauges of the bundle just loaded (cleared first: a reload may change the ladder)."""
        self.certified.clear()
        self.certified_lower.clear()
        for alpha, row in ((certification or {}).get("alphas") or {}).items():
            withdrawn = float(alpha) in (certification.get("withdrawn_alphas") or [])
            self.certified.labels(alpha=alpha).set(-1 if withdrawn else 1 if row["status"] == "certified" else 0)
            self.certified_lower.labels(alpha=alpha).set(row["lower_bound"])

    def render(self) -> bytes:
        """This server's metrics, then the vLLM engine's (``vllm:``) when the vLLM backend runs in this process."""
        return generate_latest(self.registry) + generate_latest(_EngineMetrics())
