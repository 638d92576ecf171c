"""How training.calibrate divides its documents: the head's support, its calibration half, and a certification
split that neither sees (used only to check the finished ladder)."""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["SPLITS", "split_documents"]

SPLITS = ("support", "calibration", "certification")


def split_documents(doc_ids: Sequence[str], certification_docs: int, seed: int) -> dict[str, str]:
    """Each document's split. ``certification_docs`` documents, drawn with their own seeded generator, form the
    certification split; every other document goes to the support or the calibration half with probability 0.5,
    drawn in input order from ``random.Random(seed)`` (so that with no certification split the halves are the
    ones this seed has always drawn)."""
    ids = list(doc_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique; fix the duplicated ids in the calibration records")
    if certification_docs < 0:
        raise ValueError(f"certification_docs must be >= 0, got {certification_docs}")
    if certification_docs and certification_docs > len(ids) - 4:
        raise ValueError(
            f"certification_docs {certification_docs} leaves fewer than 4 of {len(ids)} documents for the "
            "head's support and calibration; lower --certification-docs or give more calibration records"
        )
    held = set(random.Random(f"{seed}:certification").sample(ids, certification_docs)) if certification_docs else set()
    rng = random.Random(seed)
    out = {}
    for doc_id in ids:
        if doc_id in held:
            out[doc_id] = "certification"
        else:
            out[doc_id] = "support" if rng.random() < 0.5 else "calibration"
    return out
