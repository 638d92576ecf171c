"""Recording served traffic: every verification (all routes) becomes a row of the traffic store
(:mod:`sdm_core.traffic`) without delaying its response.

Requests only build a record and put it on a bounded queue; one background thread writes batches to the store.
When the queue is full the record is dropped and counted (``sdm_traffic_records_dropped_total{reason="queue_full"}``);
when the store fails, the batch is dropped and counted (``reason="store_error"``), ``sdm_traffic_store_up`` turns 0,
``/ready`` says why, and the writer reconnects with a growing back-off. Serving never waits for the store.
The writer also applies retention (age and row count) once a minute.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sdm_core.traffic import Feedback, FeedbackResult, StoreError, TrafficRecord, TrafficStore, redact_url
from server.traffic_metrics import TrafficMetrics

__all__ = ["TrafficSettings", "TrafficRecorder", "StoreUnavailable", "make_record"]

_BATCH = 256
_RETENTION_INTERVAL_S = 60.0
_MAX_BACKOFF_S = 30.0


class StoreUnavailable(RuntimeError):
    """The traffic store is off or cannot be reached."""


@dataclass(frozen=True)
class TrafficSettings:
    url: str | None
    store_text: bool = False
    sample_rate: float = 1.0
    queue_size: int = 10000
    retention_s: float = 0.0
    max_rows: int = 0


class TrafficRecorder:
    """The background writer. ``start`` / ``close`` from the app's lifespan; ``submit`` from any request."""

    def __init__(
        self,
        settings: TrafficSettings,
        metrics: TrafficMetrics,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.logger = logger or logging.getLogger("sdm.server.traffic")
        self._rng = rng or random.Random()
        self._queue: queue.Queue[TrafficRecord | None] = queue.Queue(maxsize=settings.queue_size)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.store: TrafficStore | None = None
        self.available = False
        self.error: str | None = None if settings.url else "recording is off (--traffic-store off)"
        metrics.enabled.set(1 if settings.url else 0)
        metrics.up.set(0)

    @property
    def enabled(self) -> bool:
        return self.settings.url is not None

    def status(self) -> dict:
        """What /ready reports about the store."""
        if not self.enabled:
            return {"status": "off"}
        out = {"status": "ok" if self.available else "unavailable", "url": redact_url(self.settings.url or "")}
        if not self.available and self.error:
            out["error"] = self.error
        return out

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._thread is None:
            self.error = "connecting"
            self._thread = threading.Thread(target=self._run, name="sdm-traffic-writer", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop."""
        if self._thread is not None:
            self._stop.set()
            try:
                self._queue.put_nowait(None)  # wakes the writer
            except queue.Full:
                pass
            self._thread.join(timeout_s)
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.available = False
        self.metrics.up.set(0)

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, record: TrafficRecord) -> bool:
        """Queue a record (never blocks). False when it is sampled out, recording is off, or the queue is full."""
        if not self.enabled or self._stop.is_set():
            return False
        if self.settings.sample_rate < 1.0 and self._rng.random() >= self.settings.sample_rate:
            self.metrics.sampled_out.inc()
            return False
        if not self.settings.store_text:
            record.prompt = None
            record.answer = None
        with self._lock:
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self.metrics.dropped.labels(reason="queue_full").inc()
                return False
            self._pending.add(record.id)
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    def wait_written(self, ids: Sequence[str], timeout_s: float) -> None:
        """Block (a worker thread, never the event loop) until none of ``ids`` is still queued, or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._written:
            while any(i in self._pending for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._written.wait(left)

    def _ready_store(self) -> TrafficStore:
        if not self.enabled:
            raise StoreUnavailable(
                "this server does not record its traffic (--traffic-store off), so it takes no feedback"
            )
        if not self.available or self.store is None:
            raise StoreUnavailable(f"the traffic store is unavailable ({self.error}); retry later")
        return self.store

    def set_feedback(self, items: Sequence[Feedback]) -> FeedbackResult:
        """Label records (a worker thread). Raises :class:`StoreUnavailable` when the store is off or down."""
        store = self._ready_store()
        self.wait_written([i.id for i in items], timeout_s=5.0)
        try:
            return store.set_feedback(items)
        except Exception as exc:  # noqa: BLE001 - a database error: the store is down
            self._failed(exc)
            raise StoreUnavailable(f"the traffic store failed: {self.error}; retry later") from None

    # -- the writer thread ---------------------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.available or self.error != message:
            self.logger.error("traffic store unavailable: %s", message)
        self.available = False
        self.error = message
        self.metrics.up.set(0)

    def _connect(self) -> bool:
        try:
            if self.store is None:
                self.store = TrafficStore(self.settings.url or "")
            self.store.migrate()
            self.store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the server serving without a store
            self._failed(exc)
            if isinstance(exc, StoreError):  # a bad URL or a missing driver does not heal by retrying
                self.store = None
            return False
        if not self.available:
            self.logger.info("traffic store ready", extra={"store": redact_url(self.settings.url or "")})
        self.available = True
        self.error = None
        self.metrics.up.set(1)
        return True

    def _take_batch(self, first: TrafficRecord | None) -> list[TrafficRecord]:
        batch = [first] if first is not None else []
        while len(batch) < _BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                batch.append(item)
        return batch

    def _done(self, batch: list[TrafficRecord]) -> None:
        with self._written:
            for record in batch:
                self._pending.discard(record.id)
            self._written.notify_all()
        self.metrics.queue_depth.set(self._queue.qsize())

    def _run(self) -> None:
        backoff = 0.5
        next_retention = 0.0
        while True:
            if not self.available:
                if self._connect():
                    backoff = 0.5
                else:
                    # While the store is down, queued records wait (up to the queue's bound, then they are dropped).
                    if self._stop.wait(backoff):
                        self._drain_on_stop()
                        return
                    backoff = min(_MAX_BACKOFF_S, backoff * 2)
                    continue
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                first = None
            batch = self._take_batch(first)
            if batch:
                self._write(batch)
            if self.available and time.monotonic() >= next_retention:
                next_retention = time.monotonic() + _RETENTION_INTERVAL_S
                self._retain()
            if self._stop.is_set() and self._queue.empty():
                return

    def _write(self, batch: list[TrafficRecord]) -> None:
        try:
            assert self.store is not None
            self.store.insert(batch)
            self.metrics.written.inc(len(batch))
        except Exception as exc:  # noqa: BLE001 - the store went away: count the loss, keep serving
            self._failed(exc)
            self.metrics.dropped.labels(reason="store_error").inc(len(batch))
        finally:
            self._done(batch)

    def _drain_on_stop(self) -> None:
        batch = self._take_batch(None)
        if batch:
            self.metrics.dropped.labels(reason="store_error").inc(len(batch))
            self._done(batch)

    def _retain(self) -> None:
        settings = self.settings
        if not settings.retention_s and not settings.max_rows:
            return
        try:
            assert self.store is not None
            deleted = self.store.prune(max_age_s=settings.retention_s or None, max_rows=settings.max_rows or None)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        if deleted:
            self.metrics.pruned.inc(deleted)
            self.logger.info("traffic store retention", extra={"deleted": deleted})


def make_record(
    response_id: str, route: str, facts: dict, result, prompt, created_at: float | None = None
) -> TrafficRecord:
    """The record of one answer (a :class:`server.pipeline.VerificationResult`) served by the model of ``facts``."""
    best = result.best
    h, dim = TrafficRecord.encode_h(best.embedding.detach().to("cpu").float().numpy())
    prompt_text = prompt if isinstance(prompt, str) else json.dumps([dict(m) for m in prompt], ensure_ascii=False)
    return TrafficRecord(
        id=response_id,
        created_at=time.time() if created_at is None else created_at,
        bundle=str(facts.get("bundle", "")),
        bundle_sha256=str(facts.get("bundle_sha256", "")),
        head_version=str(facts.get("head_version", "")),
        route=route,
        alpha=float(result.alpha),
        admitted=bool(best.admitted),
        prediction=int(best.prediction),
        probability=float(best.probability),
        q=int(best.q),
        q_prime=float(best.q_prime),
        d=float(best.d),
        abstention_reason=best.abstention_reason,
        h=h,
        h_dim=dim,
        prompt=prompt_text,
        answer=best.generation.text,
    )
