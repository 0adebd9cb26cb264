"""Tests for worker.simulator's quotas: rate-limit headers, regions and consumption tiers."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

from worker.simulator import (
    RegionConfig,
    SimConfig,
    SimStats,
    Simulator,
    _go_duration,
    add_simulator_arguments,
    serve_simulator,
    sim_config_from_args,
)

from .test_simulator import BODY_429, body, create, post


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
    # A token every 2 s: the counts below hold unless the test stalls for seconds.
    cfg = SimConfig(rate_limit_rps=0.5, rate_burst=4.0, ratelimit_headers=True)
    async with Simulator(cfg) as sim:
        status, _, headers = await post(http, chat_url(sim), body())
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "30"  # 0.5 rps = 30 per minute
        assert headers["x-ratelimit-remaining-requests"] == "3"
        # one token short of full at 0.5 tokens/s: 2 s, less the moment since
        assert 1.9 < parse_go_duration(headers["x-ratelimit-reset-requests"]) <= 2.0
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
        assert headers["x-ratelimit-limit-requests"] == "30"
        sim.config.require_token = False
        assert (await post(http, chat_url(sim), body()))[0] == 200
        status, data, headers = await post(http, chat_url(sim), body())
        assert status == 429
        assert data == BODY_429
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 7.5 < parse_go_duration(headers["x-ratelimit-reset-requests"]) <= 8.0
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
    # 30 requests per minute, a minute deep, but only 2 tokens at start.
    cfg = SimConfig(
        rate_limit_rps=0.5,
        rate_burst=30.0,
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
        assert {r[2]["x-ratelimit-limit-requests"] for r in results} == {"30"}
        resets = [parse_go_duration(r[2]["x-ratelimit-reset-requests"]) for r in results]
        assert 57.0 < resets[0] <= 58.0  # 29 tokens to go at 0.5/s
        assert 59.0 < resets[1] <= 60.0
        assert 59.0 < resets[2] <= 60.0
        headers = results[2][2]
        # the next token is due within 2 s (less the moment since the second request)
        wait_ms = int(headers["retry-after-ms"])
        assert 1000 < wait_ms <= 2000
        assert headers["Retry-After"] == "2"
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


# --------------------------------------------------------------------------- regions


def three_regions(**overrides: Any) -> SimConfig:
    return SimConfig(
        regions=(
            RegionConfig("us-central1"),
            RegionConfig("europe-west4", rate_limit_rps=1.0, latency_ms=None),
            RegionConfig("asia-east1", latency_ms=150.0),
        ),
        **overrides,
    )


async def wait_for(condition: Callable[[], bool], what: str, within_s: float = 3.0) -> None:
    """Poll a condition the test cannot await directly (bounded: fails, never hangs)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_regions_listen_on_their_own_ports(http: aiohttp.ClientSession) -> None:
    async with Simulator(three_regions(record_requests=8)) as sim:
        assert sim.region_names == ("us-central1", "europe-west4", "asia-east1")
        ports = {sim.region_port(name) for name in sim.region_names}
        assert len(ports | {sim.port}) == 4
        base = sim.region_base_url("europe-west4", "my-proj")
        port = sim.region_port("europe-west4")
        assert base == (
            f"http://127.0.0.1:{port}/v1/projects/my-proj/locations/europe-west4/endpoints/openapi"
        )
        assert sim.region_base_url("us-central1").startswith(
            f"http://127.0.0.1:{sim.region_port('us-central1')}/v1/projects/sim-project/"
        )
        # the real SDK against a region's base URL
        client = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0, timeout=5.0)
        try:
            completion = await create(client)
        finally:
            await client.close()
        assert completion.choices[0].message.content == "A 64x48 PNG image, mostly red (#d02020)."
        assert sim.requests[-1].path == (
            "/v1/projects/my-proj/locations/europe-west4/endpoints/openapi/chat/completions"
        )
        # the plain OpenAI path works on a region's port too
        us = sim.region_port("us-central1")
        assert (await post(http, f"http://127.0.0.1:{us}/v1/chat/completions", body()))[0] == 200
        # each port counts its own requests; the main port saw none
        assert sim.region_stats("europe-west4").by_status == {200: 1}
        assert sim.region_stats("us-central1").by_status == {200: 1}
        assert sim.region_stats("asia-east1").requests == 0
        stats = sim.stats()
        assert stats.requests == 0
        assert set(stats.regions) == set(sim.region_names)
        assert stats.regions["europe-west4"] == sim.region_stats("europe-west4")
        assert stats.regions["europe-west4"].unique_images == 1
        # GET /stats on the main port has a "regions" object, and round-trips
        async with http.get(f"{sim.root_url}/stats") as resp:
            data = await resp.json()
        assert data["regions"]["us-central1"]["by_status"] == {"200": 1}
        assert SimStats.from_json(data) == stats
        assert SimStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats
        # regions have no /stats of their own, but answer /healthz
        async with http.get(f"http://127.0.0.1:{us}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{us}/stats") as resp:
            assert resp.status == 404
        sim.reset_stats()
        assert sim.region_stats("us-central1").requests == 0
    with pytest.raises(RuntimeError):
        sim.region_base_url("us-central1")
    with pytest.raises(KeyError, match="no region named 'mars-north1'"):
        sim.region_stats("mars-north1")


