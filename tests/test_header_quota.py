"""A backend's own account of its quota (``x-ratelimit-*-requests``): parsing the headers,
the pacing bucket built from them (on a clock the tests move by hand), and one check
against the simulator that pacing by them keeps a small quota free of 429s."""

from __future__ import annotations

import anyio
import pytest

from worker.auth import NoTokens
from worker.clock import ManualClock
from worker.endpoints import Endpoint, EndpointPool
from worker.errors import ModelError
from worker.limits import HeaderQuota, Limiter, parse_reset_s
from worker.model import ModelCall, ModelClient, quota_headers
from worker.simulator import SimConfig, Simulator

from .helpers import quick_settings

# --------------------------------------------------------------------------- parse_reset_s


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        ("12", 12.0),
        ("0.25", 0.25),
        (" 7s ", 7.0),
        ("-3", 0.0),  # a plain number below zero is clamped, not trusted
    ],
)
def test_parse_reset_s_reads_go_durations_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_reset_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "   ", "soon", "1x", "s", "ms", "1s junk", "junk1s", "1.s", "-1s", "1 s", "1h-2m"]
)
def test_parse_reset_s_refuses_junk(text: str) -> None:
    assert parse_reset_s(text) is None


# --------------------------------------------------------------------------- quota_headers


def test_quota_headers_reads_openai_style_headers() -> None:
    headers = {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "598",
        "x-ratelimit-reset-requests": "200ms",
    }
    assert quota_headers(headers) == (600.0, 598.0, 0.2)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # Vertex AI sends none
        {"x-ratelimit-limit-requests": "600", "x-ratelimit-reset-requests": "1s"},
        {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s"},
        {
            "x-ratelimit-limit-requests": "lots",
            "x-ratelimit-remaining-requests": "5",
            "x-ratelimit-reset-requests": "1s",
        },
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "5",
            "x-ratelimit-reset-requests": "whenever",
        },
        {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "5"},
    ],
)
def test_quota_headers_missing_or_junk_is_none(headers: dict[str, str]) -> None:
    assert quota_headers(headers) is None


# --------------------------------------------------------------------------- HeaderQuota


def test_inactive_until_a_backend_sends_the_headers() -> None:
    quota = HeaderQuota(clock=ManualClock())
    assert quota.ready_in_s() == 0.0
    for _ in range(1000):
        quota.take()  # no bucket: nothing is counted, nothing held back
    assert quota.ready_in_s() == 0.0
    assert quota.bucket is None
    assert quota.updates == 0


def test_pacing_follows_the_reported_refill_rate() -> None:
    clock = ManualClock()
    quota = HeaderQuota(clock=clock)
    # 60 a minute, none left, whole again in 60 s: one request a second.
    quota.observe(60, 0, 60.0)
    assert quota.updates == 1
    assert quota.bucket is not None
    assert quota.bucket.rate_per_s == pytest.approx(1.0)
    assert quota.ready_in_s() == pytest.approx(1.0)
    clock.advance(0.25)
    assert quota.ready_in_s() == pytest.approx(0.75)
    clock.advance(0.75)
    assert quota.ready_in_s() == 0.0
    quota.take()
    assert quota.ready_in_s() == pytest.approx(1.0)
    # Three requests sent back to back go into debt: the next waits for all of it.
    quota.take()
    quota.take()
    assert quota.ready_in_s() == pytest.approx(3.0)


def test_remaining_tokens_are_spent_at_once_then_paced() -> None:
    clock = ManualClock()
    quota = HeaderQuota(clock=clock)
    # 120 a minute (2/s), 4 left: 116 used, whole in 58 s.
    quota.observe(120, 4, 58.0)
    assert quota.bucket is not None
    assert quota.bucket.rate_per_s == pytest.approx(2.0)
    sent = 0
    while quota.ready_in_s() == 0.0:
        quota.take()
        sent += 1
    assert sent == 4
    assert quota.ready_in_s() == pytest.approx(0.5)


