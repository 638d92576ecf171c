"""The alternatives to SDM_HR in training.evaluate, each decided on a constructed case whose answer is known."""

from __future__ import annotations

import pytest
import torch

from training.baselines import ScoredGenerations, aurocs, compare_methods, method_decisions, risk_coverage

ALPHAS = (0.9, 0.7)


def case() -> ScoredGenerations:
    """Eight answers, the first five right. The LM tags every answer Yes but the last; its P(Yes) ranks perfectly;
    the head's softmax is confident on rows 0-3, its SDM output only on rows 0-1; SDM_HR admits rows 0-2 at 0.9
    and rows 0-5 at 0.7 (nested)."""
    labels = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    p_yes = torch.tensor([0.99, 0.97, 0.95, 0.8, 0.75, 0.6, 0.2, 0.05])
    softmax = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.6, 0.6, 0.6, 0.4])
    sdm = torch.tensor([0.95, 0.95, 0.8, 0.8, 0.6, 0.6, 0.6, 0.4])
    predictions = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])
    hr = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1], [0, 1], [0, 1], [0, 0], [0, 0]], dtype=torch.bool)
    return ScoredGenerations(
        labels, ["Yes"] * 7 + ["No"], p_yes, softmax, sdm, predictions, ALPHAS, hr, torch.zeros(8, 2, dtype=torch.bool)
    )


def verified(result: dict, method: str, alpha: float) -> tuple[int, int]:
    row = next(r["verified"] for r in result[method] if r["alpha"] == alpha)
    return row["admitted"], row["correct"]


def test_each_method_admits_what_its_rule_says():
    result = compare_methods(case(), thresholds={"0.9": 0.9, "0.7": None})
    assert verified(result, "lm_tag", 0.9) == (7, 5)  # no abstention: every Yes tag
    assert verified(result, "lm_probability", 0.9) == (3, 3) and verified(result, "lm_probability", 0.7) == (5, 5)
    assert verified(result, "softmax", 0.9) == (4, 4)
    assert verified(result, "sdm", 0.9) == (2, 2) and verified(result, "sdm", 0.7) == (4, 4)
    assert verified(result, "conformal", 0.9) == (3, 3) and verified(result, "conformal", 0.7) == (0, 0)
    assert verified(result, "sdm_hr", 0.9) == (3, 3) and verified(result, "sdm_hr", 0.7) == (6, 5)
    assert verified(result, "sdm_hr_lower", 0.9) == (0, 0)


def test_lm_probability_admits_a_confident_no_too():
    yhat, admitted = method_decisions(case(), "lm_probability", 0.9)
    # Row 7 (P(Yes) = 0.05): a confident No, admitted but not among the verified answers.
    assert bool(admitted[7]) and int(yhat[7]) == 0


def test_verified_rows_carry_the_binomial_test_and_table4_cells():
    result = compare_methods(case(), thresholds=None)
    assert "conformal" not in result  # a bundle without fitted thresholds has no conformal baseline
    row = next(r for r in result["sdm_hr"] if r["alpha"] == 0.7)
    assert row["verified"]["accuracy"] == pytest.approx(5 / 6)
    # P(X <= 5 | 6, 0.7) = 1 - 0.7^6
    assert row["verified"]["p_value"] == pytest.approx(1 - 0.7**6)
    assert row["table4"]["prediction_conditional"][1]["admitted"] == 6


def test_aurocs_and_risk_coverage():
    s = case()
    values = aurocs(s)
    assert values["lm_probability"] == 1.0  # P(Yes) ranks every right answer above every wrong one
    # SDM: 0.95, 0.95, 0.8, 0.8 beat all three wrong (12 pairs); 0.6 ties two wrong 0.6s (1) and beats 0.4 (1).
    assert values["sdm"] == pytest.approx(14 / 15)
    coverage, risk = risk_coverage(s.p_yes, s.labels)
    assert coverage[-1] == 1.0 and risk[:5] == [0.0] * 5 and risk[-1] == pytest.approx(3 / 8)
