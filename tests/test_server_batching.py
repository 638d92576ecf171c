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
