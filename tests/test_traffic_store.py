"""The traffic store (sdm_core.traffic) and the server's background writer (server/traffic.py), on SQLite and on a
real PostgreSQL server started by the test: migrations, records, labels, retention, sampling, the bounded queue,
and a store outage."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from pg_support import PostgresServer
from prometheus_client import CollectorRegistry
from test_server_support import metric_value

from sdm_core.traffic import Feedback, StoreError, TrafficRecord, TrafficStore, redact_url, sqlite_url
from server.traffic import TrafficRecorder, TrafficSettings
from server.traffic_metrics import TrafficMetrics


def record(i: int, created_at: float | None = None, dim: int = 8, admitted: bool = True) -> TrafficRecord:
    h, n = TrafficRecord.encode_h(np.arange(dim, dtype=np.float32) * 0.1 + i)
    return TrafficRecord(
        id=f"gen-{i:04d}",
        created_at=1_000_000.0 + i if created_at is None else created_at,
        bundle="/b",
        bundle_sha256="abc",
        head_version="head-1",
        route="/generate",
        alpha=0.9,
        admitted=admitted,
        prediction=1,
        probability=0.93,
        q=5,
        q_prime=3.5,
        d=0.25,
        abstention_reason=None if admitted else "below_threshold",
        h=h,
        h_dim=n,
        prompt="p",
        answer="a",
    )


@pytest.fixture(scope="module")
def postgres():
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "data" / "traffic.sqlite3")
    else:
        pg = request.getfixturevalue("postgres")
        url = pg.url
    s = TrafficStore(url)
    s.migrate()
    yield s
    if request.param == "postgresql":  # one server for the module: empty the table between tests
        with s.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM sdm_verifications")
    s.close()


def test_migrations_create_the_schema_once_and_record_their_revision(store: TrafficStore) -> None:
    assert store.revision() == "0001"
    assert store.migrate() == "0001"  # idempotent: a restart or a second replica changes nothing
    assert store.count() == 0


def test_a_record_round_trips_with_its_float32_head_input(store: TrafficStore) -> None:
    original = record(7, dim=576)
    store.insert([original, record(8)])
    back = store.get("gen-0007")
    assert back == original
    assert back.embedding().dtype == np.float32
    assert np.array_equal(back.embedding(), np.arange(576, dtype=np.float32) * 0.1 + 7)
    assert store.get("gen-9999") is None


def test_the_last_label_wins_and_keeps_its_time(store: TrafficStore) -> None:
    store.insert([record(1), record(2)])
    first = store.set_feedback([Feedback("gen-0001", "correct")], at=100.0)
    assert first.previous == {"gen-0001": None} and first.records[0].label == "correct"
    second = store.set_feedback(
        [Feedback("gen-0001", "wrong", "it ignored the word limit"), Feedback("gen-0001", "ood")], at=200.0
    )
    assert second.previous == {"gen-0001": "correct"}
    got = store.get("gen-0001")
    assert (got.label, got.labelled_at, got.note) == ("ood", 200.0, None)
    assert store.get("gen-0002").label is None


def test_feedback_with_an_unknown_id_writes_nothing(store: TrafficStore) -> None:
    store.insert([record(1)])
    result = store.set_feedback([Feedback("gen-0001", "correct"), Feedback("gen-nope", "wrong")])
    assert result.missing == ["gen-nope"] and result.records == []
    assert store.get("gen-0001").label is None
    with pytest.raises(ValueError, match="label must be one of"):
        store.set_feedback([Feedback("gen-0001", "maybe")])


def test_retention_deletes_by_age_then_the_oldest_beyond_the_row_limit(store: TrafficStore) -> None:
    now = 2_000_000.0
    store.insert([record(i, created_at=now - 10 * (10 - i)) for i in range(10)])  # ages 100, 90, ..., 10 s
    assert store.prune(max_age_s=55, now=now) == 5  # ages 100..60 go
    assert store.count() == 5
    assert store.prune(max_rows=2, now=now) == 3
    assert [i for i in range(10) if store.get(f"gen-{i:04d}") is not None] == [8, 9]  # the two newest
    assert store.prune(max_age_s=1000, max_rows=10, now=now) == 0


def test_labelled_rows_come_back_in_label_order_with_filters(store: TrafficStore) -> None:
    store.insert([record(i) for i in range(5)])
    store.set_feedback([Feedback("gen-0003", "wrong")], at=10.0)
    store.set_feedback([Feedback("gen-0001", "correct"), Feedback("gen-0004", "ood")], at=20.0)
    assert [r.id for r in store.labelled()] == ["gen-0003", "gen-0001", "gen-0004"]
    assert [r.id for r in store.labelled(since=15.0)] == ["gen-0001", "gen-0004"]
    assert [r.id for r in store.labelled(labels=("correct", "wrong"))] == ["gen-0003", "gen-0001"]
    assert store.labelled(head_versions=["head-2"]) == []
    assert store.count(labelled=True) == 3 and store.count(labelled=False) == 2


def test_a_bad_url_is_refused_with_the_accepted_forms() -> None:
    with pytest.raises(StoreError, match="not a SQLAlchemy URL"):
        TrafficStore("not a url")
    assert redact_url("postgresql+psycopg://sdm:secret@db/sdm") == "postgresql+psycopg://sdm:***@db/sdm"


# -- the server's background writer ------------------------------------------------------------------------------
def metrics_text(metrics: TrafficMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def make_recorder(url: str | None, **settings) -> TrafficRecorder:
    registry = CollectorRegistry()
    metrics = TrafficMetrics(registry)
    metrics.registry = registry  # kept for metrics_text
    return TrafficRecorder(TrafficSettings(url=url, **settings), metrics, rng=random.Random(0))


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_writer_records_without_text_unless_asked(tmp_path) -> None:
    url = sqlite_url(tmp_path / "t.sqlite3")
    for store_text in (False, True):
        recorder = make_recorder(url, store_text=store_text)
        recorder.start()
        wait_for(lambda: recorder.available)  # noqa: B023 - called at once, inside this iteration
        rec = record(int(store_text))
        assert recorder.submit(rec)
        recorder.close()
        got = TrafficStore(url).get(rec.id)
        assert (got.prompt, got.answer) == (("p", "a") if store_text else (None, None))
        assert metric_value(metrics_text(recorder.metrics), "sdm_traffic_records_written_total") == 1


def test_a_full_queue_drops_records_and_counts_them(tmp_path) -> None:
    recorder = make_recorder(sqlite_url(tmp_path / "t.sqlite3"), queue_size=3)  # not started: nothing drains the queue
    accepted = [recorder.submit(record(i)) for i in range(5)]
    assert accepted == [True, True, True, False, False]
    text = metrics_text(recorder.metrics)
    assert metric_value(text, "sdm_traffic_records_dropped_total", {"reason": "queue_full"}) == 2
    assert metric_value(text, "sdm_traffic_queue_depth") == 3


def test_the_sampling_rate_records_that_share_of_answers(tmp_path) -> None:
    recorder = make_recorder(sqlite_url(tmp_path / "t.sqlite3"), sample_rate=0.25, queue_size=10_000)
    kept = sum(recorder.submit(record(i)) for i in range(2000))
    assert 400 < kept < 600  # binomial(2000, 0.25): 500 +- 5 sd
    assert metric_value(metrics_text(recorder.metrics), "sdm_traffic_records_sampled_out_total") == 2000 - kept


def test_recording_off_records_nothing_and_says_so() -> None:
    recorder = make_recorder(None)
    recorder.start()
    assert not recorder.submit(record(1))
    assert recorder.status() == {"status": "off"}
    assert metric_value(metrics_text(recorder.metrics), "sdm_traffic_store_enabled") == 0


def test_a_store_outage_is_reported_and_healed_without_losing_queued_records(postgres: PostgresServer) -> None:
    recorder = make_recorder(postgres.url)
    recorder.start()
    try:
        wait_for(lambda: recorder.available)
        assert recorder.submit(record(1))
        recorder.wait_written(["gen-0001"], 10)
        postgres.stop()
        assert recorder.submit(record(2))  # this write fails: dropped and counted
        wait_for(lambda: not recorder.available)
        status = recorder.status()
        assert status["status"] == "unavailable" and status["error"] and "postgres@" in status["url"]
        assert metric_value(metrics_text(recorder.metrics), "sdm_traffic_store_up") == 0
        assert recorder.submit(record(3))  # queued while the store is down
        postgres.start()
        wait_for(lambda: recorder.available, timeout=60)
        recorder.wait_written(["gen-0003"], 20)
        store = TrafficStore(postgres.url)
        assert store.get("gen-0001") is not None and store.get("gen-0003") is not None
        text = metrics_text(recorder.metrics)
        assert metric_value(text, "sdm_traffic_store_up") == 1
        lost = metric_value(text, "sdm_traffic_records_dropped_total", {"reason": "store_error"})
        assert lost == (0 if store.get("gen-0002") else 1)
        with store.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM sdm_verifications")
    finally:
        recorder.close()


# -- configuration ---------------------------------------------------------------------------------------------
def test_the_store_settings_are_validated_and_name_their_flag(tmp_path) -> None:
    from test_server_support import tiny_bundle_cached

    from server.config import ConfigError, ServerConfig, traffic_url

    bundle = str(tiny_bundle_cached().path)
    assert (
        traffic_url(ServerConfig(bundle=bundle, data_dir=str(tmp_path / "d")))
        == f"sqlite:///{(tmp_path / 'd' / 'traffic.sqlite3').resolve()}"
    )
    assert traffic_url(ServerConfig(bundle=bundle, traffic_store="off")) is None
    url = "postgresql+psycopg://sdm:secret@db/sdm"
    config = ServerConfig(bundle=bundle, traffic_store=url)
    assert traffic_url(config) == url and config.to_dict()["traffic_store"] == "postgresql+psycopg://sdm:***@db/sdm"
    for bad, flag in (
        (dict(traffic_store="mysql"), "--traffic-store"),
        (dict(traffic_sample_rate=0.0), "--traffic-sample-rate"),
        (dict(traffic_sample_rate=1.5), "--traffic-sample-rate"),
        (dict(traffic_queue_size=0), "--traffic-queue-size"),
        (dict(traffic_retention_days=-1.0), "--traffic-retention-days"),
        (dict(traffic_max_rows=-5), "--traffic-max-rows"),
        (dict(feedback_max_items=0), "--feedback-max-items"),
        (dict(data_dir=""), "--data-dir"),
    ):
        with pytest.raises(ConfigError, match=flag):
            ServerConfig(bundle=bundle, **bad)
    env = ServerConfig.from_sources(
        ["--bundle", bundle], {"SDM_TRAFFIC_STORE": "off", "SDM_STORE_TEXT": "true", "SDM_TRAFFIC_SAMPLE_RATE": "0.5"}
    )
    assert (env.traffic_store, env.store_text, env.traffic_sample_rate) == ("off", True, 0.5)
