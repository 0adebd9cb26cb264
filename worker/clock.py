"""Time as a join: the parts that decide by the clock take one, so tests can drive them.

:data:`SYSTEM_CLOCK` is the real thing (``time.monotonic``, ``anyio.sleep`` and the event
loop's timers). :class:`ManualClock` stands still until a test moves it: sleepers wake
and timers fire only inside :meth:`ManualClock.advance`, so a limiter's slow start,
cuts, pauses and recovery can be checked step by step with no sleep and no race.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock", "Timer"]


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, a sleep on the same scale, and a one-shot timer."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` (synchronously, on the event loop) ``delay_s`` from now."""
        ...


class SystemClock:
    """``time.monotonic`` and the running event loop."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


SYSTEM_CLOCK = SystemClock()


class _ManualTimer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to (tests).

    ``await clock.sleep(s)`` returns once :meth:`advance` has moved the clock ``s``
    past the moment it was called; ``call_later`` callbacks run inside :meth:`advance`,
    in time order. A test that needs a sleeper to be waiting before it advances uses
    ``anyio.testing.wait_all_tasks_blocked()``.
    """

    def __init__(self, start: float = 1000.0, *, auto_advance: bool = False) -> None:
        self._now = start
        # auto_advance: a sleep moves the clock by itself and returns at once (for code
        # that only sleeps, such as a retry loop: its waits are then checked, not waited).
        self.auto_advance = auto_advance
        self._seq = itertools.count()
        self._due: list[tuple[float, int, Callable[[], None], _ManualTimer]] = []
        #: Every sleep asked for, in order (seconds).
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0 or self.auto_advance:
            self.slept.append(max(0.0, seconds))
            if seconds > 0:
                self.advance(seconds)
            await anyio.lowlevel.checkpoint()
            return
        self.slept.append(seconds)
        woken = anyio.Event()
        timer = self.call_later(seconds, woken.set)
        try:
            await woken.wait()
        finally:
            timer.cancel()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer()
        heapq.heappush(self._due, (self._now + max(0.0, delay_s), next(self._seq), callback, timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer that falls due on the way."""
        target = self._now + seconds
        while self._due and self._due[0][0] <= target:
            at, _, callback, timer = heapq.heappop(self._due)
            self._now = max(self._now, at)
            if not timer.cancelled:
                callback()
        self._now = target

    @property
    def pending(self) -> int:
        """Timers and sleepers not yet due (cancelled ones excluded)."""
        return sum(1 for *_, timer in self._due if not timer.cancelled)
