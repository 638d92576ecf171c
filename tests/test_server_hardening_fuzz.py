"""Issue 16, acceptance: schemathesis fuzzes every operation of ``/openapi.json`` on a real server (uvicorn, the
tiny bundle), with data that fits the schema (positive) and data that breaks it (negative). No answer may be a 5xx,
every answer must match the schema (status, content type, body), and every request the schema calls invalid must be
refused. Hypothesis is derandomized (the same cases every run) and the example counts keep the run under two
minutes on a CI runner.

What is not checked: that every schema-valid request succeeds (``positive_data_acceptance``). The schema cannot
say everything the server checks: the alpha ladder and the prompt's length in tokens depend on the bundle."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_server_support import TinyBundle, UvicornThread, make_config, tiny_bundle  # noqa: F401 - fixture

ADMIN_KEY = "fuzz-admin-key"
# Every route of the API, with how many cases each mode gets (reloads are slow: each valid one loads the bundle).
OPERATIONS = {
    ("GET", "/health"): 10,
    ("GET", "/ready"): 10,
    ("GET", "/metrics"): 10,
    ("GET", "/v1/models"): 10,
    ("POST", "/generate"): 40,
    ("POST", "/v1/completions"): 40,
    ("POST", "/v1/chat/completions"): 40,
    ("POST", "/admin/reload"): 12,
    ("POST", "/v1/feedback"): 30,
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle, tmp_path_factory):
    from server.app import create_app

    # Client routes keyless, the admin route behind its key; tiny generations keep each case cheap. The traffic store
    # is on (SQLite in a temporary folder), so POST /v1/feedback answers for real.
    config = make_config(
        tiny_bundle,
        admin_api_keys=(ADMIN_KEY,),
        bundles_root=str(tiny_bundle.path.parent),
        warmup=False,
        default_max_tokens=2,
        max_tokens_cap=4,
        verify_bundle=False,
        traffic_store="sqlite",
        data_dir=str(tmp_path_factory.mktemp("fuzz-data")),
    )
    app = create_app(config)
    with UvicornThread(app) as running:
        deadline = time.monotonic() + 30
        while not app.state.server.traffic.available:  # the store's writer connects in the background
            assert time.monotonic() < deadline, app.state.server.traffic.error
            time.sleep(0.05)
        yield running


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_fuzzed_operations_are_every_route(server) -> None:
    from server.app import ROUTES

    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert documented == set(OPERATIONS)
    assert {path for _, path in OPERATIONS} == set(ROUTES)


# GET routes take no input, so they have no negative cases.
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode == GenerationMode.POSITIVE
]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_no_5xx_and_no_schema_violation(schema, server, method, path, mode) -> None:
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    @settings(
        max_examples=OPERATIONS[(method, path)],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case) -> None:
        response = case.call(base_url=server.url, headers=headers, timeout=60)
        case.validate_response(response, checks=CHECKS, headers=headers)

    fuzz()
