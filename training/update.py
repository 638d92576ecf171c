"""``python -m training.update``: a new bundle from labelled served traffic, without retraining.

    python -m training.update --bundle runs/smollm2/bundle --store sqlite:////srv/sdm-data/traffic.sqlite3 \\
        --out runs/smollm2/bundle-u1

The server records every verification with the head's input ``h`` in its traffic store (sdm_core.traffic) and
clients label answers through ``POST /v1/feedback``. This command reads the labelled rows and:

1. drops the rows it cannot use: ``h`` of another width than the head's input, rows the head already holds (an
   earlier update), and rows outside ``--since``/``--until``/``--head-version`` when given;
2. splits the ``correct``/``wrong`` rows deterministically (sha256 of ``--seed`` and the row id, so the same store
   gives the same split) into the head's support (``1 - --calibration-fraction``) and its calibration set; ``ood``
   rows all join the support as OOD exemplars (no prediction matches them, so q falls near them); when the bundle
   is certified, a further ``--certification-fraction`` is held out of the head to re-certify the new ladder;
   ``correct`` is the positive class (the answer followed the instruction: ``Yes``), ``wrong`` the other one;
3. appends the support rows (``SDMEstimator.add_exemplars``), scores the calibration rows against the new support
   and appends their outputs to the stored calibration outputs, and re-runs Algorithm 1 over the ladder
   (``SDMEstimator.recalibrate``): the same alphas, the same default;
4. writes the result as a new sealed bundle (``sdm_core.lm.bundle.seal_bundle``): the model files are hard links to
   the old bundle's where the file system allows (never modified), ``head/`` is new (so is the head version),
   ``feedback_rows.json`` lists every row used and its role, and the provenance names the store, the row count and
   the time range. The old certification moves to the provenance; the new ladder is certified on the held-out
   rows with the old certification's policy (sdm_core.certification), and its withdrawn regions are what the
   server will serve.

Roll it out with ``POST /admin/reload {"bundle": "<name of --out under the server's --bundles-root>"}`` (an admin
key); ``/ready``, ``/v1/models`` and ``sdm_bundle_info`` then report the new head version.

The command's configuration is training.update_config; steps 1 and 2 (the rows read, kept and split) are
training.feedback_rows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import SQLAlchemyError

from sdm_core.artifact import ArtifactError
from sdm_core.certification import Certification, certify_ladder
from sdm_core.estimator import SDMEstimator
from sdm_core.fitting import LayerStatistics
from sdm_core.lm.bundle import BundleInfo, read_bundle_info, seal_bundle
from sdm_core.settings import CommandLine, SettingsError
from sdm_core.traffic import StoreError, redact_url
from training.feedback_rows import ROWS_FILE, FeedbackRows, assign_roles, rows_listing, split_role, usable_rows
from training.update_config import UpdateConfig, UpdateError, parse_time

__all__ = ["UpdateConfig", "UpdateError", "UpdateResult", "update_bundle", "split_role", "parse_time", "main"]


@dataclass
class UpdateResult:
    out: str
    head_version: str
    previous_head_version: str
    rows: int
    support_added: int
    ood_added: int
    calibration_added: int
    certification_rows: int = 0
    certified: list | None = None
    skipped: dict = field(default_factory=dict)
    labelled_from: str | None = None
    labelled_to: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="seconds")


def _head_dir(info: BundleInfo) -> str:
    return info.head.get("path", "head")


def _head_version(info: BundleInfo) -> str:
    return str(info.raw.get("files", {}).get(f"{_head_dir(info)}/manifest.json", ""))[:16]


def _append_calibration(head: SDMEstimator, x: torch.Tensor, labels: torch.Tensor, ids: list[str]) -> None:
    """Score rows against the current support and append their outputs to the calibration outputs."""
    s = head.predict_scores(x)
    cal = head.calibration
    assert cal is not None
    new = LayerStatistics(s.logits, s.predictions, s.q, s.d_nearest, s.d, s.probabilities, s.q_prime)
    head.calibration = LayerStatistics(
        *(
            torch.cat([getattr(cal, f), getattr(new, f).to(getattr(cal, f).dtype)])
            for f in LayerStatistics.__dataclass_fields__
        )
    )
    head.calibration_labels = torch.cat([head.calibration_labels, labels.to(head.calibration_labels.dtype)])
    head.calibration_ids = list(head.calibration_ids) + ids


def _copy_bundle(source: Path, target: Path, head_dir: str) -> None:
    """Hard-link the bundle's files (never modified by an update) and copy ``head/`` and ``bundle.json`` (rewritten)."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        dest = target / rel
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (rel.parts and rel.parts[0] == head_dir) or rel.as_posix() == "bundle.json":  # both are rewritten in place
            shutil.copy2(path, dest)
            continue
        try:
            os.link(path, dest)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(path, dest)


