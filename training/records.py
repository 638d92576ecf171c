"""JSONL record format shared by every fine-tuning task.

One JSON object per line:

    id         str, non-empty, unique within the file
    prompt     str, the user prompt; or
    messages   list of {"role": str, "content": str} (a chat; at least one non-empty
               "user" turn). Exactly one of prompt / messages is given.
    positive   str, the target completion; must end with <verified>Yes</verified>
    negative   str, the static negative; must end with <verified>No</verified>
    reference  str, optional; what the task's correctness function compares against
    meta       object, optional; free-form task details (never read by the trainer)

The published JSON Schema of one line is ``training/schemas/record.schema.json``
(shipped with the package); ``python -m training.data validate FILE.jsonl`` checks a
file against it and reports every bad line.

Tolerance rules (what is accepted as it is, and what is not):

- encoding: UTF-8 only; a byte-order mark at the start of the file is ignored; lines
  may end in LF or CRLF. Anything not UTF-8 is an error (re-encode the file).
- blank (whitespace-only) lines are skipped wherever they occur; every other line must
  be a valid record.
- tags: ``<verified>Yes</verified>`` / ``<verified>No</verified>`` exactly (case, no
  inner spaces) at the end of ``positive`` / ``negative``; whitespace after the final
  tag is allowed (the training-time check strips outer whitespace anyway). Other
  markup in a completion (``<sentence>``, ``<answer>``, ...) is the task's own business:
  only its correctness function reads it.
- whitespace inside texts is kept as written (prompts, completions and references are
  never normalised here; a correctness function may ignore whitespace if it wants to).
- unknown keys are an error rather than being dropped, so nothing in a file is silently
  ignored; put extra data under ``meta``.
- one format per file: every record uses ``prompt``, or every record uses ``messages``.
- ids are unique within a file.

Errors name the file and the 1-based line number.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERIFIED_OPEN = "<verified>"
YES_TAG = "<verified>Yes</verified>"
NO_TAG = "<verified>No</verified>"

_REQUIRED = ("id", "positive", "negative")
_KNOWN = ("id", "prompt", "messages", "positive", "negative", "reference", "meta")


def record_format(obj: Mapping[str, Any]) -> str | None:
    """ "prompt" or "messages": the format of one parsed record line (None when it has neither or both)."""
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        return None
    return "prompt" if has_prompt else "messages"


def mixed_format_message(found: str, first: str, first_line: int) -> str:
    """The error for a record whose format differs from the file's first record."""
    if found == "prompt":
        fix = 'write this prompt as "messages": [{"role": "user", "content": PROMPT}]'
    else:
        fix = (
            'write every prompt as "messages": [{"role": "user", "content": PROMPT}], or put the chats in a file '
            "of their own"
        )
    return (
        f"record uses '{found}' but the file's first record (line {first_line}) uses '{first}'; use one format "
        f"per file: {fix}"
    )


