"""What is retried, how long we wait, and how attempts and deadlines are counted.

One loop (:func:`retry_call`, on tenacity) serves every caller: the model, Pub/Sub,
image and Cloud Storage fetches, and token refreshes. A caller states only its own
budget, a :class:`RetryPolicy`; the rules below are the same for all of them.

===================================  ============  ========================================
failure                              kind          what happens
===================================  ============  ========================================
HTTP 429 / ``RESOURCE_EXHAUSTED``    rate_limited  wait the answer's Retry-After (else
                                                   backoff); uses no attempt unless the
                                                   policy says so (only time)
HTTP 408, 425, 5xx; timeout; reset   transient     full-jitter backoff; uses an attempt
HTTP 401                             unauthorized  the caller refreshed its token: retry
                                                   at once; a second 401 is transient
anything else                        permanent     raised at once
===================================  ============  ========================================

A :class:`~worker.errors.ServiceError` carries its kind (set by the client that read the
answer, with :func:`kind_for_status`) and the pause the service asked for
(:func:`retry_after_s`). Plain ``TimeoutError``, ``ConnectionError`` and aiohttp's
client errors are transient; every other exception is permanent (a bug is not retried).

Backoff is full jitter over a capped exponential, ``uniform(0, min(max, initial *
2**(n-1)))`` where ``n`` counts failures so far; a server's Retry-After wins, with a
little jitter of its own so that a burst of rejected requests does not come back as
one. Each failure's own header is read: a later 429 that asks for longer is honoured.
Waits never run past the deadline: the last attempt is made at it.
"""

from __future__ import annotations

import email.utils
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

import aiohttp
from tenacity import DoAttempt, DoSleep, RetryCallState, Retrying

from .clock import SYSTEM_CLOCK, Clock
from .errors import Kind, ServiceError

__all__ = [
    "TRANSIENT_STATUS",
    "Kind",
    "OnRetry",
    "RetryPolicy",
    "RetryState",
    "kind_for_status",
    "kind_of",
    "retry_after_s",
    "retry_call",
]

T = TypeVar("T")

#: Statuses worth another try besides 429 (and any other 5xx).
TRANSIENT_STATUS = frozenset({408, 425, 500, 502, 503, 504})
# Retry-After beyond this is treated as this: a quota window longer than a few minutes is
# better served by handing the job back (queue) than by a sleeping task.
MAX_HONOURED_RETRY_AFTER_S = 300.0


def kind_for_status(status: int) -> Kind:
    """What an HTTP error status means for retrying (the one table, above)."""
    if status == 429:
        return "rate_limited"
    if status == 401:
        return "unauthorized"
    if status in TRANSIENT_STATUS or status >= 500:
        return "transient"
    return "permanent"


def kind_of(exc: BaseException) -> Kind:
    if isinstance(exc, ServiceError):
        return exc.kind
    if isinstance(exc, TimeoutError | ConnectionError | aiohttp.ClientError):
        return "transient"
    return "permanent"


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The server's requested pause: ``retry-after-ms`` wins over ``Retry-After``
    (seconds or an HTTP date). Capped at :data:`MAX_HONOURED_RETRY_AFTER_S`."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, min(float(ms) / 1000.0, MAX_HONOURED_RETRY_AFTER_S))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = parsed.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_HONOURED_RETRY_AFTER_S))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What one caller may spend on one operation.

    ``attempts`` bounds the failures that count (None: no bound); ``deadline_s`` the time
    from the first attempt (None: no bound). With neither, the loop retries transient
    failures until it is cancelled (a pull loop, a token refresher).
    """

    attempts: int | None = 8
    deadline_s: float | None = 600.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    #: Whether a 429 uses an attempt. The model's quota is waited out on time alone; an
    #: image host that keeps answering 429 is just failing.
    rate_limited_counts: bool = False

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be >= 1 (or None)")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError("deadline_s must be > 0 (or None)")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")


@dataclass(slots=True)
class RetryState:
    """One operation's account: read it after the call (records carry ``attempts``)."""

    #: Clock time of the first attempt; the deadline counts from here.
    started_at: float
    attempts: int = 0
    #: Failures that counted against ``RetryPolicy.attempts``.
    counted: int = 0
    rate_limited: int = 0
    unauthorized: int = 0
    last_error: BaseException | None = None


#: Told of each retry before its wait: (error, its kind, the wait in seconds, the state).
OnRetry = Callable[[BaseException, Kind, float, RetryState], None]


