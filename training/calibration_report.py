"""What a calibration reports of itself: the provenance ``bundle.json`` records, and the JSON line
``python -m training.calibrate`` prints (the ladder as served and the certification table)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sdm_core.calibration import RegionLadder
from sdm_core.certification import Certification
from sdm_core.settings import flatten
from training.calibrate_config import CalibrateConfig
from training.generation import LabelledGenerations
from training.records import Record
from training.trainer import git_revision

__all__ = ["calibration_provenance", "calibration_summary"]


def calibration_provenance(
    config: CalibrateConfig,
    training: dict,
    files: Sequence[str],
    correctness: str,
    records: list[Record],
    counts: dict[str, int],
    generated: LabelledGenerations,
    hard_negatives: dict[str, list[str]],
    fingerprint: str,
    device: str,
    seconds: dict,
) -> dict:
    """What the bundle records of how it was calibrated."""
    return {
        "calibrate_config": flatten(config),
        "training_config": training,
        "git_revision": git_revision(),
        "calibration_files": list(files),
        "correctness": correctness,
        "calibration_docs": len(records),
        "documents_by_split": counts,
        "calibration_generation_accuracy": generated.accuracy,
        "hard_negatives": len(hard_negatives),
        "model_fingerprint": fingerprint,
        "torch": torch.__version__,
        "device": device,
        "seconds": seconds,
    }


def calibration_summary(
    out: Path,
    records: list[Record],
    counts: dict[str, int],
    generated: LabelledGenerations,
    hard_negatives: dict[str, list[str]],
    served: RegionLadder,
    certification: Certification | None,
    seconds: dict,
) -> dict:
    """The command's JSON line: the ladder as served and the certification table."""
    region = served.regions[served.default_alpha]
    return {
        "bundle": str(out),
        "calibration_docs": len(records),
        "documents_by_split": counts,
        "generation_accuracy": generated.accuracy,
        "hard_negatives": len(hard_negatives),
        "alpha": served.default_alpha,
        "q_prime_min": region.q_prime_min if region.exists else None,
        "calibration_hr_proportion": region.calibration_admitted / max(region.calibration_size, 1)
        if region.exists
        else 0.0,
        # Every alpha of the ladder as served: the admitted share of the head's calibration half, or None where no
        # region exists (never found, or withdrawn by certification).
        "regions": {
            f"{a:g}": (r.calibration_admitted / max(r.calibration_size, 1) if r.exists else None)
            for a, r in sorted(served.regions.items(), reverse=True)
        },
        "certification": (
            {
                f"{r.alpha:g}": {
                    "admitted": r.admitted,
                    "correct": r.correct,
                    "p_value": r.p_value,
                    "status": r.status,
                    "withdrawn": r.withdrawn,
                }
                for r in certification.rows
                if r.status != "no_region"
            }
            if certification
            else None
        ),
        "certified_alphas": list(certification.certified) if certification else None,
        "seconds": seconds,
    }
