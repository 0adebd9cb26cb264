"""The one retry loop: what is retried, how long it waits, how attempts and deadlines are
counted. Waits are taken on a clock that moves by itself (``auto_advance``), so each test
checks the exact waits asked for, in no time."""

from __future__ import annotations

import email.utils
import gc
import time

import aiohttp
import anyio
import pytest

from worker.clock import ManualClock
from worker.errors import ModelError, ServiceError
from worker.retry import (
    RetryPolicy,
    RetryState,
    kind_for_status,
    kind_of,
    retry_after_s,
    retry_call,
)


class Script:
    """A call that fails with the given errors in turn, then answers "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _err(status: int, retry_after: float | None = None) -> ModelError:
    return ModelError(status, "", "", kind=kind_for_status(status), retry_after_s=retry_after)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, "rate_limited"),
        (401, "unauthorized"),
        (408, "transient"),
        (425, "transient"),
        (500, "transient"),
        (503, "transient"),
        (599, "transient"),
        (400, "permanent"),
        (403, "permanent"),
        (404, "permanent"),
        (409, "permanent"),
        (413, "permanent"),
        (422, "permanent"),
    ],
)
def test_one_table_of_statuses(status: int, kind: str) -> None:
    assert kind_for_status(status) == kind


def test_plain_exceptions_are_classified() -> None:
    assert kind_of(TimeoutError()) == "transient"
    assert kind_of(ConnectionResetError()) == "transient"
    assert kind_of(aiohttp.ServerDisconnectedError()) == "transient"
    assert kind_of(ValueError("a bug")) == "permanent"
    assert kind_of(_err(503)) == "transient"


def test_retry_after_headers() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "100000"}) == 300.0  # capped
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert retry_after_s({"retry-after": soon}) == pytest.approx(30, abs=1.5)
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None
    assert retry_after_s(None) is None


async def test_transient_failures_back_off_with_capped_full_jitter() -> None:
    clock = ManualClock(auto_advance=True)
    call = Script(*[_err(503) for _ in range(6)])
    state = RetryState(started_at=clock.now())
    policy = RetryPolicy(attempts=10, deadline_s=None, initial_backoff_s=0.5, max_backoff_s=2.0)
    assert await retry_call(call, policy, state=state, clock=clock) == "ok"
    assert call.calls == 7 and state.attempts == 7 and state.counted == 6
    caps = [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert len(clock.slept) == 6
    assert all(0 <= wait <= cap for wait, cap in zip(clock.slept, caps, strict=True))


async def test_attempts_run_out_and_the_last_error_is_raised() -> None:
    clock = ManualClock(auto_advance=True)
    errors = [_err(500), _err(502), _err(503)]
    call = Script(*errors)
    state = RetryState(started_at=clock.now())
    with pytest.raises(ModelError) as raised:
        await retry_call(call, RetryPolicy(attempts=3), state=state, clock=clock)
    assert raised.value is errors[2]
    assert state.attempts == 3 and len(clock.slept) == 2


async def test_permanent_errors_are_raised_at_once() -> None:
    clock = ManualClock(auto_advance=True)
    call = Script(_err(400))
    with pytest.raises(ModelError):
        await retry_call(call, RetryPolicy(), clock=clock)
    assert call.calls == 1 and clock.slept == []
    bug = Script(KeyError("x"))
    with pytest.raises(KeyError):
        await retry_call(bug, RetryPolicy(), clock=clock)
    assert bug.calls == 1


async def test_rate_limits_use_time_not_attempts_and_each_answer_s_own_retry_after() -> None:
    clock = ManualClock(auto_advance=True)
    # Ten 429s with growing Retry-After, more than the two attempts the policy allows.
    call = Script(*[_err(429, retry_after=0.1 * (i + 1)) for i in range(10)])
    state = RetryState(started_at=clock.now())
    assert await retry_call(call, RetryPolicy(attempts=2), state=state, clock=clock) == "ok"
    assert state.rate_limited == 10 and state.counted == 0
    # Each wait is that answer's own Retry-After (plus at most 10% + 10 ms of jitter):
    # a later, longer hint is honoured, not the first one reused.
    for i, wait in enumerate(clock.slept):
        hint = 0.1 * (i + 1)
        assert hint <= wait <= hint * 1.1 + 0.01


async def test_a_policy_can_count_rate_limits_as_attempts() -> None:
    clock = ManualClock(auto_advance=True)
    call = Script(_err(429), _err(429), _err(429))
    with pytest.raises(ServiceError):
        await retry_call(call, RetryPolicy(attempts=2, rate_limited_counts=True), clock=clock)
    assert call.calls == 2


async def test_the_deadline_bounds_the_waits_and_the_last_attempt_is_made_at_it() -> None:
    clock = ManualClock(auto_advance=True)
    call = Script(*[_err(429, retry_after=4.0) for _ in range(10)])
    state = RetryState(started_at=clock.now())
    with pytest.raises(ModelError):
        await retry_call(call, RetryPolicy(deadline_s=10.0), state=state, clock=clock)
    # 4 s, 4 s, then only the 2 s left: the final attempt lands on the deadline.
    assert clock.slept[:2] == pytest.approx([4.0, 4.0], abs=0.41)
    assert sum(clock.slept) == pytest.approx(10.0)
    assert clock.now() - state.started_at == pytest.approx(10.0)


async def test_a_first_401_is_retried_at_once_and_a_second_one_backs_off() -> None:
    clock = ManualClock(auto_advance=True)
    call = Script(_err(401), _err(401))
    state = RetryState(started_at=clock.now())
    assert await retry_call(call, RetryPolicy(), state=state, clock=clock) == "ok"
    assert clock.slept[0] == 0.0  # the caller refreshed its token: go again now
    assert state.unauthorized == 1 and state.counted == 1  # the second counts as transient


async def test_on_retry_is_told_each_retry_before_its_wait() -> None:
    clock = ManualClock(auto_advance=True)
    seen: list[tuple[str, float]] = []
    call = Script(_err(503), _err(429, retry_after=1.0))
    await retry_call(
        call,
        RetryPolicy(),
        clock=clock,
        on_retry=lambda exc, kind, delay, state: seen.append((kind, delay)),
    )
    assert [kind for kind, _ in seen] == ["transient", "rate_limited"]
    assert [delay for _, delay in seen] == clock.slept


async def test_unbounded_policies_retry_until_success() -> None:
    clock = ManualClock(auto_advance=True)
    call = Script(*[ConnectionResetError() for _ in range(50)])
    policy = RetryPolicy(attempts=None, deadline_s=None, initial_backoff_s=0.1, max_backoff_s=1.0)
    assert await retry_call(call, policy, clock=clock) == "ok"
    assert call.calls == 51


def test_policies_are_checked() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline_s=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(initial_backoff_s=2, max_backoff_s=1)


async def test_calls_in_flight_together_keep_their_own_counts() -> None:
    """Every call shares tenacity's machinery (one Retrying); calls that fail, wait and
    retry interleaved must still count, wait and give up each on its own."""
    policy = RetryPolicy(attempts=4, deadline_s=None, initial_backoff_s=0.001, max_backoff_s=0.002)
    outcomes: dict[int, tuple[str, int]] = {}

    async def one(i: int) -> None:
        call = Script(*[_err(503) for _ in range(i % 6)])  # 0 to 5 failures, then "ok"
        state = RetryState(started_at=time.monotonic())
        try:
            outcomes[i] = (await retry_call(call, policy, state=state), state.attempts)
        except ModelError:
            outcomes[i] = ("gave up", state.attempts)

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(one, i)
    for i, outcome in outcomes.items():
        failures = i % 6
        assert outcome == (("ok", failures + 1) if failures < 4 else ("gave up", 4)), i
    assert len(outcomes) == 60


async def test_a_call_that_succeeds_leaves_nothing_for_the_cyclic_gc() -> None:
    """Every job makes one call: a reference cycle per call (a Retrying built per call
    is one) costs the collector ~40 us per job under load."""

    async def ok() -> str:
        return "ok"

    policy = RetryPolicy()
    await retry_call(ok, policy)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(200):
            await retry_call(ok, policy)  # never suspends: nothing else runs meanwhile
        gc.collect()
        assert gc.garbage == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
