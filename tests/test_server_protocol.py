"""server.protocol: each generation request turns itself into the pipeline's VerificationDraft, with this server's
defaults and the request field that errors about the prompt and the token budget name."""

from __future__ import annotations

import pytest

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest


def test_a_generate_prompt_keeps_its_fields_and_takes_the_servers_default_budget() -> None:
    draft = GenerateRequest.model_validate(
        {
            "prompt": "Order: b a",
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 7,
            "stop": "###",
            "alpha": 0.9,
            "on_abstain": "withhold",
            "return_exemplars": 2,
            "max_attempts": 3,
        }
    ).to_verification(64)
    assert (draft.prompt, draft.prompt_param, draft.max_tokens, draft.tokens_param) == (
        "Order: b a",
        "prompt",
        64,
        "max_tokens",
    )
    assert (draft.temperature, draft.top_p, draft.seed, draft.stop) == (0.5, 0.9, 7, ("###",))
    assert (draft.alpha, draft.on_abstain, draft.return_exemplars, draft.max_attempts) == (0.9, "withhold", 2, 3)


def test_generate_messages_become_a_chat_with_developer_turns_as_system() -> None:
    body = GenerateRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
            ],
            "max_tokens": 5,
        }
    )
    draft = body.to_verification(64)
    assert draft.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert (draft.prompt_param, draft.max_tokens) == ("messages", 5)


def test_a_non_text_content_part_is_refused_naming_its_message() -> None:
    body = GenerateRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    )
    with pytest.raises(APIError) as caught:
        body.to_verification(64)
    assert caught.value.status == 400 and caught.value.param == "messages.0.content"


def test_openai_requests_default_to_greedy_decoding() -> None:
    draft = CompletionRequest.model_validate({"prompt": ["Order: b a"]}).to_verification(32)
    assert (draft.prompt, draft.temperature, draft.top_p, draft.max_tokens, draft.stop) == (
        "Order: b a",
        0.0,
        1.0,
        32,
        (),
    )


def test_a_chat_request_names_max_completion_tokens_when_it_sent_it() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    both = ChatCompletionRequest.model_validate(
        {"messages": messages, "max_tokens": 9, "max_completion_tokens": 4}
    ).to_verification(32)
    assert (both.max_tokens, both.tokens_param) == (4, "max_completion_tokens")
    old = ChatCompletionRequest.model_validate({"messages": messages, "max_tokens": 9}).to_verification(32)
    assert (old.max_tokens, old.tokens_param) == (9, "max_tokens")
    neither = ChatCompletionRequest.model_validate({"messages": messages}).to_verification(32)
    assert (neither.max_tokens, neither.tokens_param, neither.prompt_param) == (32, "max_tokens", "messages")
