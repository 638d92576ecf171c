"""The common alternatives to SDM_HR, decided on the same held-out generations, so that a user sees which method
keeps the promise "admitted at alpha => right with probability >= alpha" and how much each admits.

Every method is a selective classifier over the verification label y = r(generation): a prediction (Yes = the
answer followed the instructions, No) and, at each alpha, whether it is admitted. A server returns the admitted
Yes predictions as verified answers; the headline figures are theirs (``verified``), and the Table 4 cells of
the LM paper (class-, prediction-conditional and marginal) are kept beside them.

``lm_tag``          the LM's own tag word (no abstention; a missing tag counts as No)
``lm_probability``  the LM's P(Yes) at ``<verified>``: predict the likelier tag, admit when its probability >= alpha
``softmax``         the head's softmax(z'): admit the argmax when its probability >= alpha
``sdm``             the head's SDM(z') without Algorithm 1: admit the argmax when its probability >= alpha
``conformal``       split-conformal threshold on P(Yes), fitted on the bundle's calibration half to keep the marginal
                    accuracy of admitted Yes answers >= alpha (Clopper-Pearson, fixed-sequence); Yes side only
``sdm_hr``          SDM_HR, Algorithm 1's region (the certified ladder, as served)
``sdm_hr_lower``    SDM_HR_lower, the region under the DKW lower bounds
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sdm_core.certification import binomial_p_value_below, clopper_pearson_lower
from sdm_core.report import auroc, selective_row

__all__ = ["METHODS", "ScoredGenerations", "method_decisions", "compare_methods", "aurocs", "risk_coverage"]

METHODS: tuple[str, ...] = ("lm_tag", "lm_probability", "softmax", "sdm", "conformal", "sdm_hr", "sdm_hr_lower")


@dataclass(frozen=True)
class ScoredGenerations:
    """Everything the methods decide from, one row per generation. ``labels``: 1 when r says the answer is right.
    ``hr`` / ``hr_lower``: (N, L) SDM_HR admissions at each alpha of ``alphas`` (the served, nested ladder)."""

    labels: torch.Tensor
    own_tag: Sequence[str | None]
    p_yes: torch.Tensor
    softmax_yes: torch.Tensor
    sdm_yes: torch.Tensor
    head_predictions: torch.Tensor
    alphas: tuple[float, ...]
    hr: torch.Tensor
    hr_lower: torch.Tensor


def _likelier(p_yes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, its probability) of a two-way score given as P(Yes)."""
    yes = p_yes >= 0.5
    return yes.long(), torch.where(yes, p_yes, 1.0 - p_yes)


def method_decisions(
    s: ScoredGenerations, method: str, alpha: float, thresholds: Mapping[str, float | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, admitted) of ``method`` at ``alpha``."""
    n = s.labels.shape[0]
    if method == "lm_tag":
        return torch.tensor([1 if t == "Yes" else 0 for t in s.own_tag], dtype=torch.long), torch.ones(
            n, dtype=torch.bool
        )
    if method == "lm_probability":
        yhat, p = _likelier(s.p_yes)
        return yhat, p >= alpha
    if method == "softmax":
        yhat, p = _likelier(s.softmax_yes)
        return s.head_predictions, (p >= alpha) & (yhat == s.head_predictions)
    if method == "sdm":
        yhat, p = _likelier(s.sdm_yes)
        return s.head_predictions, (p >= alpha) & (yhat == s.head_predictions)
    if method == "conformal":
        t = (thresholds or {}).get(f"{alpha:g}")
        yes = s.p_yes >= t if t is not None else torch.zeros(n, dtype=torch.bool)
        return yes.long(), yes
    if method in ("sdm_hr", "sdm_hr_lower"):
        column = s.alphas.index(alpha)
        matrix = s.hr if method == "sdm_hr" else s.hr_lower
        return s.head_predictions, matrix[:, column]
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


def compare_methods(s: ScoredGenerations, thresholds: Mapping[str, float | None] | None = None) -> dict:
    """{method: [{alpha, verified: {admitted, share, correct, accuracy, p_value, lower_bound}, table4}]} at every
    alpha of the ladder. ``verified`` are the admitted Yes predictions, scored against r."""
    n = int(s.labels.shape[0])
    right = s.labels.bool()
    out: dict[str, list[dict]] = {}
    for method in METHODS:
        if method == "conformal" and thresholds is None:
            continue
        rows = []
        for alpha in s.alphas:
            yhat, admitted = method_decisions(s, method, alpha, thresholds)
            verified = admitted & (yhat == 1)
            k, m = int((verified & right).sum()), int(verified.sum())
            rows.append(
                {
                    "alpha": alpha,
                    "verified": {
                        "admitted": m,
                        "share": m / n if n else 0.0,
                        "correct": k,
                        "accuracy": k / m if m else None,
                        "p_value": binomial_p_value_below(k, m, alpha),
                        "lower_bound": clopper_pearson_lower(k, m),
                    },
                    "table4": selective_row(admitted, s.labels.long(), yhat, 2),
                }
            )
        out[method] = rows
    return out


def aurocs(s: ScoredGenerations) -> dict[str, float | None]:
    """How well each continuous score ranks right answers above wrong ones (0.5: no better than chance)."""
    return {
        "lm_probability": auroc(s.p_yes, s.labels),
        "softmax": auroc(s.softmax_yes, s.labels),
        "sdm": auroc(s.sdm_yes, s.labels),
    }


def risk_coverage(score: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """(coverage, risk) when admitting the k highest-scored answers as verified, k = 1..N: risk is the share of
    wrong answers among the admitted."""
    order = torch.argsort(score, descending=True, stable=True)
    wrong = (~labels.bool()[order]).double().cumsum(0)
    k = torch.arange(1, labels.shape[0] + 1, dtype=torch.float64)
    return (k / labels.shape[0]).tolist(), (wrong / k).tolist()
