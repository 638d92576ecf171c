"""sdm_core.lm.stops.cut_at_stop: the one rule that ends a generation at a stop string (both serving backends and
training cut with it)."""

from __future__ import annotations

from sdm_core.lm.stops import StopCut, cut_at_stop


def test_no_stop_string_in_the_text_means_no_cut() -> None:
    assert cut_at_stop("the dog barked", stop=("###",), stop_inclusive=("<verified>",)) is None
    assert cut_at_stop("the dog barked") is None


def test_a_stop_string_is_removed_with_everything_after_it() -> None:
    assert cut_at_stop("answer###more", stop=("###",)) == StopCut("answer", "###", 6, False)


def test_an_inclusive_stop_string_is_kept() -> None:
    assert cut_at_stop("answer\n<verified>Yes", stop_inclusive=("<verified>",)) == StopCut(
        "answer\n<verified>", "<verified>", 7, True
    )


def test_the_earliest_stop_string_wins_whichever_list_holds_it() -> None:
    text = "one <verified> two ### three"
    assert cut_at_stop(text, stop=("###",), stop_inclusive=("<verified>",)).text == "one <verified>"
    assert cut_at_stop("one ### two <verified>", stop=("###",), stop_inclusive=("<verified>",)).text == "one "


def test_at_the_same_position_the_longest_stop_string_wins() -> None:
    cut = cut_at_stop("a <verified>", stop=("<",), stop_inclusive=("<verified>",))
    assert (cut.stop, cut.text, cut.inclusive) == ("<verified>", "a <verified>", True)
    cut = cut_at_stop("a <verified>", stop=("<verified>",), stop_inclusive=("<",))
    assert (cut.stop, cut.text, cut.inclusive) == ("<verified>", "a ", False)


def test_of_equal_strings_at_the_same_position_the_removed_one_wins() -> None:
    assert cut_at_stop("x END", stop=("END",), stop_inclusive=("END",)) == StopCut("x ", "END", 2, False)


def test_empty_stop_strings_are_ignored() -> None:
    assert cut_at_stop("text", stop=("",), stop_inclusive=("",)) is None
    assert cut_at_stop("text!", stop=("", "!")) == StopCut("text", "!", 4, False)
