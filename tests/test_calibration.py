"""Algorithm 1 (q'_min, psi), the HIGH-RELIABILITY rule, the nested alpha ladder and abstention reasons.

SDM_SPEC §2.2 and §2.4; project decisions: nested ladder (admitted at alpha iff some ladder alpha' >= alpha admits
under its own region; region_alpha = the highest such alpha'), reasons in order ood, no_region, low_similarity,
below_threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdm_core.calibration import (
    ABSTENTION_REASONS,
    Region,
    RegionLadder,
    fit_ladder,
    fit_region,
    in_region,
    is_ood,
)


def _rows(spec, num_classes=2):
    """spec: list of (label, probability of the true label, q'). The remaining mass goes to the next class."""
    probs, q_prime, labels = [], [], []
    for label, p_true, qp in spec:
        row = [0.0] * num_classes
        row[label] = p_true
        row[(label + 1) % num_classes] = 1.0 - p_true
        probs.append(row)
        q_prime.append(qp)
        labels.append(label)
    return (
        torch.tensor(probs, dtype=torch.float32),
        torch.tensor(q_prime, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.long),
    )


def f32(x: float) -> float:
    return float(np.float32(x))


# --------------------------------------------------------------------------------------------------------------
# Hand-computed Algorithm 1
# --------------------------------------------------------------------------------------------------------------
# Class 0: (p_true, q') = (0.95, 5) (0.90, 4) (0.60, 3) (0.80, 2) (0.30, 1.5)
# Class 1: (0.99, 6) (0.85, 4) (0.70, 2.5) (0.40, 1.2); plus OOD rows (q' = 0) that must be skipped.
# alpha = 0.75, index = floor(0.25 n_c):
#   q* = 1.2, 1.5: class 0 has n = 5, index 1 of (0.3, 0.6, 0.8, 0.9, 0.95) = 0.6 < 0.75 -> fail
#   q* = 2:   class 0 n = 4, index 1 of (0.6, 0.8, 0.9, 0.95) = 0.8 ok; class 1 n = 3, index 0 = 0.7 -> fail
#   q* = 2.5, 3: class 0 n = 3, index 0 = 0.6 -> fail
#   q* = 4:   class 0 (0.9, 0.95) -> 0.9 ok; class 1 (0.85, 0.99) -> 0.85 ok  => q'_min = 4, psi = (0.90, 0.85)
HAND = [
    (0, 0.95, 5.0),
    (0, 0.90, 4.0),
    (0, 0.60, 3.0),
    (0, 0.80, 2.0),
    (0, 0.30, 1.5),
    (1, 0.99, 6.0),
    (1, 0.85, 4.0),
    (1, 0.70, 2.5),
    (1, 0.40, 1.2),
    (1, 0.10, 0.0),
    (0, 0.05, 0.0),
]


def test_algorithm1_hand_computed_q_prime_min_and_thresholds():
    region = fit_region(*_rows(HAND), alpha=0.75)
    assert region.exists
    assert region.q_prime_min == 4.0
    assert region.thresholds == (f32(0.90), f32(0.85))
    assert region.alpha == 0.75


def test_algorithm1_hand_computed_at_higher_alpha():
    # alpha = 0.9 (index 0 for these small classes): q* = 4 fails on class 1 (0.85); q* = 5 -> class 0 (0.95),
    # class 1 (0.99) -> q'_min = 5, psi = (0.95, 0.99).
    region = fit_region(*_rows(HAND), alpha=0.9)
    assert region.q_prime_min == 5.0
    assert region.thresholds == (f32(0.95), f32(0.99))


def test_algorithm1_returns_no_region_when_no_candidate_qualifies():
    region = fit_region(*_rows(HAND), alpha=0.999)
    assert not region.exists
    assert region.q_prime_min == math.inf
    assert region.thresholds == (0.0, 0.0)


@pytest.mark.parametrize(
    "n_bad, expected",
    [(0, 0.78), (1, 0.78), (2, 0.78), (3, None)],  # sorted index 2 of the kept values
)
def test_order_statistic_index_is_floor_of_one_minus_alpha_times_n(n_bad, expected):
    # Class 0 has 8 points at one q' (alpha = 0.75 -> index floor(0.25 * 8) = 2): up to 2 values below alpha pass.
    good = [0.94, 0.93, 0.92, 0.91, 0.90, 0.78, 0.77, 0.76]
    values = [0.1, 0.2, 0.3][:n_bad] + good[: 8 - n_bad]
    spec = [(0, v, 3.0) for v in values] + [(1, 0.8, 3.0)] * 4  # class 1: index floor(1) = 1 of four 0.8 -> 0.8
    region = fit_region(*_rows(spec), alpha=0.75)
    if expected is None:
        assert not region.exists
    else:
        assert region.q_prime_min == 3.0
        assert region.thresholds == (f32(expected), f32(0.8))


def test_order_statistic_index_uses_float64_product_then_truncation():
    # (1 - 0.9) * 10 = 0.9999999999999998 in float64, which truncates to index 0 (SDM_SPEC §2.2): one value
    # below alpha among ten is therefore enough to fail, as in the reference.
    spec = [(0, 0.5, 2.0)] + [(0, 0.99, 2.0)] * 9 + [(1, 0.99, 2.0)] * 10
    assert not fit_region(*_rows(spec), alpha=0.9).exists
    # with twenty points the product is 1.9999999999999996 -> index 1: one bad value passes
    spec = [(0, 0.5, 2.0)] + [(0, 0.99, 2.0)] * 19 + [(1, 0.99, 2.0)] * 10
    region = fit_region(*_rows(spec), alpha=0.9)
    assert region.exists and region.thresholds == (f32(0.99), f32(0.99))


def test_algorithm1_uses_probability_of_true_label_not_of_prediction():
    # Every row predicts the wrong class with 0.95: the true-label outputs are 0.05, so no region exists.
    spec = [(0, 0.05, 3.0)] * 5 + [(1, 0.05, 3.0)] * 5
    assert not fit_region(*_rows(spec), alpha=0.9).exists


@pytest.mark.parametrize("ood_q_prime", [0.0, 0.5, 0.999])
def test_ood_calibration_points_are_skipped(ood_q_prime):
    # All points have high true-label outputs; OOD rows (floor(q') <= 0) must neither be candidates nor counted.
    spec = [(0, 0.99, 2.0), (0, 0.98, 3.0), (1, 0.97, 2.0), (1, 0.99, 5.0)]
    with_ood = spec + [(0, 0.99, ood_q_prime), (1, 0.01, ood_q_prime), (0, 0.02, ood_q_prime)]
    base = fit_region(*_rows(spec), alpha=0.95)
    region = fit_region(*_rows(with_ood), alpha=0.95)
    assert region.q_prime_min == 2.0 == base.q_prime_min
    assert region.thresholds == base.thresholds == (f32(0.98), f32(0.97))


def test_all_ood_calibration_gives_no_region():
    region = fit_region(*_rows([(0, 0.99, 0.0), (1, 0.99, 0.0)]), alpha=0.9)
    assert not region.exists and region.thresholds == (0.0, 0.0)


def test_class_without_calibration_points_gives_no_region():
    region = fit_region(*_rows([(0, 0.99, 3.0), (0, 0.99, 4.0)]), alpha=0.9)
    assert not region.exists
    assert region.q_prime_min == math.inf
    assert region.thresholds == (0.0, 0.0)


def test_class_emptied_above_a_candidate_makes_that_candidate_fail():
    # Class 1 only exists at q' = 2; at q* = 3 it would be empty, so the region must be at q' = 2 (class 0's bad
    # value at q' = 2 is tolerated by index floor(0.25 * 5) = 1) and not at 3.
    spec = [(0, 0.5, 2.0), (0, 0.99, 3.0), (0, 0.99, 3.0), (0, 0.99, 3.0), (0, 0.99, 3.0), (1, 0.9, 2.0)]
    region = fit_region(*_rows(spec), alpha=0.75)
    assert region.q_prime_min == 2.0
    assert region.thresholds == (f32(0.99), f32(0.9))
    # and if class 1's only point is bad, no candidate can qualify
    spec[-1] = (1, 0.3, 2.0)
    assert not fit_region(*_rows(spec), alpha=0.75).exists


def test_region_thresholds_are_at_least_alpha_whenever_region_exists():
    # SDM_SPEC §6.1 item 10, on the hand-made set at several alphas. Outputs are float32 and, as in the
    # reference, compared with alpha in float32 (docs/decisions.md).
    for alpha in (0.55, 0.6, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99):
        region = fit_region(*_rows(HAND), alpha=alpha)
        if region.exists:
            assert all(np.float32(t) >= np.float32(alpha) for t in region.thresholds)


# --------------------------------------------------------------------------------------------------------------
# in_region and is_ood
# --------------------------------------------------------------------------------------------------------------
def test_is_ood_is_floor_of_q_prime_at_most_zero():
    assert is_ood(torch.tensor([0.0, 0.5, 0.999, 1.0, 2.5])).tolist() == [True, True, True, False, False]


def test_in_region_admits_single_passing_predicted_class_at_or_above_q_prime_min():
    region = Region(0.9, 3.0, (0.9, 0.9))
    p = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.90, 0.10], [0.05, 0.95], [0.85, 0.15]])
    pred = torch.tensor([0, 0, 0, 1, 0])
    qp = torch.tensor([3.0, 2.99, 7.0, 4.0, 9.0])
    assert in_region(p, pred, qp, region).tolist() == [True, False, True, True, False]


