"""The exact L2 support index over exemplars: Similarity q, nearest distance, and nearest neighbours.

Neighbours are ordered by (distance, support position): distance ties go to the lower position. Training
points exclude themselves by identity (their own support position), never by assuming rank 1 is themselves.

Two backends give the same neighbours:
- ``torch``: searches in memory-bounded chunks. For q it does not sort at all: q is the number of matching
  support points that precede the first non-matching one in (distance, position) order, capped at k, which is
  exactly the leading run of matches among the k nearest (ACT Eq. 4).
- ``faiss``: ``IndexFlatL2`` k-NN search, canonicalised to the same tie order, then the leading run.

Size: one index and its two backends, which must give the same neighbours; side by side, they can be read
against each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from sdm_core.math import as_tensor, similarity_from_matches

if TYPE_CHECKING:
    import faiss

__all__ = ["MAX_Q", "OOD_LABEL", "SupportIndex", "SimilarityResult", "faiss_available"]

MAX_Q = 2048
# An "OOD" exemplar's label: no prediction (always >= 0) can equal it, so it never counts as a match.
OOD_LABEL = -1
# Elements of one query-by-support distance block (4 bytes each): small enough to stay in cache for the
# reductions after the matrix product, and to bound memory for large supports.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_ROWS = 64
# The N x N support-against-itself distances (4 bytes each) come from one symmetric product for supports of
# _GRAM_MIN_SUPPORT to sqrt(_GRAM_ELEMENTS) points. Smaller supports keep the query-by-support blocks: they cost
# little either way, and the block path rounds like every later search of the same points, so small layers (the
# ones fine-tuning fits) give the statistics a later search reproduces, whatever the order their points arrive in.
_GRAM_ELEMENTS = 1 << 26
_GRAM_MIN_SUPPORT = 1024


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class SimilarityResult:
    """q (int64), the L2 distance to the nearest (non-excluded) support point, and that point's position."""

    q: torch.Tensor
    d_nearest: torch.Tensor
    nearest_index: torch.Tensor


