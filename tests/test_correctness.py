"""Correctness functions (spec §4.3) and training-time response checks (§3.2, §3.3)."""

from __future__ import annotations

import pytest

from training.correctness import (
    CORRECTNESS,
    exact_match,
    first_sentence,
    get_correctness,
    is_verbatim,
    normalize_hard_negative,
    word_order,
)
from training.records import NO_TAG, YES_TAG

REF = "Neat plans fail without luck."
POSITIVE = f"<sentence>{REF}</sentence>\n{YES_TAG}"


def test_word_order_accepts_paired_correct_sentence():
    assert word_order(POSITIVE, REF)


def test_word_order_is_independent_of_the_models_own_tag():
    # The label is about the sentence, not about what the model claimed.
    assert word_order(f"<sentence>{REF}</sentence>\n{NO_TAG}", REF)


def test_word_order_rejects_sentence_without_verified_tag():
    assert not word_order(f"<sentence>{REF}</sentence>", REF)


def test_word_order_rejects_wrong_order():
    assert not word_order(f"<sentence>Neat plans without fail luck.</sentence>\n{YES_TAG}", REF)


def test_word_order_ignores_whitespace_differences():
    assert word_order(f"<sentence>  Neat   plans\nfail without\tluck. </sentence>\n{YES_TAG}", REF)


def test_word_order_is_case_sensitive():
    assert not word_order(f"<sentence>neat plans fail without luck.</sentence>\n{YES_TAG}", REF)


def test_word_order_uses_first_paired_sentence_only():
    text = f"<sentence>Neat plans luck. fail without</sentence>\n{YES_TAG}\n<sentence>{REF}</sentence>"
    assert not word_order(text, REF)


def test_word_order_rejects_missing_sentence_tags():
    assert not word_order(f"{REF}\n{YES_TAG}", REF)


def test_first_sentence_pairs_by_index_not_adjacency():
    text = f"<sentence>A</sentence><sentence>B</sentence>\n{NO_TAG}"
    assert first_sentence(text) == "A"
    assert first_sentence("<sentence>A</sentence>") == ""


def test_first_sentence_without_pairing_requirement():
    assert first_sentence("<sentence>A</sentence>", require_verified=False) == "A"
    assert first_sentence("nothing here", require_verified=False) == ""


def test_first_sentence_spans_newlines():
    assert first_sentence(f"<sentence>a\nb</sentence>{YES_TAG}") == "a\nb"


def test_exact_match_strips_outer_whitespace_only():
    assert exact_match("  abc \n", "abc")
    assert not exact_match("a bc", "abc")


def test_registry_returns_named_functions():
    assert get_correctness("word_order") is word_order
    assert get_correctness("exact_match") is exact_match
    assert set(CORRECTNESS) >= {"word_order", "exact_match"}


def test_unknown_correctness_name_lists_known_names():
    with pytest.raises(ValueError, match="exact_match.*word_order"):
        get_correctness("bleu")


def test_is_verbatim_accepts_formatted_positive_with_outer_whitespace():
    assert is_verbatim(POSITIVE + "\n\n", POSITIVE)
    assert is_verbatim("  " + POSITIVE, POSITIVE)


def test_is_verbatim_accepts_same_text_with_no_tag():
    assert is_verbatim(f"<sentence>{REF}</sentence>\n{NO_TAG}", POSITIVE)


def test_is_verbatim_rejects_formatting_differences():
    assert not is_verbatim(f"<sentence>{REF}</sentence> {YES_TAG}", POSITIVE)
    assert not is_verbatim(f"<sentence>{REF} </sentence>\n{YES_TAG}", POSITIVE)


def test_is_verbatim_requires_positive_with_yes_tag():
    with pytest.raises(ValueError, match="Yes"):
        is_verbatim("x", "<sentence>x</sentence>")


def test_hard_negative_ending_in_no_is_kept():
    assert normalize_hard_negative(f"  <sentence>x</sentence>\n{NO_TAG} \n") == \
        f"<sentence>x</sentence>\n{NO_TAG}\n\n"


def test_hard_negative_ending_in_yes_is_flipped_to_no():
    assert normalize_hard_negative(f"<sentence>x</sentence>\n{YES_TAG}\n") == \
        f"<sentence>x</sentence>\n{NO_TAG}\n\n"


def test_hard_negative_without_final_tag_gets_no_tag_appended():
    assert normalize_hard_negative("<sentence>x</sentence>\n") == f"<sentence>x</sentence>\n{NO_TAG}\n\n"
    assert normalize_hard_negative(f"{YES_TAG} trailing words") == \
        f"{YES_TAG} trailing words\n{NO_TAG}\n\n"