def test_in_region_refuses_when_the_passing_class_is_not_the_prediction():
    region = Region(0.9, 1.0, (0.9, 0.9))
    assert in_region(torch.tensor([[0.95, 0.05]]), torch.tensor([1]), torch.tensor([5.0]), region).tolist() == [False]


def test_in_region_refuses_when_more_than_one_class_passes():
    region = Region(0.9, 1.0, (0.3, 0.3))  # artificial thresholds that two classes can reach at once
    p = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    assert in_region(p, torch.tensor([0, 0]), torch.tensor([5.0, 5.0]), region).tolist() == [False, True]


def test_in_region_with_three_classes():
    region = Region(0.6, 2.0, (0.6, 0.7, 0.6))
    p = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.65, 0.05], [0.1, 0.2, 0.7]])
    assert in_region(p, torch.tensor([0, 1, 2]), torch.tensor([2.0, 2.0, 2.0]), region).tolist() == [True, False, True]


def test_in_region_refuses_ood_even_when_q_prime_min_is_lower():
    region = Region(0.9, 0.0, (0.9, 0.9))  # an artificial q'_min of 0 must not let OOD rows in
    p = torch.tensor([[0.99, 0.01], [0.99, 0.01]])
    assert in_region(p, torch.tensor([0, 0]), torch.tensor([0.5, 1.0]), region).tolist() == [False, True]


