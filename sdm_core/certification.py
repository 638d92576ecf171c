"""Held-out certification of a region ladder: does each alpha keep its promise on documents it never saw?

Algorithm 1 estimates each region on the calibration set; its guarantee holds for data exchangeable with that
set. Certification checks the promise directly on a disjoint labelled split. At each alpha of the ladder the
admitted rows are counted in three groups, each with its own notion of correct:

``yes``  predicted positive (what a server returns as a verified answer): correct when the answer is right
``no``   predicted negative: correct when the answer is wrong
``all``  every admitted row: correct when the prediction matches the answer's correctness (SDM_HR's accuracy)

and each group's accuracy is tested against alpha with the one-sided exact binomial test (H0: accuracy >= alpha)
and bounded below by the one-sided Clopper-Pearson bound. The row's headline figures are the ``yes`` group's.

A region where some group's test rejects (p < ``violation_p`` with at least ``min_admitted`` rows in that group)
is violated and is withdrawn from the ladder the server uses: requests at that alpha then get ``no_region``. Alphas
are visited from the highest down, each with the regions above it already settled, so that the nested admissions
that are certified are exactly the ones the withdrawn ladder makes.

Policies (what a region must show to stay on the ladder):

``violation``   withdrawn only when the test rejects (the issue's rule; little evidence keeps a region)
``evidence``    also withdrawn when fewer than ``min_admitted`` answers were admitted (an untested region)
``lower-bound`` kept only when the Clopper-Pearson lower bound reaches alpha (the strictest; small splits
                rarely certify anything)

Pure functions over counts and tensors; no LM code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from sdm_core.calibration import Region, RegionLadder, same_alpha

__all__ = [
    "CERTIFICATION_POLICIES",
    "CertificationRow",
    "Certification",
    "binomial_cdf",
    "binomial_p_value_below",
    "clopper_pearson_lower",
    "certify_ladder",
    "withdraw_regions",
    "fit_score_threshold",
]

CERTIFICATION_POLICIES: tuple[str, ...] = ("violation", "evidence", "lower-bound")

# Statuses, from the policy's point of view.
CERTIFIED = "certified"  # enough admitted answers and the test does not reject
VIOLATED = "violated"  # the test rejects: accuracy significantly below alpha
INSUFFICIENT = "insufficient"  # some answers admitted, fewer than min_admitted
NONE_ADMITTED = "none_admitted"  # the region exists but admitted nothing of the split
NO_REGION = "no_region"  # Algorithm 1 found no region at this alpha (or it was withdrawn above)


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def _log_sum(terms: Sequence[float]) -> float:
    top = max(terms)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(t - top) for t in terms))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in log space."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and p in [0, 1], got n={n}, p={p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.exp(_log_sum([_log_pmf(i, n, p) for i in range(k + 1)])))


def binomial_p_value_below(correct: int, admitted: int, alpha: float) -> float:
    """One-sided exact binomial p-value of H0 "accuracy >= alpha" given ``correct`` of ``admitted``:
    P(X <= correct) under Binomial(admitted, alpha). 1.0 when nothing was admitted (no evidence either way)."""
    _check_counts(correct, admitted)
    if admitted == 0:
        return 1.0
    return binomial_cdf(correct, admitted, alpha)


def clopper_pearson_lower(correct: int, admitted: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower confidence bound on the accuracy: the p at which
    P(X >= correct | admitted, p) = 1 - confidence (0 when correct is 0 or nothing was admitted)."""
    _check_counts(correct, admitted)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if correct == 0:
        return 0.0
    tail = 1.0 - confidence
    lo, hi = 0.0, 1.0
    # P(X >= correct | p) increases with p; bisect to float precision.
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 1.0 - binomial_cdf(correct - 1, admitted, mid) < tail:
            lo = mid
        else:
            hi = mid
    return lo


def _check_counts(correct: int, admitted: int) -> None:
    if admitted < 0 or not 0 <= correct <= admitted:
        raise ValueError(f"need 0 <= correct <= admitted, got correct={correct}, admitted={admitted}")


