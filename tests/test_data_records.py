"""Record format: round trip, and rejection of every kind of bad line with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.records import NO_TAG, YES_TAG, DataError, Record, load_records, write_records

GOOD = {
    "id": "r1",
    "prompt": "Complete the sentence 'Neat plans' ...",
    "positive": f"<sentence>Neat plans fail without luck.</sentence>\n{YES_TAG}",
    "negative": f"<sentence>Neat plans without fail luck.</sentence>\n{NO_TAG}",
    "reference": "Neat plans fail without luck.",
    "meta": {"source": "test"},
}


def _write_lines(path: Path, objs: list) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _with(**changes) -> dict:
    obj = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


def _expect_error(path: Path, line: int, *fragments: str) -> DataError:
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    msg = str(err)
    assert str(path) in msg and f":{line}:" in msg, msg
    assert err.line == line
    for fragment in fragments:
        assert fragment in msg, msg
    return err


def test_record_round_trips_through_jsonl(tmp_path):
    chat = Record(
        id="c1",
        messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}),
        positive=f"hi\n{YES_TAG}",
        negative=f"bye\n{NO_TAG}",
    )
    for name, records in (("prompt.jsonl", [Record.from_dict(GOOD)]), ("chat.jsonl", [chat])):
        path = tmp_path / name
        assert write_records(path, records) == 1
        assert load_records(path) == records


def test_to_json_is_one_line_with_fixed_key_order():
    line = Record.from_dict(GOOD).to_json()
    assert "\n" not in line
    assert list(json.loads(line)) == ["id", "prompt", "positive", "negative", "reference", "meta"]


def test_write_records_is_byte_deterministic(tmp_path):
    records = [Record.from_dict(_with(id=f"r{i}")) for i in range(5)]
    write_records(tmp_path / "a.jsonl", records)
    write_records(tmp_path / "b.jsonl", records)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_malformed_json_is_rejected_with_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD | {"id": "a"}, '{"id": "b", "prompt": '])
    _expect_error(path, 2, "malformed JSON")


def test_positive_without_yes_tag_is_rejected_with_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_with(positive="<sentence>x</sentence>")])
    _expect_error(path, 1, "positive", YES_TAG)


def test_negative_without_no_tag_is_rejected_with_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD, _with(id="r2", negative=f"<sentence>x</sentence>\n{YES_TAG}")])
    _expect_error(path, 2, "negative", NO_TAG)


def test_empty_prompt_is_rejected_with_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD, _with(id="r2"), _with(id="r3", prompt="  \n")])
    _expect_error(path, 3, "prompt", "empty")


def test_chat_without_user_content_is_rejected_as_empty_prompt(tmp_path):
    obj = _with(prompt=..., messages=[{"role": "system", "content": "hi"}, {"role": "user", "content": ""}])
    path = _write_lines(tmp_path / "bad.jsonl", [obj])
    _expect_error(path, 1, "user", "empty prompt")


def test_duplicate_id_is_rejected_naming_both_lines(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD, _with(id="r2"), GOOD])
    _expect_error(path, 3, "duplicate id 'r1'", "line 1")


def test_missing_field_is_rejected_with_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_with(negative=...)])
    _expect_error(path, 1, "missing", "negative")


def test_ill_typed_field_is_rejected_with_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_with(reference=3)])
    _expect_error(path, 1, "reference", "string")


def test_unknown_field_is_rejected_rather_than_dropped(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_with(label=1)])
    _expect_error(path, 1, "unknown field", "label", "meta")


def test_prompt_and_messages_together_are_rejected(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_with(messages=[{"role": "user", "content": "hi"}])])
    _expect_error(path, 1, "both", "exactly one")


def test_non_object_line_is_rejected(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", ["[1, 2]"])
    _expect_error(path, 1, "JSON object")


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(_with(id="r2")) + "\n\n", encoding="utf-8")
    assert [r.id for r in load_records(path)] == ["r1", "r2"]
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(_with(id="r2", positive="x")) + "\n", encoding="utf-8")
    _expect_error(path, 3, "positive")


def test_trailing_whitespace_after_final_tag_is_allowed():
    rec = Record.from_dict(_with(negative=f"<sentence>x</sentence>\n{NO_TAG}\n\n"))
    assert rec.negative.endswith("\n\n")


def test_constructor_validates_without_location():
    with pytest.raises(DataError) as info:
        Record(id="x", prompt="p", positive="no tag", negative=NO_TAG)
    assert info.value.line is None and "positive" in str(info.value)


def test_finetune_reports_a_bad_records_file_as_a_usage_error(tmp_path, capsys):
    """training.finetune catches ValueError: a bad line ends the run with exit status 2 and the file:line, before
    any model is loaded."""
    from training.finetune import main

    bad = _write_lines(tmp_path / "train.jsonl", [GOOD, "{not json"])
    good = _write_lines(tmp_path / "calibration.jsonl", [_with(id="c1")])
    assert (
        main(
            ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--train", str(bad), "--calibration", str(good)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{bad}:2:" in err, err


def test_write_records_rejects_duplicate_ids_and_keeps_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_records(path, [Record.from_dict(GOOD)])
    before = path.read_bytes()
    with pytest.raises(DataError, match="duplicate id"):
        write_records(path, [Record.from_dict(GOOD), Record.from_dict(GOOD)])
    assert path.read_bytes() == before