def test_a_lower_remaining_wins_over_our_count_and_a_higher_one_does_not() -> None:
    clock = ManualClock()
    quota = HeaderQuota(clock=clock)
    quota.observe(60, 10, 50.0)  # 1/s, 10 left
    assert quota.bucket is not None
    # The backend counted requests of other clients too: it says 2, we thought 10. It
    # counts whole tokens, rounded down: up to 2.99 may be left, and no more.
    quota.observe(60, 2, 58.0)
    assert quota.bucket.tokens == pytest.approx(2.99)
    # An answer that was in flight a while reports 9 left: stale, our count stands.
    quota.observe(60, 9, 51.0)
    assert quota.bucket.tokens == pytest.approx(2.99)
    assert quota.updates == 3


def test_the_refill_rate_is_smoothed_over_answers() -> None:
    clock = ManualClock()
    quota = HeaderQuota(clock=clock)
    quota.observe(60, 0, 60.0)  # 1/s
    quota.observe(60, 0, 30.0)  # 2/s (a rounded reset, say)
    assert quota.bucket is not None
    assert quota.bucket.rate_per_s == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)
    assert quota.bucket.capacity == 60


def test_a_full_quota_refills_the_bucket_without_changing_the_rate() -> None:
    clock = ManualClock()
    quota = HeaderQuota(clock=clock)
    quota.observe(60, 0, 60.0)
    assert quota.bucket is not None
    quota.observe(60, 60, 0.0)  # whole again: nothing used, no rate to learn
    assert quota.bucket.rate_per_s == pytest.approx(1.0)
    assert quota.bucket.tokens == pytest.approx(60.0)
    assert quota.ready_in_s() == 0.0


def test_a_full_quota_before_any_use_builds_no_bucket() -> None:
    quota = HeaderQuota(clock=ManualClock())
    quota.observe(60, 60, 0.0)
    assert quota.bucket is None
    assert quota.ready_in_s() == 0.0


@pytest.mark.parametrize(
    ("limit", "remaining", "reset_s"), [(0, 0, 1.0), (-5, 0, 1.0), (60, -1, 1.0), (60, 5, -1.0)]
)
def test_nonsense_is_ignored(limit: float, remaining: float, reset_s: float) -> None:
    quota = HeaderQuota(clock=ManualClock())
    quota.observe(limit, remaining, reset_s)
    assert quota.updates == 0
    assert quota.bucket is None


# --------------------------------------------------------------------------- against the simulator


async def _burst(sim: Simulator, n: int) -> tuple[Endpoint, int]:
    """``n`` requests at once through a pool of one endpoint (4 slots), each retried until
    it succeeds: the endpoint, and the 429s on the way."""
    client = ModelClient(quick_settings().model, NoTokens(), base_url=sim.base_url, name="sim")
    ep = Endpoint(name="sim", client=client, limiter=Limiter(4))
    pool = EndpointPool([ep])
    rejected = 0

    async def one(i: int) -> None:
        nonlocal rejected
        while True:
            slot = await pool.acquire("standard")
            try:
                await slot.describe(ModelCall(f"gs://bucket/img-{i}.jpg"))
            except ModelError as exc:
                if exc.status != 429:
                    raise
                rejected += 1
                await anyio.sleep(exc.retry_after_s or 0.05)
                continue
            return

    try:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
    finally:
        await client.aclose()
    return ep, rejected


@pytest.mark.parametrize("headers", [True, False])
async def test_pacing_by_the_headers_keeps_the_quota_free_of_429s(headers: bool) -> None:
    # 30 requests a second in a minute-deep bucket (as OpenAI's per-minute headers
    # describe one), starting with 4 tokens; 30 requests at once, 4 slots.
    cfg = SimConfig(
        rate_limit_rps=30.0,
        rate_burst=1800.0,
        rate_initial=4.0,
        ratelimit_headers=headers,
        retry_after_s=0.05,
    )
    async with Simulator(cfg) as sim:
        ep, rejected = await _burst(sim, 30)
        assert sim.stats().by_status == {200: 30, **({429: rejected} if rejected else {})}
    if not headers:
        # Without them the pool only learns of the quota from 429s: most requests see one.
        assert rejected >= 15, rejected
        assert ep.quota.bucket is None
        return
    # Only the first round (4 slots) went before the headers told the bucket's state;
    # from then on each request waited for the refill they reported.
    assert rejected <= 4, rejected
    assert ep.quota.updates == 30 + rejected
    assert ep.quota.bucket is not None
    assert ep.quota.bucket.rate_per_s == pytest.approx(30.0, rel=0.2)
