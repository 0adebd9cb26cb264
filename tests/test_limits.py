"""The adaptive limiter and the rate ceilings, against the real simulator through the real
pipeline (``run_loadtest`` drives ``run_pipeline`` with the real AsyncOpenAI client).

Small quotas and short latencies keep each test to a few seconds."""

from __future__ import annotations

import time

import anyio
import pytest

from worker.limits import AdaptiveLimiter, Limiter, RateCeiling
from worker.loadtest import LoadtestOptions, run_loadtest
from worker.settings import Settings
from worker.simulator import SimConfig, Simulator


def _settings(base_url: str, concurrency: int | str = "auto") -> Settings:
    s = Settings()
    s.model.base_url = base_url
    s.model.auth = "none"
    s.model.timeout_s = 10.0
    s.retry.initial_backoff_s = 0.02
    s.retry.max_backoff_s = 0.2
    s.retry.deadline_s = 30.0
    s.worker.concurrency = concurrency
    s.worker.max_concurrency = 200
    return s.validate()


def _opts(**kw: object) -> LoadtestOptions:
    kw.setdefault("progress", "off")
    kw.setdefault("handle_signals", False)
    kw.setdefault("sample_interval_s", 0.1)
    return LoadtestOptions(**kw)  # type: ignore[arg-type]


async def test_limit_converges_to_the_quota_and_429s_stop_growing() -> None:
    rate_rps, latency_ms = 100.0, 100.0
    cfg = SimConfig(latency_ms=latency_ms, rate_limit_rps=rate_rps, rate_burst=20)
    report = await run_loadtest(_settings(""), _opts(jobs=400, sim=cfg))

    assert report["ok"] == 400
    assert report["lost"] == 0
    conc = report["concurrency"]
    assert conc["mode"] == "auto"
    assert conc["decreases"] >= 1  # it did hit the quota ...
    # ... and settled near what the quota carries: rate x round trip (Little's law).
    ideal = rate_rps * conc["rtt_ms"] / 1000.0
    tail = [p for p in report["timeline"] if p["t_s"] >= report["seconds"] / 2]
    assert tail
    mean_limit = sum(p["limit"] for p in tail) / len(tail)
    assert 0.5 * ideal <= mean_limit <= 2.5 * ideal + 2, (mean_limit, ideal)
    # 429s stop growing: in the second half, few requests are rejected (with a window
    # of ~10, AIMD's probing costs a 429 every few round trips).
    first, last = tail[0], tail[-1]
    rejected = last["rate_limited"] - first["rate_limited"]
    sent = last["requests"] - first["requests"]
    assert sent > 50
    assert rejected <= 0.15 * sent, (rejected, sent)
    # And the quota is used, not wasted: throughput close to the limit of 100/s.
    assert report["jobs_per_s"] >= 0.8 * rate_rps


async def test_limit_recovers_when_the_quota_is_lifted(sim: Simulator) -> None:
    sim.config.latency_ms = 30.0
    sim.config.rate_limit_rps = 100.0
    sim.config.rate_burst = 10
    sim.config.record_requests = 0
    settings = _settings(sim.vertex_base_url())
    limits_before: list[int] = []

    async def lift() -> None:
        await anyio.sleep(1.5)
        sim.config.rate_limit_rps = None

    async with anyio.create_task_group() as tg:
        tg.start_soon(lift)
        report = await run_loadtest(settings, _opts(duration_s=3.0))
    timeline = report["timeline"]
    limits_before = [int(p["limit"]) for p in timeline if 1.0 <= p["t_s"] <= 1.5]
    after = [p for p in timeline if p["t_s"] >= 2.5]
    assert limits_before
    assert after
    limited = max(limits_before)
    assert limited <= 20  # 100/s x ~30-60 ms: a handful of requests in flight
    # Unlimited again: the limit climbs well past where the quota held it, and so does
    # the throughput.
    assert max(int(p["limit"]) for p in after) >= 3 * limited
    rate_before = sum(p["jobs_per_s"] for p in timeline if 1.0 <= p["t_s"] <= 1.5)
    rate_after = sum(p["jobs_per_s"] for p in after)
    assert rate_after / len(after) > 1.5 * rate_before / len(limits_before)
    assert report["lost"] == 0


