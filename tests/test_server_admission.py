"""server.admission: a bounded number of processing slots, a bounded queue, then refusals with Retry-After."""

from __future__ import annotations

import asyncio

import pytest


def test_admission_queues_then_refuses_with_retry_after() -> None:
    from server.admission import AdmissionController, Overloaded

    changes: list[tuple[int, int]] = []

    async def main() -> None:
        gate = AdmissionController(1, 1, lambda a, w: changes.append((a, w)))
        assert await gate.acquire() == 0.0
        waiter = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert gate.waiting == 1
        with pytest.raises(Overloaded) as info:
            await gate.acquire()
        assert 1 <= info.value.retry_after_s <= 60
        gate.release(0.5)
        assert await waiter >= 0.0 and gate.active == 1
        gate.release()
        assert gate.active == 0
        # a cancelled waiter leaves the queue
        await gate.acquire()
        cancelled = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert gate.waiting == 0
        gate.release()
        assert gate.active == 0

    asyncio.run(main())
    assert (1, 1) in changes
