"""The labelled traffic rows an update folds into a head (training.update): read from the server's traffic store,
cut to those the head can use, and each given its role by a pure function of its id, so that the same store always
gives the same split. ``feedback_rows.json`` in the new bundle lists every row used and its role.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sdm_core.estimator import SDMEstimator
from sdm_core.traffic import TrafficRecord, TrafficStore, redact_url
from training.update_config import UpdateConfig, UpdateError

__all__ = ["ROWS_FILE", "FeedbackRows", "assign_roles", "rows_listing", "split_role", "usable_rows"]

ROWS_FILE = "feedback_rows.json"


def split_role(identifier: str, label: str, fraction: float, seed: int, certification_fraction: float = 0.0) -> str:
    """``support``, ``calibration``, ``certification`` or ``ood`` for one row: a pure function of its arguments.
    A uniform number from sha256(seed, id) below ``fraction`` means calibration, in the next
    ``certification_fraction`` certification, else support."""
    if label == "ood":
        return "ood"
    digest = hashlib.sha256(f"{seed}:{identifier}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < fraction:
        return "calibration"
    return "certification" if u < fraction + certification_fraction else "support"


@dataclass
class FeedbackRows:
    """The labelled rows an update uses, each with its role, and what it left out."""

    used: list[TrafficRecord]
    skipped: dict
    roles: dict[str, str]
    certification_fraction: float  # 0 when the bundle was not certified: its update is not either

    def by_role(self, *roles: str) -> list[TrafficRecord]:
        """The rows of these roles, in the store's order."""
        return [r for r in self.used if self.roles[r.id] in roles]


def usable_rows(config: UpdateConfig, head: SDMEstimator) -> tuple[list[TrafficRecord], dict]:
    """The store's labelled rows in the time and head-version filters that the head does not hold yet and whose
    ``h`` fits its input, and the count of each kind left out."""
    store = TrafficStore(config.store)
    try:
        if store.revision() is None:
            raise UpdateError(
                f"{redact_url(config.store)} holds no traffic store (no schema); point --store at the server's store"
            )
        rows = store.labelled(since=config.since, until=config.until, head_versions=list(config.head_versions) or None)
    finally:
        store.close()
    known = set(head.support.ids) | set(head.calibration_ids)
    skipped = {"already_in_head": 0, "wrong_width": 0}
    used: list[TrafficRecord] = []
    for row in rows:
        if row.id in known:
            skipped["already_in_head"] += 1
        elif row.h_dim != head.input_dim:
            skipped["wrong_width"] += 1
        else:
            used.append(row)
    if not used:
        raise UpdateError(
            f"no usable labelled rows in {redact_url(config.store)} ({len(rows)} labelled, skipped: {skipped}); "
            "label answers with POST /v1/feedback first"
        )
    return used, skipped


def assign_roles(config: UpdateConfig, used: list[TrafficRecord], skipped: dict, certified: bool) -> FeedbackRows:
    """Each usable row's role by ``split_role`` with the command's fractions and seed."""
    # Rows are held out to re-certify only when the bundle was certified (an uncertified bundle stays uncertified).
    cert_fraction = config.certification_fraction if certified else 0.0
    roles = {
        r.id: split_role(r.id, r.label or "", config.calibration_fraction, config.seed, cert_fraction) for r in used
    }
    return FeedbackRows(used, skipped, roles, cert_fraction)


def rows_listing(feedback: FeedbackRows) -> list[dict]:
    """``feedback_rows.json``'s rows: every row used, with its role."""
    return [
        {
            "id": r.id,
            "label": r.label,
            "role": feedback.roles[r.id],
            "labelled_at": r.labelled_at,
            "created_at": r.created_at,
            "head_version": r.head_version,
            "admitted": r.admitted,
            "alpha": r.alpha,
        }
        for r in feedback.used
    ]