def _check_inputs(config: UpdateConfig) -> Path:
    """The new bundle's folder, once the fractions leave rows for the support and the folder is free."""
    if not (0.0 <= config.calibration_fraction < 1.0) or not (0.0 <= config.certification_fraction < 1.0):
        raise UpdateError(
            "--calibration-fraction and --certification-fraction must be in [0, 1), got "
            f"{config.calibration_fraction}, {config.certification_fraction}"
        )
    if config.calibration_fraction + config.certification_fraction >= 1.0:
        raise UpdateError(
            "--calibration-fraction + --certification-fraction must leave some rows for the support (sum < 1)"
        )
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise UpdateError(f"{out} exists and is not empty; choose another --out")
    return out


def _load_head(config: UpdateConfig) -> tuple[BundleInfo, SDMEstimator]:
    """The bundle's info and its head, which must be a 2-class verification head."""
    info = read_bundle_info(config.bundle)
    head = SDMEstimator.load(Path(config.bundle) / _head_dir(info))
    if head.num_classes != 2:
        raise UpdateError(
            f"the head has {head.num_classes} classes; feedback labels (correct/wrong) map onto a 2-class verification "
            "head only"
        )
    return info, head


def _refit_head(head: SDMEstimator, feedback: FeedbackRows, class_of: dict[str, int]) -> None:
    """Append the support rows as exemplars and the calibration rows' outputs, then re-run Algorithm 1 over the
    same ladder."""
    support = feedback.by_role("support", "ood")
    calibration = feedback.by_role("calibration")
    if support:
        x = torch.from_numpy(np.stack([r.embedding() for r in support]))
        head.add_exemplars(
            x, ["ood" if r.label == "ood" else class_of[r.label] for r in support], [r.id for r in support]
        )
    if calibration:
        x = torch.from_numpy(np.stack([r.embedding() for r in calibration]))
        _append_calibration(
            head,
            x,
            torch.tensor([class_of[r.label] for r in calibration], dtype=torch.long),
            [r.id for r in calibration],
        )
    ladder = head.ladder
    head.recalibrate(list(ladder.alphas), ladder.default_alpha, head.config.nested_regions)


def _recertify(
    config: UpdateConfig, head: SDMEstimator, feedback: FeedbackRows, previous: Certification | None, positive: int
) -> Certification | None:
    """The new ladder certified on labelled rows it never saw, with the old certification's rules (None when the
    bundle was not certified or no row was held out)."""
    held_out = feedback.by_role("certification")
    if previous is None or not held_out:
        return None
    scores = head.predict_scores(torch.from_numpy(np.stack([r.embedding() for r in held_out])))
    certification, _ = certify_ladder(
        head.ladder,
        scores.probabilities,
        scores.predictions,
        scores.q_prime,
        torch.tensor([r.label == "correct" for r in held_out], dtype=torch.bool),
        positive,
        policy=previous.policy,
        min_admitted=previous.min_admitted,
        violation_p=previous.violation_p,
        confidence=previous.confidence,
        source={
            "kind": "update",
            "documents": len(held_out),
            "store": redact_url(config.store),
            "seed": config.seed,
            "certification_fraction": feedback.certification_fraction,
        },
    )
    return certification


