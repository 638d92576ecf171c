"""server.batching: concurrent items grouped into batches, run in a worker thread, answered in order."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


def test_batcher_groups_concurrent_items_and_keeps_order() -> None:
    from server.batching import DynamicBatcher

    batches: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        batches.append(list(items))
        time.sleep(0.01)
        return [i * 10 for i in items]

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=4, max_wait_s=0.05)
            results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            await batcher.close()
            return results

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert max(len(b) for b in batches) == 4 and sum(len(b) for b in batches) == 10
    assert len(batches) <= 4


def test_batcher_skips_cancelled_items_and_reports_errors() -> None:
    from server.batching import DynamicBatcher

    seen: list[int] = []

    def process(items: list[int]) -> list[int]:
        seen.extend(items)
        if 99 in items:
            raise RuntimeError("boom")
        return items

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=8, max_wait_s=0.05)
            dropped = asyncio.ensure_future(batcher.submit(1))
            kept = asyncio.ensure_future(batcher.submit(2))
            await asyncio.sleep(0)
            dropped.cancel()
            assert await kept == 2
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(99)
            await batcher.close()

    asyncio.run(main())
    assert 1 not in seen


def _closed_loop_batches(rejoin_s: float, clients: int, rounds: int, think_s: float) -> tuple[list[int], float]:
    """Batch sizes when ``clients`` callers each submit, wait for the answer, spend ``think_s * i`` (caller i:
    staggered, as answers leave a server one after the other) and submit again, ``rounds`` times; and the wall time."""
    from server.batching import DynamicBatcher

    sizes: list[int] = []

    def process(items: list[int]) -> list[int]:
        sizes.append(len(items))
        time.sleep(0.05)
        return items

    async def client(batcher: DynamicBatcher, i: int) -> None:
        for _ in range(rounds):
            await batcher.submit(i)
            await asyncio.sleep(think_s * i)

    async def main() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=clients, max_wait_s=0.005, rejoin_s=rejoin_s)
            started = time.perf_counter()
            await asyncio.gather(*(client(batcher, i) for i in range(clients)))
            elapsed = time.perf_counter() - started
            await batcher.close()
            return elapsed

    elapsed = asyncio.run(main())
    return sizes, elapsed


def test_batches_wait_for_the_callers_just_answered_so_a_closed_loop_keeps_full_batches() -> None:
    # Without the rejoin wait, staggered returns split 8 callers into alternating partial batches.
    split, _ = _closed_loop_batches(rejoin_s=0.0, clients=8, rounds=6, think_s=0.004)
    assert sum(split) / len(split) < 6, split
    full, _ = _closed_loop_batches(rejoin_s=0.5, clients=8, rounds=6, think_s=0.004)
    assert full == [8] * 6, full


def test_a_lone_caller_is_not_held_back_by_the_rejoin_wait() -> None:
    # One caller: its return is the one the wait expects, so each batch runs right away (not 0.5 s later).
    sizes, elapsed = _closed_loop_batches(rejoin_s=0.5, clients=1, rounds=6, think_s=0.0)
    assert sizes == [1] * 6 and elapsed < 6 * 0.05 + 0.5, elapsed


def test_callers_that_do_not_come_back_delay_the_next_batch_by_at_most_the_rejoin_wait() -> None:
    from server.batching import DynamicBatcher

    starts: list[float] = []

    def process(items: list[int]) -> list[int]:
        starts.append(time.perf_counter())
        return items

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=8, max_wait_s=0.005, rejoin_s=0.2)
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))  # four answered; none comes back
            await batcher.submit(99)
            await batcher.close()

    asyncio.run(main())
    waited = starts[1] - starts[0]
    assert 0.15 <= waited < 0.6, waited