async def test_regions_have_their_own_bucket_and_latency(http: aiohttp.ClientSession) -> None:
    async with Simulator(three_regions(ratelimit_headers=True)) as sim:
        eu = f"{sim.region_base_url('europe-west4')}/chat/completions"
        us = f"{sim.region_base_url('us-central1')}/chat/completions"
        first = await post(http, eu, body())
        assert first[0] == 200
        assert first[2]["x-ratelimit-limit-requests"] == "60"  # the region's 1 rps
        assert first[2]["x-ratelimit-remaining-requests"] == "0"
        second = await post(http, eu, body())
        assert second[0] == 429
        assert second[1] == BODY_429
        # other ports are unlimited: no bucket, no headers
        for url in (us, f"{sim.base_url}/chat/completions"):
            status, _, headers = await post(http, url, body())
            assert status == 200
            assert "x-ratelimit-limit-requests" not in headers
        assert sim.region_stats("europe-west4").by_status == {200: 1, 429: 1}
        assert sim.stats().by_status == {200: 1}
        # the main port's bucket is not a region's
        sim.config.rate_limit_rps = 1.0
        assert (await post(http, f"{sim.base_url}/chat/completions", body()))[0] == 200
        assert (await post(http, us, body()))[0] == 200
        # asia-east1 has 150 ms of its own; the others follow the main config, also when
        # it changes at runtime
        start = time.perf_counter()
        assert (await post(http, f"{sim.region_base_url('asia-east1')}/chat/completions", body()))[
            0
        ] == 200
        assert time.perf_counter() - start >= 0.149
        sim.config.latency_ms = 120.0
        start = time.perf_counter()
        assert (await post(http, us, body()))[0] == 200
        assert time.perf_counter() - start >= 0.119


async def test_stop_region_refuses_and_resets_then_start_region_reuses_port(
    http: aiohttp.ClientSession,
) -> None:
    config = SimConfig(regions=(RegionConfig("europe-west4", latency_ms=5000.0),))
    async with Simulator(config) as sim:
        port = sim.region_port("europe-west4")
        url = f"{sim.region_base_url('europe-west4')}/chat/completions"
        # a request in flight (it would take 5 s) on a region that dies under it
        start = time.perf_counter()
        task = asyncio.create_task(post(http, url, body()))
        await wait_for(lambda: sim.region_stats("europe-west4").in_flight == 1, "in flight")
        # an idle keep-alive connection, opened before the region dies
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        def connections() -> int:
            runner = sim._regions["europe-west4"].runner
            server = runner.server if runner is not None else None
            return len(server.connections) if server is not None else 0

        await wait_for(lambda: connections() == 2, "the server to accept the second connection")
        await sim.stop_region("europe-west4")
        assert not sim.region_up("europe-west4")
        with pytest.raises(aiohttp.ClientError):
            await task
        assert time.perf_counter() - start < 2.0
        # the idle connection was reset (RST), not closed politely
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        # new connections are refused, through the SDK too
        assert await refused(port)
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(http, url, body())
        client = openai.AsyncOpenAI(
            base_url=sim.region_base_url("europe-west4"), api_key="k", max_retries=0, timeout=5.0
        )
        try:
            with pytest.raises(openai.APIConnectionError):
                await create(client)
        finally:
            await client.close()
        await wait_for(lambda: sim.region_stats("europe-west4").in_flight == 0, "cancelled")
        assert sim.region_stats("europe-west4").by_status == {499: 1}
        await sim.stop_region("europe-west4")  # idempotent
        # the main port is not affected
        assert (await post(http, f"{sim.base_url}/chat/completions", body()))[0] == 200
        # back up, on the same port
        await sim.start_region("europe-west4")
        await sim.start_region("europe-west4")  # idempotent
        assert sim.region_up("europe-west4")
        assert sim.region_port("europe-west4") == port
        sim.config.regions[0].latency_ms = 0.0  # re-read by every request
        status, data, _ = await post(http, url, body())
        assert status == 200
        assert data["choices"][0]["finish_reason"] == "stop"
        assert sim.region_stats("europe-west4").by_status == {499: 1, 200: 1}
    assert await refused(port)  # stop() closes regions too


