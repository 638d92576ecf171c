"""Algorithm 1 (q'_min and class thresholds psi), the nested alpha ladder, and the HIGH-RELIABILITY decision.

SDM_SPEC §2.2 and §2.4. A region at alpha admits a prediction iff it is not OOD, q' >= q'_min (finite), and
yhat is the only class whose SDM output reaches its threshold psi_c.

Size: Algorithm 1 and the ladder of regions it produces are one concept; the decision reads the regions' fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from sdm_core.math import as_tensor, check_alpha

__all__ = [
    "ABSTENTION_REASONS",
    "Region",
    "RegionLadder",
    "fit_region",
    "fit_ladder",
    "is_ood",
    "in_region",
    "DEFAULT_ALPHA_LADDER",
    "ALPHA_TOLERANCE",
    "same_alpha",
]

DEFAULT_ALPHA_LADDER: tuple[float, ...] = (
    0.99,
    0.98,
    0.97,
    0.96,
    0.95,
    0.94,
    0.93,
    0.92,
    0.91,
    0.90,
    0.85,
    0.80,
    0.75,
    0.70,
    0.65,
    0.60,
)

# Two alphas closer than this are the same ladder rung: an alpha typed as 0.9 and one computed as 0.9000000001 (or
# read back from JSON) name one region.
ALPHA_TOLERANCE = 1e-9


def same_alpha(a: float, b: float) -> bool:
    """Whether ``a`` and ``b`` name the same ladder rung (within :data:`ALPHA_TOLERANCE`)."""
    return abs(a - b) < ALPHA_TOLERANCE


# Order matters: the first reason that applies is reported.
ABSTENTION_REASONS: tuple[str, ...] = ("ood", "no_region", "low_similarity", "below_threshold")


@dataclass(frozen=True)
class Region:
    """The output of Algorithm 1 at one alpha. ``q_prime_min`` is inf when no region exists."""

    alpha: float
    q_prime_min: float
    thresholds: tuple[float, ...]
    calibration_admitted: int = 0
    calibration_size: int = 0

    @property
    def exists(self) -> bool:
        return math.isfinite(self.q_prime_min)

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "q_prime_min": self.q_prime_min if self.exists else None,
            "thresholds": list(self.thresholds),
            "calibration_admitted": self.calibration_admitted,
            "calibration_size": self.calibration_size,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Region:
        q_min = data["q_prime_min"]
        return cls(
            alpha=float(data["alpha"]),
            q_prime_min=math.inf if q_min is None else float(q_min),
            thresholds=tuple(float(t) for t in data["thresholds"]),
            calibration_admitted=int(data.get("calibration_admitted", 0)),
            calibration_size=int(data.get("calibration_size", 0)),
        )


def _validate_calibration(
    probabilities: object, q_prime: object, labels: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = as_tensor(probabilities, "probabilities")
    if p.dim() != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, C) with C >= 2, got {tuple(p.shape)}")
    if p.numel() and bool(((p < 0) | (p > 1)).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    qp = as_tensor(q_prime, "q_prime").reshape(-1) if as_tensor(q_prime, "q_prime").dim() <= 1 else None
    if qp is None or qp.shape[0] != p.shape[0]:
        raise ValueError(f"q_prime must have shape ({p.shape[0]},)")
    if qp.numel() and bool((qp < 0).any()):
        raise ValueError("q_prime must be >= 0")
    y = as_tensor(labels, "labels", dtype=torch.long).reshape(-1)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and bool(((y < 0) | (y >= p.shape[1])).any()):
        raise ValueError(f"labels must be class indices in [0, {p.shape[1] - 1}]")
    # Thresholds are order statistics of float32 outputs, as in the reference.
    return p.to(torch.float32).numpy(), qp.to(torch.float64).numpy(), y.numpy()


def is_ood(q_prime: object) -> torch.Tensor:
    """OOD iff floor(q') <= 0, which is equivalent to q = 0 (SDM_SPEC §2.1)."""
    return torch.floor(as_tensor(q_prime, "q_prime")) <= 0


def fit_region(probabilities: object, q_prime: object, labels: object, alpha: float) -> Region:
    """Algorithm 1: the smallest q'* (over sorted unique non-OOD calibration q') such that, among calibration
    points with q' >= q'*, every class c has psi_c = sorted(SDM_c of class-c points)[min(floor((1-alpha) n_c),
    n_c - 1)] >= alpha. A class with no such point has psi_c = 0, so that candidate fails.

    probabilities: (N, C) calibration SDM outputs; q_prime: (N,); labels: (N,) true labels.
    """
    a = check_alpha(alpha)
    p, qp, y = _validate_calibration(probabilities, q_prime, labels)
    n_classes = p.shape[1]
    keep = np.floor(qp) > 0
    p, qp, y = p[keep], qp[keep], y[keep]
    if qp.size == 0:
        return Region(a, math.inf, tuple(0.0 for _ in range(n_classes)))
    candidates = np.unique(qp)
    # psi_c >= alpha  <=>  #{class-c kept values < alpha} <= k_c, with k_c the order-statistic index; counts of
    # kept points are suffix counts over q', so every candidate is checked at once with searchsorted.
    ok = np.ones(candidates.shape[0], dtype=bool)
    true_probs = p[np.arange(p.shape[0]), y]
    for c in range(n_classes):
        in_class = y == c
        q_class = np.sort(qp[in_class])
        # Compared in float32, as the reference compares float32 outputs with alpha.
        q_bad = np.sort(qp[in_class & (true_probs < np.float32(a))])
        n_c = q_class.size - np.searchsorted(q_class, candidates, side="left")
        bad_c = q_bad.size - np.searchsorted(q_bad, candidates, side="left")
        k_c = np.minimum(np.floor((1.0 - a) * n_c.astype(np.float64)).astype(np.int64), n_c - 1)
        ok &= (n_c > 0) & (bad_c <= k_c)
    if not ok.any():
        return Region(a, math.inf, tuple(0.0 for _ in range(n_classes)))
    q_min = float(candidates[int(np.argmax(ok))])
    kept = qp >= q_min
    thresholds = []
    for c in range(n_classes):
        values = np.sort(true_probs[kept & (y == c)])
        index = min(int(np.floor((1.0 - a) * values.size)), values.size - 1)
        thresholds.append(max(float(values[index]), 0.0))
    return Region(a, q_min, tuple(thresholds))


def in_region(probabilities: object, predictions: object, q_prime: object, region: Region) -> torch.Tensor:
    """The HIGH-RELIABILITY rule (SDM_SPEC §2.4): not OOD, q' >= q'_min (finite), and {c : SDM_c >= psi_c} = {yhat}."""
    p = as_tensor(probabilities, "probabilities")
    yhat = as_tensor(predictions, "predictions", dtype=torch.long).reshape(-1)
    qp = as_tensor(q_prime, "q_prime").reshape(-1)
    if p.dim() != 2 or yhat.shape[0] != p.shape[0] or qp.shape[0] != p.shape[0]:
        raise ValueError("probabilities must be (N, C) with predictions and q_prime of shape (N,)")
    return _region_admissions(p, yhat, qp, [region])[:, 0]


def _region_admissions(
    probabilities: torch.Tensor, predictions: torch.Tensor, q_prime: torch.Tensor, regions: Sequence[Region]
) -> torch.Tensor:
    """(N, L) bool: the HR rule for every region at once (no validation; hot path)."""
    psi = torch.tensor([r.thresholds for r in regions], dtype=probabilities.dtype)  # (L, C)
    q_min = torch.tensor([r.q_prime_min for r in regions], dtype=torch.float64)  # (L,), inf when no region
    return _admissions(probabilities, predictions, q_prime, psi, q_min)


def _admissions(
    probabilities: torch.Tensor,
    predictions: torch.Tensor,
    q_prime: torch.Tensor,
    psi: torch.Tensor,
    q_min: torch.Tensor,
    exclusive: bool = False,
) -> torch.Tensor:
    """(N, L) HR admissions. ``exclusive``: every region with a finite q'_min has all thresholds > 0.5, so at most one
    class can pass (the outputs sum to 1) and only the predicted class needs checking (the hot path's case)."""
    if exclusive:
        # q_min is inf where there is no region; q' is finite, so the comparison alone rejects those rows.
        similar = q_prime.to(torch.float64).unsqueeze(1) >= q_min.unsqueeze(0)
        passes = probabilities.gather(1, predictions.unsqueeze(1)) >= psi.T.index_select(0, predictions)
        return similar & passes & (torch.floor(q_prime) > 0).unsqueeze(1)
    passing = probabilities.unsqueeze(1) >= psi.unsqueeze(0)  # (N, L, C)
    single = passing.sum(dim=2) == 1
    index = predictions.view(-1, 1, 1).expand(-1, psi.shape[0], 1)
    predicted_passes = passing.gather(2, index).squeeze(2)
    similar = (q_prime.to(torch.float64).unsqueeze(1) >= q_min.unsqueeze(0)) & torch.isfinite(q_min).unsqueeze(0)
    not_ood = (torch.floor(q_prime) > 0).unsqueeze(1)
    return not_ood & similar & single & predicted_passes


def _abstention_reason(ood: bool, region: Region, q_prime: float) -> str:
    if ood:
        return "ood"
    if not region.exists:
        return "no_region"
    if q_prime < region.q_prime_min:
        return "low_similarity"
    return "below_threshold"


@dataclass
class RegionLadder:
    """Algorithm 1 over a ladder of alphas, so that any alpha of the ladder can be chosen at test time.

    With ``nested=True`` (the default) a prediction is admitted at alpha iff some region of the ladder at
    alpha' >= alpha admits it. That makes the regions nested by construction and ``region_alpha`` (the highest
    admitting alpha) consistent with every per-alpha decision. With ``nested=False`` each alpha uses its own
    Algorithm 1 region exactly as the reference does. See docs/decisions.md.
    """

    regions: dict[float, Region]
    nested: bool = True
    default_alpha: float = 0.95
    alphas: tuple[float, ...] = field(init=False)
    # (regions key, psi, q'_min, exclusive): the thresholds as tensors, kept between calls (_admissions)
    _tensor_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("regions must hold at least one alpha")
        self.alphas = tuple(sorted(self.regions, reverse=True))
        if self.default_alpha not in self.regions:
            raise ValueError(f"default_alpha {self.default_alpha} is not on the ladder {list(self.alphas)}")

    def resolve_alpha(self, alpha: float | None) -> float:
        if alpha is None:
            return self.default_alpha
        value = check_alpha(alpha)
        for a in self.alphas:
            if same_alpha(a, value):
                return a
        raise ValueError(f"alpha {alpha} is not on the calibrated ladder {list(self.alphas)}; recalibrate to add it")

    def admissions(
        self, probabilities: object, predictions: object, q_prime: object, *, check_input: bool = True
    ) -> torch.Tensor:
        """(N, L) bool: own-region admission at each ladder alpha (columns in ``self.alphas`` order).
        ``check_input=False`` skips validation on the hot path (tensors of the right shapes and dtypes)."""
        if not check_input:
            return self._admissions(
                cast(torch.Tensor, probabilities), cast(torch.Tensor, predictions), cast(torch.Tensor, q_prime)
            )
        p = as_tensor(probabilities, "probabilities")
        yhat = as_tensor(predictions, "predictions", dtype=torch.long).reshape(-1)
        qp = as_tensor(q_prime, "q_prime").reshape(-1)
        return self._admissions(p, yhat, qp)

    def admitted_at(self, own: torch.Tensor, alpha: float) -> torch.Tensor:
        """Admission at ``alpha`` from the (N, L) own-region matrix: nested (any alpha' >= alpha) or own."""
        return self._admitted_at_column(own, self.alphas.index(self.resolve_alpha(alpha)))

    def _admitted_at_column(self, own: torch.Tensor, column: int) -> torch.Tensor:
        return own[:, : column + 1].any(dim=1) if self.nested else own[:, column]

    def decide(
        self,
        probabilities: object,
        predictions: object,
        q_prime: object,
        alpha: float | None = None,
        *,
        check_input: bool = True,
    ) -> tuple[torch.Tensor, list[float | None], list[str | None]]:
        """Returns (admitted at ``alpha``, region_alpha per row, abstention reason per row).
        ``check_input=False`` skips validation on the hot path: validated tensors and an alpha on the ladder."""
        if not check_input:
            trusted = (cast(torch.Tensor, probabilities), cast(torch.Tensor, predictions), cast(torch.Tensor, q_prime))
            return self._decide(*trusted, cast(float, alpha))
        a = self.resolve_alpha(alpha)
        p = as_tensor(probabilities, "probabilities")
        yhat = as_tensor(predictions, "predictions", dtype=torch.long).reshape(-1)
        qp = as_tensor(q_prime, "q_prime").reshape(-1)
        if p.dim() != 2 or yhat.shape[0] != p.shape[0] or qp.shape[0] != p.shape[0]:
            raise ValueError("probabilities must be (N, C) with predictions and q_prime of shape (N,)")
        return self._decide(p, yhat, qp, a)

    def _admissions(
        self, probabilities: torch.Tensor, predictions: torch.Tensor, q_prime: torch.Tensor
    ) -> torch.Tensor:
        """``admissions`` for validated inputs, with the ladder's thresholds kept as tensors between calls."""
        key = tuple((a, self.regions[a].q_prime_min, self.regions[a].thresholds) for a in self.alphas)
        cached = self._tensor_cache
        if cached is None or cached[0] != key or cached[1].dtype != probabilities.dtype:
            psi = torch.tensor([self.regions[a].thresholds for a in self.alphas], dtype=probabilities.dtype)
            q_min = torch.tensor([self.regions[a].q_prime_min for a in self.alphas], dtype=torch.float64)
            exclusive = all(min(r.thresholds) > 0.5 for r in self.regions.values() if math.isfinite(r.q_prime_min))
            cached = (key, psi, q_min, exclusive)
            self._tensor_cache = cached
        return _admissions(probabilities, predictions, q_prime, cached[1], cached[2], cached[3])

    def _decide(
        self, probabilities: torch.Tensor, predictions: torch.Tensor, q_prime: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, list[float | None], list[str | None]]:
        """``decide`` for validated tensors and an alpha already on the ladder."""
        a, qp = alpha, q_prime
        own = self._admissions(probabilities, predictions, qp)
        admitted = self._admitted_at_column(own, self.alphas.index(a))
        # The highest alpha whose own region admits the row (columns run from the highest alpha down).
        any_hit = own.any(dim=1)
        first = own.to(torch.int8).argmax(dim=1)
        region_alpha = [self.alphas[f] if h else None for f, h in zip(first.tolist(), any_hit.tolist())]
        region = self.regions[a]
        ood = torch.floor(qp) <= 0
        reasons: list[str | None] = []
        for admit, o, value in zip(admitted.tolist(), ood.tolist(), qp.tolist()):
            reasons.append(None if admit else _abstention_reason(o, region, value))
        return admitted, region_alpha, reasons

    def to_dict(self) -> dict:
        return {
            "default_alpha": self.default_alpha,
            "nested": self.nested,
            "regions": [self.regions[a].to_dict() for a in self.alphas],
        }

    @classmethod
    def from_dict(cls, data: dict) -> RegionLadder:
        regions = {float(r["alpha"]): Region.from_dict(r) for r in data["regions"]}
        return cls(regions=regions, nested=bool(data["nested"]), default_alpha=float(data["default_alpha"]))


def fit_ladder(
    probabilities: object,
    q_prime: object,
    labels: object,
    predictions: object,
    alphas: Sequence[float],
    default_alpha: float,
    nested: bool = True,
) -> RegionLadder:
    """Run Algorithm 1 at every alpha of the ladder and record how much of the calibration set each admits."""
    values = sorted({check_alpha(a, "alphas") for a in alphas}, reverse=True)
    default = check_alpha(default_alpha, "default_alpha")
    if not any(same_alpha(default, a) for a in values):
        raise ValueError(f"default_alpha {default} must be one of alphas {values}")
    regions = {a: fit_region(probabilities, q_prime, labels, a) for a in values}
    ladder = RegionLadder(
        regions=regions, nested=nested, default_alpha=next(a for a in values if same_alpha(a, default))
    )
    own = ladder.admissions(probabilities, predictions, q_prime)
    n = own.shape[0]
    for a in ladder.alphas:
        admitted = ladder.admitted_at(own, a)
        r = regions[a]
        regions[a] = Region(r.alpha, r.q_prime_min, r.thresholds, int(admitted.sum()), n)
    return ladder
