"""``python -m training.seal --bundle B``: re-seal a bundle whose files were changed on purpose.

A bundle records the sha256 of every file and the server refuses one whose files no longer match ("head/ids.json
has been modified or corrupted; rebuild the bundle"). After editing a bundle by hand, for example with
``python -m sdm_core add-exemplars --artifact B/head ...`` or ``python -m sdm_core recalibrate --artifact B/head ...``,
seal it: the head summary is re-read from ``head/``, every checksum is recomputed, and the provenance records the
seal (its time and ``--note``). Then ``POST /admin/reload`` serves it, with a new head version.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sdm_core.artifact import ArtifactError
from sdm_core.lm.bundle import seal_bundle
from sdm_core.settings import CommandLine, setting

__all__ = ["SealConfig", "seal", "main"]


@dataclass(frozen=True)
class SealConfig:
    bundle: str = setting("", required=True, metavar="PATH", help="the bundle folder to re-seal in place")
    note: str = setting("", help="why it was edited (kept in the provenance)")

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ValueError("--bundle (the bundle folder to re-seal) is required")


COMMAND_LINE = CommandLine(
    SealConfig, prog="python -m training.seal", env_prefix="SDM_SEAL_", description=(__doc__ or "").split("\n\n")[0]
)


def seal(bundle: str, note: str = "") -> dict:
    """Re-seal ``bundle`` in place; returns its new head version and bundle checksum."""
    updates: dict = {}
    manifest = Path(bundle) / "bundle.json"
    try:  # the manifest as it is now (its own checksum may no longer match after a hand edit: seal_bundle fixes that)
        provenance = dict(json.loads(manifest.read_text()).get("provenance") or {})
    except (OSError, ValueError, AttributeError):
        provenance = None  # seal_bundle reports what is wrong with the manifest
    if provenance is not None:
        entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "note": note}
        provenance["seals"] = list(provenance.get("seals", [])) + [entry]
        updates["provenance"] = provenance
    info = seal_bundle(bundle, updates)
    files = info.raw.get("files", {})
    return {
        "bundle": str(info.path),
        "head_version": str(files.get(f"{info.head.get('path', 'head')}/manifest.json", ""))[:16],
        "bundle_sha256": str(info.raw.get("bundle_sha256", ""))[:16],
        "n_support": info.head.get("n_support"),
        "n_calibration": info.head.get("n_calibration"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = COMMAND_LINE.parser().parse_args(argv)
    try:
        config = COMMAND_LINE.resolve(args)
        result = seal(config.bundle, config.note)
    except (ArtifactError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
