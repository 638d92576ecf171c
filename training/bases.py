"""The base b of the SDM next-token loss (Eq. 1) per instance: b = 2 + SDM(z')_y, the training layer's output for
the instance's label y, with the layer's own support points self-excluded (SDM_SPEC §3.4)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from sdm_core import SDMEstimator
from training.verification_layer import Instance

__all__ = ["CE_BASE", "UNIFORM_BASE", "bases_from_h", "uniform_bases"]

# The CE baseline's b: b does not enter its loss, and at b = e Eq. 1 is the cross-entropy.
CE_BASE = math.e
# b at d = 0: SDM(z') is then uniform over the 2 classes, (1/2, 1/2), so b = 2 + 1/2. The instance's h lies beyond
# the layer's calibration distances, and Eq. 1 is a fixed-base cross-entropy for it.
UNIFORM_BASE = 2.5


def bases_from_h(
    h: torch.Tensor, instances: Sequence[Instance], layer: SDMEstimator, flags: Mapping[str, bool]
) -> torch.Tensor:
    """b per instance from its h; documents in the layer's support (flag True) are excluded from their own search."""
    scores = layer.predict_scores(h, support_ids=[i.doc_id if flags.get(i.doc_id) else None for i in instances])
    labels = torch.tensor([i.label for i in instances])
    return 2.0 + scores.probabilities.gather(1, labels.unsqueeze(1)).squeeze(1).to(torch.float32)


def uniform_bases(bases: torch.Tensor) -> int:
    """How many instances have d = 0 (b exactly :data:`UNIFORM_BASE`)."""
    return int((bases == UNIFORM_BASE).sum())
