"""The limiters, token buckets and ceilings, on a clock the tests move by hand.

AIMD is checked step by step against a virtual token-bucket quota (``quota_drive``):
slow start, the cut when it leaves it, one cut per burst of 429s, Retry-After pauses,
the slot a 429 keeps, and recovery when the quota is lifted. Nothing here sleeps or
measures wall time; one end-to-end run checks the wiring through the real pipeline.
"""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from worker.clock import ManualClock
from worker.limits import AdaptiveLimiter, ByteBudget, Limiter, RateCeiling, TokenBucket
from worker.loadtest import LoadtestOptions, run_loadtest
from worker.simulator import SimConfig

from .helpers import quick_settings
from .quota_drive import Bucket, Drive


def _limiter(clock: ManualClock, **kw: int) -> AdaptiveLimiter:
    kw.setdefault("initial", 16)
    return AdaptiveLimiter(kw.pop("min_limit", 1), kw.pop("max_limit", 1000), clock=clock, **kw)


async def test_slow_start_grows_the_limit_a_quarter_per_round_trip() -> None:
    clock = ManualClock()
    limiter = _limiter(clock)
    drive = Drive(limiter, clock, rtt_s=0.1)
    seen = []
    for _ in range(5):
        await drive.run_for(0.1)
        seen.append(limiter.limit)
    assert seen == [20, 25, 31, 39, 48]  # 16 x 1.25 per round trip, rounded down
    assert limiter.decreases == 0
    assert drive.rejected == 0


