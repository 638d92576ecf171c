"""Correctness functions (spec §4.3) and training-time response checks (§3.2, §3.3)."""

from __future__ import annotations

import sys

import pytest

from training.correctness import (
    CORRECTNESS,
    ENTRY_POINT_GROUP,
    arithmetic,
    exact_match,
    first_sentence,
    first_tagged,
    get_correctness,
    is_verbatim,
    normalize_hard_negative,
    parse_integer,
    registered_names,
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
    assert get_correctness("arithmetic") is arithmetic
    assert set(CORRECTNESS) >= {"word_order", "exact_match", "arithmetic"}


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
    assert normalize_hard_negative(f"  <sentence>x</sentence>\n{NO_TAG} \n") == f"<sentence>x</sentence>\n{NO_TAG}\n\n"


def test_hard_negative_ending_in_yes_is_flipped_to_no():
    assert normalize_hard_negative(f"<sentence>x</sentence>\n{YES_TAG}\n") == f"<sentence>x</sentence>\n{NO_TAG}\n\n"


def test_hard_negative_without_final_tag_gets_no_tag_appended():
    assert normalize_hard_negative("<sentence>x</sentence>\n") == f"<sentence>x</sentence>\n{NO_TAG}\n\n"
    assert normalize_hard_negative(f"{YES_TAG} trailing words") == f"{YES_TAG} trailing words\n{NO_TAG}\n\n"


# -- arithmetic: correctness by exact value -------------------------------------------------------------------


def test_arithmetic_accepts_the_exact_value_in_the_first_paired_answer():
    assert arithmetic(f"<answer>5758</answer>\n{YES_TAG}", "5758")
    assert arithmetic(f"<answer> 5,758 </answer>\n{NO_TAG}", "5758"), (
        "the label is about the value, not the model's tag"
    )
    assert arithmetic(f"<answer>-0042</answer>\n{YES_TAG}", "-42")


@pytest.mark.parametrize(
    "generation",
    [
        f"<answer>5757</answer>\n{YES_TAG}",  # wrong value
        f"<answer>5758.0</answer>\n{YES_TAG}",  # not an integer
        f"<answer>5758 apples</answer>\n{YES_TAG}",  # extra words
        f"<answer>57,58</answer>\n{YES_TAG}",  # misplaced separator
        "<answer>5758</answer>",  # no paired verified tag
        f"5758\n{YES_TAG}",  # no answer tags
        f"<answer>1</answer><answer>5758</answer>\n{YES_TAG}",  # only the first paired answer counts
    ],
)
def test_arithmetic_rejects_anything_but_the_exact_value(generation):
    assert not arithmetic(generation, "5758")


def test_arithmetic_without_a_reference_takes_the_value_from_the_positive():
    positive = f"<answer>5758</answer>\n{YES_TAG}"
    assert arithmetic(f"<answer>5,758</answer>\n{YES_TAG}", positive)
    assert not arithmetic(f"<answer>5759</answer>\n{YES_TAG}", positive)


def test_arithmetic_refuses_a_reference_that_is_not_an_integer():
    with pytest.raises(ValueError, match="reference"):
        arithmetic("<answer>1</answer><verified>Yes</verified>", "one")


def test_parse_integer():
    assert parse_integer(" -1,234 ") == -1234 and parse_integer("\u22127") == -7 and parse_integer("+5") == 5
    assert parse_integer("1.0") is None and parse_integer("") is None and parse_integer("1 2") is None


def test_first_tagged_generalises_first_sentence():
    assert first_tagged(f"<answer>7</answer>{YES_TAG}", "answer") == "7"
    assert (
        first_tagged("<answer>7</answer>", "answer") == ""
        and first_tagged("<answer>7</answer>", "answer", False) == "7"
    )
    with pytest.raises(ValueError, match="tag"):
        first_tagged("x", "a b")


# -- correctness functions from outside the package -----------------------------------------------------------

CHECKS_MODULE = """
def my_task(generation, reference):
    return reference.strip().lower() in generation.lower()

def one_argument(generation):
    return True

def keyword_only(*, generation, reference):
    return True

class Task:
    @staticmethod
    def check(generation, reference, *, strict=False):
        return generation == reference

NOT_A_FUNCTION = 3
"""


@pytest.fixture()
def checks_on_path(tmp_path, monkeypatch):
    """A module ``my_checks`` on sys.path and an installed distribution ``my-checks`` that registers two names
    under the sdm_lm.correctness entry-point group (one that loads, one that does not)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_checks.py").write_text(CHECKS_MODULE)
    dist = site / "my_checks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-checks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nmy_task = my_checks:my_task\n"
        "broken_task = my_checks:does_not_exist\nbad_signature = my_checks:one_argument\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("my_checks", None)


def test_module_path_imports_the_function(checks_on_path):
    fn = get_correctness("my_checks:my_task")
    assert fn("The answer is PARIS", "paris") and not fn("Lyon", "paris")
    assert get_correctness("my_checks:Task.check")("a", "a"), "a dotted attribute path after the colon works"


def test_entry_point_registered_by_an_installed_package_is_found_by_name(checks_on_path):
    assert registered_names()["my_task"] == "my_checks:my_task"
    assert get_correctness("my_task")("PARIS", "paris")


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("no_such_module_xyz:r", ["cannot import module 'no_such_module_xyz'", "PYTHONPATH"]),
        ("my_checks:nope", ["has no attribute 'nope'"]),
        (
            "my_checks:one_argument",
            ["cannot be called as r(generation, reference)", "def r(generation: str, reference: str) -> bool"],
        ),
        ("my_checks:keyword_only", ["cannot be called as r(generation, reference)"]),
        ("my_checks:NOT_A_FUNCTION", ["is a int, not a function"]),
        ("my_checks:", ["package.module:function"]),
        ("broken_task", ["does not load", "my_checks:does_not_exist"]),
        ("bad_signature", ["cannot be called as r(generation, reference)"]),
        (
            "no_such_name",
            ["unknown correctness function", "word_order", "my_task", "package.module:function", ENTRY_POINT_GROUP],
        ),
    ],
)
def test_bad_correctness_specs_get_an_error_that_names_the_fix(checks_on_path, spec, fragments):
    with pytest.raises(ValueError) as info:
        get_correctness(spec)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("module", ["training.finetune", "training.calibrate", "training.evaluate"])
def test_every_cli_refuses_a_bad_correctness_before_loading_anything(module, tmp_path, capsys, monkeypatch):
    import importlib

    # A path that cannot be a model or bundle: the command must fail on --correctness before it looks at them.
    argv = {
        "training.finetune": ["--preset", "tiny", "--output-dir", str(tmp_path / "run")],
        "training.calibrate": [
            "--model",
            "tiny",
            "--calibration",
            str(tmp_path / "none.jsonl"),
            "--out",
            str(tmp_path / "b"),
        ],
        "training.evaluate": [
            "--bundles",
            str(tmp_path),
            "--data",
            str(tmp_path / "none.jsonl"),
            "--out",
            str(tmp_path / "e"),
        ],
    }[module]
    main = importlib.import_module(module).main
    assert main([*argv, "--correctness", "no_such_module_xyz:r"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(
        {
            "training.finetune": "SDM_CORRECTNESS",
            "training.calibrate": "SDM_CALIBRATE_CORRECTNESS",
            "training.evaluate": "SDM_EVALUATE_CORRECTNESS",
        }[module],
        "os:getcwd",
    )
    assert main(argv) == 2
    assert "cannot be called as r(generation, reference)" in capsys.readouterr().err