async def test_region_control_routes(http: aiohttp.ClientSession) -> None:
    async with Simulator(three_regions()) as sim:
        port = sim.region_port("us-central1")
        async with http.post(f"{sim.root_url}/control/regions/us-central1/down") as resp:
            assert resp.status == 200
            state = await resp.json()
        assert state == {
            "region": "us-central1",
            "up": False,
            "base_url": sim.region_base_url("us-central1"),
        }
        assert await refused(port)
        assert not await refused(sim.region_port("europe-west4"))  # the others stay up
        async with http.post(f"{sim.root_url}/control/regions/us-central1/up") as resp:
            assert resp.status == 200
            assert (await resp.json())["up"] is True
        url = f"{sim.region_base_url('us-central1')}/chat/completions"
        assert (await post(http, url, body()))[0] == 200
        async with http.post(f"{sim.root_url}/control/regions/mars-north1/down") as resp:
            assert resp.status == 404
            error = (await resp.json())[0]["error"]
            assert error["status"] == "NOT_FOUND"
            assert "mars-north1" in error["message"]
        async with http.post(f"{sim.root_url}/control/regions/us-central1/sideways") as resp:
            assert resp.status == 404
        # only the main port takes control requests
        async with http.post(f"http://127.0.0.1:{port}/control/regions/us-central1/down") as resp:
            assert resp.status == 404
        assert sim.region_up("us-central1")


