"""Tests for worker.simulator's quotas: rate-limit headers, regions and consumption tiers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from worker.simulator import SimConfig, Simulator, _go_duration

from .test_simulator import BODY_429, body, post


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def parse_go_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``1m0.5s`` or ``20ms``."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?", text)
    assert match and text, text
    hours, minutes, secs, millis = match.groups()
    return (
        int(hours or 0) * 3600
        + int(minutes or 0) * 60
        + float(secs or 0)
        + int(millis or 0) / 1000.0
    )


def chat_url(sim: Simulator) -> str:
    return f"{sim.base_url}/chat/completions"


# --------------------------------------------------------------------------- rate-limit headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),  # rounded up: waiting this long finds the bucket full
        (0.999, "999ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (59.25, "59.25s"),
        (360.0, "6m0s"),
        (61.5, "1m1.5s"),
        (3723.5, "1h2m3.5s"),
        (-1.0, "0s"),
    ],
)
def test_go_duration_format(seconds: float, text: str) -> None:
    assert _go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(max(0.0, seconds), abs=0.001)


async def test_ratelimit_headers_on_every_answer(http: aiohttp.ClientSession) -> None:
    cfg = SimConfig(rate_limit_rps=2.0, rate_burst=4.0, ratelimit_headers=True)
    async with Simulator(cfg) as sim:
        status, _, headers = await post(http, chat_url(sim), body())
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "120"  # 2 rps = 120 per minute
        assert headers["x-ratelimit-remaining-requests"] == "3"
        # one token short of full at 2 tokens/s: half a second, less the few ms since
        assert 0.45 < parse_go_duration(headers["x-ratelimit-reset-requests"]) <= 0.5
        # errors carry them too: a 400 (after taking a token), a 500, a 401 (before it)
        status, _, headers = await post(http, chat_url(sim), {"model": "m"})
        assert status == 400
        assert headers["x-ratelimit-remaining-requests"] == "2"
        sim.config.error_rate = 1.0
        status, _, headers = await post(http, chat_url(sim), body())
        assert status in (500, 503)
        assert headers["x-ratelimit-remaining-requests"] == "1"
        sim.config.error_rate = 0.0
        sim.config.require_token = True
        status, _, headers = await post(http, chat_url(sim), body())
        assert status == 401
        assert headers["x-ratelimit-remaining-requests"] == "1"
        assert headers["x-ratelimit-limit-requests"] == "120"
        sim.config.require_token = False
        assert (await post(http, chat_url(sim), body()))[0] == 200
        status, data, headers = await post(http, chat_url(sim), body())
        assert status == 429
        assert data == BODY_429
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 1.5 < parse_go_duration(headers["x-ratelimit-reset-requests"]) <= 2.0
        assert "retry-after-ms" not in headers  # neither retry_after_s nor retry_after_exact
        # without a bucket there is nothing to describe
        sim.config.rate_limit_rps = None
        status, _, headers = await post(http, chat_url(sim), body())
        assert status == 200
        assert not any(k.lower().startswith("x-ratelimit") for k in headers)


async def test_no_ratelimit_headers_by_default(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(rate_limit_rps=5.0)) as sim:
        _, _, headers = await post(http, chat_url(sim), body())
        assert not any(k.lower().startswith("x-ratelimit") for k in headers)


async def test_nearly_empty_minute_deep_bucket(http: aiohttp.ClientSession) -> None:
    # 60 requests per minute, a minute deep, but only 2 tokens at start.
    cfg = SimConfig(
        rate_limit_rps=1.0,
        rate_burst=60.0,
        rate_initial=2.0,
        ratelimit_headers=True,
        retry_after_exact=True,
        retry_after_s=30.0,  # superseded by the exact value for bucket 429s
    )
    async with Simulator(cfg) as sim:
        results = [await post(http, chat_url(sim), body()) for _ in range(3)]
        assert [r[0] for r in results] == [200, 200, 429]
        remaining = [r[2]["x-ratelimit-remaining-requests"] for r in results]
        assert remaining == ["1", "0", "0"]
        assert {r[2]["x-ratelimit-limit-requests"] for r in results} == {"60"}
        resets = [parse_go_duration(r[2]["x-ratelimit-reset-requests"]) for r in results]
        assert 58.5 < resets[0] <= 59.0
        assert 59.5 < resets[1] <= 60.0
        assert 59.5 < resets[2] <= 60.0
        headers = results[2][2]
        # a token is due within a second (less the ms since the first request)
        wait_ms = int(headers["retry-after-ms"])
        assert 500 < wait_ms <= 1000
        assert headers["Retry-After"] == "1"
        assert results[2][1] == BODY_429
        assert "x-ratelimit-limit-requests" in headers
        # a concurrency 429 has no bucket to ask: the fixed retry_after_s applies
        sim.config.max_concurrency = 1
        sim.config.latency_ms = 200.0
        sim.config.rate_limit_rps = None  # the bucket itself is no obstacle now
        first = post(http, chat_url(sim), body())
        second = post(http, chat_url(sim), body())
        outcomes = await asyncio.gather(first, second)
        statuses = sorted(o[0] for o in outcomes)
        assert statuses == [200, 429]
        limited = next(o for o in outcomes if o[0] == 429)
        assert limited[2]["retry-after-ms"] == "30000"


async def test_rate_initial_zero_and_refill(http: aiohttp.ClientSession) -> None:
    # 50 tokens/s from an empty bucket: the first request waits ~20 ms for its token.
    cfg = SimConfig(rate_limit_rps=50.0, rate_initial=0.0, retry_after_exact=True)
    async with Simulator(cfg) as sim:
        status, _, headers = await post(http, chat_url(sim), body())
        assert status == 429
        assert 1 <= int(headers["retry-after-ms"]) <= 20
        # the bucket refills from the time of that 429, so waiting as told finds a token
        await asyncio.sleep(int(headers["retry-after-ms"]) / 1000.0)
        assert (await post(http, chat_url(sim), body()))[0] == 200
