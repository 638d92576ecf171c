"""The SDM formulas (SDM_SPEC §1.4–§2.3), as pure functions over tensors.

Every public function validates its inputs and raises ``ValueError`` naming the offending argument, so that a
caller (training, serving, tests) never gets a silently wrong probability. Inputs may be torch tensors, numpy
arrays, Python scalars or lists; outputs are torch tensors (float64 where inputs were float64, else float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

import sdm_core._kernels as kernels
from sdm_core._kernels import Q_RESCALE_OFFSET

__all__ = [
    "Q_RESCALE_OFFSET",
    "as_tensor",
    "check_alpha",
    "sdm_probabilities",
    "sdm_log_probabilities",
    "sdm_loss",
    "rescaled_similarity",
    "similarity_from_matches",
    "distance_quantile",
    "effective_sample_sizes",
    "dkw_epsilon",
]


def as_tensor(value: object, name: str, *, dtype: torch.dtype | None = None, finite: bool = True) -> torch.Tensor:
    """Convert ``value`` to a tensor, refusing NaN/inf (when ``finite``) with a message naming ``name``."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric array-like, got {type(value).__name__}: {exc}") from None
    if dtype is not None:
        tensor = tensor.to(dtype)
    elif not torch.is_floating_point(tensor):
        tensor = tensor.to(torch.float32) if tensor.dtype != torch.float64 else tensor
    if finite and torch.is_floating_point(tensor) and tensor.numel() and not _all_finite(tensor):
        raise ValueError(f"{name} contains NaN or inf; remove or repair those entries before calling")
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    # A finite sum proves every entry finite (NaN and inf propagate) in one vectorised pass; only a sum that
    # overflowed or met a NaN/inf needs the element-wise test, which is four passes over a large input.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """alpha is a target accuracy; Algorithm 1 needs alpha > 0.5 so that at most one class can pass."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0.5, 1], got {alpha!r}") from None
    if not (0.5 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0.5, 1], got {alpha!r}")
    return value


def _logits_2d(logits: object) -> tuple[torch.Tensor, bool]:
    z = as_tensor(logits, "logits")
    squeeze = z.dim() == 1
    if squeeze:
        z = z.unsqueeze(0)
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(
            f"logits must have shape (N, C) or (C,) with C >= 2, got {tuple(as_tensor(logits, 'logits').shape)}"
        )
    return z, squeeze


