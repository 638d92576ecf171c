"""The transformers backend's head input from the states captured while generating, on the real SmolLM2 bundle.

The committed default bundle writes ``<verified>`` itself, so its verification texts tokenise to the prompt's tokens
followed by generated ones: the backend pools the states generation already computed instead of running a second
pass. Those must equal the training-time ``embed_texts`` of the same text to float rounding, and capturing must not
change what is generated.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from sdm_core.lm.embedding import HiddenStateRecipe, embed_texts, pool_states, verification_text
from server.backends.transformers_backend import TransformersBackend
from server.pipeline import SelectivePipeline, VerificationRequest
from training.word_order import format_prompt

BUNDLE = Path(__file__).resolve().parents[1] / "deploy" / "bundles" / "smollm2-word-order"
PROMPTS = [
    format_prompt("The birch canoe slid on", "planks. smooth the"),
    format_prompt("It ended the war in the Ruhr Pocket", "April 1945. in"),
    format_prompt("Glue the sheet to the", "background. dark blue"),
]


def _serve(mode: str, max_tokens: int = 48):
    """(generated texts, head inputs, reused count, backend) for PROMPTS sent concurrently (one batch)."""

    async def run():
        backend = TransformersBackend(str(BUNDLE), batch_size=len(PROMPTS), batch_wait_ms=50.0, hidden_states=mode)
        await backend.load()
        pipeline = SelectivePipeline(backend)
        try:
            requests = [VerificationRequest(pipeline.prepare(p), max_tokens=max_tokens) for p in PROMPTS]
            results = await asyncio.gather(*(pipeline.run(r) for r in requests))
        finally:
            pipeline.close()
        return results, backend

    results, backend = asyncio.run(run())
    return results, backend


@pytest.fixture(scope="module")
def served():
    reused, reused_backend = _serve("reuse")
    forward, forward_backend = _serve("forward")
    yield reused, reused_backend, forward, forward_backend
    for backend in (reused_backend, forward_backend):
        asyncio.run(backend.close())


def test_captured_states_equal_the_training_embedding(served) -> None:
    reused, backend, _, _ = served
    assert backend.reused_states >= 2, "the default bundle writes <verified> itself, so most rows reuse their states"
    model, tokenizer = backend.model, backend.worker_tokenizer
    recipe = backend.info.recipe
    for prompt, result in zip(PROMPTS, reused):
        text = verification_text(tokenizer, prompt, result.best.generation.text, backend.info.chat, recipe)
        assert text == result.best.verification_text
        direct = embed_texts(model, tokenizer, [text], recipe)[0]
        relative = float((result.best.embedding - direct).abs().max() / direct.abs().max())
        assert relative <= 1e-4, relative


def test_capturing_does_not_change_generation_and_forward_mode_is_bit_identical(served) -> None:
    reused, _, forward, backend = served
    assert backend.reused_states == 0
    assert [r.best.generation.text for r in reused] == [r.best.generation.text for r in forward]
    assert [r.completion_tokens for r in reused] == [r.completion_tokens for r in forward]
    # The three verification texts were embedded as one batch, as training embeds a batch.
    direct = embed_texts(
        backend.model,
        backend.worker_tokenizer,
        [r.best.verification_text for r in forward],
        backend.info.recipe,
        batch_size=len(forward),
    )
    for result, expected in zip(forward, direct):
        assert torch.equal(result.best.embedding, expected)


def test_a_generation_cut_by_max_tokens_falls_back_to_the_forward_pass() -> None:
    """Without the tag in the output the verification text appends it: tokens nobody generated, so no reuse."""
    results, backend = _serve("reuse", max_tokens=3)
    try:
        assert backend.reused_states == 0
        direct = embed_texts(
            backend.model,
            backend.worker_tokenizer,
            [r.best.verification_text for r in results],
            backend.info.recipe,
            batch_size=len(results),
        )
        for result, expected in zip(results, direct):
            assert not result.best.generation.text.rstrip().endswith("<verified>")
            assert torch.equal(result.best.embedding, expected)
    finally:
        asyncio.run(backend.close())


def test_pool_states_pools_like_embed_texts(tiny_model, tiny_tokenizer) -> None:
    recipe = HiddenStateRecipe(sequence_end="verified")
    text = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n<sentence>hi</sentence>\n<verified>"
    ids = tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = tiny_model.get_decoder()(input_ids=ids).last_hidden_state[0]
    assert torch.allclose(
        pool_states(states, recipe), embed_texts(tiny_model, tiny_tokenizer, [text], recipe)[0], atol=1e-6
    )
    swapped = pool_states(states, HiddenStateRecipe(sequence_end="verified", order="last_mean"))
    hidden = states.shape[1]
    assert torch.equal(swapped[:hidden], states[-1].float()) and torch.allclose(
        swapped[hidden:], states.float().mean(dim=0), atol=1e-6
    )
    with pytest.raises(ValueError, match="states"):
        pool_states(states[:0], recipe)
