"""The arithmetic task's data: seeded and deterministic, disjoint splits, operands in range, negatives that are
wrong by a typical slip, and the python -m training.data arithmetic command."""

from __future__ import annotations

import json
import random

import pytest

from training.arithmetic import ArithmeticConfig, build_arithmetic, make_record, slip
from training.correctness import arithmetic
from training.data import main as data_main
from training.records import load_records

SMALL = dict(train=60, calibration=30, test=20, shift=10, quiet=True)


def _problems(path):
    return [(r.meta["a"], r.meta["op"], r.meta["b"]) for r in load_records(path)]


def test_the_same_seed_gives_the_same_files_and_another_seed_does_not(tmp_path):
    a = build_arithmetic(tmp_path / "a", ArithmeticConfig(**SMALL))
    b = build_arithmetic(tmp_path / "b", ArithmeticConfig(**SMALL))
    c = build_arithmetic(tmp_path / "c", ArithmeticConfig(seed=1, **SMALL))
    assert {k: v["sha256"] for k, v in a["splits"].items()} == {k: v["sha256"] for k, v in b["splits"].items()}
    assert a["splits"]["test"]["sha256"] != c["splits"]["test"]["sha256"]


def test_splits_are_disjoint_and_resizing_train_keeps_the_earlier_splits(tmp_path):
    build_arithmetic(tmp_path / "a", ArithmeticConfig(**SMALL, holdout=15))
    build_arithmetic(tmp_path / "b", ArithmeticConfig(**{**SMALL, "train": 120}))
    assert not (tmp_path / "b" / "holdout.jsonl").exists(), "no holdout file unless one is asked for"
    assert len(load_records(tmp_path / "a" / "holdout.jsonl")) == 15
    seen: set = set()
    for split in ("test", "calibration", "train", "holdout", "digits_shift"):
        problems = _problems(tmp_path / "a" / f"{split}.jsonl")
        assert len(set(problems)) == len(problems) and not seen & set(problems), split
        seen |= set(problems)
    for split in ("test", "calibration", "train", "digits_shift"):
        if split != "train":
            assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
                tmp_path / "b" / f"{split}.jsonl"
            ).read_bytes(), split
    # A larger train split starts with the smaller one's problems (its draw continues), and a holdout changes no train
    # record.
    assert _problems(tmp_path / "b" / "train.jsonl")[:60] == _problems(tmp_path / "a" / "train.jsonl")


def test_operands_positives_and_negatives(tmp_path):
    manifest = build_arithmetic(
        tmp_path, ArithmeticConfig(**{**SMALL, "min_digits": 2, "max_digits": 3, "operations": ("+", "*")})
    )
    for split, (low, high) in (("train", (2, 3)), ("digits_shift", (4, 5))):
        for record in load_records(tmp_path / f"{split}.jsonl"):
            a, op, b = record.meta["a"], record.meta["op"], record.meta["b"]
            assert op in ("+", "*") and all(low <= len(str(x)) <= high for x in (a, b))
            assert record.reference == str(a + b if op == "+" else a * b)
            assert arithmetic(record.positive, record.reference)
            assert not arithmetic(record.negative, record.reference)
            assert record.meta["negative_value"] != int(record.reference)
            assert str(record.meta["negative_value"]) in record.negative
    assert manifest["task"] == "arithmetic" and manifest["splits"]["digits_shift"]["operand_digits"] == [4, 5]


def test_slips_never_give_the_right_value():
    rng = random.Random(0)
    for value in [0, 1, 9, 10, 99, 100, -5, -10, 12345, -90909]:
        for op in "+-*":
            for _ in range(50):
                wrong, kind = slip(value, op, rng)
                assert wrong != value and kind in ("digit", "carry", "sign")
    record = make_record(12, "-", 30, random.Random(1), record_id="x", tag_drop_prob=1.0)
    assert record.reference == "-18" and record.meta["negative_tag_drop"] in ("open", "close", "both")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"min_digits": 3, "max_digits": 2}, "min_digits <= max_digits"),
        ({"operations": ("/",)}, "operations"),
        ({"tag_drop_prob": 2.0}, "tag_drop_prob"),
        ({"train": -1}, "train"),
        ({"min_digits": 1, "max_digits": 1, "operations": ("+",), "train": 200}, "widen the digit range"),
    ],
)
def test_settings_that_cannot_work_are_refused(tmp_path, changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_arithmetic(tmp_path, ArithmeticConfig(**{**SMALL, **changes}))


def test_the_cli_writes_the_splits_and_refuses_bad_settings(tmp_path, capsys):
    assert (
        data_main(
            [
                "arithmetic",
                "--out",
                str(tmp_path / "d"),
                "--train",
                "8",
                "--calibration",
                "4",
                "--test",
                "4",
                "--shift",
                "2",
                "--operations",
                "+,-",
                "--quiet",
            ]
        )
        == 0
    )
    assert "train=8" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["config"]["operations"] == ["+", "-"] and manifest["splits"]["digits_shift"]["records"] == 2
    assert data_main(["arithmetic", "--out", str(tmp_path / "e"), "--operations", "^"]) == 2
    assert "operations" in capsys.readouterr().err