async def test_retry_after_pauses_every_request_not_just_the_rejected_one(
    sim: Simulator,
) -> None:
    # One token a second, and 429s that ask for a 0.6 s pause.
    sim.config.rate_limit_rps = 1.0
    sim.config.rate_burst = 1
    sim.config.retry_after_s = 0.6
    sim.config.record_requests = 0
    settings = _settings(sim.vertex_base_url())
    samples: list[tuple[float, int, int]] = []

    async def watch() -> None:
        while True:
            st = sim.stats()
            samples.append((time.monotonic(), st.requests, st.by_status.get(429, 0)))
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        report = await run_loadtest(settings, _opts(jobs=3))
        tg.cancel_scope.cancel()

    assert report["ok"] == 3
    assert report["concurrency"]["pauses"] >= 1
    t_first_429 = next(t for t, _, n429 in samples if n429 > 0)
    # Requests already on the wire when the first 429 came back may still land; after
    # that, nothing is sent until the pause is over.
    settled = [r for t, r, _ in samples if t_first_429 + 0.1 <= t <= t_first_429 + 0.5]
    assert settled
    assert max(settled) == min(settled), "a request was sent during the Retry-After pause"
    # Three jobs, one token a second, every retry after the pause: a few seconds, and
    # far fewer requests than a client that ignored Retry-After would make.
    assert report["model_requests"] <= 12


async def test_retry_after_delays_acquire() -> None:
    limiter = AdaptiveLimiter(1, 10)
    limiter.observe("rate_limited", 0.001, retry_after_s=0.3)
    assert limiter.paused_for_s > 0.2
    t0 = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - t0 >= 0.28
    limiter.release()


async def test_one_burst_of_429s_is_one_cut_to_what_the_quota_carried() -> None:
    limiter = AdaptiveLimiter(1, 100, initial=40, backoff=0.9)
    # 20 answers in the last round trip (0.2 s), while the limit was not yet in use.
    for _ in range(20):
        limiter.observe("ok", 0.2)
    assert limiter.limit == 40
    for _ in range(40):
        await limiter.acquire()
    # The limit is in use and the quota is exhausted: three requests of the same
    # window come back 429 within a millisecond.
    for _ in range(3):
        limiter.observe("rate_limited", 0.001)
        limiter.release()
    assert limiter.decreases == 1
    assert limiter.limit == 20
    assert limiter.counts["rate_limited"] == 3


def test_fixed_limiter_counts_outcomes_and_never_moves() -> None:
    limiter = Limiter(8)
    limiter.observe("ok", 0.1)
    limiter.observe("rate_limited", 0.0, 1.0)
    assert limiter.limit == 8
    assert not limiter.adaptive
    assert limiter.counts["ok"] == 1
    assert limiter.counts["rate_limited"] == 1


async def test_rpm_ceiling_holds_the_request_rate(sim: Simulator) -> None:
    sim.config.record_requests = 0
    settings = _settings(sim.vertex_base_url(), concurrency=50)
    settings.worker.rpm = 1200.0  # 20/s, burst of one second's worth
    report = await run_loadtest(settings, _opts(jobs=50))
    assert report["ok"] == 50
    # 20 at once, then 20/s: the other 30 need about 1.5 s.
    assert report["seconds"] >= 1.3
    assert sim.stats().requests == 50


async def test_tpm_estimate_is_corrected_from_usage() -> None:
    ceiling = RateCeiling(tpm=60_000, initial_tokens_estimate=600)
    reserved = await ceiling.acquire()
    assert reserved == pytest.approx(600)
    assert ceiling.tokens is not None
    before = ceiling.tokens.tokens
    ceiling.settle(reserved, 300)  # used half: half the reservation comes back
    assert ceiling.tokens.tokens == pytest.approx(before + 300, abs=20)
    assert ceiling.est_tokens < 600  # the next estimate learns from the answer


async def test_byte_budget_is_first_come_first_served_and_lets_an_oversized_take_run_alone() -> (
    None
):
    from worker.limits import ByteBudget

    budget = ByteBudget(100)
    await budget.take(60)
    order: list[str] = []

    async def take(n: int, name: str) -> None:
        await budget.take(n)
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, 50, "big")
        await anyio.sleep(0.01)
        tg.start_soon(take, 10, "small")  # would fit, but queues behind "big"
        await anyio.sleep(0.01)
        assert order == []
        budget.give(60)
        await anyio.sleep(0.01)
        assert order == ["big", "small"]
        assert budget.used == 60
    budget.give(60)
    assert budget.used == 0
    await budget.take(500)  # larger than the budget: allowed when nothing else is held
    assert budget.used == 500
    budget.give(500)
