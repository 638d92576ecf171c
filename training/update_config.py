"""``python -m training.update``'s configuration: one validated dataclass whose fields are the command's flags,
mirrored by ``SDM_UPDATE_*`` variables (sdm_core.settings), and the error an update raises for inputs that do not fit.
The steps that use it are in training.update.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sdm_core.settings import setting

__all__ = ["UpdateConfig", "UpdateError", "parse_time"]


class UpdateError(ValueError):
    """Nothing to update, or inputs that do not fit; the message says what to do."""


def parse_time(text: str) -> float:
    """An ISO time (UTC when it names no zone) or epoch seconds, as epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected an ISO time (2026-12-01T00:00:00Z) or epoch seconds, got {text!r}") from None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class UpdateConfig:
    bundle: str = setting(
        "", required=True, metavar="PATH", help="the bundle the labelled answers came from (read, never changed)"
    )
    store: str = setting(
        "",
        required=True,
        metavar="URL",
        help="the server's traffic store: a SQLAlchemy URL (sqlite:////path/traffic.sqlite3, postgresql+psycopg://...)",
    )
    out: str = setting("", required=True, metavar="PATH", help="the new bundle's folder (must not exist or be empty)")
    calibration_fraction: float = setting(
        0.5,
        help="share of correct/wrong rows that join the calibration set instead of the support (deterministic by id)",
    )
    # Share of correct/wrong rows held out of the head to re-certify its ladder (bundles with a certification only).
    certification_fraction: float = setting(
        0.25,
        help="share of correct/wrong rows held out to re-certify the new ladder, when the bundle has a certification",
    )
    seed: int = setting(0, help="seed of the support/calibration split")
    since: float | None = setting(
        None, parse=parse_time, help="only labels given at or after this time (ISO or epoch seconds)"
    )
    until: float | None = setting(None, parse=parse_time, help="only labels given at or before this time")
    head_versions: tuple[str, ...] = setting(
        (), flag="head_version", repeat=True, help="only rows served by this head version (repeatable)"
    )

    def __post_init__(self) -> None:
        missing = [f"--{name}" for name in ("bundle", "store", "out") if not getattr(self, name)]
        if missing:
            raise UpdateError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
