"""The HTTP API against one real server (uvicorn on 127.0.0.1, API keys on): every response field of
/generate, the OpenAI routes over plain HTTP, every error path, auth, metrics, and the head-input recipe."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from test_server_support import (
    API_KEY,
    DEFAULT_ALPHA,
    MAX_TOKENS,
    TinyBundle,
    UvicornThread,
    make_config,
    metric_value,
    serve,
    tiny_bundle,  # noqa: F401 - fixture
)

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle):
    from server.app import create_app

    app = create_app(make_config(tiny_bundle, api_keys=(API_KEY,), max_body_bytes=4096))
    with UvicornThread(app) as running:
        yield running


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def assert_error(
    response: httpx.Response,
    status: int,
    param: str | None = "<any>",
    code: str | None = "<any>",
    type_: str | None = None,
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    if param != "<any>":
        assert error["param"] == param, error
    if code != "<any>":
        assert error["code"] == code, error
    if type_ is not None:
        assert error["type"] == type_, error
    assert response.headers.get("x-request-id")
    return error


# -- /generate: fields and decisions ------------------------------------------------------------------------------
def test_admitted_generation_returns_every_field(client, tiny_bundle) -> None:
    r = client.post(
        "/generate",
        json={"prompt": tiny_bundle.admitted_prompt, "return_exemplars": 3},
        headers={"X-Request-Id": "my-request-1"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"].startswith("req-") and r.headers["x-client-request-id"] == "my-request-1"
    body = r.json()
    expected = {
        "id",
        "object",
        "created",
        "model",
        "text",
        "verified",
        "probability",
        "probability_lower",
        "admitted",
        "abstained",
        "abstention_reason",
        "withheld",
        "alpha",
        "region_alpha",
        "q",
        "q_prime",
        "d",
        "exemplars",
        "attempts",
        "finish_reason",
        "usage",
        "timings",
    }
    assert set(body) == expected
    assert body["id"].startswith("gen-") and body["model"] == "tiny-sdm" and body["object"] == "generation"
    assert body["text"].endswith("<verified>Yes</verified>") and body["verified"] == "Yes"
    assert (
        body["admitted"] is True
        and body["abstained"] is False
        and body["abstention_reason"] is None
        and body["withheld"] is False
    )
    assert 0.0 <= body["probability_lower"] <= body["probability"] <= 1.0
    assert body["alpha"] == DEFAULT_ALPHA and body["region_alpha"] is not None and body["region_alpha"] >= DEFAULT_ALPHA
    assert isinstance(body["q"], int) and body["q"] > 0 and body["q_prime"] > 0 and 0.0 <= body["d"] <= 1.0
    assert body["attempts"] == 1 and body["finish_reason"] in ("stop", "length")
    exemplars = body["exemplars"]
    assert len(exemplars) == 3 and all(
        set(e) == {"id", "label", "label_name", "predicted", "distance"} for e in exemplars
    )
    assert [e["distance"] for e in exemplars] == sorted(e["distance"] for e in exemplars)
    assert exemplars[0]["label_name"] == "Yes"
    usage = body["usage"]
    # The generated tokens (at most MAX_TOKENS) and the tag tokens the server wrote ("Yes</verified>": 2 or more).
    assert usage["prompt_tokens"] > 0 and 2 < usage["completion_tokens"] <= MAX_TOKENS + 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timings = body["timings"]
    assert set(timings) == {"queue_ms", "generation_ms", "verification_ms", "total_ms"}
    assert (
        all(v >= 0 for v in timings.values())
        and timings["total_ms"] >= timings["generation_ms"] + timings["verification_ms"]
    )


def test_admitted_no_abstains_as_predicted_no(client, tiny_bundle) -> None:
    body = client.post("/generate", json={"prompt": tiny_bundle.predicted_no_prompt}).json()
    assert body["verified"] == "No" and body["text"].endswith("<verified>No</verified>")
    assert body["admitted"] is False and body["abstained"] is True and body["abstention_reason"] == "predicted_no"
    assert body["region_alpha"] is not None  # the head admitted its prediction; it is just "No"


def test_head_abstention_flag_and_withhold(client, tiny_bundle) -> None:
    flagged = client.post("/generate", json={"prompt": tiny_bundle.abstained_prompt}).json()
    assert flagged["abstained"] is True and flagged["abstention_reason"] == tiny_bundle.abstained_reason
    assert flagged["text"] and flagged["withheld"] is False
    withheld = client.post("/generate", json={"prompt": tiny_bundle.abstained_prompt, "on_abstain": "withhold"}).json()
    assert withheld["text"] is None and withheld["withheld"] is True and withheld["verified"] == flagged["verified"]
    admitted = client.post("/generate", json={"prompt": tiny_bundle.admitted_prompt, "on_abstain": "withhold"}).json()
    assert admitted["text"] and admitted["withheld"] is False


def test_alpha_selects_the_region(client, tiny_bundle) -> None:
    default = client.post("/generate", json={"prompt": tiny_bundle.abstained_prompt}).json()
    lower = [a for a in (0.6, 0.7) if a < DEFAULT_ALPHA]
    for alpha in lower:
        body = client.post("/generate", json={"prompt": tiny_bundle.abstained_prompt, "alpha": alpha}).json()
        assert body["alpha"] == alpha
        admitted_here = (
            default["region_alpha"] is not None and default["region_alpha"] >= alpha and default["verified"] == "Yes"
        )
        assert body["admitted"] is admitted_here
        assert body["probability"] == default["probability"] and body["region_alpha"] == default["region_alpha"]


def test_messages_equal_the_prompt_in_the_bundle_chat_format(client, tiny_bundle) -> None:
    by_prompt = client.post("/generate", json={"prompt": tiny_bundle.admitted_prompt}).json()
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": tiny_bundle.admitted_prompt},
    ]
    by_messages = client.post("/generate", json={"messages": messages}).json()
    assert by_messages["text"] == by_prompt["text"] and by_messages["probability"] == pytest.approx(
        by_prompt["probability"], abs=1e-6
    )
    assert by_messages["usage"] == by_prompt["usage"]


def test_sampling_is_reproducible_with_a_seed(client, tiny_bundle) -> None:
    request = {"prompt": tiny_bundle.abstained_prompt, "temperature": 1.0, "top_p": 0.95, "seed": 11, "max_tokens": 6}
    first = client.post("/generate", json=request).json()
    again = client.post("/generate", json=request).json()
    assert first["text"] == again["text"] and first["probability"] == again["probability"]


def test_attempts_resample_until_admitted_and_return_the_best_attempt(client) -> None:
    """Attempt k samples with derive_seed(seed, k): each attempt is replayed alone as a one-attempt request, and the
    resampling request must stop at the first admitted one (else after all 3) and return the best by (admitted,
    probability)."""
    from server.pipeline import derive_seed

    request = {"prompt": "What is the capital of France?", "temperature": 1.0, "top_p": 0.95, "max_tokens": 6}
    alone = [client.post("/generate", json={**request, "seed": derive_seed(11, k)}).json() for k in range(3)]
    admitted = [a["admitted"] for a in alone]
    tried = alone[: admitted.index(True) + 1] if True in admitted else alone
    best = max(tried, key=lambda a: (a["admitted"], a["probability"]))
    many = client.post("/generate", json={**request, "seed": 11, "max_attempts": 3}).json()
    assert many["attempts"] == len(tried)
    assert many["admitted"] is best["admitted"] and many["text"] == best["text"]
    assert many["probability"] == pytest.approx(best["probability"], abs=1e-6)


def test_user_stop_strings_end_the_generation(client, tiny_bundle) -> None:
    request = {"prompt": tiny_bundle.admitted_prompt, "temperature": 1.0, "seed": 5, "max_tokens": 12}
    full = client.post("/generate", json=request).json()
    generated = full["text"][: full["text"].rindex("<verified>")].strip()
    if len(generated) < 6:
        pytest.skip("the sampled generation is too short to cut")
    stop = generated[3:6]
    cut = client.post("/generate", json={**request, "stop": [stop]}).json()
    assert cut["finish_reason"] == "stop"
    head = cut["text"][: cut["text"].rindex("<verified>")]
    assert stop not in head and generated.startswith(head.strip())


# -- the OpenAI routes over plain HTTP ------------------------------------------------------------------------------
def test_completions_and_chat_carry_sdm(client, tiny_bundle) -> None:
    r = client.post(
        "/v1/completions", json={"model": "tiny-sdm", "prompt": tiny_bundle.admitted_prompt, "max_tokens": MAX_TOKENS}
    )
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert (
        choice["text"].endswith("Yes</verified>")
        and choice["sdm"]["admitted"] is True
        and choice["finish_reason"] in ("stop", "length")
    )
    assert set(choice["sdm"]) >= {
        "verified",
        "probability",
        "probability_lower",
        "admitted",
        "abstained",
        "abstention_reason",
        "alpha",
        "region_alpha",
        "q",
        "q_prime",
        "d",
        "exemplars",
        "attempts",
        "timings",
        "withheld",
    }
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-sdm", "messages": [{"role": "user", "content": "hi"}], "on_abstain": "withhold"},
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    sdm = chat["choices"][0]["sdm"]
    assert (chat["choices"][0]["message"]["content"] is None) == sdm["withheld"] == sdm["abstained"]


def test_chat_stream_ends_with_the_verification(client, tiny_bundle) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": tiny_bundle.admitted_prompt},
    ]
    plain = client.post("/v1/chat/completions", json={"messages": messages}).json()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": messages, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("sdm" not in c["choices"][0] for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["sdm"]["admitted"] is True and last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["total_tokens"] == plain["usage"]["total_tokens"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]


def test_models_lists_the_bundle(client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "tiny-sdm"
    facts = body["data"][0]["sdm"]
    assert facts["default_alpha"] == DEFAULT_ALPHA and facts["alphas"] == [0.9, 0.8, 0.7, 0.6]
    assert 0.0 <= facts["calibration_admitted_proportion"] <= 1.0 and facts["head_version"]


# -- errors -------------------------------------------------------------------------------------------------------
LONG_PROMPT = "word " * 400


@pytest.mark.parametrize(
    "route, payload, status, param, code",
    [
        ("/generate", b'{"prompt": "hi"', 400, None, "invalid_json"),
        ("/generate", b"", 400, None, "empty_body"),
        ("/generate", b"[1, 2]", 400, None, "invalid_json"),
        ("/generate", b'{"prompt": "caf\xe9"}', 400, None, "invalid_encoding"),
        ("/generate", {"max_tokens": 3}, 400, "prompt", None),
        ("/generate", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt", None),
        ("/generate", {"prompt": "hi", "alpha": 0.85}, 400, "alpha", "alpha_not_on_ladder"),
        ("/generate", {"prompt": "hi", "alpha": 1.5}, 400, "alpha", None),
        ("/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ("/generate", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
        ("/generate", {"prompt": "hi", "max_tokens": 65}, 400, "max_tokens", "max_tokens_too_large"),
        ("/generate", {"prompt": LONG_PROMPT}, 400, "prompt", "prompt_too_long"),
        ("/generate", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
        ("/generate", {"prompt": "hi", "unknown_field": 1}, 400, "unknown_field", None),
        ("/generate", {"prompt": "hi", "on_abstain": "drop"}, 400, "on_abstain", None),
        ("/generate", {"prompt": "hi", "max_attempts": 2}, 400, "max_attempts", "attempts_need_sampling"),
        ("/generate", {"prompt": "hi", "return_exemplars": -1}, 400, "return_exemplars", None),
        ("/generate", {"prompt": "hi", "return_exemplars": 1000}, 400, "return_exemplars", "too_many_exemplars"),
        ("/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        (
            "/generate",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "messages.0.content",
            None,
        ),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "unsupported_parameter"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
        ("/v1/completions", {"max_tokens": 2}, 400, "prompt", None),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "alpha": 0.55},
            400,
            "alpha",
            "alpha_not_on_ladder",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "alpha": 0.5}, 400, "alpha", None),
        ("/generate", {"prompt": "   "}, 400, "prompt", None),
        ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100},
            400,
            "max_completion_tokens",
            "max_tokens_too_large",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            400,
            "tools",
            None,
        ),
    ],
)
def test_bad_requests_get_the_error_envelope(client, route, payload, status, param, code) -> None:
    if isinstance(payload, bytes):
        r = client.post(route, content=payload, headers={"Content-Type": "application/json"})
    else:
        r = client.post(route, json=payload)
    assert_error(
        r, status, param, "<any>" if code is None else code, "invalid_request_error" if status == 400 else None
    )


def test_alpha_error_names_the_ladder(client) -> None:
    error = assert_error(client.post("/generate", json={"prompt": "hi", "alpha": 0.85}), 400, "alpha")
    assert "0.9" in error["message"] and "0.6" in error["message"]


def test_oversized_body_is_refused_with_413(client) -> None:
    assert_error(client.post("/generate", json={"prompt": "x" * 5000}), 413, None, "request_too_large")

    def chunks():  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * 1000

    assert_error(
        client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"}),
        413,
        None,
        "request_too_large",
    )


def test_unknown_routes_and_methods(client) -> None:
    assert_error(client.get("/nope"), 404, None, "route_not_found", "not_found_error")
    assert_error(client.get("/generate"), 405, None, "method_not_allowed")


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}]
)
def test_missing_or_wrong_key_gives_401(server, headers) -> None:
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        for method, path in (
            ("POST", "/generate"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/ready"),
            ("GET", "/metrics"),
            ("POST", "/admin/reload"),
            ("GET", "/nope"),
        ):
            r = c.request(method, path, json={"prompt": "hi"} if method == "POST" else None)
            error = assert_error(r, 401, None, "invalid_api_key", "authentication_error")
            assert r.headers.get("www-authenticate") == "Bearer", (path, error)
        assert c.get("/health").status_code == 200


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_move_with_admitted_abstained_and_failed_requests(client, tiny_bundle) -> None:
    def snapshot() -> str:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    before = snapshot()
    admitted = client.post("/generate", json={"prompt": tiny_bundle.admitted_prompt}).json()
    client.post("/generate", json={"prompt": tiny_bundle.predicted_no_prompt})
    client.post("/generate", json={"prompt": "hi", "alpha": 0.85})
    after = snapshot()

    def delta(name: str, labels: dict | None = None) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("sdm_requests_total", {"route": "/generate", "outcome": "admitted"}) == 1
    assert delta("sdm_requests_total", {"route": "/generate", "outcome": "abstained"}) == 1
    assert delta("sdm_requests_total", {"route": "/generate", "outcome": "error"}) == 1
    assert delta("sdm_request_errors_total", {"route": "/generate", "status": "400"}) == 1
    assert delta("sdm_abstentions_total", {"reason": "predicted_no"}) == 1
    assert delta("sdm_probability_count") == 2 and delta("sdm_q_prime_count") == 2 and delta("sdm_attempts_count") == 2
    assert delta("sdm_region_alpha_count") + delta("sdm_outputs_without_region_total") == 2
    for stage in ("queue", "generation", "verification", "total"):
        assert delta("sdm_stage_latency_seconds_count", {"stage": stage}) == 2
    # Time to first token: once per answered request, within its end-to-end time; time per token: per attempt.
    assert delta("sdm_time_to_first_token_seconds_count", {"route": "/generate"}) == 2
    ttft = delta("sdm_time_to_first_token_seconds_sum", {"route": "/generate"})
    assert 0 < ttft <= delta("sdm_stage_latency_seconds_sum", {"stage": "total"})
    assert delta("sdm_time_per_output_token_seconds_count", {"route": "/generate"}) >= 1
    assert delta("sdm_prompt_tokens_total") >= admitted["usage"]["prompt_tokens"]
    assert delta("sdm_completion_tokens_total") >= admitted["usage"]["completion_tokens"]
    assert (
        delta("sdm_batch_size_count", {"kind": "generate"}) >= 1
        and delta("sdm_batch_size_count", {"kind": "embed"}) >= 1
    )
    assert metric_value(after, "sdm_in_flight_requests") == 0 and metric_value(after, "sdm_queue_depth") == 0
    assert metric_value(after, "sdm_ready") == 1
    baseline = metric_value(after, "sdm_calibration_admitted_proportion")
    assert 0.0 < baseline <= 1.0
    info = [line for line in after.splitlines() if line.startswith("sdm_bundle_info{")][0]
    assert 'model="tiny-sdm"' in info and "head_version=" in info and "calibration_admitted_proportion=" in info


# -- the head input is the training-time recipe -----------------------------------------------------------------------
def test_head_input_equals_the_training_embedding(tiny_bundle) -> None:
    """The server's head input for a generation equals embed_texts (and training's embed_instances) of the same text."""
    from sdm_core.lm.bundle import load_bundle
    from sdm_core.lm.embedding import embed_texts, verification_text
    from server.app import create_app
    from server.pipeline import VerificationRequest
    from training.verification_layer import Instance, embed_instances

    async def run():
        app = create_app(make_config(tiny_bundle, warmup=False))
        async with serve(app):
            pipeline = app.state.server.manager.current.pipeline
            results = []
            for prompt in (tiny_bundle.admitted_prompt, "Order these words: b a c"):
                prepared = pipeline.prepare(prompt)
                results.append(
                    (prompt, await pipeline.run(VerificationRequest(prepared, max_tokens=6, temperature=1.0, seed=3)))
                )
            return results

    results = asyncio.run(run())
    bundle = load_bundle(tiny_bundle.path)
    for prompt, result in results:
        text = verification_text(
            bundle.tokenizer, prompt, result.best.generation.text, bundle.info.chat, bundle.info.recipe
        )
        assert text == result.best.verification_text
        direct = embed_texts(bundle.model, bundle.tokenizer, [text], bundle.info.recipe)[0]
        assert torch.equal(result.best.embedding, direct)
        trained = embed_instances(
            bundle.model,
            bundle.tokenizer,
            [Instance("d", prompt, result.best.generation.text, 1)],
            bundle.info.chat,
            bundle.info.recipe,
            8,
        )[0]
        assert torch.equal(result.best.embedding, trained)
        scores = bundle.head.predict_scores(direct.unsqueeze(0), alpha=DEFAULT_ALPHA)
        assert float(scores.probabilities[0, int(scores.predictions[0])]) == pytest.approx(
            result.best.probability, abs=0.0
        )
