"""Word-ordering task builder (spec §4.4, §5): formats, determinism, splits, edge cases."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from training.data import DEFAULT_CORPORA, WordOrderConfig, build_word_order, main, read_sentences
from training.records import NO_TAG, YES_TAG, load_records
from training.word_order import (
    distinct_orderings,
    format_negative,
    format_positive,
    format_prompt,
    make_record,
    make_record_widening,
    two_distinct_shuffles,
)

SPLIT_FILES = ("train.jsonl", "calibration.jsonl", "test.jsonl", "length_shift.jsonl", "harvard.jsonl")
SMALL = dict(train=200, calibration=100, test=50, quiet=True)

# §4.4, typed out by hand so a change to the template in the code is caught.
TABLE1_PROMPT = (
    "Complete the sentence 'Neat plans' by reordering all of the following without adding new "
    "punctuation nor words: 'fail luck. without'. Only reply with the sentence in the XML "
    "<sentence> </sentence> followed by <verified>Yes</verified> if your answer correctly "
    "addressed the instructions, and <verified>No</verified> if it did not."
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wo_seed0")
    build_word_order(out, WordOrderConfig(seed=0, **SMALL))
    return out


@pytest.fixture(scope="module")
def records(built) -> dict[str, list]:
    return {name: load_records(built / name) for name in SPLIT_FILES}


def _all(records):
    return [r for recs in records.values() for r in recs]


def _write_corpora(root: Path, wiki: list[str], shift: list[str], harvard: list[str]) -> Path:
    for rel, lines in (
        ("wikipedia/wiki_sentences_5to60.txt", wiki),
        ("wikipedia/wiki_sentences_len50to60.txt", shift),
        ("harvard/harvard_sentences.txt", harvard),
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# --- formats -------------------------------------------------------------------------------


def test_prompt_is_exact_spec_template_for_table1_example():
    assert format_prompt("Neat plans", "fail luck. without") == TABLE1_PROMPT


def test_made_record_uses_exact_template_and_table1_formats():
    # Find a seed whose first shuffle is the Table 1 multiset, then check the whole record.
    for seed in range(500):
        rec = make_record(
            "Neat plans fail without luck.", random.Random(seed), record_id="t1", source="test", tag_drop_prob=0.0
        )
        if rec.meta["multiset"] == "fail luck. without":
            break
    else:
        pytest.fail("no seed gave the Table 1 multiset")
    assert rec.prompt == TABLE1_PROMPT
    assert rec.positive == "<sentence>Neat plans fail without luck.</sentence>\n<verified>Yes</verified>"
    assert rec.reference == "Neat plans fail without luck."
    assert rec.meta["prefix"] == "Neat plans"


def test_tag_dropped_negative_formats_match_spec():
    s = "Neat plans without fail luck."
    assert format_negative(s) == f"<sentence>{s}</sentence>\n{NO_TAG}"
    assert format_negative(s, "open") == f"{s}</sentence>\n{NO_TAG}"
    assert format_negative(s, "close") == "<sentence>Neat plans without fail luck.\n<verified>No</verified>"
    assert format_negative(s, "both") == f"{s}\n{NO_TAG}"
    with pytest.raises(ValueError):
        format_negative(s, "middle")


def test_every_record_is_well_formed(records):
    for rec in _all(records):
        meta = rec.meta
        assert rec.positive == format_positive(rec.reference)
        assert rec.positive.endswith(YES_TAG) and rec.negative.endswith(NO_TAG)
        assert rec.prompt == format_prompt(meta["prefix"], meta["multiset"])
        assert rec.negative == format_negative(meta["negative_sentence"], meta["negative_tag_drop"])
        assert meta["n_words"] == len(rec.reference.split())
        assert meta["source"] in {"wikipedia", "harvard"}


def test_negatives_differ_from_positives(records):
    for rec in _all(records):
        assert rec.negative != rec.positive
        assert rec.meta["negative_sentence"] != rec.reference
        assert rec.meta["negative_sentence"].split() != rec.reference.split()


def test_multiset_is_a_changed_permutation_of_the_suffix(records):
    for rec in _all(records):
        tokens = rec.reference.split()
        m = rec.meta["suffix_size"]
        suffix, multiset = tokens[-m:], rec.meta["multiset"].split()
        negative_suffix = rec.meta["negative_sentence"].split()[-m:]
        assert sorted(multiset) == sorted(suffix) and multiset != suffix
        assert sorted(negative_suffix) == sorted(suffix)
        assert negative_suffix not in (suffix, multiset)
        assert rec.meta["prefix"].split() == tokens[:-m]
        assert rec.meta["negative_sentence"].split()[:-m] == tokens[:-m]


# --- tag drops -----------------------------------------------------------------------------


def test_about_ten_percent_of_negatives_drop_tags_spread_over_three_variants():
    sentences = [s for _, s in read_sentences(DEFAULT_CORPORA / "wikipedia/wiki_sentences_5to60.txt")][:8000]
    rng = random.Random(1234)
    drops = Counter()
    for i, s in enumerate(sentences):
        rec = make_record(s, rng, record_id=str(i), source="t")
        if rec is not None:
            drops[rec.meta["negative_tag_drop"]] += 1
    total = sum(drops.values())
    dropped = total - drops["none"]
    assert total > 7500
    assert abs(dropped / total - 0.10) < 0.02, drops
    for variant in ("open", "close", "both"):
        assert 0.22 < drops[variant] / dropped < 0.45, drops


def test_tag_drop_probability_zero_and_one_are_respected():
    s = "The quick brown fox jumps over the lazy dog."
    none = [make_record(s, random.Random(i), record_id="x", source="t", tag_drop_prob=0.0) for i in range(50)]
    every = [make_record(s, random.Random(i), record_id="x", source="t", tag_drop_prob=1.0) for i in range(50)]
    assert all(r.meta["negative_tag_drop"] == "none" for r in none)
    assert all(r.meta["negative_tag_drop"] != "none" for r in every)


def test_positives_never_drop_tags(records):
    for rec in _all(records):
        assert rec.positive.startswith("<sentence>") and "</sentence>\n" in rec.positive


# --- shuffling and skip rules --------------------------------------------------------------


def test_variety_rule_skips_suffix_with_one_distinct_word():
    assert make_record("We all said no no no", random.Random(0), record_id="x", source="t") is None
    assert make_record("We all said yes no no", random.Random(0), record_id="x", source="t") is not None


def test_two_distinct_shuffles_gives_none_when_impossible():
    assert two_distinct_shuffles(["a", "b"], random.Random(0), 50) is None  # only one other order
    first, second = two_distinct_shuffles(["a", "a", "b"], random.Random(0), 50)
    assert first != second and ["a", "a", "b"] not in (first, second)


def test_distinct_orderings_counts_multiset_permutations():
    assert distinct_orderings(["a", "b", "c"]) == 6
    assert distinct_orderings(["a", "a", "b"]) == 3
    assert distinct_orderings(["a", "a", "a"]) == 1


def test_harvard_unshufflable_suffix_is_widened():
    rec = make_record_widening("They shouted go go go", random.Random(0), record_id="h", source="harvard")
    assert rec is not None and rec.meta["suffix_size"] == 4
    assert sorted(rec.meta["multiset"].split()) == ["go", "go", "go", "shouted"]
    assert make_record_widening("go go go go", random.Random(0), record_id="h", source="harvard") is None


def test_harvard_edge_cases_are_reported_in_manifest(tmp_path):
    wiki = [s for _, s in read_sentences(DEFAULT_CORPORA / "wikipedia/wiki_sentences_5to60.txt")][:60]
    shift = [s for _, s in read_sentences(DEFAULT_CORPORA / "wikipedia/wiki_sentences_len50to60.txt")][:5]
    harvard = ["The birch canoe slid on the smooth planks.", "They shouted go go go", "go go go go go"]
    corpora = _write_corpora(tmp_path / "corpora", wiki, shift, harvard)
    manifest = build_word_order(
        tmp_path / "out", WordOrderConfig(train=20, calibration=10, test=10, corpora_dir=corpora, quiet=True)
    )
    info = manifest["splits"]["harvard"]
    assert info["records"] == 2
    assert info["widened_suffix_ids"] == ["harvard-000002"]
    assert info["left_out"] == [{"line": 3, "sentence": "go go go go go"}]


# --- splits, sizes, determinism ------------------------------------------------------------


def test_requested_split_sizes_are_exact(records):
    assert [len(records[f]) for f in ("train.jsonl", "calibration.jsonl", "test.jsonl")] == [200, 100, 50]


def test_harvard_has_all_720_sentences(records):
    assert len(records["harvard.jsonl"]) == 720
    assert {r.meta["source"] for r in records["harvard.jsonl"]} == {"harvard"}


def test_length_shift_sentences_have_50_to_60_words(records):
    shift = records["length_shift.jsonl"]
    assert len(shift) == 522
    assert all(50 <= len(r.reference.split()) <= 60 for r in shift)


def test_in_distribution_splits_exclude_length_shift_sentences(records):
    for name in ("train.jsonl", "calibration.jsonl", "test.jsonl"):
        assert all(len(r.reference.split()) < 50 for r in records[name])


def test_splits_are_disjoint_by_sentence_text(records):
    texts = {name: {r.reference for r in recs} for name, recs in records.items()}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not texts[a] & texts[b], (a, b)


def test_overlapping_corpora_still_give_disjoint_splits(tmp_path):
    wiki = [s for _, s in read_sentences(DEFAULT_CORPORA / "wikipedia/wiki_sentences_5to60.txt")][:80]
    shift = [s for _, s in read_sentences(DEFAULT_CORPORA / "wikipedia/wiki_sentences_len50to60.txt")][:5]
    harvard = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background."]
    # Plant the Harvard and length-shift sentences (and a duplicate) in the Wikipedia file.
    corpora = _write_corpora(tmp_path / "c", wiki + harvard + shift[:2] + wiki[:1], shift, harvard)
    out = tmp_path / "out"
    manifest = build_word_order(
        out, WordOrderConfig(train=40, calibration=20, test=20, corpora_dir=corpora, quiet=True)
    )
    pool = manifest["wikipedia_pool"]
    assert pool["excluded_as_length_shift_or_harvard"] == 4 and pool["duplicates"] == 1
    wiki_texts = {
        r.reference for f in ("train.jsonl", "calibration.jsonl", "test.jsonl") for r in load_records(out / f)
    }
    assert not wiki_texts & (set(harvard) | set(shift))


def test_same_seed_gives_byte_identical_files(built, tmp_path):
    build_word_order(tmp_path, WordOrderConfig(seed=0, **SMALL))
    for name in SPLIT_FILES + ("manifest.json",):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name


def test_different_seed_gives_different_files(built, tmp_path):
    build_word_order(tmp_path, WordOrderConfig(seed=1, **SMALL))
    for name in SPLIT_FILES:
        assert (tmp_path / name).read_bytes() != (built / name).read_bytes(), name


def test_ids_are_deterministic_and_unique(records):
    ids = [r.id for r in _all(records)]
    assert len(ids) == len(set(ids))
    assert records["train.jsonl"][0].id == "wiki-train-000001"
    assert records["harvard.jsonl"][-1].id == "harvard-000720"
    assert records["length_shift.jsonl"][0].id == "lenshift-000001"


def test_manifest_records_counts_seed_and_hashes(built, records):
    import hashlib

    manifest = json.loads((built / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 0
    for info in manifest["splits"].values():
        data = (built / info["file"]).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["records"] == len(records[info["file"]])
    for src in manifest["sources"].values():
        data = (DEFAULT_CORPORA / src["file"]).read_bytes()
        assert src["sha256"] == hashlib.sha256(data).hexdigest()
    assert "CC BY-SA" in manifest["licence"]


def test_requesting_more_records_than_sentences_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="lower the split sizes"):
        build_word_order(tmp_path, WordOrderConfig(train=40_000, quiet=True))


def test_invalid_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        build_word_order(tmp_path, WordOrderConfig(suffix=1, quiet=True))
    with pytest.raises(ValueError, match="tag_drop_prob"):
        build_word_order(tmp_path, WordOrderConfig(tag_drop_prob=1.5, quiet=True))


def test_max_words_bounds_the_in_distribution_splits_but_not_the_length_shift_set(tmp_path):
    rc = main(
        [
            "word-order",
            "--out",
            str(tmp_path),
            "--train",
            "30",
            "--calibration",
            "20",
            "--test",
            "10",
            "--length-shift",
            "5",
            "--max-words",
            "12",
            "--min-words",
            "6",
            "--quiet",
        ]
    )
    assert rc == 0
    for name in ("train.jsonl", "calibration.jsonl", "test.jsonl"):
        lengths = [len(r.reference.split()) for r in load_records(tmp_path / name)]
        assert lengths and all(6 <= n <= 12 for n in lengths), (name, lengths)
    assert all(len(r.reference.split()) >= 50 for r in load_records(tmp_path / "length_shift.jsonl"))
    config = json.loads((tmp_path / "manifest.json").read_text())["config"]
    assert (config["min_words"], config["max_words"]) == (6, 12)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_builds_all_files(tmp_path, capsys):
    rc = main(
        [
            "word-order",
            "--out",
            str(tmp_path),
            "--train",
            "30",
            "--calibration",
            "20",
            "--test",
            "10",
            "--length-shift",
            "15",
            "--seed",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    assert len(load_records(tmp_path / "length_shift.jsonl")) == 15
    assert len(load_records(tmp_path / "train.jsonl")) == 30
    assert (tmp_path / "manifest.json").is_file()
    assert "train=30" in capsys.readouterr().out


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    rc = main(["word-order", "--out", str(tmp_path), "--test", "999999", "--quiet"])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
