"""server.pipeline without a model: the seeds of resampled attempts, the tokens the server writes."""

from __future__ import annotations


def test_derived_seeds_differ_per_attempt() -> None:
    from server.pipeline import derive_seed

    assert derive_seed(5, 0) == 5 and derive_seed(None, 3) is None
    seeds = {derive_seed(5, k) for k in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_usage_counts_the_tag_tokens_the_server_writes(tiny_tokenizer) -> None:
    from types import SimpleNamespace

    from sdm_core.lm.bundle import VerificationTags
    from server.pipeline import SelectivePipeline

    backend = SimpleNamespace(
        info=SimpleNamespace(tags=VerificationTags()),
        head=SimpleNamespace(class_names=["No", "Yes"]),
        tokenizer=tiny_tokenizer,
    )
    pipeline = SelectivePipeline(backend)  # type: ignore[arg-type]
    try:

        def tokens(text: str) -> int:
            return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

        # Stopped at the tag: the server writes the word and the closing tag.
        assert pipeline.written_tokens("a b<verified>", "a b<verified>Yes</verified>") == tokens("Yes</verified>")
        # Ended without the tag (length or EOS): the server also writes "<verified>" after the stripped text.
        assert pipeline.written_tokens("a b \n", "a b\n<verified>No</verified>") == tokens("\n<verified>No</verified>")
        assert tokens("Yes</verified>") > 0
    finally:
        pipeline.close()


def test_a_generation_row_keeps_the_times_of_its_first_and_last_token() -> None:
    import time

    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.row import GenerationRow

    row = GenerationRow(GenerationRequest([1, 2], SamplingParams(max_tokens=4)))
    assert row.result().first_token_at is None
    before = time.perf_counter()
    row.counted(1)
    first = row.first_token_at
    row.counted(3)  # a backend that reports several tokens at once (vLLM's stream)
    row.counted(3)  # no new token: the last time stays
    result = row.result()
    assert result.completion_tokens == 3
    assert before <= result.first_token_at == first <= result.last_token_at <= time.perf_counter()
