"""server.backends without a model: stop strings and streaming of a generation row, per-row seeded sampling, and
the vLLM backend's message when vLLM is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _run_rows(tokenizer, text: str, stop=(), inclusive=("<verified>",), max_tokens=64, cancel_at=None):
    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.row import GenerationRow
    from server.backends.transformers_backend import _RowStopper

    deltas: list[str] = []
    prompt = [1, 2, 3]
    request = GenerationRequest(
        prompt, SamplingParams(max_tokens), stop=tuple(stop), stop_inclusive=tuple(inclusive), on_text=deltas.append
    )
    row = GenerationRow(request)
    stopper = _RowStopper([row], tokenizer, {tokenizer.eos_token_id}, len(prompt))
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    for step in range(1, len(tokens) + 1):
        if cancel_at == step:
            request.cancel.set()
        ids = torch.tensor([prompt + tokens[:step]])
        if bool(stopper(ids, None)[0]):
            break
    return row.result(), "".join(deltas), row


def test_generation_stops_at_verified_tag_and_streams_a_prefix(tiny_tokenizer) -> None:
    result, streamed, _ = _run_rows(tiny_tokenizer, "The words in order: a b c\n<verified>Yes</verified> trailing")
    assert result.text == "The words in order: a b c\n<verified>"
    assert result.finish_reason == "stop" and result.stop_reason == "<verified>"
    assert result.text.startswith(streamed) and streamed.startswith("The words")


def test_user_stop_strings_are_cut_and_never_streamed(tiny_tokenizer) -> None:
    result, streamed, _ = _run_rows(tiny_tokenizer, "alpha beta STOP gamma <verified>", stop=("STOP",))
    assert result.text == "alpha beta " and result.stop_reason == "STOP"
    assert "STOP" not in streamed and result.text.startswith(streamed)


def test_max_tokens_eos_and_cancel_end_a_row(tiny_tokenizer) -> None:
    result, _, row = _run_rows(tiny_tokenizer, "one two three four five six", max_tokens=3)
    assert result.finish_reason == "length" and result.completion_tokens == 3
    eos = tiny_tokenizer.eos_token
    result, _, _ = _run_rows(tiny_tokenizer, f"done{eos}more")
    assert result.finish_reason == "stop" and result.stop_reason == "eos" and result.text == "done"
    result, _, _ = _run_rows(tiny_tokenizer, "one two three four five six", cancel_at=2)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 2


def test_sampler_is_seeded_per_row_and_respects_top_p() -> None:
    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.row import GenerationRow
    from server.backends.transformers_backend import _RowSampler

    scores = torch.randn(3, 50)

    def draw(params_list):
        rows = [GenerationRow(GenerationRequest([1], p)) for p in params_list]
        out = _RowSampler(rows)(torch.zeros(len(rows), 1, dtype=torch.long), scores[: len(rows)].clone())
        return out.argmax(dim=1).tolist(), out

    first, out = draw([SamplingParams(4, 0.0), SamplingParams(4, 1.0, seed=7), SamplingParams(4, 1.0, 0.01, seed=3)])
    assert first[0] == int(scores[0].argmax())  # greedy rows untouched
    assert torch.equal(out[0], scores[0])
    assert first[2] == int(scores[2].argmax())  # top_p this small keeps only the argmax
    again, _ = draw([SamplingParams(4, 0.0), SamplingParams(4, 1.0, seed=7)])
    assert again[1] == first[1]  # same seed, same draw, whatever the batch


def test_a_vanishing_temperature_samples_greedily_instead_of_overflowing() -> None:
    """Logits divided by a subnormal temperature are inf and multinomial fails (a 500 the fuzz test found): such
    temperatures are greedy, as in vLLM."""
    from server.backends.base import GREEDY_BELOW, GenerationRequest, SamplingParams
    from server.backends.row import GenerationRow
    from server.backends.transformers_backend import _RowSampler

    scores = torch.randn(3, 50) * 30
    params = [SamplingParams(4, 5e-324, 5e-324, seed=1), SamplingParams(4, GREEDY_BELOW / 2), SamplingParams(4, 1e-3)]
    assert [p.greedy for p in params] == [True, True, False]
    rows = [GenerationRow(GenerationRequest([1], p)) for p in params]
    out = _RowSampler(rows)(torch.zeros(3, 1, dtype=torch.long), scores.clone())
    assert out.argmax(dim=1).tolist() == scores.argmax(dim=1).tolist()


def test_vllm_backend_explains_what_is_missing(fake_bundle: Path) -> None:
    import importlib.util

    from server.backends import BackendError, make_backend
    from server.config import ConfigError, ServerConfig

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(BackendError, match="pip install 'sdm-lm\\[vllm\\]'"):
        make_backend("vllm", str(fake_bundle))
    with pytest.raises(ConfigError, match="--backend"):
        ServerConfig(bundle=str(fake_bundle), backend="vllm").check_runtime()