def _per_row(value: object, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    t = as_tensor(value, name, dtype=dtype)
    if t.dim() == 0:
        return t.expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    return t


def _q_d(logits: object, q: object, d: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    z, squeeze = _logits_2d(logits)
    qt = _per_row(q, "q", z.shape[0], z.dtype)
    dt = _per_row(d, "d", z.shape[0], z.dtype)
    if qt.numel() and bool((qt < 0).any()):
        raise ValueError("q must be >= 0 (it counts consecutive matching neighbours)")
    if dt.numel() and bool(((dt < 0) | (dt > 1)).any()):
        raise ValueError("d must lie in [0, 1] (it is a distance quantile)")
    return z, qt, dt, squeeze


def sdm_probabilities(logits: object, q: object, d: object) -> torch.Tensor:
    """SDM(z')_i = (2+q)^(d z'_i) / sum_c (2+q)^(d z'_c), computed as softmax(z' d ln(2+q)) (ACT Eq. 6/10).

    logits: (N, C) or (C,); q, d: scalars or (N,). Returns probabilities of the same leading shape as logits.
    """
    z, q_t, d_t, squeeze = _q_d(logits, q, d)
    out = kernels.sdm_probabilities(z, q_t, d_t)
    return out.squeeze(0) if squeeze else out


def sdm_log_probabilities(logits: object, q: object, d: object) -> torch.Tensor:
    """log_{2+q} SDM(z')_i = log_softmax(z' d ln(2+q))_i / ln(2+q): the change of base of ACT Eq. 7."""
    z, q_t, d_t, squeeze = _q_d(logits, q, d)
    scaled, log_base = kernels.scaled_logits(z, q_t, d_t)
    out = torch.log_softmax(scaled, dim=1) / log_base.unsqueeze(1)
    return out.squeeze(0) if squeeze else out


def sdm_loss(logits: object, q: object, d: object, labels: object, reduction: str = "mean") -> torch.Tensor:
    """-log_{2+q} SDM(z')_y (ACT Eq. 7); ``reduction`` is "mean", "sum" or "none". Differentiable in logits."""
    z, q_t, d_t, _ = _q_d(logits, q, d)
    y = as_tensor(labels, "labels", dtype=torch.long)
    if y.dim() == 0:
        y = y.unsqueeze(0)
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and bool(((y < 0) | (y >= z.shape[1])).any()):
        raise ValueError(f"labels must be class indices in [0, {z.shape[1] - 1}]")
    scaled, log_base = kernels.scaled_logits(z, q_t, d_t)
    per_item = -torch.log_softmax(scaled, dim=1).gather(1, y.unsqueeze(1)).squeeze(1) / log_base
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def rescaled_similarity(q: object, p_predicted: object) -> torch.Tensor:
    """q' = min(q, (2+q)^SDM(z')_yhat) (ACT Eq. 8). q' = 0 iff q = 0; q' >= 1 whenever q >= 1."""
    q_t = as_tensor(q, "q")
    p_t = as_tensor(p_predicted, "p_predicted")
    if q_t.shape != p_t.shape and q_t.dim() and p_t.dim():
        raise ValueError(f"q and p_predicted must have the same shape, got {tuple(q_t.shape)} and {tuple(p_t.shape)}")
    if q_t.numel() and bool((q_t < 0).any()):
        raise ValueError("q must be >= 0")
    if p_t.numel() and bool(((p_t < 0) | (p_t > 1)).any()):
        raise ValueError("p_predicted must lie in [0, 1] (it is a probability)")
    dtype = torch.promote_types(q_t.dtype, p_t.dtype)
    return kernels.rescaled_similarity(q_t.to(dtype), p_t.to(dtype))


def similarity_from_matches(matches: object) -> torch.Tensor:
    """q = length of the leading run of True in each row of ``matches`` (N, k) (ACT Eq. 4).

    matches[i, r] is True iff the r-th nearest support point was correctly predicted and its prediction equals
    query i's prediction.
    """
    m = as_tensor(matches, "matches", dtype=torch.bool)
    if m.dim() != 2:
        raise ValueError(f"matches must have shape (N, k), got {tuple(m.shape)}")
    return torch.cumprod(m.to(torch.int64), dim=1).sum(dim=1)


def _sorted_cdfs(class_cdfs: Sequence[object], name: str) -> list[torch.Tensor]:
    if len(class_cdfs) < 2:
        raise ValueError(f"{name} must hold one sorted array per class (C >= 2), got {len(class_cdfs)}")
    out = []
    for c, values in enumerate(class_cdfs):
        t = as_tensor(values, f"{name}[{c}]").reshape(-1)
        if t.numel() > 1 and bool((t[1:] < t[:-1]).any()):
            raise ValueError(f"{name}[{c}] must be sorted ascending")
        out.append(t)
    return out


def distance_quantile(d_nearest: object, class_cdfs: Sequence[object]) -> torch.Tensor:
    """d = min over classes c of 1 - #{v in cdf_c : v < d_nearest} / n_c (ACT Eq. 5; strict "<").

    An empty class contributes 0, so d = 0 for every query when any class is empty (SDM_SPEC §7 item 9).
    """
    x = as_tensor(d_nearest, "d_nearest")
    if x.dim() > 1:
        raise ValueError(f"d_nearest must be a scalar or 1-D, got shape {tuple(x.shape)}")
    if x.numel() and bool((x < 0).any()):
        raise ValueError("d_nearest must be >= 0 (it is a distance)")
    cdfs = _sorted_cdfs(class_cdfs, "class_cdfs")
    d = kernels.distance_quantile(x.reshape(-1), cdfs)
    return d.to(x.dtype if torch.is_floating_point(x) else torch.float32).reshape(x.shape)


def effective_sample_sizes(q_prime: object, class_q_prime_cdfs: Sequence[object], rule: str = "paper") -> torch.Tensor:
    """n_hat_c per query and class (ACT Eq. 11): calibration points of class c with q' <= the query's q'.

    rule="paper": |D_ca|_c * eCDF_c(q') (counts "<=", no cap), the issue's choice.
    rule="reference": the reference code's strict "<" capped at n_c - 1 (SDM_SPEC §7 item 6).
    Returns a float64 tensor of shape (N, C).
    """
    x = as_tensor(q_prime, "q_prime")
    if x.dim() > 1:
        raise ValueError(f"q_prime must be a scalar or 1-D, got shape {tuple(x.shape)}")
    if x.numel() and bool((x < 0).any()):
        raise ValueError("q_prime must be >= 0")
    if rule not in ("paper", "reference"):
        raise ValueError(f"rule must be 'paper' or 'reference', got {rule!r}")
    cdfs = _sorted_cdfs(class_q_prime_cdfs, "class_q_prime_cdfs")
    return kernels.effective_sample_sizes(x.reshape(-1), cdfs, rule)


def dkw_epsilon(n: object, alpha: float) -> torch.Tensor:
    """epsilon = sqrt(ln(2 / (1 - alpha)) / (2 n)) for n > 0, else 1 (ACT Eqs. 12-13).

    alpha = 1 would make the band infinitely wide; it is clamped to 1 (the widest meaningful band).
    """
    a = check_alpha(alpha)
    n_t = as_tensor(n, "n", dtype=torch.float64)
    if n_t.numel() and bool((n_t < 0).any()):
        raise ValueError("n must be >= 0 (it is a sample size)")
    if a >= 1.0:
        return torch.ones_like(n_t)
    return kernels.dkw_epsilon(n_t, a)
