"""What is retried, and how long we wait.

Classification (the README carries the same table):

=====================================  ============  ===============================
answer                                 kind          what happens
=====================================  ============  ===============================
429 / ``RESOURCE_EXHAUSTED``           rate_limited  wait (Retry-After if given), retry;
                                                     does not use an attempt, only time
408, 5xx, timeout, reset, refused      transient     backoff, retry; uses an attempt
401                                    unauthorized  refresh the token once, retry at
                                                     once; a second 401 is transient
400, 403, 404, 409, 413, 422, other    permanent     dead-letter (``model_rejected``)
=====================================  ============  ===============================

When the attempts or the per-job deadline run out on a transient error the job is
``retries_exhausted``: dead-lettered for a file source, handed back to a queue source.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import anyio
import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from .settings import RetrySettings

__all__ = [
    "Kind",
    "RetryBudget",
    "call_with_retries",
    "classify",
    "retry_after_s",
]

Kind = Literal["rate_limited", "transient", "unauthorized", "permanent"]
T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({408, 425, 500, 502, 503, 504})
# Retry-After beyond this is treated as this: a quota window longer than a few minutes is
# better served by handing the job back (queue) than by a sleeping task.
MAX_HONOURED_RETRY_AFTER_S = 300.0


def classify(exc: BaseException) -> Kind:
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return "rate_limited"
        if status == 401:
            return "unauthorized"
        if status in _TRANSIENT_STATUS or status >= 500:
            return "transient"
        return "permanent"
    if isinstance(exc, openai.APIConnectionError | TimeoutError | ConnectionError):
        # APITimeoutError is an APIConnectionError: both are worth another try.
        return "transient"
    return "permanent"


def retry_after_s(exc: BaseException) -> float | None:
    """The server's requested pause: ``retry-after-ms`` wins over ``Retry-After``."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
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
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        seconds = parsed.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_HONOURED_RETRY_AFTER_S))


@dataclass(slots=True)
class RetryBudget:
    """Per-job retry accounting: attempts made, and those that count against the limit."""

    started_at: float
    attempts: int = 0
    counted: int = 0
    rate_limited: int = 0
    last_error: BaseException | None = None


OnRetry = Callable[[BaseException, Kind, float, RetryBudget], None]


def _is_retryable(exc: BaseException) -> bool:
    return classify(exc) != "permanent"


class _Policy:
    """tenacity stop/wait/before-sleep for one job; see the module docstring."""

    __slots__ = ("budget", "on_retry", "settings")

    def __init__(
        self, settings: RetrySettings, budget: RetryBudget, on_retry: OnRetry | None
    ) -> None:
        self.settings = settings
        self.budget = budget
        self.on_retry = on_retry

    def _note(self, exc: BaseException) -> None:
        b = self.budget
        b.last_error = exc
        if classify(exc) == "rate_limited":
            b.rate_limited += 1
        else:
            b.counted += 1

    def stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            self._note(exc)
        b = self.budget
        return (
            b.counted >= self.settings.max_attempts
            or time.monotonic() - b.started_at >= self.settings.deadline_s
        )

    def wait(self, state: RetryCallState) -> float:
        return self.next_delay()

    def next_delay(self) -> float:
        b = self.budget
        exc = b.last_error
        remaining = self.settings.deadline_s - (time.monotonic() - b.started_at)
        hinted = retry_after_s(exc) if exc is not None else None
        if hinted is not None:
            delay = hinted + random.uniform(0, 0.1 * hinted + 0.01)
        else:
            # Full jitter over a capped exponential; a 429 without a hint backs off by the
            # number of rate-limited answers so far, like any other failure.
            n = max(b.counted + b.rate_limited, 1)
            cap = min(self.settings.max_backoff_s, self.settings.initial_backoff_s * 2 ** (n - 1))
            delay = random.uniform(0, cap)
        delay = max(0.0, min(delay, remaining))
        if self.on_retry is not None and exc is not None:
            self.on_retry(exc, classify(exc), delay, b)
        return delay


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    settings: RetrySettings,
    budget: RetryBudget,
    *,
    on_retry: OnRetry | None = None,
) -> T:
    """Run ``fn`` until it succeeds, fails permanently, or the budget is spent.

    The first attempt runs without tenacity: almost every job succeeds at once, and that
    path should cost nothing. Raises the last exception when giving up.
    """
    budget.attempts += 1
    try:
        return await fn()
    except Exception as exc:
        if not _is_retryable(exc):
            raise
        first: BaseException = exc
    policy = _Policy(settings, budget, on_retry)
    # Account for the first failure the way tenacity would have.
    policy._note(first)
    if budget.counted >= settings.max_attempts:
        raise first
    delay = policy.next_delay()
    if delay > 0:
        await _sleep(delay)

    async def attempt() -> T:
        budget.attempts += 1
        return await fn()

    retrying = AsyncRetrying(
        retry=retry_if_exception(_is_retryable),
        stop=policy.stop,
        wait=policy.wait,
        reraise=True,
        sleep=_sleep,
    )
    result: T = await retrying(attempt)
    return result


async def _sleep(seconds: float) -> None:
    await anyio.sleep(seconds)