def test_in_region_refuses_everything_without_a_region():
    region = Region(0.9, math.inf, (0.0, 0.0))
    p = torch.tensor([[0.999, 0.001]])
    assert in_region(p, torch.tensor([0]), torch.tensor([100.0]), region).tolist() == [False]


def test_in_region_on_calibration_rows_of_hand_set():
    probs, qp, labels = _rows(HAND)
    region = fit_region(probs, qp, labels, alpha=0.75)  # q'_min 4, psi (0.90, 0.85)
    admitted = in_region(probs, probs.argmax(dim=1), qp, region)
    # rows with q' >= 4: (0, 0.95, 5) yes, (0, 0.90, 4) yes, (1, 0.99, 6) yes, (1, 0.85, 4) yes
    assert admitted.tolist() == [True, True, False, False, False, True, True, False, False, False, False]


def test_region_dict_round_trip_keeps_infinity():
    for region in (Region(0.9, 4.0, (0.91, 0.92), 3, 10), Region(0.95, math.inf, (0.0, 0.0))):
        data = region.to_dict()
        if not region.exists:
            assert data["q_prime_min"] is None
        assert Region.from_dict(data) == region


# --------------------------------------------------------------------------------------------------------------
# Nested ladder on a set whose per-alpha regions are NOT nested
# --------------------------------------------------------------------------------------------------------------
# Per class: six rows (0.99, q' 2), one row (0.80, q' 2), rows (0.96, q' 10) and (0.97, q' 10); plus one OOD row.
#   alpha 0.75: q* = 2, n = 9, index floor(2.25) = 2 of (0.8, 0.96, 0.97, ...) = 0.97 -> q'_min 2, psi 0.97
#   alpha 0.95: q* = 2 fails (index 0 = 0.8); q* = 10 -> index 0 of (0.96, 0.97) -> q'_min 10, psi 0.96
#   alpha 0.99: no region
# A prediction at q' = 10 with probability 0.965 is in the 0.95 region but not in the 0.75 region.
NEST = []
for _label in (0, 1):
    NEST += [(_label, 0.99, 2.0)] * 6 + [(_label, 0.80, 2.0), (_label, 0.96, 10.0), (_label, 0.97, 10.0)]
