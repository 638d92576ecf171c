"""The SDM formulas of sdm_core.math against SDM_SPEC §6.1 (items 1-9, 11), §2.1 and §2.3, plus input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdm_core.adaptor import ExemplarAdaptor
from sdm_core.math import (
    check_alpha,
    distance_quantile,
    dkw_epsilon,
    effective_sample_sizes,
    rescaled_similarity,
    sdm_log_probabilities,
    sdm_loss,
    sdm_probabilities,
    similarity_from_matches,
)
from sdm_core.support import SupportIndex

E_MINUS_2 = math.e - 2.0
Z13 = torch.tensor([1.0, 3.0], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 1: q = e - 2, d = 1 is the softmax
# --------------------------------------------------------------------------------------------------------------
def test_sdm_with_q_e_minus_2_and_d_1_equals_softmax_on_example():
    out = sdm_probabilities(Z13, E_MINUS_2, 1.0)
    assert torch.allclose(out, torch.tensor([0.119203, 0.880797], dtype=torch.float64), atol=1e-6)


def test_sdm_with_q_e_minus_2_and_d_1_equals_softmax_on_random_logits():
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    assert torch.allclose(sdm_probabilities(z, E_MINUS_2, 1.0), torch.softmax(z, dim=1), atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 2: d = 0 gives the uniform distribution, whatever q
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3, 7])
@pytest.mark.parametrize("q", [0.0, 1.0, 17.0, 2048.0])
def test_distance_zero_gives_uniform_output_for_any_q(num_classes, q):
    z = torch.randn(10, num_classes, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    out = sdm_probabilities(z, q, 0.0)
    assert torch.allclose(out, torch.full_like(out, 1.0 / num_classes), atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 3: for d > 0 the argmax of SDM is the argmax of z'
# --------------------------------------------------------------------------------------------------------------
def test_argmax_of_sdm_equals_argmax_of_logits_for_positive_distance():
    g = torch.Generator().manual_seed(2)
    n = 2000
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) * 3
    q = torch.randint(0, 3000, (n,), generator=g).to(torch.float64)
    d = torch.rand(n, generator=g, dtype=torch.float64) * 0.999 + 0.001
    out = sdm_probabilities(z, q, d)
    assert torch.equal(out.argmax(dim=1), z.argmax(dim=1))


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 4: SDM_yhat is non-decreasing in q and in d
# --------------------------------------------------------------------------------------------------------------
def test_predicted_class_probability_is_non_decreasing_in_q():
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yhat = z.argmax(dim=1, keepdim=True)
    qs = [0, 0.5, 1, 2, 3, 10, 100, 2048]
    rows = [sdm_probabilities(z, q, 0.7).gather(1, yhat).squeeze(1) for q in qs]
    stacked = torch.stack(rows, dim=1)
    assert bool((stacked[:, 1:] >= stacked[:, :-1] - 1e-15).all())
    assert bool((stacked[:, -1] > stacked[:, 0]).all())  # strictly more confident with a larger base


def test_predicted_class_probability_is_non_decreasing_in_d():
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    yhat = z.argmax(dim=1, keepdim=True)
    ds = torch.linspace(0, 1, 21, dtype=torch.float64)
    stacked = torch.stack([sdm_probabilities(z, 5.0, float(d)).gather(1, yhat).squeeze(1) for d in ds], dim=1)
    assert bool((stacked[:, 1:] >= stacked[:, :-1] - 1e-15).all())
    assert bool((stacked[:, -1] > stacked[:, 0]).all())


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 5: the z' = (1, 3) table (target class 0)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q, d, expected, loss",
    [
        (0.0, 0.5, (1 / 3, 2 / 3), 1.5850),
        (0.0, 1.0, (0.2, 0.8), 2.3219),
        (1.0, 0.5, (0.25, 0.75), 1.2619),
        (1.0, 1.0, (0.1, 0.9), 2.0959),
        (100.0, 1.0, (9.6e-5, 0.999904), 2.0000),
        (0.0, 0.0, (0.5, 0.5), 1.0),
        (1.0, 0.0, (0.5, 0.5), 0.6309),
    ],
)
def test_sdm_outputs_and_losses_match_spec_table_for_logits_1_3(q, d, expected, loss):
    out = sdm_probabilities(Z13, q, d)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-3)
    value = float(sdm_loss(Z13.unsqueeze(0), q, d, [0]))
    assert value == pytest.approx(loss, abs=1e-4)


def test_loss_at_distance_zero_is_one_over_log2_of_base():
    for q in [0.0, 1.0, 5.0, 300.0]:
        value = float(sdm_loss(Z13.unsqueeze(0), q, 0.0, [0]))
        assert value == pytest.approx(1.0 / math.log2(2.0 + q), rel=1e-9)


def test_log_probabilities_are_logs_in_base_two_plus_q():
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    q = torch.arange(20, dtype=torch.float64) * 7
    d = torch.linspace(0.05, 1, 20, dtype=torch.float64)
    logp = sdm_log_probabilities(z, q, d)
    p = sdm_probabilities(z, q, d)
    assert torch.allclose(torch.pow((2.0 + q).unsqueeze(1), logp), p, atol=1e-12)
    per_item = sdm_loss(z, q, d, torch.zeros(20, dtype=torch.long), reduction="none")
    assert torch.allclose(per_item, -logp[:, 0], atol=1e-12)


def test_loss_reductions_mean_sum_none_are_consistent():
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    none = sdm_loss(z, 3.0, 0.4, y, reduction="none")
    assert none.shape == (8,)
    assert float(sdm_loss(z, 3.0, 0.4, y, reduction="sum")) == pytest.approx(float(none.sum()))
    assert float(sdm_loss(z, 3.0, 0.4, y)) == pytest.approx(float(none.mean()))


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 6: Eq. 1 (q := s, d = 1) equals CE at beta = e; ln beta in [ln 2, ln 3]; §3.4 numeric example
# --------------------------------------------------------------------------------------------------------------
def test_sdm_loss_equals_cross_entropy_at_q_e_minus_2_and_d_1():
    z = torch.randn(32, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    y = torch.randint(0, 6, (32,), generator=torch.Generator().manual_seed(8))
    assert float(sdm_loss(z, E_MINUS_2, 1.0, y)) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-12)


def test_sdm_loss_gradient_is_finite_and_equals_cross_entropy_gradient_at_base_e():
    z = (torch.randn(16, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(10))
    (grad_sdm,) = torch.autograd.grad(sdm_loss(z, E_MINUS_2, 1.0, y), z)
    (grad_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    assert bool(torch.isfinite(grad_sdm).all())
    assert torch.allclose(grad_sdm, grad_ce, atol=1e-12)


@pytest.mark.parametrize("q", [0.0, 1.0, E_MINUS_2, 2048.0])
@pytest.mark.parametrize("d", [0.0, 0.5, 1.0])
def test_sdm_loss_gradient_is_finite_for_extreme_logits(q, d):
    z = torch.tensor([[60.0, -60.0], [-80.0, 80.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([1, 0, 1])
    loss = sdm_loss(z, q, d, y)
    (grad,) = torch.autograd.grad(loss, z)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize(
    "s, expected", [(0.0, 0.9844), (0.5, 0.5900), (0.9, 0.4346), (1.0, 0.4064), (E_MINUS_2, 0.4952)]
)
def test_next_token_loss_example_from_spec_3_4(s, expected):
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=torch.float64)
    # beta = 2 + s in [2, 3] (ln beta in [0.693, 1.099]); beta = e gives the cross-entropy 0.4952
    assert float(sdm_loss(z, s, 1.0, [0])) == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 7 and §2.1: rescaled similarity q'
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q, p, expected", [(100, 0.99, 97.39), (10, 0.97, 10.0), (2048, 1.0, 2048.0), (1, 0.5, 1.0), (0, 0.9, 0.0)]
)
def test_rescaled_similarity_examples_from_spec_2_1(q, p, expected):
    assert float(rescaled_similarity(float(q), p)) == pytest.approx(expected, abs=5e-3)


def test_rescaled_similarity_is_q_when_q_is_1_for_any_probability():
    p = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(rescaled_similarity(torch.ones(11, dtype=torch.float64), p), torch.ones(11, dtype=torch.float64))


def test_rescaled_similarity_invariants_q_prime_le_q_zero_iff_zero_floor_ge_1_iff_q_ge_1():
    g = torch.Generator().manual_seed(11)
    q = torch.cat([torch.arange(0, 3001), torch.zeros(50, dtype=torch.long)]).to(torch.float64)
    p = torch.rand(q.shape[0], generator=g, dtype=torch.float64)
    p[:100] = 0.0
    p[100:200] = 1.0
    qp = rescaled_similarity(q, p)
    assert bool((qp <= q).all())
    assert torch.equal(qp == 0, q == 0)
    assert torch.equal(torch.floor(qp) >= 1, q >= 1)
    # q' < q happens (the cap is not vacuous) only for large q
    assert bool((qp < q).any())


def test_rescaled_similarity_of_real_sdm_outputs_keeps_invariants():
    g = torch.Generator().manual_seed(12)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64) * 3
    q = torch.randint(0, 200, (500,), generator=g).to(torch.float64)
    d = torch.rand(500, generator=g, dtype=torch.float64)
    p = sdm_probabilities(z, q, d)
    qp = rescaled_similarity(q, p.gather(1, z.argmax(dim=1, keepdim=True)).squeeze(1))
    assert bool((qp <= q).all())
    assert torch.equal(qp == 0, q == 0)
    assert torch.equal(torch.floor(qp) >= 1, q >= 1)


def test_similarity_from_matches_is_leading_run_length():
    m = torch.tensor(
        [[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]],
        dtype=torch.bool,
    )
    assert similarity_from_matches(m).tolist() == [2, 0, 4, 1]


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 8: bounds on q from the support index
# --------------------------------------------------------------------------------------------------------------
def test_q_bounded_by_support_size_minus_one_for_training_points_and_support_size_otherwise():
    rng = np.random.default_rng(13)
    n = 60
    x = rng.normal(size=(n, 3)).astype(np.float32)
    labels = np.zeros(n, dtype=np.int64)
    index = SupportIndex(x, labels, labels)  # every point correct and predicted 0: all neighbours match
    train = index.similarity(x, labels, exclude=np.arange(n))
    other = index.similarity(rng.normal(size=(10, 3)).astype(np.float32), np.zeros(10, dtype=np.int64))
    assert bool((train.q == n - 1).all())
    assert bool((other.q == n).all())


def test_q_capped_at_2048_and_2047_for_training_points_when_support_is_larger():
    n = 2100
    x = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    labels = np.zeros(n, dtype=np.int64)
    index = SupportIndex(x, labels, labels)
    assert index.k() == 2048
    train = index.similarity(x[:5], labels[:5], exclude=np.arange(5))
    other = index.similarity(x[:5] + 0.25, labels[:5])
    assert train.q.tolist() == [2047] * 5
    assert other.q.tolist() == [2048] * 5


def test_q_bounded_by_number_of_correct_support_points_predicting_the_query_class():
    rng = np.random.default_rng(14)
    n = 200
    x = rng.normal(size=(n, 2)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    predictions = np.where(rng.random(n) < 0.7, labels, 1 - labels)
    index = SupportIndex(x, labels, predictions)
    queries = rng.normal(size=(300, 2)).astype(np.float32) * 0.3
    for cls in (0, 1):
        res = index.similarity(queries, np.full(300, cls))
        bound = int(((labels == predictions) & (predictions == cls)).sum())
        assert int(res.q.max()) <= bound
        assert int(res.q.max()) > 0


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 9 and §2.3: DKW epsilon
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, expected", [(100, 0.1358), (1000, 0.04295), (2500, 0.02716)])
def test_dkw_epsilon_values_at_alpha_095(n, expected):
    assert float(dkw_epsilon(n, 0.95)) == pytest.approx(expected, abs=5e-5)
    assert float(dkw_epsilon(n, 0.95)) == pytest.approx(math.sqrt(math.log(40.0) / (2 * n)), rel=1e-12)


def test_dkw_epsilon_is_one_for_zero_sample_size():
    # (d_lower = clamp(d - 1, 0, 1) = 0 for such rows is checked on the estimator in test_estimator.py)
    eps = dkw_epsilon(torch.tensor([0.0, 0.0, 100.0]), 0.95)
    assert eps.tolist()[:2] == [1.0, 1.0]
    assert eps[2].item() == pytest.approx(0.1358, abs=5e-5)


def test_dkw_epsilon_uses_alpha_in_numerator():
    assert float(dkw_epsilon(100, 0.9)) == pytest.approx(math.sqrt(math.log(20.0) / 200.0), rel=1e-12)
    assert float(dkw_epsilon(100, 0.9)) < float(dkw_epsilon(100, 0.95))


def test_dkw_epsilon_decreases_with_sample_size():
    eps = dkw_epsilon(torch.arange(1, 200, dtype=torch.float64), 0.95)
    assert bool((eps[1:] < eps[:-1]).all())


# --------------------------------------------------------------------------------------------------------------
# §6.1 item 11: parameter count of the exemplar adaptor
# --------------------------------------------------------------------------------------------------------------
def test_exemplar_adaptor_parameter_count_for_paper_configuration():
    adaptor = ExemplarAdaptor(6144, 1000, 2)
    assert sum(p.numel() for p in adaptor.parameters()) == 6_147_002


def test_exemplar_adaptor_is_affine_without_nonlinearity():
    torch.manual_seed(0)
    adaptor = ExemplarAdaptor(5, 7, 3)
    a, b = torch.randn(1, 5), torch.randn(1, 5)
    za, ha = adaptor(a)
    zb, hb = adaptor(b)
    zm, hm = adaptor((a + b) / 2)
    assert torch.allclose(hm, (ha + hb) / 2, atol=1e-5)
    assert torch.allclose(zm, (za + zb) / 2, atol=1e-5)
    assert za.shape == (1, 3) and ha.shape == (1, 7)


# --------------------------------------------------------------------------------------------------------------
# distance_quantile: strict "<" (SDM_SPEC §1.5)
# --------------------------------------------------------------------------------------------------------------
CDF0 = [1.0, 2.0, 3.0, 4.0]
CDF1 = [2.0, 2.0, 5.0]


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.0, 1.0),  # below every value
        (1.0, 1.0),  # equal to the minimum of class 0: nothing strictly below
        (2.0, 0.75),  # class 0: one value < 2 -> 3/4; class 1: none < 2 -> 1
        (2.5, 1 / 3),  # class 0: two values < 2.5 -> 1/2; class 1: two of three < 2.5 -> 1/3
        (4.0, 0.25),  # class 0: 3 below -> 1/4; class 1: 2 below -> 1/3
        (4.5, 0.0),  # above the maximum of class 0
        (9.0, 0.0),  # above every maximum
    ],
)
def test_distance_quantile_strict_less_than_semantics(value, expected):
    assert float(distance_quantile(torch.tensor([value]), [CDF0, CDF1])[0]) == pytest.approx(expected, abs=1e-7)


def test_distance_quantile_takes_minimum_over_classes_regardless_of_prediction():
    d = distance_quantile(torch.tensor([3.0]), [[10.0, 11.0], [1.0, 2.0]])
    assert float(d[0]) == 0.0


def test_distance_quantile_with_an_empty_class_is_zero_everywhere():
    d = distance_quantile(torch.tensor([0.0, 1.0, 100.0]), [[1.0, 2.0], []])
    assert d.tolist() == [0.0, 0.0, 0.0]


def test_distance_quantile_keeps_shape_and_dtype():
    x = torch.tensor([0.5, 1.5, 3.5], dtype=torch.float32)
    d = distance_quantile(x, [CDF0, CDF1])
    assert d.shape == (3,) and d.dtype == torch.float32
    assert distance_quantile(torch.tensor(1.5), [CDF0, CDF1]).shape == ()


# --------------------------------------------------------------------------------------------------------------
# effective_sample_sizes: paper (<=, no cap) and reference (<, capped at n_c - 1)
# --------------------------------------------------------------------------------------------------------------
QCDF0 = [0.0, 1.0, 1.0, 2.0, 3.0]
QCDF1 = [1.5, 4.0]
QUERIES = [0.0, 1.0, 2.5, 5.0]


def test_effective_sample_sizes_paper_rule_counts_less_or_equal_without_cap():
    ess = effective_sample_sizes(QUERIES, [QCDF0, QCDF1])
    assert ess.dtype == torch.float64 and ess.shape == (4, 2)
    assert ess.tolist() == [[1, 0], [3, 0], [4, 1], [5, 2]]


def test_effective_sample_sizes_reference_rule_counts_strictly_less_capped_at_n_minus_1():
    ess = effective_sample_sizes(QUERIES, [QCDF0, QCDF1], rule="reference")
    assert ess.tolist() == [[0, 0], [1, 0], [4, 1], [4, 1]]


def test_effective_sample_sizes_default_rule_is_paper():
    assert torch.equal(
        effective_sample_sizes(QUERIES, [QCDF0, QCDF1]), effective_sample_sizes(QUERIES, [QCDF0, QCDF1], rule="paper")
    )


def test_effective_sample_sizes_of_empty_class_are_zero_under_both_rules():
    for rule in ("paper", "reference"):
        ess = effective_sample_sizes([0.0, 3.0], [[1.0, 2.0], []], rule=rule)
        assert ess[:, 1].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------------------------------
# Validation: ValueError naming the argument
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.01, float("nan"), 0.0, -1.0, "abc", None])
def test_check_alpha_refuses_values_outside_half_open_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(alpha)


@pytest.mark.parametrize("alpha", [0.5000001, 0.95, 1.0])
def test_check_alpha_accepts_values_in_half_open_interval(alpha):
    assert check_alpha(alpha) == alpha


@pytest.mark.parametrize("alpha", [0.5, 1.01, float("nan")])
def test_dkw_epsilon_refuses_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        dkw_epsilon(10, alpha)


def test_negative_q_refused_naming_q():
    with pytest.raises(ValueError, match=r"\bq\b"):
        sdm_probabilities(Z13, -1.0, 0.5)
    with pytest.raises(ValueError, match=r"\bq\b"):
        sdm_loss(Z13.unsqueeze(0), torch.tensor([-0.5]), 0.5, [0])
    with pytest.raises(ValueError, match=r"\bq\b"):
        rescaled_similarity(-1.0, 0.5)


@pytest.mark.parametrize("d", [-0.01, 1.01, 2.0])
def test_distance_outside_unit_interval_refused_naming_d(d):
    with pytest.raises(ValueError, match=r"\bd\b"):
        sdm_probabilities(Z13, 1.0, d)
    with pytest.raises(ValueError, match=r"\bd\b"):
        sdm_log_probabilities(Z13, 1.0, d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_refused_naming_logits(bad):
    with pytest.raises(ValueError, match="logits"):
        sdm_probabilities(torch.tensor([[1.0, bad]]), 1.0, 0.5)
    with pytest.raises(ValueError, match="logits"):
        sdm_loss(torch.tensor([[1.0, bad]]), 1.0, 0.5, [0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_q_or_d_refused(bad):
    with pytest.raises(ValueError, match=r"\bq\b"):
        sdm_probabilities(Z13, bad, 0.5)
    with pytest.raises(ValueError, match=r"\bd\b"):
        sdm_probabilities(Z13, 1.0, bad)


@pytest.mark.parametrize("logits", [torch.zeros(2, 2, 2), torch.zeros(3, 1), torch.tensor(1.0), torch.zeros(1)])
def test_wrongly_shaped_logits_refused_naming_logits(logits):
    with pytest.raises(ValueError, match="logits"):
        sdm_probabilities(logits, 1.0, 0.5)


def test_q_and_d_with_wrong_length_refused_naming_them():
    z = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"\bq\b"):
        sdm_probabilities(z, torch.ones(2), 0.5)
    with pytest.raises(ValueError, match=r"\bd\b"):
        sdm_probabilities(z, 1.0, torch.ones(4) * 0.5)
    with pytest.raises(ValueError, match=r"\bq\b"):
        sdm_probabilities(z, torch.ones(3, 1), 0.5)


def test_sdm_loss_refuses_bad_labels_and_reduction():
    z = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="labels"):
        sdm_loss(z, 1.0, 0.5, [0, 1])
    with pytest.raises(ValueError, match="labels"):
        sdm_loss(z, 1.0, 0.5, [0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        sdm_loss(z, 1.0, 0.5, [0, -1, 1])
    with pytest.raises(ValueError, match="reduction"):
        sdm_loss(z, 1.0, 0.5, [0, 1, 0], reduction="max")


def test_rescaled_similarity_refuses_bad_probability_and_shapes():
    with pytest.raises(ValueError, match="p_predicted"):
        rescaled_similarity(3.0, 1.5)
    with pytest.raises(ValueError, match="p_predicted"):
        rescaled_similarity(3.0, -0.1)
    with pytest.raises(ValueError, match="p_predicted"):
        rescaled_similarity(3.0, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        rescaled_similarity(torch.ones(3), torch.ones(2) * 0.5)


def test_distance_quantile_validation_names_arguments():
    with pytest.raises(ValueError, match="d_nearest"):
        distance_quantile(torch.tensor([-1.0]), [CDF0, CDF1])
    with pytest.raises(ValueError, match="d_nearest"):
        distance_quantile(torch.zeros(2, 2), [CDF0, CDF1])
    with pytest.raises(ValueError, match="d_nearest"):
        distance_quantile(torch.tensor([float("nan")]), [CDF0, CDF1])
    with pytest.raises(ValueError, match="sorted"):
        distance_quantile(torch.tensor([1.0]), [[3.0, 1.0], CDF1])
    with pytest.raises(ValueError, match="class_cdfs"):
        distance_quantile(torch.tensor([1.0]), [CDF0])


def test_effective_sample_sizes_validation_names_arguments():
    with pytest.raises(ValueError, match="rule"):
        effective_sample_sizes([1.0], [QCDF0, QCDF1], rule="strict")
    with pytest.raises(ValueError, match="q_prime"):
        effective_sample_sizes([-1.0], [QCDF0, QCDF1])
    with pytest.raises(ValueError, match="sorted"):
        effective_sample_sizes([1.0], [[2.0, 1.0], QCDF1])


def test_dkw_epsilon_refuses_negative_sample_size():
    with pytest.raises(ValueError, match=r"\bn\b"):
        dkw_epsilon(-1, 0.95)


def test_exemplar_adaptor_refuses_bad_dimensions_and_constant_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        ExemplarAdaptor(4, 3, 1)
    with pytest.raises(ValueError, match="input_dim"):
        ExemplarAdaptor(0, 3, 2)
    with pytest.raises(ValueError, match="std"):
        ExemplarAdaptor(4, 3, 2).set_normalization(0.0, 0.0)