@dataclass(frozen=True)
class CertificationRow:
    """One alpha of the ladder on the certification split."""

    alpha: float
    admitted: int
    correct: int
    accuracy: float | None
    p_value: float
    lower_bound: float
    status: str
    withdrawn: bool
    # Every group (yes, no, all): [admitted, correct, p_value].
    groups: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Certification:
    """The ladder's record on a certification split, as stored in ``bundle.json`` under ``certification``."""

    rows: tuple[CertificationRow, ...]
    documents: int
    policy: str = "violation"
    min_admitted: int = 10
    violation_p: float = 0.01
    confidence: float = 0.95
    source: dict = field(default_factory=dict)

    @property
    def withdrawn(self) -> tuple[float, ...]:
        return tuple(r.alpha for r in self.rows if r.withdrawn)

    @property
    def certified(self) -> tuple[float, ...]:
        """Alphas whose region stays on the ladder with enough admitted answers and no rejection."""
        return tuple(r.alpha for r in self.rows if r.status == CERTIFIED and not r.withdrawn)

    def row(self, alpha: float) -> CertificationRow | None:
        return next((r for r in self.rows if same_alpha(r.alpha, alpha)), None)

    def summary(self) -> str:
        """One line for logs and the end of calibration."""
        certified = ", ".join(f"{a:g}" for a in self.certified) or "none"
        withdrawn = ", ".join(f"{a:g}" for a in self.withdrawn) or "none"
        return (
            f"certification on {self.documents} held-out documents ({self.policy}): certified alphas {certified}; "
            f"withdrawn {withdrawn}"
        )

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "policy": self.policy,
            "min_admitted": self.min_admitted,
            "violation_p": self.violation_p,
            "confidence": self.confidence,
            "certified": list(self.certified),
            "withdrawn": list(self.withdrawn),
            "source": dict(self.source),
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Certification:
        rows = tuple(CertificationRow(**{**r, "alpha": float(r["alpha"])}) for r in data["rows"])
        return cls(
            rows=rows,
            documents=int(data["documents"]),
            policy=str(data.get("policy", "violation")),
            min_admitted=int(data.get("min_admitted", 10)),
            violation_p=float(data.get("violation_p", 0.01)),
            confidence=float(data.get("confidence", 0.95)),
            source=dict(data.get("source", {})),
        )


def _status(region_exists: bool, groups: dict, min_admitted: int, violation_p: float) -> str:
    """From the groups' [admitted, correct, p_value]; the ``yes`` group decides whether there is enough evidence."""
    if not region_exists:
        return NO_REGION
    if any(n >= min_admitted and p < violation_p for n, _, p in groups.values()):
        return VIOLATED
    admitted = groups["yes"][0]
    if admitted == 0:
        return NONE_ADMITTED
    return CERTIFIED if admitted >= min_admitted else INSUFFICIENT


def _withdraws(policy: str, status: str, lower_bound: float, alpha: float) -> bool:
    if status == NO_REGION:
        return False
    if policy == "violation":
        return status == VIOLATED
    if policy == "evidence":
        return status != CERTIFIED
    return status != CERTIFIED or lower_bound < alpha


def withdraw_regions(ladder: RegionLadder, alphas: Sequence[float]) -> RegionLadder:
    """A copy of ``ladder`` whose regions at ``alphas`` no longer exist (requests there get ``no_region``)."""
    gone = [a for a in ladder.alphas if any(same_alpha(a, w) for w in alphas)]
    regions = dict(ladder.regions)
    for a in gone:
        r = regions[a]
        regions[a] = Region(a, math.inf, tuple(0.0 for _ in r.thresholds), 0, r.calibration_size)
    return RegionLadder(regions=regions, nested=ladder.nested, default_alpha=ladder.default_alpha)


def _check_policy(policy: str, min_admitted: int, violation_p: float) -> None:
    if policy not in CERTIFICATION_POLICIES:
        raise ValueError(f"policy must be one of {list(CERTIFICATION_POLICIES)}, got {policy!r}")
    if min_admitted < 1:
        raise ValueError(f"min_admitted must be >= 1, got {min_admitted}")
    if not 0.0 < violation_p < 1.0:
        raise ValueError(f"violation_p must be in (0, 1), got {violation_p}")


