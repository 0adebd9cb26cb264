"""The endpoint pool against the simulator's regions (one port, one endpoint each):
routing by weight and load, a 429 that cuts one endpoint and sends the retry to another,
and what jobs do when every endpoint is out."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from worker.app import run_worker
from worker.auth import NoTokens
from worker.clock import ManualClock
from worker.endpoints import Endpoint, EndpointPool, Slot
from worker.errors import DrainRequested, ModelError
from worker.limits import AdaptiveLimiter, Limiter
from worker.model import ModelCall, ModelClient
from worker.settings import Settings
from worker.simulator import RegionConfig, SimConfig, Simulator

from .endpoint_helpers import endpoint, outputs, pool_of, region_settings, telemetry
from .helpers import gs_jobs, jobs_file, quick_settings, wait_until

A, B = "us-central1", "europe-west4"


@pytest.fixture
async def regions() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(regions=(RegionConfig(A), RegionConfig(B)))) as sim:
        yield sim


@pytest.fixture
async def clients(regions: Simulator) -> AsyncIterator[dict[str, ModelClient]]:
    s = quick_settings()
    made = {
        name: ModelClient(s.model, NoTokens(), base_url=regions.region_base_url(name))
        for name in (A, B)
    }
    try:
        yield made
    finally:
        for client in made.values():
            await client.aclose()


async def _take(pool: EndpointPool, n: int) -> list[Slot]:
    slots = []
    for _ in range(n):
        with anyio.fail_after(1):
            slots.append(await pool.acquire("standard"))
    return slots


async def _acquire_into(pool: EndpointPool, got: list[Slot]) -> None:
    """A request that waits for a slot; the slot it gets goes into ``got``."""
    got.append(await pool.acquire("standard"))


async def test_work_spreads_in_proportion_to_weight(
    regions: Simulator, clients: dict[str, ModelClient]
) -> None:
    pool = EndpointPool(
        [
            Endpoint(name=A, client=clients[A], limiter=Limiter(100), weight=3.0),
            Endpoint(name=B, client=clients[B], limiter=Limiter(100), weight=1.0),
        ]
    )
    slots = await _take(pool, 40)
    assert Counter(s.endpoint.name for s in slots) == {A: 30, B: 10}
    # Each slot is a request to its own endpoint's port.
    async with anyio.create_task_group() as tg:
        for i, slot in enumerate(slots):
            tg.start_soon(slot.describe, ModelCall(f"gs://bucket/img-{i}.jpg"))
    assert regions.region_stats(A).by_status == {200: 30}
    assert regions.region_stats(B).by_status == {200: 10}
    assert pool.in_use == 0


async def test_work_goes_where_there_is_room(clients: dict[str, ModelClient]) -> None:
    # Same weight; one endpoint's limit was cut to a third of the other's: it gets a
    # quarter of the work, and what is busy on one sends the next request to the other.
    a = Endpoint(name=A, client=clients[A], limiter=Limiter(10))
    b = Endpoint(name=B, client=clients[B], limiter=Limiter(30))
    pool = EndpointPool([a, b])
    slots = await _take(pool, 20)
    assert Counter(s.endpoint.name for s in slots) == {A: 5, B: 15}
    # Give back all of B's: the next ones go to B until the loads are level again.
    for slot in [s for s in slots if s.endpoint is b]:
        slot.abandon()
    more = await _take(pool, 10)
    assert Counter(s.endpoint.name for s in more) == {B: 10}
    for slot in [s for s in slots if s.endpoint is a] + more:
        slot.abandon()
    assert pool.in_use == 0


async def test_acquire_waits_for_a_slot_and_gives_up_at_its_timeout(
    clients: dict[str, ModelClient],
) -> None:
    pool = EndpointPool([Endpoint(name=A, client=clients[A], limiter=Limiter(1))])
    (held,) = await _take(pool, 1)
    with pytest.raises(ModelError) as info:
        await pool.acquire("standard", timeout_s=0.05)
    assert info.value.code == "no_endpoint"
    assert info.value.kind == "transient"
    assert pool.waiting == 0  # the timed-out waiter left the queue
    got: list[Slot] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_acquire_into, pool, got)
        await anyio.wait_all_tasks_blocked()
        assert pool.waiting == 1
        held.abandon()  # the release hands the slot straight to the waiter
    assert [s.endpoint.name for s in got] == [A]
    got[0].abandon()
    assert pool.in_use == 0  # no slot went to the waiter that had timed out


class _Readings(Endpoint):
    """An endpoint whose time to readiness is scripted: each reading takes the next of
    ``readings``; the last one stays."""

    readings: list[float]

    def ready_in_s(self) -> float:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


async def test_a_pause_read_a_microsecond_before_its_end_still_wakes_the_waiter(
    clients: dict[str, ModelClient],
) -> None:
    # Time passes between two readings of one pause. When the pool's timer fires a hair
    # early (or a second 429 moved the pause a little later), the reading that turns the
    # endpoint down says "1 us to go" and the next one "over". Arming the next timer from
    # that second reading armed none: with nothing in flight, no release came either,
    # and the waiting jobs stalled until their deadlines (a CI run: 38 of 60 jobs).
    clock = ManualClock()
    ep = _Readings(name=A, client=clients[A], limiter=Limiter(1, clock=clock))
    ep.readings = [0.05]  # paused for another 50 ms, however often it is read
    pool = EndpointPool([ep], clock=clock)
    got: list[Slot] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_acquire_into, pool, got)
        await anyio.wait_all_tasks_blocked()
        assert pool.waiting == 1
        ep.readings = [1e-6, 0.0]  # when the timer fires: 1 us to go; after that, over
        clock.advance(0.05)
        clock.advance(0.001)
        await anyio.wait_all_tasks_blocked()
        assert pool.waiting == 0, "the endpoint is free and the request still waits"
    assert [s.endpoint.name for s in got] == [A]
    got[0].abandon()


async def test_close_refuses_waiting_and_later_requests(clients: dict[str, ModelClient]) -> None:
    pool = EndpointPool([Endpoint(name=A, client=clients[A], limiter=Limiter(1))])
    (held,) = await _take(pool, 1)
    refused: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pool.acquire("standard")
        except DrainRequested as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        pool.close()
    assert len(refused) == 1
    with pytest.raises(DrainRequested):
        await pool.acquire("standard")
    held.abandon()


def _run_settings(sim: Simulator, tmp_path: Path, *names: str, jobs: int) -> Settings:
    s = region_settings(sim, tmp_path, *names)
    s.worker.source = jobs_file(tmp_path, gs_jobs(jobs))
    return s


async def test_a_429_cuts_only_that_endpoint_and_the_retry_goes_to_the_other_at_once(
    tmp_path: Path,
) -> None:
    # Region A has no quota left and asks for a 5 s pause; B has plenty.
    cfg = SimConfig(
        regions=(RegionConfig(A, rate_limit_rps=0.01, rate_burst=1.0), RegionConfig(B)),
        rate_initial=0.0,
        retry_after_s=5.0,
    )
    async with Simulator(cfg) as sim:
        s = _run_settings(sim, tmp_path, A, B, jobs=6)
        s.worker.concurrency = "auto"
        s.retry.deadline_s = 4.0  # waiting out A's pause would take the whole deadline
        t = telemetry()
        stats = await run_worker(s.validate(), telemetry=t)
        a_stats, b_stats = sim.region_stats(A), sim.region_stats(B)
    results, dead = outputs(s)
    assert dead == []
    assert stats.ok == 6
    # Every job was answered by B; those first sent to A got a 429 there and went to B
    # with their very next attempt, without waiting out A's pause.
    assert {r["endpoint"] for r in results} == {B}
    rejected = a_stats.by_status.get(429, 0)
    assert rejected >= 1
    assert a_stats.by_status == {429: rejected}
    assert b_stats.by_status == {200: 6}
    retried = [r for r in results if r["attempts"] > 1]
    assert len(retried) == rejected
    assert all(r["attempts"] == 2 for r in retried)
    assert max(float(r["latency_s"]) for r in retried) < 2.0, "the retry waited out A's pause"
    pool = pool_of(t)
    a, b = endpoint(pool, A), endpoint(pool, B)
    assert isinstance(a.limiter, AdaptiveLimiter)
    assert isinstance(b.limiter, AdaptiveLimiter)
    assert a.limiter.decreases == 1  # one burst of 429s, one cut, on A alone
    assert a.limiter.limit < 16
    assert a.limiter.paused_for_s > 0  # still paused: the jobs did not wait for it
    assert b.limiter.decreases == 0
    assert b.limiter.limit >= 16
    assert a.limiter.counts["rate_limited"] == rejected
    assert b.limiter.counts["ok"] == 6
    assert t.model_requests == {(A, "429"): rejected, (B, "200"): 6}


async def test_when_every_endpoint_is_out_jobs_wait_and_finish_once_one_is_back(
    regions: Simulator, tmp_path: Path
) -> None:
    await regions.stop_region(A)
    await regions.stop_region(B)
    s = _run_settings(regions, tmp_path, A, B, jobs=8)
    s.retry.deadline_s = 8.0
    t = telemetry()

    async def bring_a_back() -> None:
        await wait_until(lambda: t.pipeline is not None, 5, "the pipeline")
        pool = pool_of(t)
        # Both circuits open and every job waiting for a slot: nothing is being sent.
        await wait_until(
            lambda: all(ep.circuit.state == "open" for ep in pool.endpoints) and pool.waiting == 8,
            5,
            "every job waiting with both endpoints out",
        )
        await regions.start_region(A)

    async with anyio.create_task_group() as tg:
        tg.start_soon(bring_a_back)
        with anyio.fail_after(15):
            stats = await run_worker(s.validate(), telemetry=t)
    results, dead = outputs(s)
    assert dead == []
    assert stats.ok == 8
    assert sorted(r["id"] for r in results) == sorted(f"job-{i}" for i in range(8))
    assert {r["endpoint"] for r in results} == {A}
    assert endpoint(pool_of(t), A).circuit.state == "closed"
    assert endpoint(pool_of(t), B).circuit.state != "closed"
    # While both were out, the jobs waited rather than spent attempts: only the
    # failures that opened the circuits (5 each) and the probes were sent.
    failures = sum(n for (_, code), n in t.model_requests.items() if code != "200")
    assert failures <= 2 * 5 + 4


async def test_when_the_only_endpoint_comes_back_every_waiting_job_finishes(
    regions: Simulator, tmp_path: Path
) -> None:
    await regions.stop_region(A)
    s = _run_settings(regions, tmp_path, A, jobs=6)
    s.retry.deadline_s = 8.0
    t = telemetry()

    async def bring_it_back() -> None:
        await wait_until(lambda: t.pipeline is not None, 5, "the pipeline")
        pool = pool_of(t)
        await wait_until(
            lambda: pool.endpoints[0].circuit.state == "open" and pool.waiting == 6,
            5,
            "every job waiting for the endpoint",
        )
        await regions.start_region(A)

    async with anyio.create_task_group() as tg:
        tg.start_soon(bring_it_back)
        with anyio.fail_after(15):
            stats = await run_worker(s.validate(), telemetry=t)
    results, dead = outputs(s)
    # The probe's success must put the endpoint back for the jobs queued behind it, not
    # only for the probing job (they would wait out their deadline).
    assert dead == [], [d["error"] for d in dead]
    assert stats.ok == 6
    assert {r["endpoint"] for r in results} == {A}


async def test_a_deadline_that_passes_while_every_endpoint_is_out_is_retries_exhausted(
    regions: Simulator, tmp_path: Path
) -> None:
    await regions.stop_region(A)
    await regions.stop_region(B)
    s = _run_settings(regions, tmp_path, A, B, jobs=4)
    s.retry.deadline_s = 1.0
    with anyio.fail_after(10):
        stats = await run_worker(s.validate())
    results, dead = outputs(s)
    assert results == []
    assert stats.dead_lettered == 4
    assert stats.failed == 0
    assert sorted(d["id"] for d in dead) == [f"job-{i}" for i in range(4)]
    assert {d["error"]["type"] for d in dead} == {"retries_exhausted"}
    for d in dead:
        assert json.loads(d["input"])["id"] == d["id"]
        assert d["attempts"] >= 1
    # Nothing reached a region: both ports were closed.
    assert regions.region_stats(A).requests == 0
    assert regions.region_stats(B).requests == 0
