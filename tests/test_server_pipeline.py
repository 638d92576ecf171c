"""server.pipeline without a model: the seeds of resampled attempts."""

from __future__ import annotations


def test_derived_seeds_differ_per_attempt() -> None:
    from server.pipeline import derive_seed

    assert derive_seed(5, 0) == 5 and derive_seed(None, 3) is None
    seeds = {derive_seed(5, k) for k in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