def _group_counts(
    in_region: torch.Tensor, group_masks: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float
) -> dict[str, tuple[int, int, float]]:
    """Per group: (admitted, correct, exact binomial p of accuracy >= alpha) among the rows in the region."""
    counts: dict[str, tuple[int, int, float]] = {}
    for name, (member, good) in group_masks.items():
        n = int((in_region & member).sum())
        k = int((in_region & member & good).sum())
        counts[name] = (n, k, binomial_p_value_below(k, n, alpha))
    return counts


def certify_ladder(
    ladder: RegionLadder,
    probabilities: torch.Tensor,
    predictions: torch.Tensor,
    q_prime: torch.Tensor,
    correct: torch.Tensor,
    positive_class: int = 1,
    *,
    policy: str = "violation",
    min_admitted: int = 10,
    violation_p: float = 0.01,
    confidence: float = 0.95,
    source: dict | None = None,
) -> tuple[Certification, RegionLadder]:
    """Certify every alpha of ``ladder`` on a labelled split scored by the head (its SDM probabilities,
    predictions and q'), with ``correct[i]`` whether answer i is right. Returns the certification and the ladder
    with the withdrawn regions removed."""
    _check_policy(policy, min_admitted, violation_p)
    yhat = torch.as_tensor(predictions).reshape(-1).long()
    right = torch.as_tensor(correct).reshape(-1).bool()
    if right.shape[0] != yhat.shape[0]:
        raise ValueError(f"correct has {right.shape[0]} rows but the scores have {yhat.shape[0]}")
    verified = yhat == positive_class
    group_masks = {
        "yes": (verified, right),
        "no": (~verified, ~right),
        "all": (torch.ones_like(verified), verified == right),
    }
    rows: list[CertificationRow] = []
    current = ladder
    for alpha in ladder.alphas:
        own = current.admissions(probabilities, yhat, q_prime)
        in_region = current.admitted_at(own, alpha)
        counts = _group_counts(in_region, group_masks, alpha)
        admitted, n_correct, p_value = counts["yes"]
        groups = {name: list(values) for name, values in counts.items()}  # stored as [admitted, correct, p_value]
        lower = clopper_pearson_lower(n_correct, admitted, confidence)
        status = _status(current.regions[alpha].exists, groups, min_admitted, violation_p)
        withdraw = _withdraws(policy, status, lower, alpha)
        if withdraw:
            current = withdraw_regions(current, [alpha])
        rows.append(
            CertificationRow(
                alpha,
                admitted,
                n_correct,
                n_correct / admitted if admitted else None,
                p_value,
                lower,
                status,
                withdraw,
                groups,
            )
        )
    certification = Certification(
        tuple(rows), int(yhat.shape[0]), policy, min_admitted, violation_p, confidence, dict(source or {})
    )
    return certification, current


def fit_score_threshold(
    scores: torch.Tensor, correct: torch.Tensor, alpha: float, confidence: float = 0.95
) -> float | None:
    """The split-conformal baseline: the lowest threshold t on a score such that admitting ``score >= t`` keeps
    the marginal accuracy of admitted rows at least alpha with probability ``confidence``.

    Candidate thresholds (the distinct calibration scores) are tested from the highest down, each by whether the
    one-sided Clopper-Pearson lower bound of the admitted rows' accuracy reaches alpha, and the scan stops at the
    first failure (fixed-sequence testing, so the error rate over the scan stays 1 - confidence). The scan starts
    at the first threshold that admits enough rows for a perfect record to pass (alpha^n <= 1 - confidence): a
    start chosen from the scores alone, so the sequence stays fixed in advance. None when the first test fails."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(correct).reshape(-1).bool()
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} rows but correct has {y.shape[0]}")
    order = torch.argsort(s, descending=True)
    ranked: list[float] = s[order].tolist()
    ranked_correct: list[bool] = y[order].tolist()
    if not 0.5 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0.5, 1), got {alpha}")
    n_min = math.ceil(math.log(1.0 - confidence) / math.log(alpha))
    best: float | None = None
    k = n = 0
    i = 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j] == ranked[i]:  # every row tied at this score is admitted together
            n += 1
            k += int(ranked_correct[j])
            j += 1
        if n >= n_min:
            if clopper_pearson_lower(k, n, confidence) < alpha:
                break
            best = ranked[i]
        i = j
    return best
