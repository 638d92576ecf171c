"""Where a generation ends at a stop string: one rule, shared by every serving backend and by training, so that a
calibration generation is cut exactly as the server cuts the answer it verifies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StopCut", "cut_at_stop"]


@dataclass(frozen=True)
class StopCut:
    """A text cut at a stop string: ``text`` is what remains, ``stop`` the string that ended it, found at character
    ``position`` of the uncut text; ``inclusive`` stops stay in ``text``."""

    text: str
    stop: str
    position: int
    inclusive: bool


def cut_at_stop(text: str, stop: Sequence[str] = (), stop_inclusive: Sequence[str] = ()) -> StopCut | None:
    """Cut ``text`` at its earliest stop string, or None when it holds none.

    The contract:

    - The earliest occurrence of any string of ``stop`` or ``stop_inclusive`` wins.
    - Of strings found at the same position, the longest wins (``"</v>"`` over ``"<"``); of equally long ones,
      a ``stop`` string before a ``stop_inclusive`` one, then the order given.
    - A ``stop`` string is removed with everything after it; a ``stop_inclusive`` one (the verification tag's
      opening) is kept and everything after it removed.
    - Empty strings are ignored (they would match everywhere).
    """
    best: tuple[int, str, bool] | None = None
    for candidates, inclusive in ((stop, False), (stop_inclusive, True)):
        for candidate in candidates:
            if not candidate:
                continue
            at = text.find(candidate)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(candidate) > len(best[1]))):
                best = (at, candidate, inclusive)
    if best is None:
        return None
    at, found, inclusive = best
    return StopCut(text[: at + len(found)] if inclusive else text[:at], found, at, inclusive)
