"""Held-out certification: the binomial arithmetic, withdrawal of a region that breaks its promise, the
split-conformal baseline's threshold, and a certified bundle as the server loads it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from sdm_core.calibration import Region, RegionLadder
from sdm_core.certification import (
    Certification,
    binomial_cdf,
    binomial_p_value_below,
    certify_ladder,
    clopper_pearson_lower,
    fit_score_threshold,
    withdraw_regions,
)

ROOT = Path(__file__).resolve().parents[1]


def test_binomial_cdf_matches_hand_computed_values():
    # P(X <= 1 | n=3, p=0.9) = 0.1^3 + 3 * 0.9 * 0.1^2 = 0.028
    assert binomial_cdf(1, 3, 0.9) == pytest.approx(0.028, rel=1e-12)
    # P(X <= 2 | n=4, p=0.5) = (1 + 4 + 6) / 16
    assert binomial_cdf(2, 4, 0.5) == pytest.approx(11 / 16, rel=1e-12)
    assert binomial_cdf(4, 4, 0.3) == 1.0 and binomial_cdf(-1, 4, 0.3) == 0.0


def test_p_value_of_the_issue_example_half_right_at_alpha_090():
    # 9 of 18 admitted answers right at alpha 0.90: sum_{i<=9} C(18,i) 0.9^i 0.1^(18-i)
    exact = sum(math.comb(18, i) * 0.9**i * 0.1 ** (18 - i) for i in range(10))
    assert binomial_p_value_below(9, 18, 0.90) == pytest.approx(exact, rel=1e-9)
    assert binomial_p_value_below(9, 18, 0.90) == pytest.approx(2.088e-5, rel=1e-3)
    # No admitted answers: no evidence of a violation.
    assert binomial_p_value_below(0, 0, 0.95) == 1.0
    with pytest.raises(ValueError, match="correct <= admitted"):
        binomial_p_value_below(5, 4, 0.9)


def test_clopper_pearson_lower_bounds():
    # All right: the bound solves p^n = 1 - confidence.
    assert clopper_pearson_lower(29, 29, 0.95) == pytest.approx(0.05 ** (1 / 29), abs=1e-9)
    # 9 of 10 at 95 % one-sided: the standard table value 0.6058.
    assert clopper_pearson_lower(9, 10, 0.95) == pytest.approx(0.6058, abs=5e-5)
    assert clopper_pearson_lower(0, 10) == 0.0


def two_region_ladder() -> RegionLadder:
    """Regions at 0.9 (q' >= 5) and 0.8 (q' >= 2); psi 0.5 for both classes, so the prediction always passes."""
    regions = {0.9: Region(0.9, 5.0, (0.5, 0.5), 0, 100), 0.8: Region(0.8, 2.0, (0.5, 0.5), 0, 100)}
    return RegionLadder(regions=regions, nested=True, default_alpha=0.9)


def scored(q_prime: list[float], predictions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = torch.tensor([[0.05, 0.95] if y == 1 else [0.95, 0.05] for y in predictions])
    return p, torch.tensor(predictions), torch.tensor(q_prime)


def test_a_region_whose_admitted_answers_are_half_wrong_is_withdrawn():
    ladder = two_region_ladder()
    # 20 rows at q' 6 (both regions admit), predicted Yes, 10 right: far below 0.9 -> violated at 0.9.
    # 40 rows at q' 3 (only 0.8 admits), predicted Yes, 39 right.
    p, yhat, qp = scored([6.0] * 20 + [3.0] * 40, [1] * 60)
    correct = torch.tensor([True] * 10 + [False] * 10 + [True] * 39 + [False])
    certification, served = certify_ladder(ladder, p, yhat, qp, correct)
    top = certification.row(0.9)
    assert (top.admitted, top.correct, top.status, top.withdrawn) == (20, 10, "violated", True)
    assert top.p_value == pytest.approx(binomial_cdf(10, 20, 0.9))
    # 0.8's own region (q' >= 2) admits all 60 rows, 49 right (0.82): certified.
    low = certification.row(0.8)
    assert (low.admitted, low.correct, low.status, low.withdrawn) == (60, 49, "certified", False)
    assert certification.withdrawn == (0.9,) and certification.certified == (0.8,)
    # The served ladder answers no_region at 0.9 and still admits at 0.8.
    admitted, _, reasons = served.decide(p, yhat, qp, alpha=0.9)
    assert not admitted.any() and set(reasons) == {"no_region"}
    admitted, _, _ = served.decide(p, yhat, qp, alpha=0.8)
    assert int(admitted.sum()) == 60


def test_a_violation_among_predicted_no_withdraws_the_region_too():
    ladder = two_region_ladder()
    # Predicted No, in the 0.9 region: 12 rows whose answers are in fact right (the No is wrong on all of them).
    p, yhat, qp = scored([6.0] * 12, [0] * 12)
    certification, _ = certify_ladder(ladder, p, yhat, qp, torch.ones(12, dtype=torch.bool))
    row = certification.row(0.9)
    assert row.admitted == 0 and row.groups["no"][:2] == [12, 0] and row.status == "violated" and row.withdrawn


def test_few_admitted_answers_are_insufficient_evidence_and_policies_differ():
    ladder = two_region_ladder()
    p, yhat, qp = scored([6.0] * 5, [1] * 5)
    correct = torch.tensor([True, True, False, False, False])
    kept, served = certify_ladder(ladder, p, yhat, qp, correct, policy="violation")
    assert kept.row(0.9).status == "insufficient" and not kept.row(0.9).withdrawn and served.regions[0.9].exists
    strict, served = certify_ladder(ladder, p, yhat, qp, correct, policy="evidence")
    assert strict.row(0.9).withdrawn and not served.regions[0.9].exists
    with pytest.raises(ValueError, match="policy"):
        certify_ladder(ladder, p, yhat, qp, correct, policy="lenient")


def test_lower_bound_policy_keeps_only_regions_whose_bound_reaches_alpha():
    ladder = two_region_ladder()
    p, yhat, qp = scored([6.0] * 30 + [3.0] * 30, [1] * 60)
    correct = torch.tensor([True] * 30 + [True] * 27 + [False] * 3)
    certification, served = certify_ladder(ladder, p, yhat, qp, correct, policy="lower-bound")
    # 30 of 30 at 0.9: bound 0.905 >= 0.9, kept; at 0.8 the nested set is 57 of 60: bound ~0.875 >= 0.8, kept.
    assert certification.withdrawn == () and served.regions[0.9].exists
    assert certification.row(0.9).lower_bound == pytest.approx(0.05 ** (1 / 30), abs=1e-9)


def test_certification_round_trips_through_its_dict():
    ladder = two_region_ladder()
    p, yhat, qp = scored([6.0] * 20, [1] * 20)
    certification, _ = certify_ladder(
        ladder, p, yhat, qp, torch.tensor([True] * 10 + [False] * 10), source={"kind": "test"}
    )
    again = Certification.from_dict(certification.to_dict())
    assert again == certification and again.withdrawn == (0.9, 0.8)
    assert "certified alphas none; withdrawn 0.9, 0.8" in again.summary()


def test_withdraw_regions_leaves_the_other_regions_alone():
    ladder = two_region_ladder()
    out = withdraw_regions(ladder, [0.8])
    assert out.regions[0.9] == ladder.regions[0.9] and not out.regions[0.8].exists
    assert ladder.regions[0.8].exists, "the input ladder is not modified"


def test_split_conformal_threshold_on_a_constructed_score():
    # 30 rows at 0.9, all right; 30 at 0.5, half right. At alpha 0.9 the top group passes (bound 0.905) and adding
    # the second (45 of 60) fails: the threshold is 0.9. At 0.95 nothing passes: 30 of 30 bounds at 0.905.
    scores = torch.tensor([0.9] * 30 + [0.5] * 30)
    correct = torch.tensor([True] * 30 + [True, False] * 15)
    assert fit_score_threshold(scores, correct, 0.9) == pytest.approx(0.9)
    assert fit_score_threshold(scores, correct, 0.95) is None
    # At 0.7 both groups pass (45 of 60, bound ~0.64 < 0.7 fails): still 0.9.
    assert fit_score_threshold(scores, correct, 0.7) == pytest.approx(0.9)
    assert fit_score_threshold(scores, correct, 0.6) == pytest.approx(0.5)


def test_a_certified_bundle_serves_without_its_withdrawn_regions(tmp_path):
    from sdm_core import SDMEstimator
    from sdm_core.lm.bundle import load_head, read_bundle_info, seal_bundle

    # The default bundle's files, with its head given regions at the lower alphas of its ladder.
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "deploy" / "bundles" / "smollm2-word-order", bundle)
    head = SDMEstimator.load(bundle / "head")
    regions = {
        a: (Region(a, 3.0, (0.6, 0.6), 10, 100) if a <= 0.8 else Region(a, math.inf, (0.0, 0.0), 0, 100))
        for a in head.ladder.alphas
    }
    head.ladder = RegionLadder(regions=regions, nested=head.ladder.nested, default_alpha=head.ladder.default_alpha)
    existing = [a for a in head.ladder.alphas if head.ladder.regions[a].exists]
    assert existing
    shutil.rmtree(bundle / "head")
    head.save(bundle / "head")
    seal_bundle(bundle, {"certification": None})
    rows = [
        {
            "alpha": a,
            "admitted": 20,
            "correct": 10,
            "accuracy": 0.5,
            "p_value": 1e-5,
            "lower_bound": 0.3,
            "status": "violated",
            "withdrawn": a in existing,
            "groups": {},
        }
        for a in head.ladder.alphas
    ]
    seal_bundle(bundle, {"certification": Certification.from_dict({"documents": 100, "rows": rows}).to_dict()})
    served = load_head(read_bundle_info(bundle))  # checksums verified after the re-seal
    assert not any(served.ladder.regions[a].exists for a in served.ladder.alphas)
    # The head on disk keeps its regions: the withdrawal is the certification's, applied at load.
    on_disk = SDMEstimator.load(bundle / "head").ladder
    assert [a for a in on_disk.alphas if on_disk.regions[a].exists] == existing
