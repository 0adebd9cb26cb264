"""Concurrency limits and rate ceilings for model requests.

:class:`Limiter` is a semaphore whose size can change while tasks wait on it. The fixed
limit (``--concurrency N``) sets it once; :class:`AdaptiveLimiter` (``--concurrency auto``)
moves it between ``min_concurrency`` and ``max_concurrency`` from what the model answers:

* **multiplicative decrease** on 429 / ``RESOURCE_EXHAUSTED`` and on timeouts, at most
  once per round trip, and only for requests sent after the last cut (a burst of 429s
  from one window is one congestion signal, not fifty). Leaving slow start the window is
  halved, later cuts take 10%. The cut goes at least down to what the quota just proved it can carry: the
  requests that succeeded in the last round trip (Little's law: rate x latency), so an
  overshoot of 4x is undone in one step instead of thirteen;
* a 429 keeps its slot for one round trip: a rejected request comes back in a
  millisecond, and handing its slot straight to the next request turns an exhausted
  quota into a storm of instant 429s;
* a **pause** of new requests for as long as ``Retry-After`` / ``retry-after-ms`` asks;
* **additive increase** while requests succeed *and* the limit is actually in use (an idle
  limit proves nothing about the quota). Growth starts as slow start (x1.25 per round
  trip) until the first congestion signal; then +1/4 per round trip while below the
  level of the last signal (creeping up on the quota keeps 429s rare), and past it +1
  per round trip, the step doubling for every further round trip without a signal
  (capped) so the limit climbs back quickly when a quota is lifted.

Why AIMD rather than a latency-gradient scheme: an exhausted quota shows up as 429
answers, not as slower 200s (a token-bucket quota, like the simulator's, rejects the
excess at once and leaves the rest alone), so the latency of successful requests does
not rise as the quota is approached and a gradient scheme has no signal before the 429s
start. (Measured in bench P2: at the quota, with 429s arriving, the
smoothed latency of successes was 305 ms against the simulator's 300 ms.) The 429 itself
is the signal, and AIMD reacts to exactly that.

:class:`RateCeiling` is the optional hard ceiling (``--rpm``, ``--tpm``): token buckets
checked before a request is sent, with the request's tokens estimated up front and the
estimate corrected from the answer's ``usage``.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable
from typing import Final, Literal

import anyio

from .clock import SYSTEM_CLOCK, Clock

__all__ = [
    "OUTCOMES",
    "AdaptiveLimiter",
    "ByteBudget",
    "Limiter",
    "Outcome",
    "RateCeiling",
    "TokenBucket",
]

DEFAULT_INITIAL: Final = 16
#: The outcome of one model request, as a limiter is told it.
Outcome = Literal["ok", "rate_limited", "timeout", "transient", "unauthorized", "permanent"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "ok",
    "rate_limited",
    "timeout",
    "transient",
    "unauthorized",
    "permanent",
)


class Limiter:
    """A resizable semaphore. Lowering the limit never cancels holders; it only stops
    new admissions until enough of them have released.

    It also counts the outcome of every model request (:meth:`observe`), so metrics and
    the load-test display read the same numbers whichever limiter is in use.
    """

    __slots__ = (
        "_clock",
        "_in_use",
        "_limit",
        "_waiters",
        "counts",
        "demand",
        "listener",
        "rate_limited_at",
    )

    def __init__(self, limit: int, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._clock = clock
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[anyio.Event] = deque()
        #: Model requests by outcome (see :data:`OUTCOMES`).
        self.counts: dict[Outcome, int] = dict.fromkeys(OUTCOMES, 0)
        #: Called when a slot may have become free (a release, a higher limit): an owner
        #: that queues requests itself (the endpoint pool) hands the slot on from here.
        self.listener: Callable[[], None] | None = None
        #: Requests waiting elsewhere for this limiter (the pool's queue): they count as
        #: demand when an adaptive limit asks whether it is being used.
        self.demand: Callable[[], int] | None = None
        #: Clock time of the latest 429 (quota saturation reads it).
        self.rate_limited_at = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def adaptive(self) -> bool:
        return False

    @property
    def paused_for_s(self) -> float:
        """Seconds until new requests may go (a server asked for a pause); 0: now."""
        return 0.0

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._wake()
        if self.listener is not None:
            self.listener()

    @property
    def has_room(self) -> bool:
        return self._in_use < self._limit and not self._waiters

    def try_acquire(self) -> bool:
        """Take a slot if one is free now (nobody queued here first); never waits."""
        if self.has_room:
            self._in_use += 1
            return True
        return False

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
        if self.listener is not None:
            self.listener()

    def _waiting(self) -> int:
        return len(self._waiters) + (self.demand() if self.demand is not None else 0)

    def observe(
        self,
        outcome: Outcome,
        latency_s: float,
        retry_after_s: float | None = None,
        *,
        paced: bool = False,
    ) -> None:
        """One model request finished with ``outcome``. ``paced``: the backend's own
        quota headers pace requests (see :class:`HeaderQuota`), so a 429 says the pacing
        overshot, not that too many requests are in flight."""
        self.counts[outcome] += 1
        if outcome == "rate_limited":
            self.rate_limited_at = self._clock.now()

    def _wake(self) -> None:
        # A woken waiter owns its slot from the moment its event is set.
        while self._waiters and self._in_use < self._limit:
            self._in_use += 1
            self._waiters.popleft().set()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdaptiveLimiter(Limiter):
    """AIMD on the number of model requests in flight; see the module docstring.

    Readable state for metrics: :attr:`limit`, :attr:`counts`, :attr:`decreases`,
    :attr:`increases`, :attr:`pauses`, :attr:`rtt_s`, :attr:`paused_for_s`.
    """

    __slots__ = (
        "_delivered",
        "_last_decrease",
        "_next_step_at",
        "_paused_until",
        "_rejected_since_cut",
        "_slow_start",
        "_step",
        "_w_max",
        "_window",
        "backoff",
        "decreases",
        "increases",
        "max_limit",
        "min_cooldown_s",
        "min_limit",
        "pauses",
        "rtt_s",
    )

    def __init__(
        self,
        min_limit: int = 1,
        max_limit: int = 256,
        *,
        initial: int | None = None,
        backoff: float = 0.9,
        min_cooldown_s: float = 0.01,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not 0 < backoff < 1:
            raise ValueError("backoff must be in (0, 1)")
        # Start at 16 (within the bounds): a useful first window for any real quota, and
        # slow start finds the rest within a few round trips.
        start = min(max(initial or DEFAULT_INITIAL, min_limit), max_limit)
        super().__init__(start, clock=clock)
        self.min_limit = min_limit
        self.max_limit = max_limit
        # A gentle cut: with a token-bucket quota, time spent below the quota is lost for
        # good while a little time above it only costs cheap, immediate 429s.
        self.backoff = backoff
        self.min_cooldown_s = min_cooldown_s
        self._window = float(start)
        self._slow_start = True
        self._step = 1.0
        # The window when the last congestion signal came (the quota's level, roughly).
        self._w_max = 0.0
        self._last_decrease = -math.inf
        self._next_step_at = 0.0
        self._paused_until = 0.0
        # Finish times of the successes of (about) the last round trip.
        self._delivered: deque[float] = deque()
        self._rejected_since_cut = 0
        #: Smoothed latency of successful requests: the controller's notion of a round trip.
        self.rtt_s = 0.0
        self.decreases = 0
        self.increases = 0
        self.pauses = 0

    @property
    def adaptive(self) -> bool:
        return True

    @property
    def window(self) -> float:
        """The unrounded limit."""
        return self._window

    @property
    def paused_for_s(self) -> float:
        return max(0.0, self._paused_until - self._clock.now())

    async def acquire(self) -> None:
        # Honour a server-requested pause before queueing for a slot. Re-check after the
        # sleep: another 429 may have extended it.
        while True:
            delay = self._paused_until - self._clock.now()
            if delay <= 0:
                break
            await self._clock.sleep(delay)
        await super().acquire()

    def observe(
        self,
        outcome: Outcome,
        latency_s: float,
        retry_after_s: float | None = None,
        *,
        paced: bool = False,
    ) -> None:
        self.counts[outcome] += 1
        now = self._clock.now()
        if outcome == "rate_limited":
            self.rate_limited_at = now
        if outcome == "ok":
            self._on_success(latency_s, now)
        elif outcome in ("rate_limited", "timeout"):
            if retry_after_s:
                until = now + retry_after_s
                if until > self._paused_until:
                    self._paused_until = until
                    self.pauses += 1
            if paced and outcome == "rate_limited":
                # The quota's rate is known and paced; cutting concurrency below rate x
                # latency would only waste it (measured: a bucket that starts nearly
                # empty answered the first burst with 429s, and the cut cost 12% of a
                # 20 s run while the limit crept back).
                return
            self._on_congestion(now, now - latency_s)
            if outcome == "rate_limited":
                self._hold_slot()

    def _hold_slot(self) -> None:
        # Called before the caller releases its slot: take a phantom one that is given
        # back a round trip later (see the module docstring).
        self._in_use += 1
        self._clock.call_later(self._cooldown_s(), self.release)

    def _cooldown_s(self) -> float:
        return max(self.rtt_s, self.min_cooldown_s)

    def _on_success(self, latency_s: float, now: float) -> None:
        self.rtt_s = latency_s if self.rtt_s == 0.0 else 0.9 * self.rtt_s + 0.1 * latency_s
        delivered = self._delivered
        delivered.append(now)
        horizon = now - self._cooldown_s()
        while delivered[0] < horizon:
            delivered.popleft()
        # Only a limit that is being used has been tested: count the request that just
        # finished (it has released its slot by now) as still in use.
        if self._in_use + self._waiting() + 1 < self._limit:
            return
        if self._window >= self.max_limit:
            return
        if self._slow_start:
            # x1.25 per round trip: a gentler overshoot than TCP's doubling, since every
            # request beyond the quota comes back as a 429.
            self._window += 0.25
        elif self._window < self._w_max:
            # Below the level of the last congestion signal: creep up on it (+1/4 per
            # round trip), so the sawtooth's period is long and its 429s are few.
            self._window += 0.25 / self._window
        else:
            # Past it (the quota may have grown): +step per round trip, spread over the
            # window's worth of answers in one.
            self._window += self._step / self._window
            if now >= self._next_step_at:
                # A whole round trip without congestion: probe harder next time.
                self._step = min(self._step * 2.0, max(1.0, self._window / 8.0))
                self._next_step_at = now + self._cooldown_s()
        self._window = min(self._window, float(self.max_limit))
        self._apply()

    def _on_congestion(self, now: float, sent_at: float) -> None:
        if sent_at < self._last_decrease:
            # Sent under a window already cut: its rejection says nothing about the new one.
            return
        self._rejected_since_cut += 1
        if now - self._last_decrease < self._cooldown_s() and self._rejected_since_cut <= max(
            2.0, self._window * (1.0 - self.backoff)
        ):
            # Same window of requests, already acted on, unless more of them were
            # rejected since than the last cut took away: then that cut was too small.
            return
        self._last_decrease = now
        self._rejected_since_cut = 0
        self._step = 1.0
        # Past the old level, probe gently (+1 per round trip) for a few round trips
        # before probing harder.
        self._next_step_at = now + 4 * self._cooldown_s()
        horizon = now - self._cooldown_s()
        delivered = self._delivered
        while delivered and delivered[0] < horizon:
            delivered.popleft()
        self._w_max = self._window
        # Leaving slow start, halve (as TCP does): the window grew x1.25 per round trip and
        # a quota's burst allowance can hide its level for a while, so the first signal
        # comes late and the overshoot is large. Later signals come from small probes.
        cut = self._window * (0.5 if self._slow_start else self.backoff)
        # What the quota carried in the last round trip is a measurement only when the
        # limit was in use (a quiet spell carries little and proves nothing); and no
        # single step cuts below a quarter.
        if self._in_use + self._waiting() >= self._limit - 1:
            carried = float(len(delivered))
            cut = min(cut, max(carried, self._window * 0.25))
        self._window = max(float(self.min_limit), cut)
        self._slow_start = False
        self.decreases += 1
        self._apply()

    def _apply(self) -> None:
        new = max(self.min_limit, min(self.max_limit, int(self._window)))
        if new > self._limit:
            self.increases += 1
        if new != self._limit:
            self.set_limit(new)


class TokenBucket:
    """``rate_per_s`` tokens a second, holding at most ``capacity``. May go into debt
    (a correction after the fact); a debtor waits until the debt is paid."""

    __slots__ = ("_clock", "_stamp", "_tokens", "capacity", "rate_per_s")

    def __init__(self, rate_per_s: float, capacity: float, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be > 0")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock.now()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now

    @property
    def tokens(self) -> float:
        self._refill(self._clock.now())
        return self._tokens

    def take(self, n: float) -> float:
        """Take ``n`` tokens now (possibly into debt); return the seconds the caller should
        wait before sending, 0 when the tokens were there."""
        self._refill(self._clock.now())
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s

    def give(self, n: float) -> None:
        """Correct an estimate: ``n`` > 0 returns tokens, ``n`` < 0 takes more."""
        self._refill(self._clock.now())
        self._tokens = min(self.capacity, self._tokens + n)

    def set_tokens(self, n: float) -> None:
        """What the bucket holds now (a backend told us)."""
        self._refill(self._clock.now())
        self._tokens = min(self.capacity, n)

    def time_for(self, n: float) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        self._refill(self._clock.now())
        missing = n - self._tokens
        # A hair short is there: float refills must not leave a caller waiting forever.
        return 0.0 if missing <= 1e-9 else missing / self.rate_per_s


class RateCeiling:
    """Hard ceilings for users who know their quota: requests and tokens per minute.

    A request reserves its tokens before it is sent (an estimate: the running mean of
    real ``total_tokens``, starting from ``initial_tokens_estimate``) and the estimate is
    corrected from ``usage`` when the answer comes. :meth:`ready_in_s` and :meth:`take`
    serve a caller that does its own queueing (the endpoint pool); :meth:`acquire` waits
    by itself, first come, first served.
    """

    __slots__ = ("_clock", "_lock", "est_tokens", "requests", "tokens", "waited_s")

    def __init__(
        self,
        *,
        rpm: float = 0,
        tpm: float = 0,
        initial_tokens_estimate: float = 600.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        # One second of quota as burst: per-minute quotas are enforced over short windows.
        self.requests = (
            TokenBucket(rpm / 60.0, max(1.0, rpm / 60.0), clock=clock) if rpm > 0 else None
        )
        self.tokens = (
            TokenBucket(tpm / 60.0, max(initial_tokens_estimate, tpm / 60.0), clock=clock)
            if tpm > 0
            else None
        )
        self.est_tokens = initial_tokens_estimate
        self.waited_s = 0.0
        self._lock = anyio.Lock()

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def ready_in_s(self) -> float:
        """Seconds until one more request fits (0: now)."""
        wait = 0.0
        if self.requests is not None:
            wait = self.requests.time_for(1.0)
        if self.tokens is not None:
            wait = max(wait, self.tokens.time_for(self.est_tokens))
        return wait

    def take(self) -> float:
        """Reserve one request now (into debt if it does not fit); the tokens reserved."""
        estimate = self.est_tokens if self.tokens is not None else 0.0
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(estimate)
        return estimate

    async def acquire(self) -> float:
        """Wait until one more request fits; return the tokens reserved for it."""
        async with self._lock:
            # Holding the lock keeps the order: later callers queue behind this one.
            delay = self.ready_in_s()
            if delay > 0:
                self.waited_s += delay
                await self._clock.sleep(delay)
            return self.take()

    def settle(self, reserved: float, used_tokens: int | None) -> None:
        """Correct the reservation from the answer's ``usage.total_tokens`` (None: an
        error answer, which Vertex does not charge tokens for)."""
        if self.tokens is None:
            return
        used = float(used_tokens or 0)
        self.tokens.give(reserved - used)
        if used_tokens:
            self.est_tokens = 0.9 * self.est_tokens + 0.1 * used


class HeaderQuota:
    """A backend's own account of its request quota, from OpenAI-style headers.

    Many OpenAI-compatible backends send ``x-ratelimit-limit-requests``,
    ``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` (the time until
    the quota is whole again) on every answer; Vertex AI does not. When they come, the
    quota is a token bucket we can see: ``remaining`` tokens now, refilling at
    ``(limit - remaining) / reset`` a second. Pacing requests by it keeps the rate just
    under the quota, where AIMD alone would bounce off it with a 429 now and then.
    Inactive (never holds a request back) until a backend sends the headers.
    """

    __slots__ = ("_clock", "bucket", "updates")

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.bucket: TokenBucket | None = None
        self.updates = 0

    def observe(self, limit: float, remaining: float, reset_s: float) -> None:
        """An answer's headers. ``remaining`` was counted when the backend answered, so
        it already includes what we had in flight then: believe it over our own count
        when it is lower."""
        if limit <= 0 or remaining < 0 or reset_s < 0:
            return
        used = max(limit - remaining, 0.0)
        rate = used / reset_s if reset_s > 0 else 0.0
        self.updates += 1
        if rate <= 0:
            if self.bucket is not None:
                self.bucket.set_tokens(max(self.bucket.tokens, remaining))
            return
        if self.bucket is None:
            self.bucket = TokenBucket(rate, limit, clock=self._clock)
            self.bucket.set_tokens(remaining)
            return
        # Smooth the refill rate: reset times come rounded (to ms or s).
        self.bucket.rate_per_s = 0.8 * self.bucket.rate_per_s + 0.2 * rate
        self.bucket.capacity = limit
        # ``remaining`` is whole tokens, rounded down: the backend may hold up to one more.
        # Cutting our count to it would throw the fraction away on every answer (at 100
        # answers a second, over 10% of the quota, measured in bench Q2).
        self.bucket.set_tokens(min(self.bucket.tokens, remaining + 0.99))

    @property
    def active(self) -> bool:
        """The backend sends quota headers: requests are paced by them."""
        return self.bucket is not None

    def ready_in_s(self) -> float:
        return 0.0 if self.bucket is None else self.bucket.time_for(1.0)

    def take(self) -> None:
        if self.bucket is not None:
            self.bucket.take(1.0)


def parse_reset_s(text: str) -> float | None:
    """``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``, or plain seconds, as seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class ByteBudget:
    """Bytes that jobs may hold at once (inlined images), first come, first served.

    ``take`` waits until the bytes fit; a request larger than the whole budget is let
    through when nothing else is held, so one oversized take cannot wait forever.
    """

    __slots__ = ("_waiters", "capacity", "used")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.capacity

    async def take(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.used += n
            return
        entry = (n, anyio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.give(n)  # granted while being cancelled: hand it back
            else:
                self._waiters.remove(entry)
                self._wake()  # we may have been blocking smaller takes behind us
            raise

    def give(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, event = self._waiters.popleft()
            self.used += n
            event.set()
