"""Quota saturation: is the quota, not this replica, what limits throughput?

``EndpointPool.quota_bound`` is checked step by step on a clock the tests move by hand;
``worker_quota_saturation`` (the share of the watchdog's samples in which it held) is
checked on two short real runs: one held back by the simulator's quota, one by a fixed
``--concurrency`` with no 429 at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from worker.app import run_worker
from worker.auth import NoTokens
from worker.clock import ManualClock
from worker.endpoints import Endpoint, EndpointPool, Slot
from worker.errors import DrainRequested
from worker.limits import AdaptiveLimiter, Limiter
from worker.metrics import QUOTA_429_WINDOW_S
from worker.model import ModelClient
from worker.settings import TIERS, Tier
from worker.simulator import SimConfig, Simulator

from .endpoint_helpers import metric_samples, outputs, pool_of, telemetry
from .helpers import gs_jobs, jobs_file, quick_settings

WINDOW = QUOTA_429_WINDOW_S


@pytest.fixture
async def client() -> AsyncIterator[ModelClient]:
    # Never sent anything: the pool's bookkeeping is all these tests look at.
    made = ModelClient(quick_settings().model, NoTokens(), base_url="http://127.0.0.1:9/v1")
    try:
        yield made
    finally:
        await made.aclose()


def _endpoint(
    client: ModelClient,
    clock: ManualClock,
    name: str,
    *,
    tiers: frozenset[Tier] = frozenset(TIERS),
    adaptive: bool = False,
) -> Endpoint:
    limiter = AdaptiveLimiter(1, 1, clock=clock) if adaptive else Limiter(1, clock=clock)
    return Endpoint(name=name, client=client, limiter=limiter, tiers=tiers)


async def _with_a_waiter(pool: EndpointPool, tier: Tier = "standard") -> list[Slot]:
    """Fill every endpoint serving ``tier`` (limit 1 each); the slots taken."""
    held = []
    for ep in pool.endpoints:
        if tier in ep.tiers:
            held.append(await pool.acquire(tier))
    return held


async def _waiter(pool: EndpointPool, tier: Tier = "standard") -> None:
    """A request waiting for a slot until the pool is closed."""
    with contextlib.suppress(DrainRequested):
        (await pool.acquire(tier)).abandon()


async def test_held_only_while_requests_wait_and_every_endpoint_saw_a_429(
    client: ModelClient,
) -> None:
    clock = ManualClock()
    a, b = _endpoint(client, clock, "a"), _endpoint(client, clock, "b")
    pool = EndpointPool([a, b], clock=clock)
    a.limiter.observe("rate_limited", 0.001)
    b.limiter.observe("rate_limited", 0.001)
    assert not pool.quota_bound(WINDOW), "nothing waits: nothing is held back"
    held = await _with_a_waiter(pool)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_waiter, pool)
        await anyio.wait_all_tasks_blocked()
        assert pool.waiting == 1
        assert pool.quota_bound(WINDOW)
        clock.advance(WINDOW / 2)
        b.limiter.observe("ok", 0.1)  # successes do not clear a recent 429
        assert pool.quota_bound(WINDOW)
        clock.advance(WINDOW / 2 + 0.01)
        # The 429s are older than the window: the requests wait for this replica's own
        # limit now, not for the quota.
        assert not pool.quota_bound(WINDOW)
        a.limiter.observe("rate_limited", 0.001)
        assert not pool.quota_bound(WINDOW), "b has not seen a 429 lately"
        b.limiter.observe("rate_limited", 0.001)
        assert pool.quota_bound(WINDOW)
        pool.close()  # the waiter gives up
    for slot in held:
        slot.abandon()


async def test_a_pause_or_an_open_circuit_holds_an_endpoint_back(client: ModelClient) -> None:
    clock = ManualClock()
    a = _endpoint(client, clock, "a", adaptive=True)
    b = _endpoint(client, clock, "b")
    pool = EndpointPool([a, b], clock=clock)
    held = await _with_a_waiter(pool)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_waiter, pool)
        await anyio.wait_all_tasks_blocked()
        assert not pool.quota_bound(WINDOW)
        # a was asked to pause (Retry-After) long ago enough that its 429 is old...
        assert isinstance(a.limiter, AdaptiveLimiter)
        a.limiter.observe("rate_limited", 0.001, retry_after_s=3 * WINDOW)
        clock.advance(2 * WINDOW)
        assert a.limiter.paused_for_s > 0
        # ...and b's circuit is open: neither could take the waiting request.
        for _ in range(b.circuit.failures_to_open):
            b.circuit.on_failure()
        assert b.circuit.state == "open"
        assert pool.quota_bound(WINDOW)
        pool.close()
    for slot in held:
        slot.abandon()


async def test_only_endpoints_that_serve_the_waiting_tier_count(client: ModelClient) -> None:
    clock = ManualClock()
    regional = _endpoint(client, clock, "us-central1", tiers=frozenset({"standard"}))
    global_ = _endpoint(client, clock, "global", tiers=frozenset({"flex"}))
    pool = EndpointPool([regional, global_], clock=clock)
    held = await _with_a_waiter(pool, "flex")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_waiter, pool, "flex")
        await anyio.wait_all_tasks_blocked()
        regional.limiter.observe("rate_limited", 0.001)
        assert not pool.quota_bound(WINDOW), "the regional 429 says nothing about flex"
        global_.limiter.observe("rate_limited", 0.001)
        assert pool.quota_bound(WINDOW)
        pool.close()
    for slot in held:
        slot.abandon()


async def test_saturation_is_high_when_the_quota_limits_throughput(tmp_path: Path) -> None:
    # 20 requests a second against 60 jobs and an adaptive limit: ~3 s of jobs waiting
    # behind an endpoint that keeps answering 429.
    cfg = SimConfig(latency_ms=20.0, rate_limit_rps=20.0, retry_after_s=0.05)
    async with Simulator(cfg) as sim:
        s = quick_settings()
        s.model.base_url = sim.vertex_base_url()
        s.images.backend = "vertex"
        s.retry.deadline_s = 30.0
        s.worker.concurrency = "auto"
        s.worker.sink = f"jsonl:{tmp_path / 'out' / 'results.jsonl'}"
        s.worker.source = jobs_file(tmp_path, gs_jobs(60))
        t = telemetry()
        stats = await run_worker(s.validate(), telemetry=t)
        by_status = sim.stats().by_status
        assert by_status.get(429, 0) > 0
    pool = pool_of(t)
    ep = pool.endpoints[0]
    assert stats.ok == 60, (
        by_status,
        [d["error"]["message"] for d in outputs(s)[1][:5]],
        pool.counts,
        (ep.limiter.limit, ep.limiter.in_use, pool.waiting, ep.circuit.state),
    )
    assert outputs(s)[1] == []
    assert t.quota_saturation > 0.5
    assert metric_samples(t, "worker_quota_saturation") == {(): t.quota_saturation}


async def test_saturation_stays_zero_when_the_worker_limits_throughput(
    tmp_path: Path,
) -> None:
    # No quota at all; two requests in flight at a time keep jobs waiting for ~1.5 s.
    async with Simulator(SimConfig(latency_ms=50.0)) as sim:
        s = quick_settings()
        s.model.base_url = sim.vertex_base_url()
        s.images.backend = "vertex"
        s.worker.concurrency = 2
        s.worker.sink = f"jsonl:{tmp_path / 'out' / 'results.jsonl'}"
        s.worker.source = jobs_file(tmp_path, gs_jobs(60))
        t = telemetry()
        waited = False

        async def watch() -> None:
            nonlocal waited
            while True:
                if t.pipeline is not None and t.pipeline.models.waiting > 0:
                    waited = True
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            stats = await run_worker(s.validate(), telemetry=t)
            tg.cancel_scope.cancel()
        assert sim.stats().by_status == {200: 60}
    assert stats.ok == 60
    assert waited, "jobs must have waited for a slot, or the test shows nothing"
    assert t.quota_saturation == 0.0
    assert metric_samples(t, "worker_quota_saturation") == {(): 0.0}