def _update_summary(config: UpdateConfig, previous_version: str, feedback: FeedbackRows) -> dict:
    """What the head's metadata and the bundle's provenance record of this update."""
    used, support = feedback.used, feedback.by_role("support", "ood")
    times = [r.labelled_at for r in used if r.labelled_at is not None]
    return {
        "at": _iso(time.time()),
        "from_bundle": str(Path(config.bundle).resolve()),
        "from_head_version": previous_version,
        "store": redact_url(config.store),
        "rows": len(used),
        "support_added": sum(1 for r in support if r.label != "ood"),
        "ood_added": sum(1 for r in support if r.label == "ood"),
        "calibration_added": len(feedback.by_role("calibration")),
        "certification_rows": len(feedback.by_role("certification")),
        "labels": {label: sum(1 for r in used if r.label == label) for label in ("correct", "wrong", "ood")},
        "labelled_from": _iso(min(times)) if times else None,
        "labelled_to": _iso(max(times)) if times else None,
        "calibration_fraction": config.calibration_fraction,
        "seed": config.seed,
        "skipped": feedback.skipped,
        "rows_file": ROWS_FILE,
    }


def _write_bundle(
    config: UpdateConfig,
    out: Path,
    info: BundleInfo,
    head: SDMEstimator,
    feedback: FeedbackRows,
    summary: dict,
    certification: Certification | None,
) -> None:
    """The new sealed bundle, built in a temporary folder beside ``out`` and moved into place whole."""
    head_dir = _head_dir(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _copy_bundle(Path(config.bundle), tmp, head_dir)
        head.save(tmp / head_dir)
        listing = rows_listing(feedback)
        (tmp / ROWS_FILE).write_text(json.dumps({"store": redact_url(config.store), "rows": listing}, indent=1) + "\n")
        provenance = dict(info.provenance)
        provenance["updates"] = list(provenance.get("updates", [])) + [summary]
        updates: dict = {"provenance": provenance}
        if info.raw.get("certification") is not None:
            # The old certificate was issued for the old head: it is kept in the provenance, and the new head gets
            # its own from the held-out rows, or none when there were none to certify on.
            provenance["previous_certification"] = info.raw["certification"]
            updates["certification"] = certification.to_dict() if certification is not None else None
        seal_bundle(tmp, updates)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def update_bundle(config: UpdateConfig) -> UpdateResult:
    out = _check_inputs(config)
    info, head = _load_head(config)
    positive = info.tags.positive_class
    class_of = {"correct": positive, "wrong": 1 - positive}
    used, skipped = usable_rows(config, head)
    feedback = assign_roles(config, used, skipped, certified=info.certification is not None)
    _refit_head(head, feedback, class_of)
    certification = _recertify(config, head, feedback, info.certification, positive)
    previous_version = _head_version(info)
    summary = _update_summary(config, previous_version, feedback)
    head.metadata = {**head.metadata, "updates": list(head.metadata.get("updates", [])) + [summary]}
    _write_bundle(config, out, info, head, feedback, summary, certification)
    return UpdateResult(
        out=str(out),
        head_version=_head_version(read_bundle_info(out)),
        previous_head_version=previous_version,
        rows=len(used),
        support_added=summary["support_added"],
        ood_added=summary["ood_added"],
        calibration_added=summary["calibration_added"],
        certification_rows=summary["certification_rows"],
        certified=list(certification.certified) if certification else None,
        skipped=skipped,
        labelled_from=summary["labelled_from"],
        labelled_to=summary["labelled_to"],
    )


COMMAND_LINE = CommandLine(
    UpdateConfig,
    prog="python -m training.update",
    env_prefix="SDM_UPDATE_",
    description=(__doc__ or "").split("\n\n")[0],
)


def main(argv: Sequence[str] | None = None) -> int:
    args = COMMAND_LINE.parser().parse_args(argv)
    try:
        config = COMMAND_LINE.resolve(args)
        result = update_bundle(config)
    except (UpdateError, SettingsError, StoreError, ArtifactError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(
            f"error: cannot read the traffic store {redact_url(config.store)}: {str(exc).splitlines()[0]}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