async def test_first_429s_end_slow_start_with_one_cut_to_what_the_quota_carried() -> None:
    clock = ManualClock()
    limiter = _limiter(clock)
    # 200 requests/s at 100 ms: the quota carries 20 in flight; a burst of 20 on top.
    drive = Drive(limiter, clock, rtt_s=0.1, quota=Bucket(rate=200, capacity=20))
    peak = limiter.limit
    while drive.rejected == 0:
        peak = max(peak, limiter.limit)
        await drive.run_for(0.001)
    await drive.run_for(0.005)  # the rest of that burst of 429s comes back
    assert limiter.decreases == 1, "one burst of 429s is one congestion signal"
    # Leaving slow start halves the window, and never leaves it above what the quota
    # carried in the last round trip (200/s x 0.1 s), so one cut undoes the overshoot.
    assert limiter.limit <= min(peak // 2, 20) + 1
    assert limiter.limit >= 10


async def test_limit_settles_at_the_quota_with_few_429s() -> None:
    clock = ManualClock()
    limiter = _limiter(clock)
    drive = Drive(limiter, clock, rtt_s=0.1, quota=Bucket(rate=200, capacity=20))
    await drive.run_for(10.0)
    ok, rejected, sent = drive.ok, drive.rejected, drive.sent
    await drive.run_for(20.0)
    # Over the last 20 s: the quota (200/s) is used, and 429s are under 2% of requests.
    assert (drive.ok - ok) / 20.0 >= 0.9 * 200
    assert (drive.rejected - rejected) / (drive.sent - sent) < 0.02
    assert 0.8 * 20 <= drive.mean_limit(since=clock.now() - 20.0) <= 1.3 * 20


async def test_limit_recovers_when_the_quota_is_lifted() -> None:
    clock = ManualClock()
    limiter = _limiter(clock)
    drive = Drive(limiter, clock, rtt_s=0.1, quota=Bucket(rate=200, capacity=20))
    await drive.run_for(10.0)
    held = limiter.limit
    assert held <= 30
    drive.quota = None
    ok = drive.ok
    await drive.run_for(3.0)
    # Past the old level the step doubles every round trip without a 429.
    assert limiter.limit >= 5 * held
    assert (drive.ok - ok) / 3.0 > 2 * 200


async def test_retry_after_pauses_every_new_request_until_it_has_passed() -> None:
    clock = ManualClock()
    limiter = _limiter(clock)
    await limiter.acquire()
    limiter.observe("rate_limited", 0.001, retry_after_s=0.3)
    limiter.release()
    assert limiter.pauses == 1
    acquired: list[float] = []

    async def request() -> None:
        await limiter.acquire()
        acquired.append(clock.now())

    async with anyio.create_task_group() as tg:
        start = clock.now()
        for _ in range(3):
            tg.start_soon(request)
        await wait_all_tasks_blocked()
        clock.advance(0.29)
        await wait_all_tasks_blocked()
        assert acquired == [], "nothing may be sent during the pause"
        clock.advance(0.02)
        await wait_all_tasks_blocked()
    assert len(acquired) == 3
    assert all(t >= start + 0.3 for t in acquired)


async def test_a_later_429_extends_the_pause() -> None:
    clock = ManualClock()
    limiter = _limiter(clock)
    limiter.observe("rate_limited", 0.001, retry_after_s=0.2)
    clock.advance(0.1)
    limiter.observe("rate_limited", 0.001, retry_after_s=0.5)
    assert limiter.paused_for_s == pytest.approx(0.5)
    limiter.observe("rate_limited", 0.001, retry_after_s=0.1)  # shorter: changes nothing
    assert limiter.paused_for_s == pytest.approx(0.5)


async def test_a_429_keeps_its_slot_for_one_round_trip() -> None:
    clock = ManualClock()
    limiter = _limiter(clock, initial=4)
    for _ in range(3):
        await limiter.acquire()
        limiter.release()
        limiter.observe("ok", 0.2)  # round trip: 200 ms
    await limiter.acquire()
    limiter.observe("rate_limited", 0.001)
    limiter.release()
    # The rejected request's slot is still taken: a 429 storm cannot feed on it.
    assert limiter.in_use == 1
    clock.advance(0.19)
    assert limiter.in_use == 1
    clock.advance(0.02)
    assert limiter.in_use == 0


async def test_429s_of_requests_sent_before_a_cut_do_not_cut_again() -> None:
    clock = ManualClock()
    limiter = _limiter(clock, initial=40)
    for _ in range(20):
        limiter.observe("ok", 0.2)
    for _ in range(40):
        await limiter.acquire()
    limiter.observe("rate_limited", 0.001)
    limiter.release()
    assert limiter.decreases == 1
    cut_to = limiter.limit
    # Answers to requests sent before the cut, arriving after it, say nothing new.
    clock.advance(0.5)
    for _ in range(10):
        limiter.observe("rate_limited", 0.6)
        limiter.release()
    assert limiter.decreases == 1
    assert limiter.limit == cut_to


def test_fixed_limiter_counts_outcomes_and_never_moves() -> None:
    limiter = Limiter(8)
    limiter.observe("ok", 0.1)
    limiter.observe("rate_limited", 0.0, 1.0)
    assert limiter.limit == 8
    assert not limiter.adaptive
    assert limiter.counts["ok"] == 1
    assert limiter.counts["rate_limited"] == 1


async def test_lowering_the_limit_never_cancels_holders_and_admits_in_order() -> None:
    limiter = Limiter(2)
    await limiter.acquire()
    await limiter.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(take, i)
        await wait_all_tasks_blocked()
        limiter.set_limit(1)
        limiter.release()
        await wait_all_tasks_blocked()
        assert order == []  # 1 in use, limit 1
        limiter.release()
        await wait_all_tasks_blocked()
        assert order == [0]
        limiter.set_limit(3)
        await wait_all_tasks_blocked()
        assert order == [0, 1, 2]


def test_token_bucket_refills_at_its_rate_and_goes_into_debt() -> None:
    clock = ManualClock()
    bucket = TokenBucket(10.0, 5.0, clock=clock)
    assert bucket.take(5) == 0.0
    assert bucket.take(1) == pytest.approx(0.1)  # one token short: 1/10 s
    clock.advance(0.1)
    assert bucket.tokens == pytest.approx(0.0)
    clock.advance(10.0)
    assert bucket.tokens == pytest.approx(5.0)  # never above capacity
    bucket.give(-7)  # a correction after the fact
    assert bucket.take(0) == pytest.approx(0.2)


async def test_rpm_ceiling_spaces_requests_at_the_rate() -> None:
    clock = ManualClock(auto_advance=True)
    ceiling = RateCeiling(rpm=1200, clock=clock)  # 20/s, a second's worth as burst
    start = clock.now()
    for _ in range(50):
        await ceiling.acquire()
    # 20 at once, then 20 a second: the other 30 take 1.5 s.
    assert clock.now() - start == pytest.approx(1.5)
    assert ceiling.waited_s == pytest.approx(sum(clock.slept))


async def test_tpm_estimate_is_corrected_from_usage() -> None:
    clock = ManualClock()
    ceiling = RateCeiling(tpm=60_000, initial_tokens_estimate=600, clock=clock)
    reserved = await ceiling.acquire()
    assert reserved == pytest.approx(600)
    assert ceiling.tokens is not None
    before = ceiling.tokens.tokens
    ceiling.settle(reserved, 300)  # used half: half the reservation comes back
    assert ceiling.tokens.tokens == pytest.approx(before + 300)
    assert ceiling.est_tokens == pytest.approx(0.9 * 600 + 0.1 * 300)


async def test_byte_budget_is_first_come_first_served_and_lets_an_oversized_take_run_alone() -> (
    None
):
    budget = ByteBudget(100)
    await budget.take(60)
    order: list[str] = []

    async def take(n: int, name: str) -> None:
        await budget.take(n)
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, 50, "big")
        await wait_all_tasks_blocked()
        tg.start_soon(take, 10, "small")  # would fit, but queues behind "big"
        await wait_all_tasks_blocked()
        assert order == []
        budget.give(60)
        await wait_all_tasks_blocked()
        assert order == ["big", "small"]
        assert budget.used == 60
    budget.give(60)
    assert budget.used == 0
    await budget.take(500)  # larger than the budget: allowed when nothing else is held
    assert budget.used == 500
    budget.give(500)


async def test_auto_concurrency_through_the_real_pipeline_finds_the_quota() -> None:
    """Wiring, not figures (those are bench/'s): the real client, limiter and retries
    against the simulator's quota lose nothing and do cut the limit."""
    s = quick_settings()
    s.retry.initial_backoff_s = 0.02
    s.retry.max_backoff_s = 0.2
    s.worker.concurrency = "auto"
    s.worker.max_concurrency = 200
    cfg = SimConfig(latency_ms=50.0, rate_limit_rps=100.0, rate_burst=10)
    opts = LoadtestOptions(
        jobs=200, sim=cfg, progress="off", handle_signals=False, sample_interval_s=0.1
    )
    report = await run_loadtest(s.validate(), opts)
    assert report["ok"] == 200
    assert report["lost"] == 0
    assert report["concurrency"]["mode"] == "auto"
    assert report["concurrency"]["decreases"] >= 1
