"""The published JSON Schema of a record line, and a file check that reports every bad line.

``training/schemas/record.schema.json`` states the per-line format of ``training.records``;
:func:`validate_file` checks a JSONL file against it, adds the file-level rules no per-line
schema can state (UTF-8, one JSON object per line, unique ids, one format per file) and
returns every problem with its line and what to fix, instead of stopping at the first as
:func:`training.records.load_records` does. The two agree on what a valid file is (a test
holds them to it).

    python -m training.data validate data/train.jsonl data/calibration.jsonl
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from training.records import NO_TAG, YES_TAG, DataError, Record, mixed_format_message, record_format

__all__ = ["Problem", "FileReport", "SCHEMA_RESOURCE", "load_schema", "validate_file"]

SCHEMA_RESOURCE = "schemas/record.schema.json"
_FIELDS = ("id", "prompt", "messages", "positive", "negative", "reference", "meta")


@dataclass(frozen=True)
class Problem:
    """One bad line: where it is and what to fix."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class FileReport:
    """The outcome of :func:`validate_file`: how many records passed, and every problem found."""

    path: str
    records: int = 0
    format: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_schema() -> dict[str, Any]:
    """The record schema shipped in the package (read through importlib.resources, so an installed copy finds it)."""
    return json.loads(files("training").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8"))


def _validator():
    from jsonschema import Draft202012Validator  # the train extra; imported here so that loading records never needs it

    return Draft202012Validator(load_schema())


def _where(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    if not parts:
        return "the record"
    name = parts[0]
    for part in parts[1:]:
        name += f"[{part}]" if part.isdigit() else f".{part}"
    return f"field '{name}'"


def _explain(error) -> str:
    """A jsonschema error as what is wrong and what to do about it."""
    path = list(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and not path:
        unknown = sorted(set(error.instance) - set(_FIELDS))
        return f"unknown field(s) {unknown}; allowed fields are {list(_FIELDS)} (put extra information under 'meta')"
    if kind == "additionalProperties" or (kind == "required" and path and path[0] == "messages"):
        return f"{_where(error)} must be an object with exactly the keys 'role' and 'content'"
    if kind == "required":
        missing = [k for k in ("id", "positive", "negative") if k not in error.instance]
        return (
            f"missing required field(s) {missing}; every record needs ['id', 'positive', 'negative'] and one of "
            "'prompt' or 'messages'"
        )
    if kind == "oneOf":
        which = "both" if "prompt" in error.instance else "neither"
        return f"record has {which} of 'prompt' and 'messages'; give exactly one"
    if kind == "type":
        expected = {"string": "a string", "array": "a list", "object": "a JSON object"}.get(
            error.validator_value, error.validator_value
        )
        return f"{_where(error)} must be {expected}, got {type(error.instance).__name__}"
    if kind == "pattern" and path == ["positive"]:
        return (
            f"field 'positive' does not end with {YES_TAG}; append the tag to the target completion (only "
            "whitespace may follow it)"
        )
    if kind == "pattern" and path == ["negative"]:
        return (
            f"field 'negative' does not end with {NO_TAG}; append the tag to the static negative (only whitespace "
            "may follow it)"
        )
    if kind == "pattern" and path == ["id"]:
        return "field 'id' is empty; give every record a unique non-empty id"
    if kind == "pattern" and path == ["prompt"]:
        return "field 'prompt' is empty; every record needs the text the model is asked"
    if kind == "pattern":
        return f"{_where(error)} is empty; give it a non-empty value"
    if kind in ("minItems", "contains"):
        return "field 'messages' has no non-empty 'user' turn (empty prompt); add the user's request"
    return f"{_where(error)}: {error.message}"


def validate_file(path: str | os.PathLike) -> FileReport:
    """Check a JSONL record file line by line; every problem is collected, none stops the check."""
    report = FileReport(str(path))
    validator = _validator()
    first_line_of: dict[str, int] = {}
    file_format: tuple[str, int] | None = None

    def problem(line: int, message: str) -> None:
        report.problems.append(Problem(str(path), line, message))

    try:
        handle = open(path, "rb")
    except OSError as exc:
        report.problems.append(Problem(str(path), 0, f"cannot read the file ({exc.strerror}); check the path"))
        return report
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem(lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                problem(
                    lineno,
                    f"malformed JSON ({exc.msg} at column {exc.colno}); each line must be one complete JSON object",
                )
                continue
            if not isinstance(obj, dict):
                problem(lineno, f"expected a JSON object, got {type(obj).__name__}; write one object per line")
                continue
            errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
            messages = list(dict.fromkeys(_explain(e) for e in errors))  # one line per distinct fix
            if not messages:
                try:  # the schema passed; the record class must agree (a test keeps the two in step)
                    Record.from_dict(obj)
                except DataError as exc:
                    messages = [exc.reason]
            for message in messages:
                problem(lineno, message)
            record_id = obj.get("id")
            if isinstance(record_id, str) and record_id.strip():
                if record_id in first_line_of:
                    problem(
                        lineno,
                        f"duplicate id {record_id!r} (first used on line {first_line_of[record_id]}); ids must "
                        "be unique, rename or remove one of them",
                    )
                else:
                    first_line_of[record_id] = lineno
            fmt = record_format(obj)
            if fmt is not None:
                if file_format is None:
                    file_format = (fmt, lineno)
                elif fmt != file_format[0]:
                    problem(lineno, mixed_format_message(fmt, *file_format))
            if not messages:
                report.records += 1
    report.format = file_format[0] if file_format else None
    if report.records == 0 and not report.problems:
        problem(0, "the file holds no records; write one JSON object per line")
    return report
