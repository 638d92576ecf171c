"""``POST /v1/feedback``: a client says whether an answer was right.

The body is one object ``{"id": "...", "label": "correct" | "wrong" | "ood", "note": "..."}`` or a list of them
(at most ``--feedback-max-items``). ``id`` is the ``id`` of a response of ``/generate``, ``/v1/completions`` or
``/v1/chat/completions``. ``correct``: the answer did what was asked; ``wrong``: it did not; ``ood``: the request
is outside what the model should be judged on. The last label for an id wins and its time is kept. A request is
all or nothing: an unknown (never recorded, sampled out or expired) id is a 404 and nothing is written.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from sdm_core.traffic import Feedback
from server.bodies import parse_request
from server.config import ServerConfig
from server.errors import APIError, invalid_request, not_found
from server.traffic import StoreUnavailable, TrafficRecorder
from server.traffic_metrics import TrafficMetrics

__all__ = ["FeedbackItem", "FeedbackHandler", "feedback_body_schema", "set_feedback_limits"]

MAX_ID_CHARS = 128


class FeedbackItem(BaseModel):
    """One label. Strict: a number is not an id, a list is not a note."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="the id of a response this server gave")
    label: Literal["correct", "wrong", "ood"] = Field(
        description="correct: the answer did what was asked; wrong: it did not; ood: out of distribution"
    )
    note: str | None = Field(
        default=None, description="free text kept with the label (at most --feedback-max-note-chars)"
    )


def feedback_body_schema() -> dict:
    """The OpenAPI request body of POST /v1/feedback: one label or a list of labels. The limits the handler enforces
    (--feedback-max-items, --feedback-max-note-chars) are settings: :func:`set_feedback_limits` writes them in."""
    ref = {"$ref": "#/components/schemas/FeedbackItem"}
    schema = {
        "anyOf": [ref, {"type": "array", "items": ref, "minItems": 1}],
        "$defs": {"FeedbackItem": FeedbackItem.model_json_schema()},
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def set_feedback_limits(body: dict, item: dict, config: ServerConfig) -> None:
    """Write this server's limits into the feedback body schema ``body`` and its ``FeedbackItem`` component ``item``:
    a list of 1 to --feedback-max-items labels, each note at most --feedback-max-note-chars characters."""
    note = item["properties"]["note"]
    for branch in note.get("anyOf", [note]):
        if branch.get("type") == "string":
            branch["maxLength"] = config.feedback_max_note_chars
    for branch in body["anyOf"]:
        if branch.get("type") == "array":
            branch["maxItems"] = config.feedback_max_items


class FeedbackHandler:
    def __init__(self, config: ServerConfig, recorder: TrafficRecorder, metrics: TrafficMetrics) -> None:
        self.config = config
        self.recorder = recorder
        self.metrics = metrics

    def parse(self, data: Any) -> list[Feedback]:
        """The labels of a request body, or a 400 naming the first bad field (``3.label`` for a list's fourth item)."""
        single = isinstance(data, dict)
        if single:
            items = [data]
        elif isinstance(data, list):
            items = data
        else:
            raise invalid_request(
                f"the request body must be a JSON object or a list of objects, got {type(data).__name__}",
                None,
                "invalid_json",
            )
        if not items:
            raise invalid_request(
                'the list of labels is empty; send at least one {"id", "label"} object', None, "empty_feedback"
            )
        limit = self.config.feedback_max_items
        if len(items) > limit:
            raise invalid_request(
                f"{len(items)} labels in one request; this server accepts at most {limit} (--feedback-max-items): send "
                "them in batches",
                None,
                "too_many_labels",
            )
        out = []
        for n, item in enumerate(items):
            prefix = "" if single else f"{n}."
            if not isinstance(item, dict):
                raise invalid_request(
                    f"{prefix or 'body'}: each label must be a JSON object, got {type(item).__name__}",
                    prefix.rstrip(".") or None,
                    "invalid_type",
                )
            try:
                parsed = parse_request(FeedbackItem, item)
            except APIError as exc:
                if prefix:
                    exc.param = prefix + (exc.param or "")
                    exc.message = prefix + exc.message
                raise
            if parsed.note is not None and len(parsed.note) > self.config.feedback_max_note_chars:
                raise invalid_request(
                    f"{prefix}note: {len(parsed.note)} characters; at most {self.config.feedback_max_note_chars} are "
                    "kept (--feedback-max-note-chars)",
                    f"{prefix}note",
                    "note_too_long",
                )
            out.append(Feedback(parsed.id, parsed.label, parsed.note))
        return out

    async def handle(self, request: Request) -> dict:
        data = await _read_any_json(request)
        items = self.parse(data)
        try:
            result = await asyncio.to_thread(self.recorder.set_feedback, items)
        except StoreUnavailable as exc:
            raise APIError(
                503, str(exc), "service_unavailable", None, "store_unavailable", {"Retry-After": "30"}
            ) from None
        if result.missing:
            shown = ", ".join(repr(i) for i in result.missing[:5]) + (
                f" and {len(result.missing) - 5} more" if len(result.missing) > 5 else ""
            )
            raise not_found(
                f"no recorded answer has the id {shown} (unknown, not sampled, or expired by retention); nothing was "
                "written",
                "id",
                "answer_not_found",
            )
        self.metrics.observe_feedback(result.records)
        return {
            "object": "feedback",
            "count": len(result.records),
            "data": [
                {
                    "id": r.id,
                    "label": r.label,
                    "labelled_at": r.labelled_at,
                    "previous_label": result.previous.get(r.id),
                    "admitted": r.admitted,
                    "alpha": r.alpha,
                    "head_version": r.head_version,
                }
                for r in result.records
            ],
        }


async def _read_any_json(request: Request) -> Any:
    """The body as JSON (an object or a list): 400 for an empty body, bytes that are not UTF-8, or text that is not
    JSON."""
    body = await request.body()
    if not body.strip():
        raise invalid_request(
            'the request body is empty; send {"id": ..., "label": ...} or a list of them', code="empty_body"
        )
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise invalid_request(
            f"the request body is not valid UTF-8 (invalid byte at position {exc.start}); encode JSON as UTF-8",
            code="invalid_encoding",
        ) from None
    except json.JSONDecodeError as exc:
        raise invalid_request(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from None
