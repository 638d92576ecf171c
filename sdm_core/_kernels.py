"""The SDM formulas as unvalidated tensor kernels: what :mod:`sdm_core.math`'s public functions compute once they
have checked their arguments, and what the estimator's scoring uses directly on tensors it has validated itself.

Private to ``sdm_core``: every caller outside the package uses :mod:`sdm_core.math`, whose functions name a bad
argument instead of returning a silently wrong probability. Each kernel's docstring states what it assumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "Q_RESCALE_OFFSET",
    "scaled_logits",
    "sdm_probabilities",
    "rescaled_similarity",
    "distance_quantile",
    "effective_sample_sizes",
    "dkw_epsilon",
]

# The base of the SDM activation is 2 + q: q = 0 (OOD) still gives a valid base > 1 (SDM_SPEC §1.6).
Q_RESCALE_OFFSET = 2.0


def scaled_logits(z: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z' d ln(2+q), ln(2+q)) for logits (N, C), q and d (N,): SDM(z') is the softmax of the first."""
    log_base = torch.log(q + Q_RESCALE_OFFSET)
    return z * (d * log_base).unsqueeze(1), log_base


def sdm_probabilities(logits: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """SDM(z') for logits (N, C), q and d (N,) of the logits' dtype."""
    return torch.softmax(scaled_logits(logits, q, d)[0], dim=1)


def rescaled_similarity(q: torch.Tensor, p_predicted: torch.Tensor) -> torch.Tensor:
    """q' = min(q, (2+q)^p) for tensors of one dtype and shape."""
    return torch.minimum(q, torch.pow(q + Q_RESCALE_OFFSET, p_predicted))


def distance_quantile(d_nearest: torch.Tensor, class_cdfs: Sequence[torch.Tensor]) -> torch.Tensor:
    """d for a 1-D d_nearest and sorted per-class tensors; float64 result."""
    flat = d_nearest.to(torch.float64)
    if not class_cdfs:
        return torch.ones_like(flat)
    if any(values.numel() == 0 for values in class_cdfs):
        return torch.zeros_like(flat)
    # min_c (1 - eCDF_c) = 1 - max_c eCDF_c, with eCDF_c = #{calibration distances < d} / n_c.
    shares = [
        torch.searchsorted(values.to(torch.float64), flat, side="left").to(torch.float64) / values.numel()
        for values in class_cdfs
    ]
    highest = shares[0] if len(shares) == 1 else torch.stack(shares).amax(dim=0)
    return 1.0 - highest


def effective_sample_sizes(
    q_prime: torch.Tensor, class_q_prime_cdfs: Sequence[torch.Tensor], rule: str
) -> torch.Tensor:
    """n_hat (N, C), float64, for a 1-D q' and sorted per-class tensors; ``rule`` "paper" or "reference"."""
    flat = q_prime.to(torch.float64)
    columns = []
    for values in class_q_prime_cdfs:
        v = values.to(torch.float64)
        if rule == "paper":
            counts = torch.searchsorted(v, flat, side="right").to(torch.float64)
        else:
            counts = torch.searchsorted(v, flat, side="left").to(torch.float64)
            counts = torch.clamp(counts, max=max(v.numel() - 1, 0))
        columns.append(counts)
    return torch.stack(columns, dim=1)


def dkw_epsilon(n: torch.Tensor, alpha: float) -> torch.Tensor:
    """epsilon for a float64 n >= 0 and an alpha already checked."""
    n_t, a = n, alpha
    if a >= 1.0:
        return torch.ones_like(n_t)
    numerator = math.log(2.0 / (1.0 - a))
    safe = torch.clamp(n_t, min=1.0)
    eps = torch.sqrt(numerator / (2.0 * safe))
    return torch.where(n_t > 0, eps, torch.ones_like(n_t))