class DataError(ValueError):
    """A record or a record file is malformed. ``path``/``line`` locate it when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.reason = message
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Record:
    """One training/evaluation example. Validated on construction (raises DataError)."""

    id: str
    positive: str
    negative: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    reference: str | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.messages is not None and not isinstance(self.messages, tuple):
            # Keep the dataclass immutable at the top level even if a list was passed.
            if isinstance(self.messages, list):
                object.__setattr__(self, "messages", tuple(self.messages))
        _validate(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """Build a record from a parsed JSON object; raises DataError on any defect."""
        if not isinstance(data, Mapping):
            raise DataError(f"expected a JSON object, got {type(data).__name__}; write one object per line")
        unknown = sorted(set(data) - set(_KNOWN))
        if unknown:
            raise DataError(
                f"unknown field(s) {unknown}; allowed fields are {list(_KNOWN)} (put extra information under 'meta')"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise DataError(
                f"missing required field(s) {missing}; every record needs "
                f"{list(_REQUIRED)} and one of 'prompt' or 'messages'"
            )
        messages = data.get("messages")
        if isinstance(messages, list):
            messages = tuple(messages)
        return cls(
            id=data["id"],
            positive=data["positive"],
            negative=data["negative"],
            prompt=data.get("prompt"),
            messages=messages,
            reference=data.get("reference"),
            meta=data.get("meta"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in a fixed key order; absent optional fields are left out."""
        out: dict[str, Any] = {"id": self.id}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        out["positive"] = self.positive
        out["negative"] = self.negative
        if self.reference is not None:
            out["reference"] = self.reference
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    def to_json(self) -> str:
        """One JSON line (no trailing newline). Deterministic: same record, same bytes."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(", ", ": "))


def _check_str(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise DataError(f"field '{name}' must be a string, got {type(value).__name__}")


def _validate(rec: Record) -> None:
    _check_str("id", rec.id)
    if not rec.id.strip():
        raise DataError("field 'id' is empty; give every record a unique non-empty id")
    _check_str("positive", rec.positive)
    _check_str("negative", rec.negative)
    _check_str("prompt", rec.prompt, allow_none=True)
    _check_str("reference", rec.reference, allow_none=True)
    if rec.meta is not None and not isinstance(rec.meta, dict):
        raise DataError(f"field 'meta' must be a JSON object, got {type(rec.meta).__name__}")

    if (rec.prompt is None) == (rec.messages is None):
        which = "both" if rec.prompt is not None else "neither"
        raise DataError(f"record has {which} of 'prompt' and 'messages'; give exactly one")
    if rec.prompt is not None and not rec.prompt.strip():
        raise DataError("field 'prompt' is empty; every record needs the text the model is asked")
    if rec.messages is not None:
        _validate_messages(rec.messages)

    if not rec.positive.rstrip().endswith(YES_TAG):
        raise DataError(f"field 'positive' does not end with {YES_TAG}; append the tag to the target completion")
    if not rec.negative.rstrip().endswith(NO_TAG):
        raise DataError(f"field 'negative' does not end with {NO_TAG}; append the tag to the static negative")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, tuple) or not messages:
        raise DataError("field 'messages' must be a non-empty list of {role, content} objects")
    has_user = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise DataError(f"messages[{i}] must be an object with exactly the keys 'role' and 'content'")
        if not isinstance(msg["role"], str) or not msg["role"].strip():
            raise DataError(f"messages[{i}].role must be a non-empty string")
        if not isinstance(msg["content"], str):
            raise DataError(f"messages[{i}].content must be a string")
        if msg["role"] == "user" and msg["content"].strip():
            has_user = True
    if not has_user:
        raise DataError("field 'messages' has no non-empty 'user' turn (empty prompt); add the user's request")


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read and validate a JSONL file. Blank lines are skipped; anything else bad raises
    DataError naming the file and the 1-based line number."""
    path = Path(path)
    records: list[Record] = []
    first_line_of: dict[str, int] = {}
    file_format: tuple[str, int] | None = None  # the first record's format and line
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8", path, lineno
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON ({exc.msg} at column {exc.colno}); each line must be one complete JSON object",
                    path,
                    lineno,
                ) from None
            try:
                rec = Record.from_dict(obj)
            except DataError as exc:
                raise DataError(exc.reason, path, lineno) from None
            if rec.id in first_line_of:
                raise DataError(
                    f"duplicate id {rec.id!r} (first used on line "
                    f"{first_line_of[rec.id]}); ids must be unique, rename or "
                    "remove one of them",
                    path,
                    lineno,
                )
            first_line_of[rec.id] = lineno
            fmt = "prompt" if rec.prompt is not None else "messages"
            if file_format is None:
                file_format = (fmt, lineno)
            elif fmt != file_format[0]:
                raise DataError(mixed_format_message(fmt, *file_format), path, lineno)
            records.append(rec)
    return records


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records as JSONL (UTF-8, '\\n' line ends) and return how many were written.

    The file is written to a temporary name and renamed, so a failure never leaves a
    half-written file behind. Duplicate ids raise DataError before anything is replaced.
    """
    path = Path(path)
    lines: list[str] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, Record):
            raise DataError(f"item {i} is a {type(rec).__name__}, not a Record", path)
        if rec.id in seen:
            raise DataError(f"duplicate id {rec.id!r} (records {seen[rec.id]} and {i}); ids must be unique", path)
        seen[rec.id] = i
        lines.append(rec.to_json() + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(lines)