NEST += [(0, 0.99, 0.0)]
LADDER = (0.99, 0.95, 0.75)

TEST_P = torch.tensor([[0.965, 0.035], [0.98, 0.02], [0.99, 0.01], [0.5, 0.5], [0.9, 0.1], [0.01, 0.99]])
TEST_PRED = TEST_P.argmax(dim=1)
TEST_Q = torch.tensor([10.0, 3.0, 0.0, 1.0, 10.0, 12.0])


def _nest_ladder(nested):
    probs, qp, labels = _rows(NEST)
    return fit_ladder(probs, qp, labels, probs.argmax(dim=1), LADDER, 0.95, nested=nested)


def test_nest_fixture_has_non_nested_per_alpha_regions():
    ladder = _nest_ladder(True)
    assert ladder.alphas == LADDER
    r75, r95, r99 = ladder.regions[0.75], ladder.regions[0.95], ladder.regions[0.99]
    assert (r75.q_prime_min, r75.thresholds) == (2.0, (f32(0.97), f32(0.97)))
    assert (r95.q_prime_min, r95.thresholds) == (10.0, (f32(0.96), f32(0.96)))
    assert not r99.exists
    own = ladder.admissions(TEST_P, TEST_PRED, TEST_Q)
    # columns (0.99, 0.95, 0.75)
    assert own.tolist() == [
        [False, True, False],  # in the 0.95 region but not in the 0.75 region: own regions are not nested
        [False, False, True],
        [False, False, False],
        [False, False, False],
        [False, False, False],
        [False, True, True],
    ]


def test_nested_ladder_admits_at_alpha_when_any_higher_alpha_region_admits():
    ladder = _nest_ladder(True)
    at = {a: ladder.decide(TEST_P, TEST_PRED, TEST_Q, a)[0].tolist() for a in LADDER}
    assert at[0.99] == [False] * 6
    assert at[0.95] == [True, False, False, False, False, True]
    assert at[0.75] == [True, True, False, False, False, True]
    for hi, lo in ((0.99, 0.95), (0.95, 0.75)):
        assert all(b for a, b in zip(at[hi], at[lo]) if a)  # nested by construction


def test_nested_ladder_region_alpha_is_highest_admitting_alpha():
    ladder = _nest_ladder(True)
    for a in LADDER:
        _, region_alpha, _ = ladder.decide(TEST_P, TEST_PRED, TEST_Q, a)
        assert region_alpha == [0.95, 0.75, None, None, None, 0.95]


def test_non_nested_ladder_uses_each_alphas_own_region():
    ladder = _nest_ladder(False)
    admitted75, region_alpha, reasons75 = ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.75)
    assert admitted75.tolist() == [False, True, False, False, False, True]
    assert reasons75[0] == "below_threshold"
    assert region_alpha == [0.95, 0.75, None, None, None, 0.95]
    admitted95, _, _ = ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.95)
    assert admitted95.tolist() == [True, False, False, False, False, True]


def test_abstention_reasons_in_order_ood_no_region_low_similarity_below_threshold():
    assert ABSTENTION_REASONS == ("ood", "no_region", "low_similarity", "below_threshold")
    ladder = _nest_ladder(True)
    _, _, r99 = ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.99)
    _, _, r95 = ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.95)
    _, _, r75 = ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.75)
    assert r99 == ["no_region", "no_region", "ood", "no_region", "no_region", "no_region"]
    # row 3 (q' = 1, p = 0.5) is below q'_min and below threshold: low_similarity is reported first
    assert r95 == [None, "low_similarity", "ood", "low_similarity", "below_threshold", None]
    assert r75 == [None, None, "ood", "low_similarity", "below_threshold", None]


def test_decide_defaults_to_default_alpha():
    ladder = _nest_ladder(True)
    default = ladder.decide(TEST_P, TEST_PRED, TEST_Q)
    explicit = ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.95)
    assert default[0].tolist() == explicit[0].tolist() and default[2] == explicit[2]


def test_fit_ladder_calibration_admitted_counts_nested_and_not_nested():
    nested = _nest_ladder(True)
    flat = _nest_ladder(False)
    n = len(NEST)
    assert [nested.regions[a].calibration_size for a in LADDER] == [n] * 3
    # 0.99: none. 0.95: the four q' = 10 rows (0.96 and 0.97 per class). 0.75 own region: twelve 0.99 rows and
    # the two 0.97 rows; nested adds the two 0.96 rows admitted at 0.95.
    assert [nested.regions[a].calibration_admitted for a in LADDER] == [0, 4, 16]
    assert [flat.regions[a].calibration_admitted for a in LADDER] == [0, 4, 14]


