"""Request bodies: JSON read strictly (400 for an empty body, bytes that are not UTF-8, text that is not JSON) and
validated with pydantic, the first error becoming a 400 that names its field in ``param``."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from server.errors import invalid_request

__all__ = ["read_json", "parse_request"]

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request) -> Any:
    """The body as JSON: 400 for an empty body, bytes that are not UTF-8, or text that is not JSON."""
    body = await request.body()
    if not body.strip():
        raise invalid_request("the request body is empty; send a JSON object", code="empty_body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request(
            f"the request body is not valid UTF-8 (invalid byte at position {exc.start}); encode JSON as UTF-8",
            code="invalid_encoding",
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_request(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise invalid_request(
            "the request body nests arrays or objects too deeply; send a flat JSON object", code="invalid_json"
        ) from None
    except ValueError as exc:  # an integer beyond Python's digit limit for int conversion
        del exc  # its text advises raising an interpreter limit, which is not the client's business
        raise invalid_request(
            "the request body holds an integer too long to read (over 4300 digits); send numbers of ordinary size",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise invalid_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "nullable"}


def _is_type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union member (``str``, ``list[str]``, ...), not a field."""
    if not isinstance(part, str):
        return False
    return (
        part in _TYPE_TAGS
        or any(c in part for c in "[]()")
        or part.startswith(("constrained-", "function-", "lax-", "strict-"))
    )


def _pick_error(errors: list[dict]) -> dict:
    """The error to report: of the first field's errors, the deepest one that is not a union's 'should be None'
    branch."""
    first = errors[0].get("loc", ("",))[:1]
    same = [
        e for e in errors if e.get("loc", ())[:1] == first and not (e.get("loc") and e["loc"][-1] == "none")
    ] or errors[:1]
    # deepest first; of equally deep ones, a broken constraint before a wrong type (the other union branch)
    return max(
        same,
        key=lambda e: (
            len([p for p in e.get("loc", ()) if not _is_type_tag(p)]),
            not str(e.get("type", "")).endswith("_type"),
        ),
    )


def parse_request(model: type[M], data: Any) -> M:
    """Validate with pydantic; the first error becomes a 400 naming its field in ``param``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = _pick_error(exc.errors(include_url=False))
        loc = [str(part) for part in error.get("loc", ()) if not _is_type_tag(part)]
        param = ".".join(loc) if loc else getattr(model, "root_param", None)
        message = str(error.get("msg", "invalid value"))
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        if error.get("type") == "missing":
            message = "this field is required"
        if param and not message.startswith(param):  # "alpha must be ..." already names its field
            message = f"{param}: {message}"
        raise invalid_request(message, param, error.get("type")) from None
