"""The server serves a bundle's certification: the withdrawn regions are gone from its ladder (requests there
abstain with no_region), /v1/models shows the table, and /metrics exports it per alpha."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from test_server_support import (
    ALPHAS,
    TinyBundle,
    make_config,
    metric_value,
    serve,
    tiny_bundle,  # noqa: F401 - fixture
)

WITHDRAWN = 0.9


@pytest.fixture(scope="module")
def certified_bundle(tiny_bundle: TinyBundle, tmp_path_factory):
    from sdm_core.certification import Certification
    from sdm_core.lm.bundle import seal_bundle

    folder = tmp_path_factory.mktemp("certified") / "bundle"
    shutil.copytree(tiny_bundle.path, folder)
    rows = [
        {
            "alpha": a,
            "admitted": 20,
            "correct": 10 if a == WITHDRAWN else 20,
            "accuracy": 0.5 if a == WITHDRAWN else 1.0,
            "p_value": 1e-5 if a == WITHDRAWN else 1.0,
            "lower_bound": 0.3 if a == WITHDRAWN else 0.86,
            "status": "violated" if a == WITHDRAWN else "certified",
            "withdrawn": a == WITHDRAWN,
            "groups": {},
        }
        for a in ALPHAS
    ]
    seal_bundle(folder, {"certification": Certification.from_dict({"documents": 40, "rows": rows}).to_dict()})
    return folder


def test_withdrawn_region_abstains_and_the_certification_is_shown(certified_bundle, tiny_bundle: TinyBundle) -> None:
    from server.app import create_app

    async def scenario():
        app = create_app(make_config(certified_bundle))
        async with serve(app) as client:
            # The same prompt the uncertified bundle admits at 0.9 abstains there now, and is still admitted at 0.8.
            at_withdrawn = (
                await client.post("/generate", json={"prompt": tiny_bundle.admitted_prompt, "alpha": WITHDRAWN})
            ).json()
            at_kept = (
                await client.post("/generate", json={"prompt": tiny_bundle.admitted_prompt, "alpha": 0.8})
            ).json()
            models = (await client.get("/v1/models")).json()
            metrics = (await client.get("/metrics")).text
        return at_withdrawn, at_kept, models, metrics

    at_withdrawn, at_kept, models, metrics = asyncio.run(scenario())
    assert at_withdrawn["admitted"] is False and at_withdrawn["abstention_reason"] == "no_region"
    assert at_kept["admitted"] is True
    certification = models["data"][0]["sdm"]["certification"]
    assert certification["withdrawn_alphas"] == [WITHDRAWN] and certification["documents"] == 40
    assert certification["alphas"]["0.9"]["status"] == "violated"
    assert set(certification["certified_alphas"]) == set(ALPHAS) - {WITHDRAWN}
    assert metric_value(metrics, "sdm_region_certified", {"alpha": "0.9"}) == -1
    assert metric_value(metrics, "sdm_region_certified", {"alpha": "0.8"}) == 1
    assert metric_value(metrics, "sdm_certified_accuracy_lower_bound", {"alpha": "0.8"}) == pytest.approx(0.86)


def test_a_bundle_without_certification_says_so(tiny_bundle: TinyBundle) -> None:
    from server.app import create_app

    async def scenario():
        app = create_app(make_config(tiny_bundle))
        async with serve(app) as client:
            return (await client.get("/v1/models")).json()

    assert asyncio.run(scenario())["data"][0]["sdm"]["certification"] is None
