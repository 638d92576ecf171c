"""Recording every verification and POST /v1/feedback against a real server (uvicorn, API keys on, SQLite store in a
temporary data folder): every route is recorded with the head's input, labels land on the right row, the metrics
count them, every malformed request gets a clear 4xx in the one error envelope, and a PostgreSQL outage leaves the
server answering while /ready and the metrics say so."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from pg_support import PostgresServer
from test_server_api import assert_error
from test_server_support import (  # noqa: F401
    API_KEY,
    DEFAULT_ALPHA,
    TinyBundle,
    UvicornThread,
    make_config,
    metric_value,
    tiny_bundle,
)

from sdm_core.traffic import TrafficStore, sqlite_url

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sdm-data")


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle, data_dir):
    from server.app import create_app

    app = create_app(make_config(tiny_bundle, api_keys=(API_KEY,), traffic_store="sqlite", data_dir=str(data_dir)))
    with UvicornThread(app) as running:
        deadline = time.monotonic() + 30
        while not app.state.server.traffic.available:
            assert time.monotonic() < deadline, app.state.server.traffic.error
            time.sleep(0.05)
        yield running


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def store(server, data_dir):
    s = TrafficStore(sqlite_url(data_dir / "traffic.sqlite3"))
    yield s
    s.close()


def written(server, ids: list[str]):
    server.app.state.server.traffic.wait_written(ids, 10)


def generate(client, prompt: str) -> dict:
    r = client.post("/generate", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()


# -- recording ----------------------------------------------------------------------------------------------------
def test_every_route_records_its_verification_with_the_head_input(client, server, store, tiny_bundle) -> None:
    ready = client.get("/ready").json()
    assert ready["traffic_store"]["status"] == "ok" and ready["traffic_store"]["url"].startswith("sqlite:///")
    ids = {"/generate": generate(client, tiny_bundle.admitted_prompt)["id"]}
    ids["/v1/completions"] = client.post(
        "/v1/completions", json={"model": "tiny-sdm", "prompt": tiny_bundle.predicted_no_prompt}
    ).json()["id"]
    chat = {"model": "tiny-sdm", "messages": [{"role": "user", "content": tiny_bundle.abstained_prompt}]}
    ids["/v1/chat/completions"] = client.post("/v1/chat/completions", json=chat).json()["id"]
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed_id = events[-1]["id"]
    written(server, [*ids.values(), streamed_id])
    head = server.app.state.server.manager.current.backend.head
    for route, identifier in ids.items():
        row = store.get(identifier)
        assert row is not None and row.route == route, (route, identifier)
        assert row.head_version == ready["head_version"] and row.alpha == DEFAULT_ALPHA
        assert row.h_dim == head.input_dim and row.embedding().shape == (head.input_dim,)
        assert row.prompt is None and row.answer is None  # no text without --store-text
    assert store.get(streamed_id).route == "/v1/chat/completions"
    admitted = store.get(ids["/generate"])
    assert admitted.admitted and admitted.prediction == 1 and admitted.abstention_reason is None
    no = store.get(ids["/v1/completions"])
    assert not no.admitted and no.abstention_reason == "predicted_no"
    # The stored h is the head input that made the decision: scoring it again gives the same probability.
    again = head.predict_scores(admitted.embedding()[None, :], alpha=DEFAULT_ALPHA)
    assert float(again.probabilities[0, 1]) == pytest.approx(admitted.probability, abs=1e-5)


def test_feedback_labels_answers_and_the_metrics_count_them(client, server, store, tiny_bundle) -> None:
    before = client.get("/metrics").text
    series = {"decision": "admitted", "label": "wrong", "alpha": f"{DEFAULT_ALPHA:g}"}
    a, b = generate(client, tiny_bundle.admitted_prompt), generate(client, tiny_bundle.predicted_no_prompt)
    r = client.post("/v1/feedback", json={"id": a["id"], "label": "correct", "note": "fine"})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 1 and r.json()["data"][0]["previous_label"] is None
    r = client.post("/v1/feedback", json=[{"id": a["id"], "label": "wrong"}, {"id": b["id"], "label": "ood"}])
    assert r.status_code == 200, r.text
    data = {d["id"]: d for d in r.json()["data"]}
    assert (
        data[a["id"]]["previous_label"] == "correct"
        and data[a["id"]]["label"] == "wrong"
        and data[a["id"]]["admitted"] is True
    )
    row = store.get(a["id"])
    assert (row.label, row.note) == ("wrong", None) and row.labelled_at == pytest.approx(time.time(), abs=60)
    assert store.get(b["id"]).label == "ood"
    after = client.get("/metrics").text
    assert (
        metric_value(after, "sdm_feedback_labels_total", series)
        - metric_value(before, "sdm_feedback_labels_total", series)
        == 1
    )
    ood = {"decision": "abstained", "label": "ood", "alpha": f"{DEFAULT_ALPHA:g}"}
    assert (
        metric_value(after, "sdm_feedback_labels_total", ood) - metric_value(before, "sdm_feedback_labels_total", ood)
        == 1
    )
    assert metric_value(after, "sdm_ladder_alpha", {"alpha": "0.8"}) == 0.8
    assert metric_value(after, "sdm_traffic_store_up") == 1


def test_feedback_right_after_the_answer_finds_it(client, tiny_bundle) -> None:
    # The record may still be queued for the writer: feedback waits for it instead of answering 404.
    for _ in range(3):
        answer = generate(client, tiny_bundle.admitted_prompt)
        assert client.post("/v1/feedback", json={"id": answer["id"], "label": "correct"}).status_code == 200


# -- bad input ----------------------------------------------------------------------------------------------------
def test_an_unknown_id_is_404_and_nothing_is_written(client, store, tiny_bundle) -> None:
    answer = generate(client, tiny_bundle.admitted_prompt)
    error = assert_error(
        client.post("/v1/feedback", json={"id": "gen-doesnotexist", "label": "correct"}),
        404,
        "id",
        "answer_not_found",
        "not_found_error",
    )
    assert "gen-doesnotexist" in error["message"]
    assert_error(
        client.post("/v1/feedback", json=[{"id": answer["id"], "label": "wrong"}, {"id": "nope", "label": "wrong"}]),
        404,
        "id",
        "answer_not_found",
    )
    assert store.get(answer["id"]).label is None


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"id": "x", "label": "maybe"}, "label", "literal_error"),
        ([{"id": "x", "label": "correct"}, {"id": "y", "label": "right"}], "1.label", "literal_error"),
        ({"id": 123, "label": "correct"}, "id", "string_type"),
        ({"id": "x", "label": "correct", "note": ["a"]}, "note", "string_type"),
        ({"id": "x", "label": True}, "label", "literal_error"),
        ({"label": "correct"}, "id", "missing"),
        ({"id": "", "label": "correct"}, "id", "string_too_short"),
        ({"id": "x" * 129, "label": "correct"}, "id", "string_too_long"),
        ({"id": "x", "label": "correct", "score": 1}, "score", "extra_forbidden"),
        ({"id": "x", "label": "correct", "note": "n" * 2001}, "note", "note_too_long"),
        ([], None, "empty_feedback"),
        (["gen-1"], "0", "invalid_type"),
        ("gen-1", None, "invalid_json"),
        ([{"id": f"gen-{i}", "label": "correct"} for i in range(10_000)], None, "too_many_labels"),
    ],
    ids=[
        "bad-label",
        "bad-label-in-list",
        "int-id",
        "list-note",
        "bool-label",
        "no-id",
        "empty-id",
        "long-id",
        "extra-field",
        "huge-note",
        "empty-list",
        "string-item",
        "string-body",
        "10000-items",
    ],
)
def test_malformed_feedback_is_a_400_naming_the_field(client, body, param, code) -> None:
    error = assert_error(client.post("/v1/feedback", json=body), 400, param, code, "invalid_request_error")
    if code == "too_many_labels":
        assert "10000" in error["message"] and "1000" in error["message"]


def test_feedback_bodies_that_are_not_json_or_too_large(client) -> None:
    assert_error(
        client.post("/v1/feedback", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        None,
        "invalid_json",
    )
    assert_error(client.post("/v1/feedback", content=b""), 400, None, "empty_body")
    huge = json.dumps({"id": "x", "label": "correct", "note": "n" * 2_000_000})
    assert_error(
        client.post("/v1/feedback", content=huge, headers={"Content-Type": "application/json"}),
        413,
        None,
        "request_too_large",
    )


def test_feedback_needs_an_api_key(server) -> None:
    r = httpx.post(f"{server.url}/v1/feedback", json={"id": "x", "label": "correct"})
    assert_error(r, 401, None, "invalid_api_key", "authentication_error")


def test_without_a_store_feedback_is_503_and_ready_says_off(tiny_bundle) -> None:
    from server.app import create_app

    app = create_app(make_config(tiny_bundle, api_keys=(API_KEY,), traffic_store="off", warmup=False))
    with UvicornThread(app) as running, httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as c:
        assert c.get("/ready").json()["traffic_store"] == {"status": "off"}
        assert_error(
            c.post("/v1/feedback", json={"id": "x", "label": "correct"}),
            503,
            None,
            "store_unavailable",
            "service_unavailable",
        )


# -- a PostgreSQL store and its outage ------------------------------------------------------------------------------
def test_a_postgres_outage_leaves_the_server_answering_and_is_reported(tiny_bundle) -> None:
    from server.app import create_app

    with PostgresServer() as pg:
        app = create_app(make_config(tiny_bundle, api_keys=(API_KEY,), traffic_store=pg.url, warmup=False))
        recorder = app.state.server.traffic
        with UvicornThread(app) as running, httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as c:
            deadline = time.monotonic() + 30
            while not recorder.available:
                assert time.monotonic() < deadline, recorder.error
                time.sleep(0.05)
            first = generate(c, tiny_bundle.admitted_prompt)
            assert c.post("/v1/feedback", json={"id": first["id"], "label": "correct"}).status_code == 200
            pg.stop()
            during = [generate(c, tiny_bundle.admitted_prompt) for _ in range(2)]  # answers keep coming
            deadline = time.monotonic() + 30
            while recorder.available:
                assert time.monotonic() < deadline, "the outage was not noticed"
                time.sleep(0.05)
            ready = c.get("/ready")
            assert ready.status_code == 200 and ready.json()["traffic_store"]["status"] == "unavailable"
            assert ready.json()["traffic_store"]["error"]
            assert metric_value(c.get("/metrics").text, "sdm_traffic_store_up") == 0
            assert_error(
                c.post("/v1/feedback", json={"id": first["id"], "label": "wrong"}), 503, None, "store_unavailable"
            )
            queued = generate(c, tiny_bundle.admitted_prompt)  # waits in the writer's queue until the store is back
            pg.start()
            deadline = time.monotonic() + 60
            while not recorder.available:
                assert time.monotonic() < deadline, recorder.error
                time.sleep(0.1)
            assert c.get("/ready").json()["traffic_store"]["status"] == "ok"
            assert (
                c.post("/v1/feedback", json={"id": first["id"], "label": "wrong"}).json()["data"][0]["previous_label"]
                == "correct"
            )
            text = c.get("/metrics").text
            lost = metric_value(text, "sdm_traffic_records_dropped_total", {"reason": "store_error"})
            store = TrafficStore(pg.url)
            kept = sum(store.get(a["id"]) is not None for a in during)
            assert kept + lost >= len(during)  # every answer of the outage is either recorded or counted as lost
            recorder.wait_written([queued["id"]], 30)
            assert store.get(queued["id"]) is not None
            store.close()
