"""Metrics of the traffic store and of feedback (prefix ``sdm_``), on the app's registry (server/metrics.py owns an
instance). Kept apart from server/traffic.py so that exporting them needs no database driver."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["TrafficMetrics", "alpha_label"]


class TrafficMetrics:
    """The traffic store's and feedback's metrics, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.written = Counter(
            "sdm_traffic_records_written", "Verification records written to the traffic store", registry=r
        )
        self.dropped = Counter(
            "sdm_traffic_records_dropped",
            "Verification records not written, by reason (queue_full, store_error)",
            ["reason"],
            registry=r,
        )
        self.sampled_out = Counter(
            "sdm_traffic_records_sampled_out", "Answers not recorded because of --traffic-sample-rate", registry=r
        )
        self.pruned = Counter(
            "sdm_traffic_records_pruned", "Records deleted by retention (age or row count)", registry=r
        )
        self.queue_depth = Gauge(
            "sdm_traffic_queue_depth", "Records waiting for the traffic store's writer", registry=r
        )
        self.up = Gauge(
            "sdm_traffic_store_up",
            "1 when the traffic store is reachable and migrated, else 0 (also 0 when recording is off)",
            registry=r,
        )
        self.enabled = Gauge(
            "sdm_traffic_store_enabled",
            "1 when the server records its traffic (--traffic-store is not off)",
            registry=r,
        )
        self.feedback = Counter(
            "sdm_feedback_labels",
            "Labels received on POST /v1/feedback, by the labelled answer's decision (admitted, abstained), label "
            "(correct, wrong, ood) and alpha",
            ["decision", "label", "alpha"],
            registry=r,
        )
        self.ladder_alpha = Gauge(
            "sdm_ladder_alpha",
            "The alphas of the served ladder, as values (the alerts compare observed accuracy against them)",
            ["alpha"],
            registry=r,
        )
        for reason in ("queue_full", "store_error"):
            self.dropped.labels(reason=reason)

    def set_ladder(self, alphas: Sequence[float]) -> None:
        self.ladder_alpha.clear()
        for alpha in alphas:
            self.ladder_alpha.labels(alpha=alpha_label(alpha)).set(float(alpha))
            for decision in ("admitted", "abstained"):  # exported at 0, so increase() sees the first label
                for label in ("correct", "wrong", "ood"):
                    self.feedback.labels(decision=decision, label=label, alpha=alpha_label(alpha))

    def observe_feedback(self, records: Sequence) -> None:
        """Count labels (``sdm_core.traffic.TrafficRecord`` rows as they are after labelling)."""
        for record in records:
            decision = "admitted" if record.admitted else "abstained"
            self.feedback.labels(decision=decision, label=record.label, alpha=alpha_label(record.alpha)).inc()


def alpha_label(alpha: float) -> str:
    """The ``alpha`` label value: the shortest form of the number (0.9, 0.95)."""
    return f"{float(alpha):g}"
