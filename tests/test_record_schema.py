"""The published record schema and python -m training.data validate: every bad line reported with file:line and
its fix, the file-level rules (unique ids, one format per file, UTF-8), and agreement with load_records."""

from __future__ import annotations

import codecs
import json
import tomllib
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from training.data import main as data_main
from training.record_schema import load_schema, validate_file
from training.records import NO_TAG, YES_TAG, DataError, load_records

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "id": "a1",
    "prompt": "Compute 2 + 3.",
    "positive": f"<answer>5</answer>\n{YES_TAG}",
    "negative": f"<answer>6</answer>\n{NO_TAG}",
    "reference": "5",
    "meta": {"op": "+"},
}
CHAT = {
    "id": "c1",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2 + 3."}],
    "positive": f"<answer>5</answer>\n{YES_TAG}",
    "negative": f"<answer>6</answer>\n{NO_TAG}",
}


def _with(base: dict, **changes) -> dict:
    obj = dict(base)
    for key, value in changes.items():
        if value is ...:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


# Each bad line, and a fragment of the fix its report must carry.
BAD_LINES = [
    (_with(GOOD, extra=1), "put extra information under 'meta'"),
    (_with(GOOD, id=...), "missing required field(s) ['id']"),
    (_with(GOOD, negative=...), "missing required field(s) ['negative']"),
    (_with(GOOD, id="  "), "field 'id' is empty"),
    (_with(GOOD, id=7), "field 'id' must be a string"),
    (_with(GOOD, prompt=" \n"), "field 'prompt' is empty"),
    (_with(GOOD, prompt=...), "neither of 'prompt' and 'messages'"),
    (_with(GOOD, messages=CHAT["messages"]), "both of 'prompt' and 'messages'"),
    (_with(GOOD, positive="<answer>5</answer>"), "append the tag to the target completion"),
    (
        _with(GOOD, positive="<answer>5</answer>\n<verified>yes</verified>"),
        "does not end with <verified>Yes</verified>",
    ),
    (_with(GOOD, positive=f"{YES_TAG} trailing words"), "does not end with <verified>Yes</verified>"),
    (_with(GOOD, negative=f"<answer>6</answer>\n{YES_TAG}"), "does not end with <verified>No</verified>"),
    (_with(GOOD, reference=5), "field 'reference' must be a string"),
    (_with(GOOD, meta=["x"]), "field 'meta' must be a JSON object"),
    (_with(CHAT, messages=[]), "no non-empty 'user' turn"),
    (_with(CHAT, messages=[{"role": "system", "content": "hi"}]), "no non-empty 'user' turn"),
    (_with(CHAT, messages=[{"role": "user", "content": "hi", "name": "x"}]), "exactly the keys 'role' and 'content'"),
    (
        _with(CHAT, messages=[{"role": "user"}, {"role": "user", "content": "hi"}]),
        "exactly the keys 'role' and 'content'",
    ),
    (_with(CHAT, messages="hi"), "field 'messages' must be a list"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "x", ', "malformed JSON"),
]


def _write(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


def test_the_shipped_schema_is_a_valid_draft_2020_12_schema_and_accepts_good_records():
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert not list(Draft202012Validator(schema).iter_errors(GOOD))
    assert not list(Draft202012Validator(schema).iter_errors(CHAT))


def test_the_schema_ships_as_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "training"
    ]
    assert any(path.match(pattern) for pattern in package_data for path in [Path("schemas/record.schema.json")])
    assert (ROOT / "training" / "schemas" / "record.schema.json").is_file()


@pytest.mark.parametrize("line, fix", BAD_LINES, ids=[fix[:40] for _, fix in BAD_LINES])
def test_each_bad_line_is_reported_with_its_fix_and_refused_by_load_records(tmp_path, line, fix):
    # The bad line sits between good ones: the check names its line and carries on past it.
    if isinstance(line, dict) and "messages" in line and "prompt" not in line:
        first, last = CHAT, _with(CHAT, id="c2")
    else:
        first, last = GOOD, _with(GOOD, id="a2")
    path = _write(tmp_path / "data.jsonl", [first, line, last])
    report = validate_file(path)
    assert report.records == 2 and not report.ok
    assert {p.line for p in report.problems} == {2}, [str(p) for p in report.problems]
    assert any(fix in str(p) and str(p).startswith(f"{path}:2: ") for p in report.problems), [
        str(p) for p in report.problems
    ]
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.line == 2


def test_validate_reports_every_bad_line_and_exits_1(tmp_path, capsys):
    lines = [GOOD] + [line for line, _ in BAD_LINES if not (isinstance(line, dict) and "messages" in line)]
    lines = [
        _with(line, id=f"id{i}")
        if isinstance(line, dict) and isinstance(line.get("id"), str) and line["id"].strip()
        else line
        for i, line in enumerate(lines)
    ]
    path = _write(tmp_path / "bad.jsonl", lines)
    assert data_main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    bad_lines = {
        int(line.split(":")[1])
        for line in out.splitlines()
        if line.startswith(f"{path}:") and line.split(":")[1].isdigit()
    }
    assert bad_lines == set(range(2, len(lines) + 1))
    assert out.splitlines()[-1].startswith(f"{path}: ") and "1 good records" in out.splitlines()[-1]


def test_validate_accepts_a_good_file_and_exits_0(tmp_path, capsys):
    path = _write(tmp_path / "good.jsonl", [GOOD, "", _with(GOOD, id="a2")])
    assert data_main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: 2 records, format 'prompt', OK"


@pytest.mark.parametrize("order", [(GOOD, CHAT), (CHAT, GOOD)])
def test_a_file_with_mixed_formats_gets_an_error_naming_the_fix(tmp_path, order):
    path = _write(tmp_path / "mixed.jsonl", list(order))
    problems = validate_file(path).problems
    assert len(problems) == 1 and problems[0].line == 2
    assert (
        "use one format per file" in problems[0].message
        and '"messages": [{"role": "user", "content": PROMPT}]' in problems[0].message
    )
    with pytest.raises(DataError, match="use one format per file") as info:
        load_records(path)
    assert info.value.line == 2


def test_duplicate_ids_are_reported_on_the_second_use(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [GOOD, _with(GOOD, id="a2"), GOOD])
    (problem,) = validate_file(path).problems
    assert problem.line == 3 and "duplicate id 'a1' (first used on line 1)" in problem.message


def test_tolerance_a_bom_crlf_blank_lines_and_whitespace_after_the_final_tag_are_accepted(tmp_path):
    good = _with(GOOD, positive=GOOD["positive"] + " \n\n")
    path = tmp_path / "windows.jsonl"
    path.write_bytes(
        codecs.BOM_UTF8 + (json.dumps(good) + "\r\n\r\n" + json.dumps(_with(GOOD, id="a2")) + "\r\n").encode()
    )
    assert validate_file(path).ok
    assert [r.id for r in load_records(path)] == ["a1", "a2"]


def test_text_that_is_not_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        (json.dumps(GOOD) + "\n").encode()
        + json.dumps(_with(GOOD, id="a2", prompt="Caf\u00e9"), ensure_ascii=False).encode("latin-1")
        + b"\n"
    )
    (problem,) = validate_file(path).problems
    assert problem.line == 2 and "re-encode the file as UTF-8" in problem.message


def test_an_empty_or_missing_file_is_a_problem(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "holds no records" in validate_file(tmp_path / "empty.jsonl").problems[0].message
    assert "cannot read the file" in validate_file(tmp_path / "missing.jsonl").problems[0].message


def test_the_shipped_builders_write_files_that_validate(tmp_path):
    from training.arithmetic import ArithmeticConfig, build_arithmetic
    from training.data import WordOrderConfig, build_word_order

    build_arithmetic(tmp_path / "arith", ArithmeticConfig(train=40, calibration=20, test=10, shift=10, quiet=True))
    build_word_order(tmp_path / "wo", WordOrderConfig(train=20, calibration=10, test=10, length_shift=5, quiet=True))
    for path in sorted((tmp_path / "arith").glob("*.jsonl")) + sorted((tmp_path / "wo").glob("*.jsonl")):
        report = validate_file(path)
        assert report.ok, [str(p) for p in report.problems[:3]]
