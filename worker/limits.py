"""Concurrency limits: how many model requests may be in flight.

:class:`Limiter` is a semaphore whose size can change while tasks wait on it. The fixed
limit sets it once; the adaptive controller (``--concurrency auto``) moves it.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["Limiter"]


class Limiter:
    """A resizable semaphore. Lowering the limit never cancels holders; it only stops
    new admissions until enough of them have released."""

    __slots__ = ("_in_use", "_limit", "_waiters")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._wake()

    async def acquire(self) -> None:
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                # We were handed a slot while being cancelled: give it back.
                self.release()
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        # A woken waiter owns its slot from the moment its event is set.
        while self._waiters and self._in_use < self._limit:
            self._in_use += 1
            self._waiters.popleft().set()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
