"""Statistical check of the calibration guarantee on held-out data.

Two overlapping Gaussian classes in D = 16 (1 % label noise) plus a far-away OOD cluster. The SDM estimator is fitted
on 2,000 training and 2,000 calibration points and evaluated on 4,000 held-out points. At alpha = 0.95 and 0.9 the
admitted accuracy must reach alpha for every true class (class-conditional) and every predicted class
(prediction-conditional), up to a finite-sample tolerance: a group fails when its accuracy is below alpha AND a
Binomial(n, alpha) would produce that few correct answers with probability < 1e-3 (one-sided exact binomial test;
for n = 300 at alpha = 0.95 this tolerates about 0.04 below alpha, shrinking as 1/sqrt(n)). A group with nothing
admitted is vacuous; the test requires enough admissions overall that it can fail. At least 99 % of the far-away
cluster must not be admitted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdm_core import SDMConfig, SDMEstimator

D = 16
SEPARATION = 3.0  # distance between the class means: Bayes accuracy ~93 %, so much of the space is ambiguous
LABEL_NOISE = 0.01
P_VALUE = 1e-3


def _gaussians(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    direction = np.ones(D) / math.sqrt(D)
    x = rng.normal(size=(n, D)) + np.where(y[:, None] == 1, SEPARATION / 2, -SEPARATION / 2) * direction
    flip = rng.random(n) < LABEL_NOISE
    return x.astype(np.float32), np.where(flip, 1 - y, y)


def binomial_lower_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def test_binomial_lower_tail_matches_direct_sum():
    n, p = 12, 0.9
    direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(9))
    assert binomial_lower_tail(8, n, p) == pytest.approx(direct, rel=1e-12)
    assert binomial_lower_tail(12, n, p) == 1.0
    # the tolerance it implies: 270 of 300 correct (0.90) is significantly below 0.95, 280 (0.933) is not
    assert binomial_lower_tail(270, 300, 0.95) < P_VALUE < binomial_lower_tail(280, 300, 0.95)


@pytest.fixture(scope="module")
def experiment():
    rng = np.random.default_rng(0)
    x_train, y_train = _gaussians(rng, 2000)
    x_cal, y_cal = _gaussians(rng, 2000)
    x_test, y_test = _gaussians(rng, 4000)
    x_ood = (rng.normal(size=(1000, D)) + 25.0).astype(np.float32)  # ~100 units from both classes
    # The reference learning rate (1e-5) needs the paper's 200 epochs; 3e-3 converges in 15 epochs here. The point of
    # this test is the calibration guarantee of the regions, not the optimiser.
    config = SDMConfig(exemplar_dim=64, epochs=15, learning_rate=3e-3, progress=False, seed=0)
    estimator = SDMEstimator(config).fit(x_train, y_train, x_cal, y_cal)
    return estimator, x_test, torch.as_tensor(y_test), x_ood


def _check_group(name: str, correct: torch.Tensor, alpha: float) -> int:
    n = int(correct.numel())
    if n == 0:
        return 0  # vacuous: nothing admitted in this group
    k = int(correct.sum())
    accuracy = k / n
    p = binomial_lower_tail(k, n, alpha)
    assert accuracy >= alpha or p >= P_VALUE, (
        f"{name}: admitted accuracy {accuracy:.4f} ({k}/{n}) is significantly below alpha={alpha} (P = {p:.2e})"
    )
    return n


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.95, 0.9])
def test_admitted_accuracy_reaches_alpha_per_true_and_predicted_class(experiment, alpha):
    estimator, x_test, y_test, _ = experiment
    scores = estimator.predict_scores(x_test, alpha=alpha)
    admitted = scores.admitted
    correct = scores.predictions == y_test
    total = int(admitted.sum())
    assert total >= 100, (
        f"only {total} of {len(y_test)} test points admitted at alpha={alpha}; the check would be vacuous"
    )
    assert total < len(y_test)  # overlapping classes: the estimator must abstain somewhere
    checked = 0
    for c in (0, 1):
        checked += _check_group(f"true class {c}", correct[admitted & (y_test == c)], alpha)
        _check_group(f"predicted class {c}", correct[admitted & (scores.predictions == c)], alpha)
    assert checked == total
    _check_group("marginal", correct[admitted], alpha)
    # the admitted set is selective: more accurate than the classifier on all points
    assert float(correct[admitted].float().mean()) > float(correct.float().mean())


@pytest.mark.slow
def test_regions_are_nested_on_held_out_data(experiment):
    estimator, x_test, _, _ = experiment
    at95 = estimator.predict_scores(x_test, alpha=0.95).admitted
    at90 = estimator.predict_scores(x_test, alpha=0.9).admitted
    assert not bool((at95 & ~at90).any())
    assert int(at90.sum()) > int(at95.sum())


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.95, 0.9])
def test_far_away_ood_cluster_is_not_admitted(experiment, alpha):
    estimator, _, _, x_ood = experiment
    scores = estimator.predict_scores(x_ood, alpha=alpha)
    admitted_fraction = float(scores.admitted.float().mean())
    assert admitted_fraction <= 0.01, f"{admitted_fraction:.3%} of the far-away cluster admitted at alpha={alpha}"