def _lexicographic_min(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (value, position)-least entry of (B, G) candidates: the minimum value, ties to the lower position."""
    if values.shape[1] == 1:  # one candidate per row (two classes): nothing to compare
        return values[:, 0], positions[:, 0]
    best = values.min(dim=1).values
    big = torch.iinfo(torch.long).max
    pos = torch.where(values == best.unsqueeze(1), positions, torch.full_like(positions, big)).min(dim=1).values
    return best, pos


def _concat(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    q, d, i = zip(*parts)
    return torch.cat(q), torch.cat(d), torch.cat(i)


class SupportIndex:
    """Exemplars h' of the support set with their true and predicted labels and string ids."""

    def __init__(
        self,
        exemplars: object,
        labels: object,
        predictions: object,
        ids: Sequence[str] | None = None,
        backend: str = "torch",
        max_q: int = MAX_Q,
    ) -> None:
        if backend not in ("torch", "faiss", "auto"):
            raise ValueError(f"backend must be 'torch', 'faiss' or 'auto', got {backend!r}")
        if backend == "faiss" and not faiss_available():
            raise ValueError(
                "backend='faiss' needs the faiss-cpu package: pip install 'sdm-lm[faiss]', or use backend='torch'"
            )
        if backend == "auto":
            backend = "torch"  # faster on CPU for q (it needs no top-k sort); faiss stays selectable
        if int(max_q) < 1:
            raise ValueError(f"max_q must be >= 1, got {max_q}")
        self.backend = backend
        self.max_q = int(max_q)
        self.labels = torch.empty(0, dtype=torch.long)
        self.predictions = torch.empty(0, dtype=torch.long)
        self.ids: list[str] = []
        self._position: dict[str, int] = {}
        self._faiss: faiss.IndexFlatL2 | None = None
        self.add(exemplars, labels, predictions, ids)

    # -- contents -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(self._sorted.shape[1]) if hasattr(self, "_sorted") else 0

    def add(self, exemplars: object, labels: object, predictions: object, ids: Sequence[str] | None = None) -> None:
        """Append exemplars (no retraining). Labels may be ``OOD_LABEL`` for exemplars no prediction can match."""
        x = as_tensor(exemplars, "exemplars", dtype=torch.float32)
        if x.dim() != 2:
            raise ValueError(f"exemplars must have shape (N, M), got {tuple(x.shape)}")
        if len(self) and x.shape[1] != self.dim:
            raise ValueError(f"exemplars must have dimension {self.dim}, got {x.shape[1]}")
        y = as_tensor(labels, "labels", dtype=torch.long).reshape(-1)
        p = as_tensor(predictions, "predictions", dtype=torch.long).reshape(-1)
        if y.shape[0] != x.shape[0] or p.shape[0] != x.shape[0]:
            raise ValueError(
                f"labels and predictions must have {x.shape[0]} entries, got {y.shape[0]} and {p.shape[0]}"
            )
        if y.numel() and bool(((y < 0) & (y != OOD_LABEL)).any()):
            raise ValueError(f"labels must be class indices >= 0 or OOD_LABEL ({OOD_LABEL})")
        if p.numel() and bool((p < 0).any()):
            raise ValueError("predictions must be class indices >= 0")
        start = len(self)
        new_ids = [str(i) for i in ids] if ids is not None else [f"support-{start + i}" for i in range(x.shape[0])]
        if len(new_ids) != x.shape[0]:
            raise ValueError(f"ids must have {x.shape[0]} entries, got {len(new_ids)}")
        # Check every id before registering any, so that a refused add leaves the index unchanged.
        if len(set(new_ids)) != len(new_ids):
            raise ValueError("ids must be unique within one add")
        clash = next((i for i in new_ids if i in self._position), None)
        if clash is not None:
            raise ValueError(f"ids must be unique; {clash!r} is already in the support")
        for offset, identifier in enumerate(new_ids):
            self._position[identifier] = start + offset
        new_norms = torch.cat(
            [(x[i : i + 4096].double() ** 2).sum(dim=1) for i in range(0, x.shape[0], 4096)]
            or [torch.empty(0, dtype=torch.float64)]
        )
        exemplars = x.contiguous().clone() if start == 0 else torch.cat([self.exemplars, x], dim=0)
        norms = new_norms.to(torch.float32) if start == 0 else torch.cat([self.norms, new_norms.to(torch.float32)])
        self.labels = torch.cat([self.labels, y])
        self.predictions = torch.cat([self.predictions, p])
        self.ids.extend(new_ids)
        self._faiss = None
        self._store(exemplars, norms)

    def _store(self, exemplars: torch.Tensor, norms: torch.Tensor) -> None:
        """Keep the exemplars sorted by match group: the correctly predicted exemplars of each class, then every
        other one (wrong predictions and OOD labels), each group in position order. A query predicted c matches
        exactly group c, so q needs one contiguous slice per group and no per-query match mask."""
        correct = self.labels == self.predictions
        group = torch.where(correct, self.predictions, torch.full_like(self.predictions, -1))
        order = torch.sort(group, stable=True).indices
        self._order = order  # sorted slot -> support position
        self._slot = torch.empty_like(order)
        self._slot[order] = torch.arange(order.shape[0])  # support position -> sorted slot
        self._sorted = exemplars.index_select(0, order)
        self._sorted_norms = norms.index_select(0, order)
        sorted_group = group[order]
        keys, counts = torch.unique_consecutive(sorted_group, return_counts=True)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
        # (group key, first slot, end slot); key -1 is the never-matching group.
        self._groups = [(int(key), bounds[i], bounds[i + 1]) for i, key in enumerate(keys.tolist())]

    @property
    def exemplars(self) -> torch.Tensor:
        """The exemplars in support-position order (N, M); a copy of the internal storage."""
        if not hasattr(self, "_sorted"):
            return torch.empty(0, 0)
        return self._sorted.index_select(0, self._slot)

    @property
    def norms(self) -> torch.Tensor:
        """Squared L2 norms of the exemplars in support-position order (float32)."""
        return self._sorted_norms.index_select(0, self._slot)

    def positions(self, ids: Sequence[str | None]) -> torch.Tensor:
        """Support position of each id, or -1 where the id is None or not in the support."""
        return torch.tensor([self._position.get(i, -1) if i is not None else -1 for i in ids], dtype=torch.long)

    def k(self) -> int:
        return min(self.max_q, len(self))

    # -- search ---------------------------------------------------------------------------------------------
    def _sorted_distances(self, queries: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Squared L2 distances (B, N) in sorted-slot order, from ||a||^2 + ||b||^2 - 2ab, clamped at 0.

        ``out`` (B, N) is written in place when given: reusing one block buffer across a batch's chunks avoids
        re-faulting a fresh multi-megabyte allocation per chunk."""
        q_norms = (queries.double() ** 2).sum(dim=1).to(torch.float32)
        dist = torch.addmm(self._sorted_norms.unsqueeze(0), queries, self._sorted.T, beta=1.0, alpha=-2.0, out=out)
        dist.add_(q_norms.unsqueeze(1))
        return dist.clamp_(min=0.0)

    def _distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances (B, N) in support-position order."""
        return self._sorted_distances(queries).index_select(1, self._slot)

    def _chunk_rows(self) -> int:
        # Blocks of about _CHUNK_ELEMENTS stay in cache for the passes after the matrix product; at least
        # _MIN_CHUNK_ROWS rows keep that product a matrix-matrix one for large supports.
        return max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(len(self), 1))

    def _check_queries(self, queries: object, exclude: object | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = as_tensor(queries, "queries", dtype=torch.float32)
        if x.dim() != 2 or (len(self) and x.shape[1] != self.dim):
            raise ValueError(f"queries must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if len(self) == 0:
            raise ValueError("the support index is empty; fit or add exemplars first")
        if exclude is None:
            ex = torch.full((x.shape[0],), -1, dtype=torch.long)
        else:
            ex = as_tensor(exclude, "exclude", dtype=torch.long).reshape(-1)
            if ex.shape[0] != x.shape[0]:
                raise ValueError(f"exclude must have one position per query ({x.shape[0]}), got {ex.shape[0]}")
            if ex.numel() and bool((ex >= len(self)).any()):
                raise ValueError(f"exclude positions must be < {len(self)} (or -1 for none)")
        return x.contiguous(), ex

    def similarity(
        self,
        queries: object,
        query_predictions: object,
        exclude: object | None = None,
        *,
        check_input: bool = True,
    ) -> SimilarityResult:
        """q, nearest L2 distance and nearest position for each query.

        ``exclude[i]`` is query i's own support position (-1 for none): it is skipped, and q is then capped at
        k - 1 (the reference's "ranks 2..k"), else at k = min(max_q, N).

        ``check_input=False`` (scikit-learn's convention) skips validation on the hot path: the caller passes
        contiguous float32 (B, M) queries, int64 (B,) predictions and an int64 (B,) ``exclude``.
        """
        if not check_input:
            return self._similarity(
                cast(torch.Tensor, queries), cast(torch.Tensor, query_predictions), cast(torch.Tensor, exclude)
            )
        x, ex = self._check_queries(queries, exclude)
        yhat = as_tensor(query_predictions, "query_predictions", dtype=torch.long).reshape(-1)
        if yhat.shape[0] != x.shape[0]:
            raise ValueError(f"query_predictions must have {x.shape[0]} entries, got {yhat.shape[0]}")
        return self._similarity(x, yhat, ex)

    def _similarity(
        self, queries: torch.Tensor, query_predictions: torch.Tensor, exclude: torch.Tensor
    ) -> SimilarityResult:
        if self.backend == "faiss":
            return self._similarity_faiss(queries, query_predictions, exclude)
        return self._similarity_torch(queries, query_predictions, exclude)

    def _similarity_torch(self, x: torch.Tensor, yhat: torch.Tensor, ex: torch.Tensor) -> SimilarityResult:
        classes = sorted(set(yhat.tolist()))
        if len(classes) == 1:
            return SimilarityResult(*self._similarity_class(x, int(classes[0]), ex))
        q_out = torch.empty(x.shape[0], dtype=torch.long)
        d_out = torch.empty(x.shape[0], dtype=torch.float32)
        i_out = torch.empty(x.shape[0], dtype=torch.long)
        for c in classes:
            rows = (yhat == c).nonzero().squeeze(1)
            q, d, i = self._similarity_class(x.index_select(0, rows), int(c), ex.index_select(0, rows))
            q_out[rows], d_out[rows], i_out[rows] = q, d, i
        return SimilarityResult(q_out, d_out, i_out)

    def _segments(self, c: int) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """(the slots of match group c or None, the slot ranges of every other group)."""
        match = next(((lo, hi) for key, lo, hi in self._groups if key == c and c >= 0), None)
        others = [(lo, hi) for key, lo, hi in self._groups if key != c or c < 0]
        return match, others

    def _similarity_class(
        self, x: torch.Tensor, c: int, ex: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, nearest distance and position for queries that are all predicted ``c``, in memory-bounded blocks."""
        b = x.shape[0]
        step = self._chunk_rows()
        parts = []
        buffer = torch.empty(min(step, b), len(self)) if b > step else None
        for start in range(0, b, step):
            stop = min(start + step, b)
            dist = self._sorted_distances(x[start:stop], None if buffer is None else buffer[: stop - start])
            parts.append(self._reduce_block(dist, c, ex[start:stop]))
        return _concat(parts)

    def _reduce_block(
        self, dist: torch.Tensor, c: int, ex: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, nearest distance and position from one (B, N) block of squared distances in sorted-slot order, for
        queries all predicted ``c`` with exclusion positions ``ex`` (-1 for none). ``dist`` is modified.

        q = #{matching j before the first non-matching point in (distance, position) order}, capped at k: the
        matching points form the contiguous slots of group c, and the first non-matching point is the
        (distance, position)-least of the other groups' minima (each group is in position order, and a
        row-wise min returns the first, i.e. lowest-position, of tied values).
        """
        rows_n = dist.shape[0]
        match, others = self._segments(c)
        segments = ([match] if match else []) + others
        inf = float("inf")
        k = self.k()
        has_ex = ex >= 0
        excluding = bool(has_ex.any())
        if excluding:
            rows = torch.arange(rows_n)
            dist[rows[has_ex], self._slot[ex[has_ex]]] = inf
        mins = [dist[:, lo:hi].min(dim=1) for lo, hi in segments]
        values = torch.stack([m.values for m in mins], dim=1)
        slots = torch.stack([m.indices + lo for m, (lo, _) in zip(mins, segments)], dim=1)
        positions = self._order[slots]
        nearest_d, nearest_p = _lexicographic_min(values, positions)
        if match is None:
            count = torch.zeros(rows_n, dtype=torch.long)
        else:
            lo, hi = match
            if others:
                first_d, first_p = _lexicographic_min(values[:, 1:], positions[:, 1:])
            else:
                first_d = torch.full((rows_n,), inf)
                first_p = torch.full((rows_n,), -1, dtype=torch.long)
            block = dist[:, lo:hi]
            threshold = first_d.unsqueeze(1)
            count = (block < threshold).sum(dim=1)
            # Ties with the first non-matching point count when their position is lower (finite ties only:
            # an excluded point is inf and must never count).
            tied = torch.isfinite(first_d) & (block == threshold).any(dim=1)
            if bool(tied.any()):
                t_rows = tied.nonzero().squeeze(1)
                tie_mask = block[t_rows] == threshold[t_rows]
                before = self._order[lo:hi].unsqueeze(0) < first_p[t_rows].unsqueeze(1)
                count[t_rows] += (tie_mask & before).sum(dim=1)
        if excluding:
            q = torch.minimum(count, k - has_ex.to(torch.long))
            # A row whose every support point is excluded has no nearest neighbour (as in neighbors()).
            nearest = torch.where(torch.isinf(nearest_d), torch.full_like(nearest_p, -1), nearest_p)
        else:
            # Without exclusions every distance is finite, so each row has a nearest neighbour.
            q = count.clamp_(max=k)
            nearest = nearest_p
        return q, nearest_d.sqrt(), nearest

    def self_similarity(self) -> SimilarityResult:
        """q, nearest distance and nearest position of every support point against the others (each excludes
        itself by identity), predicted as the support records: the training split's statistics in a fit.

        Equal to ``similarity(exemplars, predictions, exclude=arange(N))``. For supports of _GRAM_MIN_SUPPORT
        points up to an N x N matrix of _GRAM_ELEMENTS, the torch backend computes the distances as one symmetric
        Gram product (BLAS syrk, about two thirds of the time of the general product) instead of query-by-support
        blocks; the results agree to float32 rounding.
        """
        n = len(self)
        if n == 0:
            raise ValueError("the support index is empty; fit or add exemplars first")
        positions = torch.arange(n)
        if self.backend == "faiss" or n < _GRAM_MIN_SUPPORT or n * n > _GRAM_ELEMENTS:
            return self._similarity(self.exemplars, self.predictions, positions)
        # numpy's matmul of an array with its own transpose runs BLAS syrk (one triangle, then mirrored); the
        # squared distances are then formed row block by row block, as in _sorted_distances.
        sorted_np = self._sorted.numpy()
        gram = torch.from_numpy(sorted_np @ sorted_np.T)
        norms = self._sorted_norms
        predictions = self.predictions.index_select(0, self._order)  # prediction of each sorted slot
        q_out = torch.empty(n, dtype=torch.long)
        d_out = torch.empty(n, dtype=torch.float32)
        i_out = torch.empty(n, dtype=torch.long)
        step = self._chunk_rows()
        for c in sorted(set(predictions.tolist())):
            slots = (predictions == c).nonzero().squeeze(1)
            for start in range(0, slots.shape[0], step):
                rows = slots[start : start + step]
                dist = (
                    gram.index_select(0, rows)
                    .mul_(-2.0)
                    .add_(norms.unsqueeze(0))
                    .add_(norms[rows].unsqueeze(1))
                    .clamp_(min=0.0)
                )
                own = self._order[rows]
                q, d, i = self._reduce_block(dist, int(c), own)
                q_out[own], d_out[own], i_out[own] = q, d, i
        return SimilarityResult(q_out, d_out, i_out)

    def _faiss_index(self) -> faiss.IndexFlatL2:
        if self._faiss is None:
            import faiss

            index = faiss.IndexFlatL2(self.dim)
            index.add(self.exemplars.numpy())
            self._faiss = index
        return self._faiss

    def neighbors(self, queries: object, k: int, exclude: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest support points per query in (distance, position) order: (L2 distances, positions).

        Rows with an excluded position return k - 1 real neighbours followed by (inf, -1) padding when the
        support has no more points.
        """
        x, ex = self._check_queries(queries, exclude)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self))
        if self.backend == "faiss":
            dist, pos = self._neighbors_faiss(x, k, ex)
        else:
            dist, pos = self._neighbors_torch(x, k, ex)
        return dist.sqrt(), pos

    def _neighbors_torch(self, x: torch.Tensor, k: int, ex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_d, out_i = [], []
        inf = torch.tensor(float("inf"))
        positions = torch.arange(len(self))
        step = self._chunk_rows()
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            dist = self._distances(x[start:stop])
            rows = torch.arange(stop - start)
            ex_chunk = ex[start:stop]
            has_ex = ex_chunk >= 0
            if bool(has_ex.any()):
                dist[rows[has_ex], ex_chunk[has_ex]] = inf
            # The k-th value; all strictly smaller entries are in, and ties at it go to the lowest positions.
            kth = dist.topk(k, dim=1, largest=False).values[:, -1:]
            below = dist < kth
            tied = dist == kth
            room = k - below.sum(dim=1, keepdim=True)
            chosen = below | (tied & (torch.cumsum(tied.to(torch.int32), dim=1) <= room))
            cols = positions.unsqueeze(0).expand_as(dist)[chosen].reshape(stop - start, k)
            vals = dist.gather(1, cols)
            order = torch.sort(vals, dim=1, stable=True).indices  # cols are ascending: ties keep position order
            out_d.append(vals.gather(1, order))
            out_i.append(cols.gather(1, order))
        dist, pos = torch.cat(out_d), torch.cat(out_i)
        pos = torch.where(torch.isinf(dist), torch.full_like(pos, -1), pos)
        return dist, pos

    def _neighbors_faiss(self, x: torch.Tensor, k: int, ex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = 2 if bool((ex >= 0).any()) else 1  # one more than needed lets boundary ties resolve by position
        k_search = min(k + extra, len(self))
        d, i = self._faiss_index().search(x.numpy(), k_search)
        d = np.maximum(d.astype(np.float32), 0.0)
        i = i.astype(np.int64)
        ex_np = ex.numpy()
        d[i == ex_np[:, None]] = np.inf
        order = np.lexsort((i, d), axis=1)  # primary: distance, secondary: position
        d = np.take_along_axis(d, order, axis=1)[:, :k]
        i = np.take_along_axis(i, order, axis=1)[:, :k]
        i[np.isinf(d)] = -1
        return torch.from_numpy(d), torch.from_numpy(i)

    def _similarity_faiss(self, x: torch.Tensor, yhat: torch.Tensor, ex: torch.Tensor) -> SimilarityResult:
        k = self.k()
        dist, pos = self._neighbors_faiss(x, k, ex)
        valid = pos >= 0
        safe = pos.clamp(min=0)
        match = valid & (self.labels[safe] == self.predictions[safe]) & (self.predictions[safe] == yhat.unsqueeze(1))
        q = similarity_from_matches(match)
        q = torch.minimum(q, k - (ex >= 0).to(torch.long))
        return SimilarityResult(q, dist[:, 0].sqrt(), pos[:, 0])