def test_alpha_not_on_ladder_is_refused():
    ladder = _nest_ladder(True)
    with pytest.raises(ValueError, match="ladder"):
        ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.9)
    with pytest.raises(ValueError, match="alpha"):
        ladder.decide(TEST_P, TEST_PRED, TEST_Q, 0.5)
    assert ladder.resolve_alpha(0.95 + 1e-12) == 0.95


def test_fit_ladder_refuses_default_alpha_not_among_alphas():
    probs, qp, labels = _rows(NEST)
    with pytest.raises(ValueError, match="default_alpha"):
        fit_ladder(probs, qp, labels, probs.argmax(dim=1), LADDER, 0.9)
    with pytest.raises(ValueError, match="default_alpha"):
        RegionLadder(regions={0.95: Region(0.95, 1.0, (0.96, 0.96))}, default_alpha=0.9)
    with pytest.raises(ValueError, match="regions"):
        RegionLadder(regions={}, default_alpha=0.95)


def test_ladder_dict_round_trip_gives_same_decisions():
    for nested in (True, False):
        ladder = _nest_ladder(nested)
        again = RegionLadder.from_dict(ladder.to_dict())
        assert again.alphas == ladder.alphas and again.nested == nested and again.default_alpha == 0.95
        for a in LADDER:
            x, y = ladder.decide(TEST_P, TEST_PRED, TEST_Q, a), again.decide(TEST_P, TEST_PRED, TEST_Q, a)
            assert x[0].tolist() == y[0].tolist() and x[1] == y[1] and x[2] == y[2]


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------
def test_fit_region_validation_errors():
    probs, qp, labels = _rows(HAND)
    with pytest.raises(ValueError, match="alpha"):
        fit_region(probs, qp, labels, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        fit_region(probs, qp, labels, float("nan"))
    with pytest.raises(ValueError, match="probabilities"):
        fit_region(probs[:, 0], qp, labels, 0.9)
    with pytest.raises(ValueError, match="probabilities"):
        fit_region(probs * 2, qp, labels, 0.9)
    with pytest.raises(ValueError, match="q_prime"):
        fit_region(probs, qp[:-1], labels, 0.9)
    with pytest.raises(ValueError, match="q_prime"):
        fit_region(probs, -qp, labels, 0.9)
    with pytest.raises(ValueError, match="q_prime"):
        fit_region(probs, torch.full_like(qp, float("nan")), labels, 0.9)
    with pytest.raises(ValueError, match="labels"):
        fit_region(probs, qp, labels[:-1], 0.9)
    with pytest.raises(ValueError, match="labels"):
        fit_region(probs, qp, labels + 1, 0.9)


# --------------------------------------------------------------------------------------------------------------
# Cross-check against a literal, slow reimplementation of Algorithm 1
# --------------------------------------------------------------------------------------------------------------
def brute_force_algorithm1(probs: np.ndarray, q_prime: np.ndarray, labels: np.ndarray, alpha: float):
    probs = probs.astype(np.float32)
    n_classes = probs.shape[1]
    keep = [i for i in range(len(labels)) if math.floor(q_prime[i]) > 0]
    candidates = sorted({float(q_prime[i]) for i in keep})
    for q_star in candidates:
        thresholds = []
        for c in range(n_classes):
            values = sorted(float(probs[i, c]) for i in keep if q_prime[i] >= q_star and labels[i] == c)
            if not values:
                thresholds.append(0.0)
                continue
            index = min(int((1.0 - alpha) * len(values)), len(values) - 1)
            thresholds.append(max(values[index], 0.0))
        if all(t >= alpha for t in thresholds):
            return q_star, tuple(thresholds)
    return math.inf, tuple(0.0 for _ in range(n_classes))


def _random_calibration(rng):
    n = int(rng.integers(5, 160))
    c = int(rng.choice([2, 3]))
    labels = rng.integers(0, c, n)
    # q': OOD zeros, integers and half-integers (duplicates are common), a few fractional values
    q_prime = rng.integers(1, 25, n).astype(np.float64)
    q_prime += np.where(rng.random(n) < 0.3, 0.5, 0.0)
    q_prime = np.where(rng.random(n) < 0.1, 0.0, q_prime)
    q_prime = np.where(rng.random(n) < 0.05, 1.0 + rng.random(n) * 5, q_prime)
    # the true-label output grows with q' so that regions exist in some sets and not in others
    strength = rng.uniform(0.0, 0.6)
    p_true = 1.0 - rng.random(n) ** (1.0 + q_prime * strength) * rng.uniform(0.2, 0.8)
    probs = np.zeros((n, c))
    probs[np.arange(n), labels] = p_true
    rest = rng.dirichlet(np.ones(c - 1), n) * (1.0 - p_true)[:, None]
    for j in range(c - 1):
        probs[np.arange(n), (labels + 1 + j) % c] = rest[:, j]
    alpha = float(rng.choice([0.55, 0.6, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]))
    return probs.astype(np.float32), q_prime.astype(np.float32), labels, alpha


def test_fit_region_matches_brute_force_algorithm1_on_random_sets():
    rng = np.random.default_rng(2024)
    outcomes = {"finite": 0, "inf": 0}
    for _ in range(60):
        probs, q_prime, labels, alpha = _random_calibration(rng)
        region = fit_region(probs, q_prime, labels, alpha)
        q_min, thresholds = brute_force_algorithm1(probs, q_prime.astype(np.float64), labels, alpha)
        assert region.q_prime_min == q_min, (alpha, len(labels))
        assert region.thresholds == thresholds
        if region.exists:
            assert all(t >= alpha for t in region.thresholds)  # SDM_SPEC §6.1 item 10
            outcomes["finite"] += 1
        else:
            outcomes["inf"] += 1
    # the random sets exercise both outcomes
    assert outcomes["finite"] >= 10 and outcomes["inf"] >= 5, outcomes


def test_nested_ladder_is_nested_on_random_sets():
    rng = np.random.default_rng(7)
    ladder_alphas = (0.99, 0.95, 0.9, 0.8, 0.6)
    admitted_any = 0
    for _ in range(20):
        probs, q_prime, labels, _ = _random_calibration(rng)
        preds = torch.from_numpy(probs).argmax(dim=1)
        ladder = fit_ladder(probs, q_prime, labels, preds, ladder_alphas, 0.9, nested=True)
        decisions = {a: ladder.decide(probs, preds, q_prime, a) for a in ladder_alphas}
        for hi, lo in zip(ladder_alphas, ladder_alphas[1:]):
            assert bool((decisions[lo][0] | ~decisions[hi][0]).all())
        for a, (admitted, region_alpha, reasons) in decisions.items():
            for i in range(len(region_alpha)):
                assert (region_alpha[i] is not None and region_alpha[i] >= a) == bool(admitted[i])
                assert (reasons[i] is None) == bool(admitted[i])
            admitted_any += int(admitted.sum())
            assert ladder.regions[a].calibration_admitted == int(admitted.sum())
    assert admitted_any > 0


def test_ladder_fast_admission_path_equals_the_general_rule_on_random_sets():
    # Fitted regions have every threshold >= alpha > 0.5, so the ladder checks only the predicted class; the
    # general rule (exactly one passing class, and it is the prediction) must give the same matrix.
    from sdm_core.calibration import _admissions

    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(20):
        probs, q_prime, labels, _ = _random_calibration(rng)
        preds = torch.from_numpy(probs).argmax(dim=1)
        ladder = fit_ladder(probs, q_prime, labels, preds, (0.99, 0.95, 0.9, 0.8, 0.6), 0.9)
        p, qp = torch.as_tensor(probs), torch.as_tensor(q_prime)
        fast = ladder.admissions(p, preds, qp)
        assert ladder._tensor_cache[3], "fitted regions must take the exclusive path"
        _, psi, q_min, _ = ladder._tensor_cache
        assert torch.equal(fast, _admissions(p, preds, qp, psi, q_min, exclusive=False))
        checked += int(fast.sum())
    assert checked > 0


def test_ladder_with_artificial_low_thresholds_uses_the_general_rule():
    region = Region(0.9, 1.0, (0.3, 0.3))
    ladder = RegionLadder(regions={0.9: region}, default_alpha=0.9)
    p = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    admitted, _, reasons = ladder.decide(p, torch.tensor([0, 0]), torch.tensor([5.0, 5.0]))
    assert admitted.tolist() == [False, True] and reasons[0] == "below_threshold"
