"""The exact L2 support index: q, nearest distance/position, neighbours, ties, self-exclusion, backends, chunking.

Small hand-made 2-D support sets use integer or dyadic coordinates so that every distance is exact in float32 and
ties are real ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdm_core.support as support_module
from sdm_core.support import MAX_Q, OOD_LABEL, SupportIndex, faiss_available

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss-cpu missing"))]


def _index(points, labels, predictions, backend="torch", max_q=MAX_Q, ids=None):
    return SupportIndex(
        np.asarray(points, dtype=np.float32), labels, predictions, ids=ids, backend=backend, max_q=max_q
    )


# A line of support points: positions 0..5 at x = 0..5.
#   pos:        0  1  2  3  4  5
#   label:      0  0  1  1  1  0
#   prediction: 0  0  0  1  1  0
# Correct: 0, 1, 3, 4, 5; position 2 is a wrong prediction (label 1, predicted 0).
LINE = [[float(i), 0.0] for i in range(6)]
LINE_Y = [0, 0, 1, 1, 1, 0]
LINE_P = [0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_is_leading_run_of_correct_neighbours_with_query_prediction(backend):
    index = _index(LINE, LINE_Y, LINE_P, backend)
    queries = [[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [4.25, 0.0], [5.0, 0.0], [-0.5, 0.0]]
    preds = [0, 1, 1, 1, 0, 0]
    res = index.similarity(np.asarray(queries, dtype=np.float32), preds)
    # (0,0) pred 0: pos0 match, pos1 match, pos2 wrong -> 2
    # (0,0) pred 1: pos0 predicts 0 -> 0
    # (3,0) pred 1: pos3 match, then pos2 (d=1) and pos4 (d=1) tie -> pos2 first, which is wrong -> 1
    # (4.25,0) pred 1: pos4 (0.25) match, pos3 (1.25) match, pos5 (0.75) comes before pos3 and predicts 0 -> 1
    # (5,0) pred 0: pos5 match, pos4 predicts 1 -> 1
    # (-0.5,0) pred 0: pos0, pos1 match, pos2 wrong -> 2
    assert res.q.tolist() == [2, 0, 1, 1, 1, 2]
    assert res.q.dtype == torch.int64
    assert res.nearest_index.tolist() == [0, 0, 3, 4, 5, 0]
    assert res.d_nearest.tolist() == [0.0, 0.0, 0.0, 0.25, 0.0, 0.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_d_nearest_is_euclidean_not_squared(backend):
    index = _index([[3.0, 4.0], [10.0, 10.0]], [0, 0], [0, 0], backend)
    res = index.similarity(np.zeros((1, 2), dtype=np.float32), [0])
    assert res.d_nearest.tolist() == [5.0]
    dist, pos = index.neighbors(np.zeros((1, 2), dtype=np.float32), 2)
    assert dist[0, 0].item() == 5.0
    assert dist[0, 1].item() == pytest.approx(float(np.sqrt(200.0)), rel=1e-6)
    assert pos.tolist() == [[0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetric_distance_tie_goes_to_lower_position(backend):
    query = np.zeros((1, 2), dtype=np.float32)
    # mismatch at position 0, match at position 1, both at distance 1: the mismatch comes first -> q = 0
    a = _index([[1.0, 0.0], [-1.0, 0.0]], [0, 0], [1, 0], backend)
    res_a = a.similarity(query, [0])
    assert res_a.q.tolist() == [0] and res_a.nearest_index.tolist() == [0]
    # swap positions: the match comes first -> q = 1
    b = _index([[-1.0, 0.0], [1.0, 0.0]], [0, 0], [0, 1], backend)
    res_b = b.similarity(query, [0])
    assert res_b.q.tolist() == [1] and res_b.nearest_index.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_exemplars_at_same_distance_are_ordered_by_position(backend):
    # Five duplicates of (2, 2); matches at positions 0, 1, 3; mismatches at 2 (wrong) and 4 (other prediction).
    points = [[2.0, 2.0]] * 5 + [[9.0, 9.0]]
    labels = [0, 0, 1, 0, 1, 0]
    preds = [0, 0, 0, 0, 1, 0]
    index = _index(points, labels, preds, backend)
    res = index.similarity(np.asarray([[2.0, 3.0]], dtype=np.float32), [0])
    assert res.q.tolist() == [2]
    assert res.nearest_index.tolist() == [0]
    assert res.d_nearest.tolist() == [1.0]
    dist, pos = index.neighbors(np.asarray([[2.0, 3.0]], dtype=np.float32), 6)
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert dist[0, :5].tolist() == [1.0] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_reversed_mismatch_first_gives_zero(backend):
    points = [[2.0, 2.0]] * 3
    index = _index(points, [1, 0, 0], [0, 0, 0], backend)  # position 0 is wrong, 1 and 2 match
    assert index.similarity(np.asarray([[2.0, 2.0]], dtype=np.float32), [0]).q.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_exclusion_is_by_identity_when_a_duplicate_sits_at_a_lower_position(backend):
    # Positions 0 and 1 hold the same exemplar. Position 0 is correct (label 0, predicted 0); position 1 is the
    # query's own row and is wrong (label 1, predicted 0). Excluding position 1 must leave position 0 as the
    # nearest at distance 0 (a rank-1 drop would discard position 0 instead and leave the wrong row -> q = 0).
    points = [[5.0, 5.0], [5.0, 5.0], [6.0, 5.0], [5.0, 8.0]]
    labels = [0, 1, 0, 1]
    preds = [0, 0, 0, 1]
    index = _index(points, labels, preds, backend)
    query = np.asarray([[5.0, 5.0]], dtype=np.float32)
    res = index.similarity(query, [0], exclude=[1])
    assert res.nearest_index.tolist() == [0]
    assert res.d_nearest.tolist() == [0.0]
    assert res.q.tolist() == [2]  # pos0 match, pos2 match, pos3 predicts 1
    # Without exclusion the wrong duplicate at position 1 breaks the run after position 0.
    plain = index.similarity(query, [0])
    assert plain.q.tolist() == [1] and plain.nearest_index.tolist() == [0]
    # Excluding position 0 instead keeps the wrong duplicate (position 1) as nearest, at distance 0.
    other = index.similarity(query, [0], exclude=[0])
    assert other.nearest_index.tolist() == [1] and other.d_nearest.tolist() == [0.0] and other.q.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusion_of_a_point_that_is_not_the_nearest(backend):
    # Exclusion is by position, not rank: excluding a far point leaves rank 1 in place (and caps q at k - 1).
    index = _index(LINE, [0] * 6, [0] * 6, backend)
    res = index.similarity(np.asarray([[0.0, 0.0]], dtype=np.float32), [0], exclude=[5])
    assert res.nearest_index.tolist() == [0]
    assert res.q.tolist() == [5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_one_means_no_exclusion(backend):
    index = _index(LINE, [0] * 6, [0] * 6, backend)
    q = np.asarray([[0.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    res = index.similarity(q, [0, 0], exclude=[-1, 0])
    assert res.q.tolist() == [6, 5]
    assert res.nearest_index.tolist() == [0, 1]
    assert res.d_nearest.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_cap_when_max_q_smaller_than_support(backend):
    index = _index(LINE, [0] * 6, [0] * 6, backend, max_q=3)
    assert index.k() == 3
    x = np.asarray(LINE, dtype=np.float32)
    plain = index.similarity(x, [0] * 6)
    excluded = index.similarity(x, [0] * 6, exclude=np.arange(6))
    assert plain.q.tolist() == [3] * 6
    assert excluded.q.tolist() == [2] * 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_cap_is_support_size_when_max_q_larger(backend):
    index = _index(LINE, [0] * 6, [0] * 6, backend, max_q=100)
    assert index.k() == 6
    x = np.asarray(LINE, dtype=np.float32)
    assert index.similarity(x, [0] * 6).q.tolist() == [6] * 6
    assert index.similarity(x, [0] * 6, exclude=np.arange(6)).q.tolist() == [5] * 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_cap_only_truncates_the_run_within_the_first_k(backend):
    # A mismatch at rank 4 does not matter when k = 3; at max_q = 5 it stops the run at 3.
    labels = [0, 0, 0, 0, 0, 0]
    preds = [0, 0, 0, 1, 0, 0]
    x = np.asarray([[0.0, 0.0]], dtype=np.float32)
    assert _index(LINE, labels, preds, backend, max_q=3).similarity(x, [0]).q.tolist() == [3]
    assert _index(LINE, labels, preds, backend, max_q=5).similarity(x, [0]).q.tolist() == [3]
    assert _index(LINE, labels, preds, backend, max_q=2).similarity(x, [0], exclude=[0]).q.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ood_label_exemplar_breaks_a_run_even_with_matching_prediction(backend):
    labels = [0, 0, OOD_LABEL, 0, 0, 0]
    index = _index(LINE, labels, [0] * 6, backend)
    res = index.similarity(np.asarray([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32), [0, 0])
    assert res.q.tolist() == [2, 0]
    assert res.nearest_index.tolist() == [0, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbors_order_and_padding(backend):
    points = [[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]
    index = _index(points, [0] * 4, [0] * 4, backend, ids=["a", "b", "c", "d"])
    q = np.asarray([[0.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    dist, pos = index.neighbors(q, 4, exclude=[-1, 0])
    # Row 0: 0 (0), then ties at 1 between positions 2 and 3 -> 2 first, then 1 (3).
    assert pos[0].tolist() == [0, 2, 3, 1]
    assert dist[0].tolist() == [0.0, 1.0, 1.0, 3.0]
    # Row 1 excludes position 0: three real neighbours then (inf, -1) padding.
    assert pos[1].tolist() == [2, 3, 1, -1]
    assert dist[1, :3].tolist() == [1.0, 1.0, 3.0]
    assert dist[1, 3].item() == float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbors_k_larger_than_support_is_clamped(backend):
    index = _index(LINE[:3], [0] * 3, [0] * 3, backend)
    dist, pos = index.neighbors(np.asarray([[2.0, 0.0]], dtype=np.float32), 10)
    assert pos.tolist() == [[2, 1, 0]]
    assert dist.tolist() == [[0.0, 1.0, 2.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbors_without_exclusion_need_no_padding(backend):
    index = _index(LINE, [0] * 6, [0] * 6, backend)
    dist, pos = index.neighbors(np.asarray([[2.5, 0.0]], dtype=np.float32), 3)
    assert pos.tolist() == [[2, 3, 1]]
    assert dist.tolist() == [[0.5, 0.5, 1.5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_appends_exemplars_and_changes_q_without_touching_existing_rows(backend):
    index = _index(LINE, [0] * 6, [0] * 6, backend)
    x = np.asarray([[0.25, 0.0]], dtype=np.float32)
    assert index.similarity(x, [0]).q.tolist() == [6]
    index.add(np.asarray([[0.25, 0.0]], dtype=np.float32), [OOD_LABEL], [0], ids=["ood-0"])
    assert len(index) == 7
    res = index.similarity(x, [0])
    assert res.q.tolist() == [0] and res.nearest_index.tolist() == [6]
    assert index.ids[-1] == "ood-0" and index.positions(["ood-0"]).tolist() == [6]
    assert index.labels.tolist()[:6] == [0] * 6


def test_positions_map_ids_and_unknown_or_none_to_minus_one():
    index = _index(LINE[:3], [0] * 3, [0] * 3, ids=["a", "b", "c"])
    assert index.positions(["c", None, "zzz", "a"]).tolist() == [2, -1, -1, 0]


def test_default_ids_are_positional_and_continue_after_add():
    index = _index(LINE[:2], [0, 0], [0, 0])
    index.add(np.asarray([[7.0, 7.0]], dtype=np.float32), [1], [1])
    assert index.ids == ["support-0", "support-1", "support-2"]


# --------------------------------------------------------------------------------------------------------------
# torch and faiss give identical results
# --------------------------------------------------------------------------------------------------------------
def _clustered(seed, n, m, noise=0.05):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, m)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64)
    preds = np.where(rng.random(n) < 1 - noise, labels, 1 - labels)
    return rng, x, labels, preds


def _assert_same(a, b, queries, qpreds, exclude, k):
    ra, rb = a.similarity(queries, qpreds, exclude=exclude), b.similarity(queries, qpreds, exclude=exclude)
    assert torch.equal(ra.q, rb.q)
    assert torch.equal(ra.nearest_index, rb.nearest_index)
    assert torch.allclose(ra.d_nearest, rb.d_nearest, atol=1e-4, rtol=1e-5)
    da, pa = a.neighbors(queries, k, exclude=exclude)
    db, pb = b.neighbors(queries, k, exclude=exclude)
    assert torch.equal(pa, pb)
    finite = torch.isfinite(da)
    assert torch.equal(finite, torch.isfinite(db))
    assert torch.allclose(da[finite], db[finite], atol=1e-4, rtol=1e-5)
    return ra


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu missing")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_q", [40, MAX_Q])
def test_torch_and_faiss_agree_on_random_data(seed, max_q):
    rng, x, labels, preds = _clustered(seed, 600, 8)
    a = SupportIndex(x, labels, preds, backend="torch", max_q=max_q)
    b = SupportIndex(x, labels, preds, backend="faiss", max_q=max_q)
    queries = rng.normal(size=(300, 8)).astype(np.float32)
    qpreds = (queries[:, 0] > 0).astype(np.int64)
    res = _assert_same(a, b, queries, qpreds, None, 12)
    assert res.q.max() > 5  # the comparison covers non-trivial runs
    # few queries (faiss takes its non-BLAS path below 20 queries)
    _assert_same(a, b, queries[:7], qpreds[:7], None, 12)
    # training points against themselves, excluded by identity
    res_ex = _assert_same(a, b, x, preds, np.arange(600), 12)
    assert bool((res_ex.nearest_index != torch.arange(600)).all())


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu missing")
@pytest.mark.parametrize("seed", range(6))
def test_torch_and_faiss_agree_with_many_exact_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(50, 300))
    m = int(rng.integers(1, 4))
    x = rng.integers(-2, 3, size=(n, m)).astype(np.float32)  # few distinct points: many exact ties
    labels = rng.integers(0, 2, n)
    preds = np.where(rng.random(n) < 0.85, labels, 1 - labels)
    queries = rng.integers(-2, 3, size=(int(rng.integers(5, 60)), m)).astype(np.float32)
    qpreds = rng.integers(0, 2, queries.shape[0])
    exclude = rng.integers(-1, n, queries.shape[0])
    for max_q in (3, 17, MAX_Q):
        a = SupportIndex(x, labels, preds, backend="torch", max_q=max_q)
        b = SupportIndex(x, labels, preds, backend="faiss", max_q=max_q)
        for k in (1, 5, 30):
            _assert_same(a, b, queries, qpreds, None, k)
            _assert_same(a, b, queries, qpreds, exclude, k)


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu missing")
def test_faiss_index_is_rebuilt_after_add():
    index = _index(LINE, [0] * 6, [0] * 6, "faiss")
    x = np.asarray([[10.0, 0.0]], dtype=np.float32)
    assert index.similarity(x, [0]).nearest_index.tolist() == [5]
    index.add(np.asarray([[10.0, 0.0]], dtype=np.float32), [1], [1])
    res = index.similarity(x, [0])
    assert res.nearest_index.tolist() == [6] and res.q.tolist() == [0]


def test_auto_backend_resolves_to_a_concrete_backend():
    index = _index(LINE, [0] * 6, [0] * 6, "auto")
    assert index.backend in ("torch", "faiss")


# --------------------------------------------------------------------------------------------------------------
# chunking gives identical results
# --------------------------------------------------------------------------------------------------------------
def _search_all(index, queries, qpreds, exclude):
    return index.similarity(queries, qpreds, exclude=exclude), index.neighbors(queries, 9, exclude=exclude)


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_chunked_search_gives_identical_q_nearest_and_neighbours(monkeypatch, chunk):
    # Gaussian data: q, nearest positions and neighbour lists are identical; distances agree to float32 rounding
    # (the distance GEMM's rounding depends on how many queries share a block, ~1 ulp).
    rng, x, labels, preds = _clustered(5, 200, 6)
    queries = np.concatenate([rng.normal(size=(97, 6)).astype(np.float32), x[:20], x[:5]])
    qpreds = np.concatenate([(queries[:97, 0] > 0).astype(np.int64), preds[:20], 1 - preds[:5]])
    exclude = np.concatenate([np.full(97, -1), np.arange(20), np.arange(5)])
    index = SupportIndex(x, labels, preds, max_q=50)
    full, (full_d, full_p) = _search_all(index, queries, qpreds, exclude)
    monkeypatch.setattr(support_module, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(support_module, "_MIN_CHUNK_ROWS", 1)
    assert index._chunk_rows() == max(1, chunk // 200)
    chunked, (chunked_d, chunked_p) = _search_all(index, queries, qpreds, exclude)
    assert torch.equal(full.q, chunked.q)
    assert torch.equal(full.nearest_index, chunked.nearest_index)
    assert torch.allclose(full.d_nearest, chunked.d_nearest, rtol=1e-5, atol=1e-6)
    assert torch.equal(full_p, chunked_p)
    assert torch.allclose(full_d, chunked_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_chunked_search_is_bit_identical_when_distances_are_exact(monkeypatch, chunk):
    # Integer coordinates make every distance exact, so chunking must not change a single bit (ties included).
    rng = np.random.default_rng(6)
    x = rng.integers(-3, 4, size=(200, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.9, labels, 1 - labels)
    queries = rng.integers(-3, 4, size=(60, 3)).astype(np.float32)
    qpreds = rng.integers(0, 2, 60)
    exclude = rng.integers(-1, 200, 60)
    index = SupportIndex(x, labels, preds, max_q=30)
    full, (full_d, full_p) = _search_all(index, queries, qpreds, exclude)
    monkeypatch.setattr(support_module, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(support_module, "_MIN_CHUNK_ROWS", 1)
    chunked, (chunked_d, chunked_p) = _search_all(index, queries, qpreds, exclude)
    assert torch.equal(full.q, chunked.q) and bool((full.q > 0).any())
    assert torch.equal(full.nearest_index, chunked.nearest_index)
    assert torch.equal(full.d_nearest, chunked.d_nearest)
    assert torch.equal(full_p, chunked_p) and torch.equal(full_d, chunked_d)


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------
def test_constructor_validation_errors():
    x = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="backend"):
        SupportIndex(x, [0] * 3, [0] * 3, backend="annoy")
    with pytest.raises(ValueError, match="max_q"):
        SupportIndex(x, [0] * 3, [0] * 3, max_q=0)
    with pytest.raises(ValueError, match="exemplars"):
        SupportIndex(np.zeros(3, dtype=np.float32), [0] * 3, [0] * 3)
    with pytest.raises(ValueError, match="exemplars"):
        SupportIndex(np.array([[0.0, np.nan]] * 3, dtype=np.float32), [0] * 3, [0] * 3)
    with pytest.raises(ValueError, match="labels"):
        SupportIndex(x, [0] * 2, [0] * 3)
    with pytest.raises(ValueError, match="predictions"):
        SupportIndex(x, [0] * 3, [0] * 2)
    with pytest.raises(ValueError, match="labels"):
        SupportIndex(x, [0, -2, 0], [0] * 3)
    with pytest.raises(ValueError, match="predictions"):
        SupportIndex(x, [0] * 3, [0, OOD_LABEL, 0])
    with pytest.raises(ValueError, match="ids"):
        SupportIndex(x, [0] * 3, [0] * 3, ids=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        SupportIndex(x, [0] * 3, [0] * 3, ids=["a", "b", "a"])


def test_query_validation_errors():
    index = _index(LINE, [0] * 6, [0] * 6)
    good = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="queries"):
        index.similarity(np.zeros((2, 3), dtype=np.float32), [0, 0])
    with pytest.raises(ValueError, match="queries"):
        index.similarity(np.zeros(2, dtype=np.float32), [0, 0])
    with pytest.raises(ValueError, match="query_predictions"):
        index.similarity(good, [0])
    with pytest.raises(ValueError, match="exclude"):
        index.similarity(good, [0, 0], exclude=[0])
    with pytest.raises(ValueError, match="exclude"):
        index.similarity(good, [0, 0], exclude=[0, 6])
    with pytest.raises(ValueError, match=r"\bk\b"):
        index.neighbors(good, 0)
    with pytest.raises(ValueError, match="dimension"):
        index.add(np.zeros((1, 3), dtype=np.float32), [0], [0])
    with pytest.raises(ValueError, match="unique"):
        index.add(np.zeros((1, 2), dtype=np.float32), [0], [0], ids=["support-0"])


def test_empty_support_refuses_queries():
    index = SupportIndex(np.zeros((0, 2), dtype=np.float32), [], [])
    assert len(index) == 0
    with pytest.raises(ValueError, match="empty"):
        index.similarity(np.zeros((1, 2), dtype=np.float32), [0])


def test_rejected_add_leaves_the_index_unchanged():
    # An add refused for a duplicate id must not register any of its ids: the index stays as it was.
    index = _index(LINE[:2], [0, 0], [0, 0], ids=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        index.add(np.zeros((2, 2), dtype=np.float32), [0, 0], [0, 0], ids=["new", "a"])
    assert len(index) == 2
    assert index.positions(["new"]).tolist() == [-1]
    index.add(np.asarray([[4.0, 4.0]], dtype=np.float32), [1], [1], ids=["new"])
    assert index.positions(["new"]).tolist() == [2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_whose_only_support_point_is_excluded_has_no_nearest(backend):
    # With the single support point excluded there is no neighbour: q = 0, distance inf, and the nearest
    # position must be -1 (as neighbors() pads), never the excluded point itself; both backends must agree.
    index = _index([[0.0, 0.0]], [0], [0], backend)
    res = index.similarity(np.zeros((1, 2), dtype=np.float32), [0], exclude=[0])
    assert res.q.tolist() == [0]
    assert res.d_nearest.tolist() == [float("inf")]
    assert res.nearest_index.tolist() == [-1]
    dist, pos = index.neighbors(np.zeros((1, 2), dtype=np.float32), 1, exclude=[0])
    assert pos.tolist() == [[-1]] and dist.tolist() == [[float("inf")]]


def _brute_force_similarity(x, labels, preds, queries, qpreds, exclude, max_q):
    """q, nearest distance and position by sorting every (distance, position) pair: the definition itself."""
    k = min(max_q, len(x))
    q_out, d_out, i_out = [], [], []
    for row, yhat, ex in zip(queries, qpreds, exclude):
        dist = ((x.astype(np.float64) - row.astype(np.float64)) ** 2).sum(axis=1)
        order = [j for j in sorted(range(len(x)), key=lambda j: (dist[j], j)) if j != ex]
        run = 0
        for j in order[: k - (ex >= 0)]:
            if labels[j] == preds[j] == yhat:
                run += 1
            else:
                break
        q_out.append(run)
        d_out.append(np.sqrt(dist[order[0]]) if order else np.inf)
        i_out.append(order[0] if order else -1)
    return np.array(q_out), np.array(d_out), np.array(i_out)


def _tied_three_class_support(rng, n):
    """Integer 3-D points (exact distances, many ties), three classes, ~5 % OOD labels, ~20 % wrong predictions."""
    x = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    labels[rng.random(n) < 0.05] = OOD_LABEL
    preds = np.where(rng.random(n) < 0.8, np.maximum(labels, 0), rng.integers(0, 3, n))
    return x, labels, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_search_matches_brute_force_with_three_classes_ood_labels_ties_and_exclusions(seed):
    # Integer coordinates give exact distances and many ties across match groups; three classes, OOD-labelled
    # exemplars and wrong predictions exercise every group; queries include support points that exclude themselves.
    rng = np.random.default_rng(seed)
    x, labels, preds = _tied_three_class_support(rng, 150)
    queries = np.concatenate([rng.integers(-2, 3, size=(60, 3)).astype(np.float32), x[:40]])
    qpreds = np.concatenate([rng.integers(0, 3, 60), preds[:40]])
    exclude = np.concatenate([np.full(60, -1), np.arange(40)])
    index = SupportIndex(x, labels, preds, max_q=40)
    got = index.similarity(queries, qpreds, exclude=exclude)
    q, d, i = _brute_force_similarity(x, labels, preds, queries, qpreds, exclude, max_q=40)
    assert got.q.tolist() == q.tolist()
    assert got.nearest_index.tolist() == i.tolist()
    assert np.allclose(got.d_nearest.numpy(), d, rtol=1e-6)
    assert torch.equal(index.exemplars, torch.from_numpy(x))


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "blocks"])
@pytest.mark.parametrize("seed", [0, 1])
def test_self_similarity_matches_brute_force_with_identity_exclusion(monkeypatch, seed, gram):
    # The fit's training-split statistics: every support point against the others, itself excluded by identity,
    # with duplicates (ties across groups), three classes, OOD labels and a q cap below the support size; both the
    # one-Gram path and the block fallback for supports too large for it.
    monkeypatch.setattr(support_module, "_GRAM_MIN_SUPPORT", 1)  # these supports are small
    if not gram:
        monkeypatch.setattr(support_module, "_GRAM_ELEMENTS", 0)
    rng = np.random.default_rng(seed)
    x, labels, preds = _tied_three_class_support(rng, 160)
    # A far clump of 40 correct class-1 points (some duplicates) whose runs reach the cap k - 1 = 29.
    clump = (10 + rng.integers(0, 2, size=(40, 3))).astype(np.float32)
    x, labels, preds = (
        np.concatenate([x, clump]),
        np.concatenate([labels, np.ones(40, int)]),
        np.concatenate([preds, np.ones(40, int)]),
    )
    n = len(x)
    index = SupportIndex(x, labels, preds, max_q=30)
    got = index.self_similarity()
    q, d, i = _brute_force_similarity(x, labels, preds, x, preds, np.arange(n), max_q=30)
    assert got.q.tolist() == q.tolist()
    assert got.nearest_index.tolist() == i.tolist()
    assert np.allclose(got.d_nearest.numpy(), d, rtol=1e-6)
    assert bool((got.q > 0).any()) and bool((got.q == 29).any())  # the cap k - 1 is reached: not vacuous


def test_self_similarity_equals_the_general_search_on_random_data(monkeypatch):
    monkeypatch.setattr(support_module, "_GRAM_MIN_SUPPORT", 1)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 24)).astype(np.float32)
    labels = rng.integers(0, 2, 700)
    preds = np.where(rng.random(700) < 0.85, labels, 1 - labels)
    index = SupportIndex(x, labels, preds)
    fast, general = index.self_similarity(), index.similarity(x, preds, exclude=np.arange(700))
    assert torch.equal(fast.q, general.q)
    assert torch.equal(fast.nearest_index, general.nearest_index)
    assert torch.allclose(fast.d_nearest, general.d_nearest, rtol=1e-5)
    assert bool((fast.nearest_index != torch.arange(700)).all())
