"""One request's generation state, shared by every backend: stop strings found in the text, text streamed with the
hold-back rules (a possible stop string, trailing whitespace and partial characters wait), and the result."""

from __future__ import annotations

import time

import torch

from sdm_core.lm.stops import cut_at_stop
from server.backends.base import GenerationRequest, GenerationResult

__all__ = ["GenerationRow"]


class GenerationRow:
    """The state of one request while it generates: its text so far, its stop strings, what was streamed, and how it
    finished. Touched by one thread or task at a time (a backend's worker thread or the request's own task)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.count = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.text = ""
        self.streamed = 0
        self.done = False
        self.finish_reason = "length"
        self.stop_reason: str | None = None
        self.final_text: str | None = None
        self.holdback = max((len(s) - 1 for s in request.stop), default=0)
        self.generator: torch.Generator | None = None

    def finish(self, reason: str, stop_reason: str | None, text: str) -> None:
        self.done = True
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.final_text = text

    def counted(self, count: int) -> None:
        """The row now holds ``count`` generated tokens; the times of the first and the latest are kept."""
        if count > self.count:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        self.count = count

    def finish_at_stop(self) -> bool:
        """Finish the row if its text holds a stop string, cut as :func:`sdm_core.lm.stops.cut_at_stop` says."""
        cut = cut_at_stop(self.text, self.request.stop, self.request.stop_inclusive)
        if cut is None:
            return False
        self.finish("stop", cut.stop, cut.text)
        return True

    def stream(self) -> None:
        """Send text that can no longer change: a possible stop string, trailing whitespace and partial characters
        are held back (the verification prefix strips trailing whitespace). The rest of the final text is sent by
        the caller once the output is verified."""
        callback = self.request.on_text
        if callback is None:
            return
        safe = self.text
        if self.holdback:
            safe = safe[: max(0, len(safe) - self.holdback)]
        safe = safe.rstrip()
        if safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")
        if len(safe) > self.streamed and safe.startswith(self.text[: self.streamed]):
            callback(safe[self.streamed :])
            self.streamed = len(safe)

    def result(self) -> GenerationResult:
        text = self.final_text if self.final_text is not None else self.text
        return GenerationResult(
            text,
            len(self.request.prompt_ids),
            self.count,
            self.finish_reason,
            self.stop_reason,
            first_token_at=self.first_token_at,
            last_token_at=self.last_token_at,
        )
