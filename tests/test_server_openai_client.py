"""The official ``openai`` client, unchanged, against both OpenAI routes of a real server (streaming included).

The server's LM is scripted to write a fixed answer followed by ``<verified>``, so generation stops at the tag,
the stream carries several text chunks, and the forced tag comes from the SDM head."""

from __future__ import annotations

import pytest
from test_server_support import API_KEY, TinyBundle, UvicornThread, make_config, script_model, tiny_bundle  # noqa: F401

openai = pytest.importorskip("openai")

ANSWER = "banana cherry apple, in order.\n<verified>Yes</verified> ignored"


@pytest.fixture(scope="module")
def server(tiny_bundle: TinyBundle):
    from server.app import create_app

    app = create_app(make_config(tiny_bundle, api_keys=(API_KEY,), default_max_tokens=32))
    with UvicornThread(app) as running:
        script_model(app.state.server.manager.current.backend, ANSWER)
        yield running


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def sdm_of(choice) -> dict:
    sdm = getattr(choice, "sdm", None)
    if sdm is None:
        sdm = (choice.model_extra or {}).get("sdm")
    return sdm if isinstance(sdm, dict) else sdm.model_dump() if sdm is not None else None


def test_models_and_completions(client, tiny_bundle) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-sdm"]
    completion = client.completions.create(
        model="tiny-sdm", prompt=tiny_bundle.admitted_prompt, max_tokens=32, extra_body={"return_exemplars": 2}
    )
    choice = completion.choices[0]
    assert choice.text.startswith("banana cherry apple, in order.\n<verified>") and choice.text.endswith("</verified>")
    assert "ignored" not in choice.text and choice.finish_reason == "stop"
    sdm = sdm_of(choice)
    assert sdm["verified"] in ("Yes", "No") and choice.text.endswith(f"<verified>{sdm['verified']}</verified>")
    assert len(sdm["exemplars"]) == 2 and sdm["attempts"] == 1
    assert completion.usage.completion_tokens > 1 and completion.usage.prompt_tokens > 0


def test_chat_completion(client, tiny_bundle) -> None:
    chat = client.chat.completions.create(
        model="tiny-sdm", messages=[{"role": "user", "content": "Order: cherry banana apple"}], max_tokens=32
    )
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.startswith("banana cherry apple")
    sdm = sdm_of(choice)
    assert set(sdm) >= {
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
    }


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_streaming_ends_with_the_verification(client, tiny_bundle, route) -> None:
    if route == "chat":
        stream = client.chat.completions.create(
            model="tiny-sdm",
            messages=[{"role": "user", "content": "Order: cherry banana apple"}],
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        plain = client.chat.completions.create(
            model="tiny-sdm", messages=[{"role": "user", "content": "Order: cherry banana apple"}], max_tokens=32
        )
        expected, expected_sdm = plain.choices[0].message.content, sdm_of(plain.choices[0])
    else:
        stream = client.completions.create(
            model="tiny-sdm", prompt=tiny_bundle.admitted_prompt, max_tokens=32, stream=True
        )
        chunks = list(stream)
        pieces = [c.choices[0].text for c in chunks if c.choices]
        plain = client.completions.create(model="tiny-sdm", prompt=tiny_bundle.admitted_prompt, max_tokens=32)
        expected, expected_sdm = plain.choices[0].text, sdm_of(plain.choices[0])
    assert "".join(pieces) == expected
    assert sum(1 for p in pieces if p) >= 3  # text arrived in several chunks before the verification
    last = chunks[-1].choices[0]
    sdm = sdm_of(last)
    assert sdm is not None and last.finish_reason == "stop"
    assert all(sdm_of(c.choices[0]) is None for c in chunks[:-1] if c.choices)
    assert {k: sdm[k] for k in ("verified", "probability", "admitted", "abstention_reason")} == {
        k: expected_sdm[k] for k in ("verified", "probability", "admitted", "abstention_reason")
    }
    if route == "chat":
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_errors_surface_as_openai_exceptions(client, server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-sdm", prompt="hi", max_tokens=0)
    assert info.value.body["param"] == "max_tokens" if isinstance(info.value.body, dict) else True
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
