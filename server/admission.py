"""Admission control: at most ``max_concurrent`` requests hold a processing slot, at most ``max_queue`` wait for
one (first come, first served); beyond that a request is refused at once with a Retry-After estimate."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Callable

__all__ = ["AdmissionController", "Overloaded"]


class Overloaded(Exception):
    """Every slot is taken and the queue is full."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"overloaded; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class AdmissionController:
    def __init__(self, max_concurrent: int, max_queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._on_change = on_change
        self._service_s = 1.0  # EWMA of how long a slot is held, for Retry-After

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.active, self.waiting)

    def retry_after(self) -> int:
        rounds = (self.waiting + 1) / self.max_concurrent
        return int(min(60, max(1, math.ceil(self._service_s * rounds))))

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds spent waiting. Raises :class:`Overloaded` when the queue is full."""
        started = time.perf_counter()
        if self.active < self.max_concurrent and self.waiting == 0:
            self.active += 1
            self._changed()
            return 0.0
        if self.waiting >= self.max_queue:
            raise Overloaded(self.retry_after())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._changed()
        try:
            await future  # on success the releasing request handed its slot over (active unchanged)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(0.0)  # granted just as we were cancelled: pass the slot on
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
            self._service_s = 0.8 * self._service_s + 0.2 * held_s
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._changed()
                return
        self.active = max(0, self.active - 1)
        self._changed()
