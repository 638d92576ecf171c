"""SDMEstimator end to end on small synthetic data: fit, score, artifact round trip and tamper refusal, determinism,
self-exclusion, OOD exemplars, recalibration, exemplars, and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdm_core import SDMConfig, SDMEstimator, SDMScores
from sdm_core.artifact import ArtifactError, canonical_json
from sdm_core.calibration import fit_region
from sdm_core.estimator import NotFittedError
from sdm_core.fitting import class_cdfs
from sdm_core.math import distance_quantile, dkw_epsilon, effective_sample_sizes, rescaled_similarity, sdm_probabilities
from sdm_core.support import OOD_LABEL

D = 16
# The reference learning rate (1e-5) needs ~200 epochs; 1e-3 lets this small layer learn in a few epochs, which is
# all these tests need (they check the estimator's bookkeeping, not the optimiser).
CONFIG = SDMConfig(exemplar_dim=32, epochs=10, learning_rate=1e-3, progress=False, seed=0)
ARTIFACT_FILES = ["weights.safetensors", "support.safetensors", "calibration.safetensors", "ids.json", "manifest.json"]


def _make(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, D)) + np.where(y[:, None] == 1, 1.0, 0.0)
    flip = rng.random(n) < 0.03
    return x.astype(np.float32), np.where(flip, 1 - y, y)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    xtr, ytr = _make(rng, 300)
    xca, yca = _make(rng, 300)
    xte, yte = _make(rng, 200)
    far = (rng.normal(size=(20, D)) + 30.0).astype(np.float32)
    return {"xtr": xtr, "ytr": ytr, "xca": xca, "yca": yca, "xte": np.concatenate([xte, far]), "yte": yte}


@pytest.fixture(scope="module")
def fitted(data):
    ids = [f"tr{i}" for i in range(300)]
    return SDMEstimator(CONFIG).fit(data["xtr"], data["ytr"], data["xca"], data["yca"], train_ids=ids)


@pytest.fixture(scope="module")
def artifact(fitted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifact") / "est"
    fitted.save(folder)
    return folder


@pytest.fixture
def fresh(artifact):
    """An independent estimator (loaded from the artifact) that a test may modify."""
    return SDMEstimator.load(artifact)


@pytest.fixture
def copy(artifact, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


TENSOR_FIELDS = [
    f.name
    for f in dataclasses.fields(SDMScores)
    if f.name not in ("alpha", "region_alpha", "abstention_reason", "nearest_id", "exemplars")
]


def _assert_scores_identical(a, b):
    for name in TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.alpha == b.alpha
    assert a.region_alpha == b.region_alpha
    assert a.abstention_reason == b.abstention_reason
    assert a.nearest_id == b.nearest_id
    assert a.exemplars == b.exemplars


def _mixed_support_ids(n):
    return [f"tr{i}" if i % 3 == 0 else None for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# artifact round trip and refusal
# --------------------------------------------------------------------------------------------------------------
def test_fixture_admits_some_points_so_comparisons_are_not_vacuous(fitted, data):
    scores = fitted.predict_scores(data["xte"])
    assert 0 < int(scores.admitted.sum()) < len(scores)


def test_score_is_a_deprecated_alias_of_predict_scores(fitted, data):
    x = data["xte"][:20]
    ids = _mixed_support_ids(20)
    with pytest.warns(DeprecationWarning, match="predict_scores"):
        old = fitted.score(x, alpha=0.9, support_ids=ids, return_exemplars=2)
    _assert_scores_identical(old, fitted.predict_scores(x, alpha=0.9, support_ids=ids, return_exemplars=2))


def test_artifact_round_trip_gives_bit_identical_scores(fitted, artifact, data):
    loaded = SDMEstimator.load(artifact)
    x = np.concatenate([data["xte"], data["xtr"][:30]])
    ids = [None] * len(data["xte"]) + [f"tr{i}" for i in range(30)]
    for alpha in (None, 0.9, 0.99):
        a = fitted.predict_scores(x, alpha=alpha, support_ids=ids, return_exemplars=3)
        b = loaded.predict_scores(x, alpha=alpha, support_ids=ids, return_exemplars=3)
        _assert_scores_identical(a, b)
    assert loaded.ladder.to_dict() == fitted.ladder.to_dict()
    assert loaded.config == fitted.config
    assert loaded.support.ids == fitted.support.ids
    assert torch.equal(loaded.predict(x), fitted.predict(x))


def test_artifact_contains_expected_files(artifact):
    assert sorted(p.name for p in Path(artifact).iterdir() if not p.name.startswith(".")) == sorted(ARTIFACT_FILES)


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ARTIFACT_FILES)
def test_modified_artifact_file_is_refused(copy, name):
    path = copy / name
    if name == "ids.json":
        ids = json.loads(path.read_text())
        ids["support"][0] = "someone-else"
        path.write_text(json.dumps(ids))
    elif name == "manifest.json":
        manifest = json.loads(path.read_text())
        manifest["regions"]["regions"][0]["thresholds"][0] = 0.0  # a tempting edit: loosen a threshold
        path.write_text(json.dumps(manifest))
    else:
        _flip_byte(path)
    with pytest.raises(ArtifactError, match=re.escape(name)):  # refused, naming the file
        SDMEstimator.load(copy)


@pytest.mark.parametrize("name", ARTIFACT_FILES)
def test_missing_artifact_file_is_refused(copy, name):
    (copy / name).unlink()
    with pytest.raises(ArtifactError, match=re.escape(name)):
        SDMEstimator.load(copy)


def test_nonexistent_artifact_folder_is_refused_as_a_wrong_path(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact folder"):
        SDMEstimator.load(tmp_path / "nothing-here")


def _rewrite_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
    path.write_text(json.dumps(manifest))


def test_rewritten_manifest_with_valid_checksum_still_loads(copy):
    # control for the version tests below: re-signing an unchanged manifest is accepted
    _rewrite_manifest(copy)
    SDMEstimator.load(copy)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version_is_refused(copy, version):
    _rewrite_manifest(copy, format_version=version)
    with pytest.raises(ArtifactError, match="format_version"):
        SDMEstimator.load(copy)


def test_wrong_format_name_is_refused(copy):
    _rewrite_manifest(copy, format="something-else")
    with pytest.raises(ArtifactError, match="format"):
        SDMEstimator.load(copy)


def test_a_refused_artifact_is_a_value_error_and_a_cli_usage_error(copy, capsys):
    """Callers catch bad input as ValueError (the training CLIs do), and python -m sdm_core reports a refused
    artifact as a usage error (exit status 2) naming the file, not as a traceback."""
    from sdm_core.cli import main

    _flip_byte(copy / "weights.safetensors")
    with pytest.raises(ValueError, match="weights.safetensors"):
        SDMEstimator.load(copy)
    assert main(["recalibrate", "--artifact", str(copy), "--alphas", "0.9"]) == 2
    assert "error:" in (err := capsys.readouterr().err) and "weights.safetensors" in err


# --------------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------------
def test_fit_is_deterministic_for_a_seed_and_differs_across_seeds(data):
    cfg = dataclasses.replace(CONFIG, epochs=4)
    args = (data["xtr"], data["ytr"], data["xca"], data["yca"])
    a = SDMEstimator(cfg).fit(*args)
    b = SDMEstimator(cfg).fit(*args)
    c = SDMEstimator(dataclasses.replace(cfg, seed=1)).fit(*args)
    sa, sb = a.adaptor.state_dict(), b.adaptor.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    _assert_scores_identical(a.predict_scores(data["xte"]), b.predict_scores(data["xte"]))
    sc = c.adaptor.state_dict()
    assert not torch.equal(sa["exemplar.weight"], sc["exemplar.weight"])
    assert not torch.equal(a.predict_scores(data["xte"]).logits, c.predict_scores(data["xte"]).logits)


def test_fit_does_not_change_global_torch_rng(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SDMEstimator(dataclasses.replace(CONFIG, epochs=1)).fit(data["xtr"], data["ytr"], data["xca"], data["yca"])
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------------------------------------
# score fields
# --------------------------------------------------------------------------------------------------------------
def test_score_fields_are_consistent(fitted, data):
    s = fitted.predict_scores(data["xte"])
    n = len(s)
    assert torch.allclose(s.probabilities.sum(dim=1), torch.ones(n), atol=1e-5)
    assert torch.equal(s.predictions, s.logits.argmax(dim=1))
    assert torch.equal(s.predictions, fitted.predict(data["xte"]))
    assert s.q.dtype == torch.int64 and bool((s.q >= 0).all()) and bool((s.q <= fitted.support.k()).all())
    assert bool(((s.d >= 0) & (s.d <= 1)).all())
    assert bool((s.q_prime <= s.q.to(s.q_prime.dtype)).all())
    assert torch.equal(s.is_ood, s.q == 0)
    assert not bool((s.admitted & s.is_ood).any())
    # HR_lower implies HR: SDM_lower_yhat <= SDM_yhat, q'_lower <= q', same regions (C = 2, psi > 0.5)
    assert not bool((s.admitted_lower & ~s.admitted).any())
    assert bool((s.d_lower <= s.d).all()) and bool((s.d <= s.d_upper).all())
    p, pl, pu = (
        s.probability_predicted,
        s.probability_predicted_lower,
        s.probabilities_upper.gather(1, s.predictions.unsqueeze(1)).squeeze(1),
    )
    assert bool((pl <= p + 1e-6).all()) and bool((p <= pu + 1e-6).all())
    assert bool((s.q_prime_lower <= s.q_prime + 1e-5).all())
    for i in range(n):
        assert (s.abstention_reason[i] is None) == bool(s.admitted[i])
        if s.admitted[i]:
            assert s.region_alpha[i] is not None and s.region_alpha[i] >= s.alpha
        if s.is_ood[i]:
            assert s.abstention_reason[i] == "ood"
    assert s.nearest_id == [fitted.support.ids[int(i)] for i in s.nearest_index]
    assert s.alpha == 0.95


def test_far_away_inputs_are_not_admitted(fitted, data):
    s = fitted.predict_scores(data["xte"][-20:])
    assert not bool(s.admitted.any())
    assert bool((s.d == 0).all())  # beyond every calibration distance


def test_effective_sample_sizes_and_dkw_band_follow_paper_rule(fitted, data):
    s = fitted.predict_scores(data["xte"])
    cal_q, cal_y = fitted.calibration.q_prime.double(), fitted.calibration_labels
    expected = torch.stack(
        [(cal_q[cal_y == c].unsqueeze(0) <= s.q_prime.double().unsqueeze(1)).sum(dim=1) for c in (0, 1)], dim=1
    )
    assert torch.equal(s.effective_sample_sizes, expected.double())
    eps = dkw_epsilon(s.effective_sample_sizes, 0.95).max(dim=1).values.float()
    assert torch.equal(s.epsilon, eps)
    assert torch.equal(s.d_lower, torch.clamp(s.d - eps, 0, 1))
    zero = s.effective_sample_sizes.min(dim=1).values == 0
    assert bool((s.epsilon[zero] == 1).all()) and bool((s.d_lower[zero] == 0).all())


def test_lower_band_outputs_follow_their_definitions(fitted, data):
    # SDM_lower uses d_lower; q'_lower = min(q, (2+q)^SDM_lower_yhat); HR_lower is the HR rule on (SDM_lower, q'_lower)
    # with the same regions, nested over the ladder like HR itself (ACT Eqs. 16-19).
    for alpha in (0.95, 0.9):
        s = fitted.predict_scores(data["xte"], alpha=alpha)
        q = s.q.to(s.logits.dtype)
        assert torch.allclose(s.probabilities_lower, sdm_probabilities(s.logits, q, s.d_lower), atol=1e-6)
        assert torch.allclose(s.probabilities_upper, sdm_probabilities(s.logits, q, s.d_upper), atol=1e-6)
        assert torch.allclose(s.q_prime_lower, rescaled_similarity(q, s.probability_predicted_lower), atol=1e-5)
        ladder = fitted.ladder
        own = ladder.admissions(s.probabilities_lower, s.predictions, s.q_prime_lower)
        column = ladder.alphas.index(alpha)
        assert torch.equal(s.admitted_lower, own[:, : column + 1].any(dim=1))
        assert 0 < int(s.admitted_lower.sum()) < int(s.admitted.sum())  # the band is neither vacuous nor inert


def test_effective_sample_sizes_reference_rule(fresh, data):
    fresh.config = dataclasses.replace(fresh.config, effective_sample_size_rule="reference")
    s = fresh.predict_scores(data["xte"])
    cdfs = [torch.sort(fresh.calibration.q_prime[fresh.calibration_labels == c].double()).values for c in (0, 1)]
    assert torch.equal(s.effective_sample_sizes, effective_sample_sizes(s.q_prime, cdfs, rule="reference"))
    assert bool((s.effective_sample_sizes[s.is_ood] == 0).all())  # nothing is strictly below q' = 0
    assert bool((s.epsilon[s.is_ood] == 1).all())


def test_scoring_calibration_split_reproduces_stored_calibration_outputs(fitted, data):
    s = fitted.predict_scores(data["xca"])
    cal = fitted.calibration
    assert torch.equal(s.logits, cal.logits)
    assert torch.equal(s.q, cal.q)
    assert torch.equal(s.d_nearest, cal.d_nearest)
    assert torch.equal(s.d, cal.d)
    assert torch.equal(s.probabilities, cal.probabilities)
    assert torch.equal(s.q_prime, cal.q_prime)
    for a in fitted.ladder.alphas:
        admitted = fitted.predict_scores(data["xca"], alpha=a).admitted
        assert int(admitted.sum()) == fitted.ladder.regions[a].calibration_admitted
        assert fitted.ladder.regions[a].calibration_size == len(data["yca"])


def test_calibration_cdfs_hold_distances_of_non_ood_calibration_points(fitted, data):
    s = fitted.predict_scores(data["xca"])
    expected = class_cdfs(s.d_nearest, torch.as_tensor(data["yca"]), s.q, 2)
    for got, want in zip(fitted.calibration_cdfs, expected):
        assert torch.equal(got, want)


def test_regions_are_algorithm1_over_stored_calibration(fitted):
    cal = fitted.calibration
    for a, region in fitted.ladder.regions.items():
        expected = fit_region(cal.probabilities, cal.q_prime, fitted.calibration_labels, a)
        assert (region.q_prime_min, region.thresholds) == (expected.q_prime_min, expected.thresholds)


def test_support_holds_training_exemplars_and_predictions(fitted, data):
    logits, exemplars = fitted.adaptor.infer(torch.as_tensor(data["xtr"]))
    assert torch.equal(fitted.support.exemplars, exemplars)
    assert torch.equal(fitted.support.predictions, logits.argmax(dim=1))
    assert fitted.support.labels.tolist() == list(data["ytr"])
    assert fitted.support.ids[:2] == ["tr0", "tr1"]


def test_records_are_json_ready_and_match_tensors(fitted, data):
    s = fitted.predict_scores(data["xte"][:10], return_exemplars=2)
    records = s.records()
    json.dumps(records, allow_nan=False)
    for i, r in enumerate(records):
        assert (
            r["q"] == int(s.q[i]) and r["admitted"] == bool(s.admitted[i]) and r["prediction"] == int(s.predictions[i])
        )
        assert r["floor_q_prime"] == math.floor(float(s.q_prime[i]))
        assert len(r["exemplars"]) == 2


# --------------------------------------------------------------------------------------------------------------
# self-exclusion through support_ids
# --------------------------------------------------------------------------------------------------------------
def test_support_ids_exclude_training_points_from_their_own_neighbours(fitted, data):
    x = data["xtr"]
    ids = [f"tr{i}" for i in range(len(x))]
    plain = fitted.predict_scores(x)
    excluded = fitted.predict_scores(x, support_ids=ids)
    own = torch.arange(len(x))
    assert torch.equal(plain.nearest_index, own)  # without exclusion each point finds itself
    assert bool((plain.d_nearest < 0.05).all())  # ~0, up to float32 cancellation in the distance expansion
    assert bool((excluded.nearest_index != own).all())
    assert bool((excluded.d_nearest > plain.d_nearest).all())
    assert bool((excluded.q <= fitted.support.k() - 1).all())
    assert bool((excluded.q != plain.q).any())
    assert torch.equal(excluded.logits, plain.logits)


def test_support_ids_use_training_distance_cdfs_and_reproduce_them(fitted, data):
    ids = [f"tr{i}" for i in range(len(data["xtr"]))]
    s = fitted.predict_scores(data["xtr"], support_ids=ids)
    assert torch.equal(s.d, distance_quantile(s.d_nearest, fitted.train_cdfs))
    expected = class_cdfs(s.d_nearest, torch.as_tensor(data["ytr"]), s.q, 2)
    for got, want in zip(fitted.train_cdfs, expected):
        assert torch.equal(got, want)


def test_support_ids_apply_per_row_and_unknown_ids_mean_no_exclusion(fitted, data):
    x = data["xtr"][:12]
    mixed = fitted.predict_scores(x, support_ids=_mixed_support_ids(12))
    plain = fitted.predict_scores(x)
    unknown = fitted.predict_scores(x, support_ids=["not-a-support-id"] * 12)
    _assert_scores_identical(unknown, plain)
    for i in range(12):
        if i % 3 == 0:
            assert int(mixed.nearest_index[i]) != i
        else:
            assert int(mixed.nearest_index[i]) == i and int(mixed.q[i]) == int(plain.q[i])


# --------------------------------------------------------------------------------------------------------------
# updating the support
# --------------------------------------------------------------------------------------------------------------
def test_add_ood_exemplars_lowers_q_near_them_without_changing_logits(fresh, data):
    before = fresh.predict_scores(data["xte"])
    targets = torch.nonzero(before.q > 3).flatten()[:5]
    assert targets.numel() == 5
    x_new = data["xte"][targets.numpy()]
    fresh.add_exemplars(x_new, ["ood"] * 5, [f"ood-{i}" for i in range(5)])
    assert len(fresh.support) == 305
    assert fresh.support.labels[-5:].tolist() == [OOD_LABEL] * 5
    after = fresh.predict_scores(data["xte"])
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.predictions, before.predictions)
    assert after.q[targets].tolist() == [0] * 5
    assert bool(after.is_ood[targets].all()) and not bool(after.admitted[targets].any())
    assert [after.abstention_reason[int(i)] for i in targets] == ["ood"] * 5
    assert [after.nearest_id[int(i)] for i in targets] == [f"ood-{i}" for i in range(5)]
    assert bool((after.q <= before.q).all())  # an exemplar no prediction matches can only shorten runs
    near = fresh.predict_scores(x_new + 1e-3)
    assert near.q.tolist() == [0] * 5


def test_support_with_added_ood_exemplars_round_trips(fresh, data, tmp_path):
    fresh.add_exemplars(data["xte"][:2], ["ood", 1], ["o0", "o1"])
    fresh.save(tmp_path / "u")
    again = SDMEstimator.load(tmp_path / "u")
    assert again.support.ids[-2:] == ["o0", "o1"] and again.support.labels[-2:].tolist() == [OOD_LABEL, 1]
    _assert_scores_identical(
        fresh.predict_scores(data["xte"], return_exemplars=2), again.predict_scores(data["xte"], return_exemplars=2)
    )


def test_add_labelled_exemplars_extends_support_with_model_predictions(fresh, data):
    x_new = data["xte"][:3]
    fresh.add_exemplars(x_new, [0, 1, "1"], ["n0", "n1", "n2"])
    assert fresh.support.ids[-3:] == ["n0", "n1", "n2"]
    assert fresh.support.labels[-3:].tolist() == [0, 1, 1]
    assert torch.equal(fresh.support.predictions[-3:], fresh.predict(x_new))
    assert fresh.predict_scores(x_new).nearest_id == ["n0", "n1", "n2"]


def test_add_exemplars_validation(fresh):
    x = np.zeros((2, D), dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        fresh.add_exemplars(x, ["ood", "cat"], ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        fresh.add_exemplars(x, [0, 2], ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        fresh.add_exemplars(x, [0], ["a", "b"])
    with pytest.raises(ValueError, match="dimension"):
        fresh.add_exemplars(np.zeros((2, D + 1), dtype=np.float32), [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        fresh.add_exemplars(x, [0, 1], ["tr0", "b"])


# --------------------------------------------------------------------------------------------------------------
# recalibration
# --------------------------------------------------------------------------------------------------------------
def test_recalibrate_changes_regions_not_probabilities(fresh, data):
    before = fresh.predict_scores(data["xte"])
    ladder = fresh.recalibrate([0.9, 0.8], default_alpha=0.8)
    assert ladder.alphas == (0.9, 0.8) and ladder.default_alpha == 0.8
    assert fresh.config.alpha == 0.8 and fresh.config.alpha_ladder == (0.9, 0.8)
    after = fresh.predict_scores(data["xte"])
    assert after.alpha == 0.8
    for name in ("logits", "q", "d", "probabilities", "q_prime", "d_nearest"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    with pytest.raises(ValueError, match="ladder"):
        fresh.predict_scores(data["xte"], alpha=0.95)
    cal = fresh.calibration
    for a in (0.9, 0.8):
        expected = fit_region(cal.probabilities, cal.q_prime, fresh.calibration_labels, a)
        assert fresh.ladder.regions[a].q_prime_min == expected.q_prime_min
    assert set(fresh.ladder.regions) == {0.9, 0.8}
    assert not torch.equal(after.admitted, before.admitted)  # the new regions change decisions


def test_recalibrate_nested_flag_switches_ladder_semantics(fresh, data):
    fresh.recalibrate([0.99, 0.95, 0.9], default_alpha=0.9, nested=False)
    assert fresh.ladder.nested is False
    s = fresh.predict_scores(data["xte"], alpha=0.9)
    own = fresh.ladder.admissions(s.probabilities, s.predictions, s.q_prime)
    assert torch.equal(s.admitted, own[:, fresh.ladder.alphas.index(0.9)])


def test_recalibrated_estimator_round_trips(fresh, data, tmp_path):
    fresh.recalibrate([0.9, 0.85], default_alpha=0.85)
    fresh.save(tmp_path / "r")
    again = SDMEstimator.load(tmp_path / "r")
    assert again.ladder.alphas == (0.9, 0.85)
    _assert_scores_identical(fresh.predict_scores(data["xte"]), again.predict_scores(data["xte"]))


# --------------------------------------------------------------------------------------------------------------
# exemplars
# --------------------------------------------------------------------------------------------------------------
def test_return_exemplars_gives_k_nearest_in_distance_order_with_ids(fitted, data):
    s = fitted.predict_scores(data["xte"][:20], return_exemplars=4)
    support = fitted.support
    assert len(s.exemplars) == 20
    for i, row in enumerate(s.exemplars):
        assert len(row) == 4
        distances = [e.distance for e in row]
        assert distances == sorted(distances)
        assert row[0].id == s.nearest_id[i]
        assert row[0].distance == pytest.approx(float(s.d_nearest[i]), rel=1e-5, abs=1e-6)
        for e in row:
            pos = support.ids.index(e.id)
            assert e.label == int(support.labels[pos]) and e.predicted == int(support.predictions[pos])
        _, pos = support.neighbors(fitted.adaptor.infer(torch.as_tensor(data["xte"][i : i + 1]))[1], 4)
        assert [e.id for e in row] == [support.ids[p] for p in pos[0].tolist()]
    assert fitted.predict_scores(data["xte"][:3]).exemplars == []
    assert (
        fitted.nearest_exemplars(data["xte"][:3], k=2)
        == fitted.predict_scores(data["xte"][:3], return_exemplars=2).exemplars
    )


def test_return_exemplars_skips_the_excluded_training_point(fitted, data):
    s = fitted.predict_scores(data["xtr"][:5], support_ids=[f"tr{i}" for i in range(5)], return_exemplars=3)
    for i, row in enumerate(s.exemplars):
        assert len(row) == 3 and f"tr{i}" not in [e.id for e in row]


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------
def test_unfitted_estimator_raises_not_fitted_error(tmp_path):
    est = SDMEstimator(CONFIG)
    x = np.zeros((2, D), dtype=np.float32)
    for call in (
        lambda: est.predict_scores(x),
        lambda: est.predict(x),
        lambda: est.save(tmp_path / "x"),
        lambda: est.recalibrate([0.9]),
        lambda: est.add_exemplars(x, [0, 1], ["a", "b"]),
        lambda: est.summary(),
        lambda: est.num_classes,
        lambda: est.input_dim,
        lambda: est.fitted_parts(),
    ):
        with pytest.raises(NotFittedError):
            call()
    assert not (tmp_path / "x").exists()


def test_fitted_parts_are_the_estimators_own(fitted):
    parts = fitted.fitted_parts()
    assert parts.adaptor is fitted.adaptor and parts.support is fitted.support
    assert parts.ladder is fitted.ladder and parts.calibration is fitted.calibration
    # A partly restored estimator (here without its ladder) is still unfitted, not half-usable.
    broken = SDMEstimator(fitted.config)
    broken.adaptor, broken.support, broken.calibration = fitted.adaptor, fitted.support, fitted.calibration
    with pytest.raises(NotFittedError):
        broken.fitted_parts()


def test_wrong_embedding_dimension_is_refused(fitted):
    for bad in (np.zeros((3, D - 1), dtype=np.float32), np.zeros((3, D + 1), dtype=np.float32)):
        with pytest.raises(ValueError, match="dimension"):
            fitted.predict_scores(bad)
        with pytest.raises(ValueError, match="dimension"):
            fitted.predict(bad)
    with pytest.raises(ValueError, match="embeddings"):
        fitted.predict_scores(np.zeros(D, dtype=np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        fitted.predict_scores(np.full((1, D), np.nan, dtype=np.float32))


def test_score_argument_errors(fitted, data):
    x = data["xte"][:4]
    with pytest.raises(ValueError, match="alpha"):
        fitted.predict_scores(x, alpha=0.5)
    with pytest.raises(ValueError, match="ladder"):
        fitted.predict_scores(x, alpha=0.955)
    with pytest.raises(ValueError, match="return_exemplars"):
        fitted.predict_scores(x, return_exemplars=-1)
    with pytest.raises(ValueError, match="support_ids"):
        fitted.predict_scores(x, support_ids=["tr0"])


def test_fit_argument_errors(data):
    est = SDMEstimator(dataclasses.replace(CONFIG, epochs=1))
    xtr, ytr, xca, yca = data["xtr"], data["ytr"], data["xca"], data["yca"]
    with pytest.raises(ValueError, match="train_labels"):
        est.fit(xtr, ytr[:-1], xca, yca)
    with pytest.raises(ValueError, match="calibration_embeddings"):
        est.fit(xtr, ytr, xca[:, :-1], yca)
    with pytest.raises(ValueError, match="disjoint"):
        est.fit(xtr[:5], ytr[:5], xca[:5], yca[:5], train_ids=list("abcde"), calibration_ids=list("vwxya"))
    with pytest.raises(ValueError, match="unique"):
        est.fit(xtr[:3], ytr[:3], xca[:3], yca[:3], train_ids=["a", "a", "b"])
    with pytest.raises(ValueError, match="num_classes"):
        est.fit(xtr, ytr, xca, yca, num_classes=1)
    with pytest.raises(ValueError, match="train_labels"):
        est.fit(xtr[:4], [0, 1, -1, 0], xca[:4], yca[:4])


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        SDMConfig(alpha=0.5)
    with pytest.raises(ValueError, match="alpha_ladder"):
        SDMConfig(alpha_ladder=(0.95, 1.2))
    with pytest.raises(ValueError, match="epochs"):
        SDMConfig(epochs=0)
    with pytest.raises(ValueError, match="learning_rate"):
        SDMConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="effective_sample_size_rule"):
        SDMConfig(effective_sample_size_rule="other")
    with pytest.raises(ValueError, match="unknown"):
        SDMConfig.from_dict({"nope": 1})
    cfg = SDMConfig(alpha=0.93, alpha_ladder=(0.9,))
    assert cfg.alpha_ladder == (0.93, 0.9)  # the default alpha always joins the ladder, sorted high to low
    assert SDMConfig.from_dict(cfg.to_dict()) == cfg
