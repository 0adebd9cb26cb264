"""A discrete-event drive for limiters: requests against a virtual quota on a ManualClock.

Every request a limiter lets through is "sent" at once: the quota (a token bucket, like
Vertex AI's and the simulator's) accepts it, and it answers 200 after ``rtt_s``, or
rejects it, and it answers 429 a millisecond later. A slot that frees up is taken again
at once, before the limiter hears the answer, as it is in the pipeline, where jobs wait
for a slot and the release hands it straight to one of them. Nothing sleeps and nothing races: the same
drive gives the same trajectory every time, so tests can assert on it exactly.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from worker.clock import ManualClock
from worker.limits import AdaptiveLimiter, Limiter

__all__ = ["Bucket", "Drive", "Sample"]


@dataclass
class Bucket:
    """``rate`` tokens a second, at most ``capacity``; a request takes one."""

    rate: float
    capacity: float
    tokens: float | None = None
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens is None:
            self.tokens, self.stamp = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Sample:
    t: float
    limit: int
    in_use: int


@dataclass
class Drive:
    limiter: Limiter
    clock: ManualClock
    rtt_s: float = 0.1
    quota: Bucket | None = None
    retry_after_s: float | None = None
    reject_latency_s: float = 0.001
    #: Answers by outcome, and what was sent.
    ok: int = 0
    rejected: int = 0
    sent: int = 0
    samples: list[Sample] = field(default_factory=list)
    _due: list[tuple[float, int, bool, float]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    async def fill(self) -> None:
        """Send requests while the limiter has room (and is not paused)."""
        limiter = self.limiter
        while limiter.in_use < limiter.limit and not self._paused():
            await limiter.acquire()  # room and no waiters: returns at once
            now = self.clock.now()
            self.sent += 1
            accepted = self.quota is None or self.quota.take(now)
            latency = self.rtt_s if accepted else self.reject_latency_s
            heapq.heappush(self._due, (now + latency, next(self._seq), accepted, latency))

    def _paused(self) -> bool:
        return isinstance(self.limiter, AdaptiveLimiter) and self.limiter.paused_for_s > 0

    async def run_for(self, seconds: float) -> None:
        end = self.clock.now() + seconds
        await self.fill()
        next_sample = self.clock.now()
        while True:
            candidates = [end, next_sample]
            if self._due:
                candidates.append(self._due[0][0])
            if self._paused():
                assert isinstance(self.limiter, AdaptiveLimiter)
                candidates.append(self.clock.now() + self.limiter.paused_for_s)
            at = min(candidates)
            if at > end:
                break
            self.clock.advance(max(0.0, at - self.clock.now()))
            if at == next_sample:
                self.samples.append(Sample(at, self.limiter.limit, self.limiter.in_use))
                next_sample += self.rtt_s
            while self._due and self._due[0][0] <= self.clock.now():
                _, _, accepted, latency = heapq.heappop(self._due)
                await self._answer(accepted, latency)
            await self.fill()
            if at >= end:
                break

    async def _answer(self, accepted: bool, latency: float) -> None:
        limiter = self.limiter
        if accepted:
            # As the endpoint pool does: the slot goes back (to a waiting job), then the
            # limiter hears the answer.
            self.ok += 1
            limiter.release()
            await self.fill()
            limiter.observe("ok", latency)
        else:
            self.rejected += 1
            limiter.observe("rate_limited", latency, self.retry_after_s)
            limiter.release()
            await self.fill()

    def mean_limit(self, since: float) -> float:
        tail = [s.limit for s in self.samples if s.t >= since]
        return sum(tail) / len(tail)