class _Loop:
    """tenacity's retry/wait/stop for one operation, all reading one :class:`RetryState`.

    tenacity asks ``retry`` first, then ``wait``, then ``stop``: the failure is
    accounted for in ``retry`` and the other two only read the account.
    """

    __slots__ = ("classify", "clock", "delay", "kind", "on_retry", "policy", "state")

    def __init__(
        self,
        policy: RetryPolicy,
        state: RetryState,
        classify: Callable[[BaseException], Kind],
        on_retry: OnRetry | None,
        clock: Clock,
    ) -> None:
        self.policy = policy
        self.state = state
        self.classify = classify
        self.on_retry = on_retry
        self.clock = clock
        self.kind: Kind = "permanent"
        self.delay = 0.0

    def retry(self, rs: RetryCallState) -> bool:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        if exc is None:
            return False
        kind = self.classify(exc)
        if kind == "permanent":
            return False
        s = self.state
        s.last_error = exc
        if kind == "unauthorized" and s.unauthorized == 0:
            # The caller refreshed its token before raising: go again at once, free.
            s.unauthorized += 1
        elif kind == "rate_limited" and not self.policy.rate_limited_counts:
            s.rate_limited += 1
        else:
            kind = "transient" if kind == "unauthorized" else kind
            s.counted += 1
        self.kind = kind
        return True

    def remaining_s(self) -> float:
        deadline = self.policy.deadline_s
        if deadline is None:
            return float("inf")
        return deadline - (self.clock.now() - self.state.started_at)

    def wait(self, rs: RetryCallState) -> float:
        s, p = self.state, self.policy
        exc = s.last_error
        if self.kind == "unauthorized":
            delay = 0.0
        else:
            hinted = exc.retry_after_s if isinstance(exc, ServiceError) else None
            if hinted is not None:
                delay = hinted + random.uniform(0, 0.1 * hinted + 0.01)
            else:
                # A 429 without a hint backs off like any other failure, by how many
                # failures (of either kind) came before it.
                n = max(s.counted + s.rate_limited, 1)
                cap = min(p.max_backoff_s, p.initial_backoff_s * 2 ** min(n - 1, 62))
                delay = random.uniform(0, cap)
        self.delay = max(0.0, min(delay, self.remaining_s()))
        return self.delay

    def stop(self, rs: RetryCallState) -> bool:
        attempts = self.policy.attempts
        if attempts is not None and self.state.counted >= attempts:
            return True
        return self.remaining_s() <= 0

    def before_sleep(self, rs: RetryCallState) -> None:
        if self.on_retry is not None and self.state.last_error is not None:
            self.on_retry(self.state.last_error, self.kind, self.delay, self.state)


def _loop_of(rs: RetryCallState) -> _Loop:
    return cast(_Loop, rs.kwargs["loop"])


# One Retrying serves every call; each call's decisions are made by its own _Loop, which
# its RetryCallState carries. A Retrying built per call is a reference cycle (tenacity
# keeps bound methods of itself in its action list) that only the cyclic GC frees: 17
# objects per job, ~40-50 us of collection per job under bench/ P1. Sharing one is safe:
# iter() is synchronous, so the calls on an event loop never interleave inside it, and
# its scratch state is per thread. Its statistics are shared and never read.
_RETRYING = Retrying(
    retry=lambda rs: _loop_of(rs).retry(rs),
    wait=lambda rs: _loop_of(rs).wait(rs),
    stop=lambda rs: _loop_of(rs).stop(rs),
    before_sleep=lambda rs: _loop_of(rs).before_sleep(rs),
    reraise=True,
)


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    state: RetryState | None = None,
    classify: Callable[[BaseException], Kind] = kind_of,
    on_retry: OnRetry | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> T:
    """Call ``fn`` until it succeeds, fails permanently, or ``policy`` is spent; then
    raise its last exception. Every attempt, the first included, goes through here.

    ``classify`` decides what a failure is (default :func:`kind_of`); ``state`` (made
    when not given) is where attempts and failures are counted.
    """
    if state is None:
        state = RetryState(started_at=clock.now())
    # tenacity decides (retry, wait, stop, before_sleep) and this loop awaits. Its
    # AsyncRetrying does the same but inspects every callback for coroutine-ness on each
    # attempt: 21 us per call against 11 us here, and every job makes one call.
    rs = RetryCallState(
        retry_object=_RETRYING,
        fn=None,
        args=(),
        kwargs={"loop": _Loop(policy, state, classify, on_retry, clock)},
    )
    _RETRYING.begin()
    while True:
        do = _RETRYING.iter(retry_state=rs)
        if isinstance(do, DoAttempt):
            state.attempts += 1
            try:
                result = await fn()
            except BaseException:
                rs.set_exception(sys.exc_info())  # type: ignore[arg-type]
            else:
                rs.set_result(result)
        elif isinstance(do, DoSleep):
            rs.prepare_for_next_attempt()
            await clock.sleep(float(do))
        else:
            return cast(T, do)