async def test_region_resets_and_errors_follow_the_main_config(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(three_regions()) as sim:
        url = f"{sim.region_base_url('us-central1')}/chat/completions"
        sim.config.reset_rate = 1.0
        with pytest.raises(aiohttp.ClientError):
            await post(http, url, body())
        sim.config.reset_rate = 0.0
        sim.config.error_rate = 1.0
        assert (await post(http, url, body()))[0] in (500, 503)
        sim.config.error_rate = 0.0
        sim.config.require_token = True
        sim.config.static_token = "tok"
        assert (await post(http, url, body()))[0] == 401
        headers = {"Authorization": "Bearer tok"}
        assert (await post(http, url, body(), headers=headers))[0] == 200
        stats = sim.region_stats("us-central1")
        assert stats.requests == 4
        assert (stats.by_status[0], stats.by_status[200], stats.by_status[401]) == (1, 1, 1)
        assert stats.by_status.get(500, 0) + stats.by_status.get(503, 0) == 1
        assert stats.missing_token_401 == 1
        assert sim.stats().requests == 0


def test_region_config_validation() -> None:
    for kwargs in (
        {"name": "Europe West"},
        {"name": ""},
        {"name": "eu", "rate_limit_rps": 0.0},
        {"name": "eu", "rate_limit_rps": -1.0},
        {"name": "eu", "latency_ms": float("nan")},
        {"name": "eu", "rate_burst": 0.5},
        {"name": "eu", "port": 70000},
    ):
        with pytest.raises(ValueError, match="RegionConfig"):
            RegionConfig(**kwargs)
    with pytest.raises(ValueError, match="duplicate"):
        SimConfig(regions=(RegionConfig("eu"), RegionConfig("eu")))
    with pytest.raises(ValueError, match="RegionConfig"):
        SimConfig(regions=("eu",))  # type: ignore[arg-type]
    assert SimConfig(regions=[RegionConfig("eu")]).regions == (RegionConfig("eu"),)  # type: ignore[arg-type]


def test_regions_flag() -> None:
    parser = argparse.ArgumentParser()
    add_simulator_arguments(parser)
    ns = parser.parse_args(["--regions", "us-central1:100, europe-west4:50:300,global:0"])
    assert sim_config_from_args(ns).regions == (
        RegionConfig("us-central1", rate_limit_rps=100.0),
        RegionConfig("europe-west4", rate_limit_rps=50.0, latency_ms=300.0),
        RegionConfig("global", rate_limit_rps=None),
    )
    assert sim_config_from_args(parser.parse_args([])).regions == ()
    for spec in ("us-central1", "us-central1:fast", "us-central1:1:2:3", "Bad Name:1"):
        with pytest.raises(ValueError, match=r"region|RegionConfig"):
            sim_config_from_args(parser.parse_args(["--regions", spec]))


async def test_serve_simulator_announces_regions(capsys: pytest.CaptureFixture[str]) -> None:
    config = SimConfig(regions=(RegionConfig("us-central1"), RegionConfig("global")))
    task = asyncio.create_task(serve_simulator(config, "127.0.0.1", 0))
    err = ""
    deadline = time.monotonic() + 3.0
    while err.count("\n") < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        err += capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert re.fullmatch(r"simulator listening on http://127\.0\.0\.1:\d+/v1", lines[0])
    for line, name in zip(lines[1:], ("us-central1", "global"), strict=True):
        match = re.fullmatch(
            rf"simulator region {name} listening on (http://127\.0\.0\.1:\d+/v1/projects/"
            rf"sim-project/locations/{name}/endpoints/openapi)",
            line,
        )
        assert match, line
        async with aiohttp.ClientSession() as http:
            status, _, _ = await post(http, f"{match.group(1)}/chat/completions", body())
            assert status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- consumption tiers


async def tiered(
    http: aiohttp.ClientSession,
    url: str,
    shared: str | None = None,
    kind: str | None = None,
) -> tuple[int, Any, Any]:
    headers = {}
    if shared is not None:
        headers["X-Vertex-AI-LLM-Shared-Request-Type"] = shared
    if kind is not None:
        headers["X-Vertex-AI-LLM-Request-Type"] = kind
    return await post(http, url, body(), headers=headers)


def vertex_chat(sim: Simulator, location: str) -> str:
    return f"{sim.vertex_base_url('p', location)}/chat/completions"


async def test_flex_only_on_the_global_endpoint(http: aiohttp.ClientSession) -> None:
    config = SimConfig(regions=(RegionConfig("global"), RegionConfig("europe-west4")))
    async with Simulator(config) as sim:
        for url in (
            vertex_chat(sim, "us-central1"),
            f"{sim.base_url}/chat/completions",  # no location at all
            f"{sim.region_base_url('europe-west4')}/chat/completions",
        ):
            status, data, _ = await tiered(http, url, "flex")
            assert status == 400, url
            error = data[0]["error"]
            assert error["status"] == "INVALID_ARGUMENT"
            assert "Flex PayGo" in error["message"]
            assert "global endpoint" in error["message"]
        # the global location on the main port, and the region named global
        status, data, _ = await tiered(http, vertex_chat(sim, "global"), "flex")
        assert status == 200
        assert data["choices"][0]["finish_reason"] == "stop"
        # header names and values are case-insensitive
        url = f"{sim.region_base_url('global')}/chat/completions"
        headers = {"x-vertex-ai-llm-shared-request-type": " FLEX "}
        assert (await post(http, url, body(), headers=headers))[0] == 200
        stats = sim.stats()
        assert stats.by_tier == {"flex": 1}
        assert stats.by_status == {400: 2, 200: 1}
        assert stats.by_header == {"shared-request-type=flex": 3}
        assert sim.region_stats("global").by_tier == {"flex": 1}
        assert sim.region_stats("global").by_header == {"shared-request-type=flex": 1}
        assert sim.region_stats("europe-west4").by_status == {400: 1}


async def test_flex_is_slower_and_has_its_own_bucket(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SimConfig(
        latency_ms=30.0, rate_limit_rps=1.0, flex_rate_limit_rps=1.0, retry_after_exact=True
    )
    async with Simulator(config) as sim:
        delays: list[float] = []
        original = sim._delay_s

        def recording(cfg: SimConfig, region: Any, factor: float) -> float:
            delays.append(round(original(cfg, region, factor), 6))
            return delays[-1]

        monkeypatch.setattr(sim, "_delay_s", recording)
        url = vertex_chat(sim, "global")
        start = time.perf_counter()
        assert (await tiered(http, url))[0] == 200  # the standard bucket's only token
        assert time.perf_counter() - start >= 0.029
        start = time.perf_counter()
        assert (await tiered(http, url, "flex"))[0] == 200  # flex draws from its own
        assert time.perf_counter() - start >= 0.089  # 3 x 30 ms
        status, data, headers = await tiered(http, url, "flex")
        assert status == 429
        assert data == BODY_429
        assert 0 < int(headers["retry-after-ms"]) <= 1000
        assert (await tiered(http, url))[0] == 429
        sim.config.flex_latency_factor = 1.0
        sim.config.flex_rate_limit_rps = None  # unlimited
        statuses = [(await tiered(http, url, "flex", "shared"))[0] for _ in range(3)]
        assert statuses == [200] * 3
        assert delays == [0.03, 0.09, 0.03, 0.03, 0.03]  # the 429s were answered at once
        assert sim.stats().by_tier == {"standard": 1, "flex": 4}


async def test_priority_counted_apart_with_an_optional_bucket(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(SimConfig(rate_limit_rps=1.0)) as sim:
        url = vertex_chat(sim, "us-central1")
        # without a bucket of its own, priority draws from the standard one
        assert (await tiered(http, url, "priority"))[0] == 200
        assert (await tiered(http, url))[0] == 429
        assert (await tiered(http, url, "Priority"))[0] == 429
        sim.config.priority_rate_limit_rps = 1.0
        assert (await tiered(http, url, "priority", "shared"))[0] == 200
        assert (await tiered(http, url, "priority"))[0] == 429
        stats = sim.stats()
        assert stats.by_tier == {"priority": 2}
        assert stats.by_header == {
            "shared-request-type=priority": 4,
            "request-type=shared": 1,
        }
        assert stats.by_status == {200: 2, 429: 3}


async def test_provisioned_throughput_spills_over(http: aiohttp.ClientSession) -> None:
    config = SimConfig(provisioned_rps=1.0, rate_limit_rps=1.0, retry_after_exact=True)
    async with Simulator(config) as sim:
        url = vertex_chat(sim, "us-central1")
        # no header: PT first, then the standard bucket, then 429
        assert [(await tiered(http, url))[0] for _ in range(2)] == [200, 200]
        status, _, headers = await tiered(http, url)
        assert status == 429
        assert 0 < int(headers["retry-after-ms"]) <= 1000  # the first of both to refill
        assert sim.stats().by_tier == {"provisioned": 1, "standard": 1}


async def test_dedicated_and_shared(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(provisioned_rps=1.0, retry_after_s=2.0)) as sim:
        url = vertex_chat(sim, "us-central1")
        # shared bypasses PT, even with PT tokens left
        assert (await tiered(http, url, kind="shared"))[0] == 200
        assert sim.stats().by_tier == {"standard": 1}
        # dedicated: PT only, 429 once spent, although pay-as-you-go is unlimited
        assert (await tiered(http, url, kind="dedicated"))[0] == 200
        status, data, headers = await tiered(http, url, kind="DEDICATED")
        assert status == 429
        assert data == BODY_429
        assert headers["retry-after-ms"] == "2000"
        assert (await tiered(http, url, kind="shared"))[0] == 200
        assert (await tiered(http, url))[0] == 200  # spills over
        stats = sim.stats()
        assert stats.by_tier == {"standard": 3, "provisioned": 1}
        assert stats.by_header == {"request-type=shared": 2, "request-type=dedicated": 2}
        # without any PT, dedicated cannot be served at all
        sim.config.provisioned_rps = None
        status, data, _ = await tiered(http, url, kind="dedicated")
        assert status == 400
        assert data[0]["error"]["status"] == "FAILED_PRECONDITION"
        assert "no Provisioned Throughput" in data[0]["error"]["message"]


async def test_flex_after_provisioned_throughput(http: aiohttp.ClientSession) -> None:
    config = SimConfig(provisioned_rps=1.0, flex_rate_limit_rps=1.0, rate_limit_rps=1.0)
    async with Simulator(config) as sim:
        url = vertex_chat(sim, "global")
        # flex alone: PT first, then flex; the standard bucket is never touched
        assert [(await tiered(http, url, "flex"))[0] for _ in range(3)] == [200, 200, 429]
        assert sim.stats().by_tier == {"provisioned": 1, "flex": 1}
        assert (await tiered(http, url))[0] == 200
        assert sim.stats().by_tier == {"provisioned": 1, "flex": 1, "standard": 1}


async def test_shared_flex_skips_provisioned_throughput(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(provisioned_rps=1.0)) as sim:
        url = vertex_chat(sim, "global")
        assert (await tiered(http, url, "flex", "shared"))[0] == 200
        assert (await tiered(http, url, kind="dedicated"))[0] == 200  # PT still full
        assert sim.stats().by_tier == {"flex": 1, "provisioned": 1}


async def test_tier_quotas_are_per_region(http: aiohttp.ClientSession) -> None:
    config = SimConfig(
        provisioned_rps=1.0,
        regions=(RegionConfig("us-central1"), RegionConfig("europe-west4")),
    )
    async with Simulator(config) as sim:
        for name in sim.region_names:
            url = f"{sim.region_base_url(name)}/chat/completions"
            assert (await tiered(http, url, kind="dedicated"))[0] == 200
            assert (await tiered(http, url, kind="dedicated"))[0] == 429
            assert sim.region_stats(name).by_tier == {"provisioned": 1}
        stats = sim.stats()
        assert stats.by_tier == {}
        assert SimStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


@pytest.mark.parametrize(
    ("shared", "kind", "needle"),
    [
        ("batch", None, "X-Vertex-AI-LLM-Shared-Request-Type"),
        ("", None, "X-Vertex-AI-LLM-Shared-Request-Type"),
        (None, "spillover", "X-Vertex-AI-LLM-Request-Type"),
        ("flex", "bogus", "X-Vertex-AI-LLM-Request-Type"),
    ],
)
async def test_bad_tier_headers_get_400(
    http: aiohttp.ClientSession, shared: str | None, kind: str | None, needle: str
) -> None:
    async with Simulator(SimConfig(rate_limit_rps=1.0)) as sim:
        status, data, _ = await tiered(http, vertex_chat(sim, "global"), shared, kind)
        assert status == 400
        assert data[0]["error"]["status"] == "INVALID_ARGUMENT"
        assert needle in data[0]["error"]["message"]
        assert sum(sim.stats().by_header.values()) == (shared is not None) + (kind is not None)
        assert (await tiered(http, vertex_chat(sim, "global")))[0] == 200  # no token was taken


def test_tier_flags_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_simulator_arguments(parser)
    ns = parser.parse_args(
        [
            "--provisioned-rps",
            "5",
            "--flex-rate-limit-rps",
            "2",
            "--priority-rate-limit-rps",
            "3",
            "--flex-latency-factor",
            "4",
        ]
    )
    cfg = sim_config_from_args(ns)
    assert (cfg.provisioned_rps, cfg.flex_rate_limit_rps, cfg.priority_rate_limit_rps) == (
        5.0,
        2.0,
        3.0,
    )
    assert cfg.flex_latency_factor == 4.0
    defaults = sim_config_from_args(parser.parse_args([]))
    assert defaults.flex_latency_factor == 3.0
    assert defaults.provisioned_rps is None
    bad: tuple[dict[str, Any], ...] = (
        {"provisioned_rps": 0.0},
        {"provisioned_rps": -1.0},
        {"flex_rate_limit_rps": -1.0},
        {"priority_rate_limit_rps": float("inf")},
        {"flex_latency_factor": -1.0},
    )
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SimConfig(**kwargs)
