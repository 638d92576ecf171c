"""The whole loop, end to end: serve, label answers through POST /v1/feedback, restart, update the bundle from the
store (python -m training.update), roll it out with POST /admin/reload, and see decisions change for the reason the
new support gives: a ``wrong``-labelled answer's near-duplicate is no longer admitted (its nearest exemplar is now
labelled No) and an ``ood``-labelled one is flagged OOD. Run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from pg_support import PostgresServer
from test_server_support import API_KEY, DEFAULT_ALPHA, TinyBundle, make_config, metric_value, serve, tiny_bundle  # noqa: F401

from sdm_core.lm.bundle import read_bundle_info
from sdm_core.traffic import TrafficStore
from training.update import main as update_main

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "admin-key-456"


async def ask(client, prompt: str) -> dict:
    r = await client.post("/generate", json={"prompt": prompt, "return_exemplars": 4})
    assert r.status_code == 200, r.text
    return r.json()


async def wait_store(app) -> None:
    recorder = app.state.server.traffic
    deadline = time.monotonic() + 30
    while not recorder.available:
        assert time.monotonic() < deadline, recorder.error
        await asyncio.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_setting(request, tmp_path):
    if request.param == "sqlite":
        yield {"traffic_store": "sqlite", "data_dir": str(tmp_path / "data")}
    else:
        with PostgresServer() as pg:
            yield {"traffic_store": pg.url}


def test_labels_update_reload_changes_decisions_for_the_new_supports_reason(
    tiny_bundle: TinyBundle, store_setting, tmp_path
) -> None:
    asyncio.run(_loop(tiny_bundle, store_setting, tmp_path))


async def _loop(tiny_bundle: TinyBundle, store_setting: dict, tmp_path) -> None:
    from server.app import create_app
    from server.config import traffic_url

    # Admitted prompts that are not themselves in the head's support (its training split holds the even ones).
    fresh = [p for p in tiny_bundle.positive_prompts if int(p.rsplit(" ", 1)[1]) % 2 == 1]
    assert len(fresh) >= 2, tiny_bundle.positive_prompts
    wrong_prompt, ood_prompt = fresh[0], fresh[1]
    bundles = tmp_path / "bundles"  # the server's --bundles-root: reload names a folder in it
    bundles.mkdir()
    config = make_config(
        tiny_bundle, api_keys=(API_KEY,), admin_api_keys=(ADMIN_KEY,), bundles_root=str(bundles), **store_setting
    )
    url = traffic_url(config)

    # 1. Serve and label: both answers were admitted; the operator says one was wrong and the other out of scope.
    app = create_app(config)
    async with serve(app, headers=AUTH) as client:
        await wait_store(app)
        old_version = (await client.get("/ready")).json()["head_version"]
        wrong, ood = await ask(client, wrong_prompt), await ask(client, ood_prompt)
        assert wrong["admitted"] and ood["admitted"] and wrong["exemplars"][0]["label_name"] == "Yes"
        r = await client.post(
            "/v1/feedback",
            json=[{"id": wrong["id"], "label": "wrong", "note": "did not sort"}, {"id": ood["id"], "label": "ood"}],
        )
        assert r.status_code == 200, r.text
        text = (await client.get("/metrics")).text
        alpha = f"{DEFAULT_ALPHA:g}"
        assert (
            metric_value(text, "sdm_feedback_labels_total", {"decision": "admitted", "label": "wrong", "alpha": alpha})
            == 1
        )
        assert (
            metric_value(text, "sdm_feedback_labels_total", {"decision": "admitted", "label": "ood", "alpha": alpha})
            == 1
        )

    # 2. A restart loses nothing: the records and their labels are in the store.
    store = TrafficStore(url)
    assert store.get(wrong["id"]).label == "wrong" and store.get(wrong["id"]).note == "did not sort"
    assert store.get(ood["id"]).label == "ood"
    store.close()

    # 3. Update without retraining: every labelled row joins the support (calibration fraction 0).
    out = bundles / "bundle-u1"
    assert (
        update_main(
            ["--bundle", str(tiny_bundle.path), "--store", url, "--out", str(out), "--calibration-fraction", "0"]
        )
        == 0
    )
    new_version = read_bundle_info(out).raw["files"]["head/manifest.json"][:16]
    assert new_version != old_version

    # 4. A restarted server still has the records; reload rolls the new bundle out.
    app = create_app(config)
    async with serve(app, headers=AUTH) as client:
        await wait_store(app)
        relabel = await client.post("/v1/feedback", json={"id": wrong["id"], "label": "wrong"})
        assert relabel.status_code == 200 and relabel.json()["data"][0]["previous_label"] == "wrong"
        assert (await ask(client, wrong_prompt))["admitted"]  # the old head still admits it
        r = await client.post(
            "/admin/reload", json={"bundle": out.name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["head_version"] == new_version
        assert (await client.get("/ready")).json()["head_version"] == new_version
        assert (await client.get("/v1/models")).json()["data"][0]["sdm"]["head_version"] == new_version
        assert metric_value((await client.get("/metrics")).text, "sdm_bundle_info", {"head_version": new_version}) == 1

        # 5. The same requests again: the nearest exemplar is now the labelled answer itself.
        after_wrong = await ask(client, wrong_prompt)
        assert not after_wrong["admitted"]
        nearest = after_wrong["exemplars"][0]
        assert (nearest["id"], nearest["label_name"]) == (wrong["id"], "No") and nearest[
            "distance"
        ] < 1e-2  # itself, up to float noise
        assert after_wrong["q"] == 0 and wrong["q"] > 0  # the nearest exemplar now disagrees with the prediction
        after_ood = await ask(client, ood_prompt)
        assert not after_ood["admitted"] and after_ood["abstention_reason"] == "ood"
        nearest = after_ood["exemplars"][0]
        assert (nearest["id"], nearest["label_name"]) == (ood["id"], "ood") and nearest["distance"] < 1e-2
