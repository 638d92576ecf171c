"""Admission control: at most ``max_concurrent`` requests hold a processing slot, at most ``max_queue`` wait for
one (first come, first served); beyond that a request is refused at once with a Retry-After estimate.

The estimate is when a slot is likely to be free for the refused request: each running request is expected to
take the median of the recent service times (or, with no history yet, at least as long again as it has run so
far), and the waiting requests are served before it."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

__all__ = ["AdmissionController", "Overloaded"]


class Overloaded(Exception):
    """Every slot is taken and the queue is full."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"overloaded; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class AdmissionController:
    HISTORY = 32  # service times the Retry-After estimate looks at
    MAX_RETRY_AFTER_S = 60

    def __init__(
        self,
        max_concurrent: int,
        max_queue: int,
        on_change: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._on_change = on_change
        self._clock = clock
        self._service: deque[float] = deque(maxlen=self.HISTORY)  # recent seconds a slot was held
        self._started: deque[float] = deque()  # when each held slot was taken (oldest first)

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.active, self.waiting)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request (1 to 60)."""
        now = self._clock()
        typical = statistics.median(self._service) if self._service else None
        remaining = []
        for started in self._started:
            elapsed = now - started
            if typical is None:
                remaining.append(max(elapsed, 1.0))  # it has run this long: expect as long again
            else:
                remaining.append(max(typical - elapsed, 0.1 * typical))
        remaining.sort()
        per_round = typical if typical is not None else (max(remaining) if remaining else 1.0)
        ahead = self.waiting  # served before this request
        if remaining:
            slot = remaining[ahead % len(remaining)] + per_round * (ahead // len(remaining))
        else:
            slot = per_round * (ahead // self.max_concurrent + 1)
        return int(min(self.MAX_RETRY_AFTER_S, max(1, math.ceil(slot))))

    def _take(self) -> None:
        self._started.append(self._clock())

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds spent waiting. Raises :class:`Overloaded` when the queue is full."""
        started = time.perf_counter()
        if self.active < self.max_concurrent and self.waiting == 0:
            self.active += 1
            self._take()
            self._changed()
            return 0.0
        if self.waiting >= self.max_queue:
            raise Overloaded(self.retry_after())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._changed()
        try:
            await future  # on success the releasing request handed its slot over (active unchanged)
            self._take()
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._take()
                self.release(None)  # granted just as we were cancelled: pass the slot on
            else:
                try:
                    self._waiters.remove(future)
                except ValueError:
                    pass
                self._changed()
            raise
        return time.perf_counter() - started

    def release(self, held_s: float | None = None) -> None:
        """Give the slot back (to the longest waiter, if any). ``held_s`` updates the Retry-After estimate."""
        if held_s is not None and held_s > 0:
            self._service.append(held_s)
        if self._started:  # forget the start of the slot given back (the one taken held_s ago, else the oldest)
            if held_s is not None and held_s > 0:
                taken = self._clock() - held_s
                self._started.remove(min(self._started, key=lambda t: abs(t - taken)))
            else:
                self._started.popleft()
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._changed()
                return
        self.active = max(0, self.active - 1)
        self._changed()
