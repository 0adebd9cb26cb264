"""Tests for worker.simulator, driven through the real OpenAI SDK and a plain aiohttp client."""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import random
import re
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from worker.simulator import (
    _NOTHING,
    SimConfig,
    SimStats,
    Simulator,
    _SchemaError,
    _SchemaFiller,
    add_simulator_arguments,
    serve_simulator,
    sim_config_from_args,
)

RED = (208, 32, 32)
BODY_429 = [
    {
        "error": {
            "code": 429,
            "message": (
                "Resource exhausted. Please try again later. Please refer to "
                "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 "
                "for more details."
            ),
            "status": "RESOURCE_EXHAUSTED",
        }
    }
]


def data_url(
    size: tuple[int, int] = (64, 48),
    colour: tuple[int, int, int] = RED,
    fmt: str = "PNG",
    mime: str | None = None,
) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    mime = mime or f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


PNG_URL = data_url()


def messages(image: Any = PNG_URL, text: str = "Describe this image briefly") -> list[Any]:
    if isinstance(image, str):
        image = {"url": image}
    return [
        {"role": "system", "content": "You describe images."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": image},
            ],
        },
    ]


def body(image: Any = PNG_URL, **extra: Any) -> dict[str, Any]:
    return {"model": "google/gemini-2.0-flash", "messages": messages(image), **extra}


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0, timeout=5.0)
    try:
        yield c
    finally:
        await c.close()


async def create(client: openai.AsyncOpenAI, image: Any = PNG_URL, **extra: Any) -> Any:
    return await client.chat.completions.create(
        model="google/gemini-2.0-flash",
        messages=messages(image),
        **extra,
    )


async def post(
    http: aiohttp.ClientSession, url: str, payload: Any, **kwargs: Any
) -> tuple[int, Any, Any]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    async with http.post(url, data=data, headers=headers, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


# --------------------------------------------------------------------------- happy paths


async def test_happy_path_png_describes_size_format_colour(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    completion = await create(client)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-sim-")
    assert completion.model == "google/gemini-2.0-flash"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "A 64x48 PNG image, mostly red (#d02020)."
    usage = completion.usage
    # 3 words of system prompt + 4 words of user text + 258 for the image
    assert usage.prompt_tokens == 3 + 4 + 258
    assert usage.completion_tokens == len(choice.message.content.split())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # same input -> same text; ids increase
    again = await create(client)
    assert again.choices[0].message.content == choice.message.content
    assert again.id != completion.id


@pytest.mark.parametrize(
    ("fmt", "colour", "expected"),
    [
        ("JPEG", (30, 40, 200), "JPEG image, mostly blue"),
        ("WEBP", (20, 180, 40), "WEBP image, mostly green"),
        ("GIF", (255, 255, 255), "GIF image, mostly white"),
        ("PNG", (0, 0, 0), "PNG image, mostly black (#000000)"),
        ("PNG", (240, 220, 20), "PNG image, mostly yellow"),
    ],
)
async def test_other_formats_and_colours(
    client: openai.AsyncOpenAI, fmt: str, colour: tuple[int, int, int], expected: str
) -> None:
    completion = await create(client, data_url((20, 10), colour, fmt))
    content = completion.choices[0].message.content
    assert content.startswith("A 20x10 ")
    assert expected in content


async def test_dominant_colour_is_most_common(client: openai.AsyncOpenAI) -> None:
    img = Image.new("RGB", (40, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 10))  # a quarter red, the rest blue
    buf = io.BytesIO()
    img.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = (await create(client, url)).choices[0].message.content
    assert content == "A 40x40 PNG image, mostly blue (#0000ff)."


async def test_string_image_url_and_remote_uri(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.base_url}/chat/completions"
    status, data, _ = await post(http, url, body("gs://bucket/photos/scones.jpg"))
    assert status == 200
    content = data["choices"][0]["message"]["content"]
    assert re.fullmatch(r"A simulated description of scones\.jpg \(ref [0-9a-f]{6}\)\.", content)
    # the object form of the same URL gives the same (deterministic) answer
    status2, data2, _ = await post(http, url, body({"url": "gs://bucket/photos/scones.jpg"}))
    assert status2 == 200
    assert data2["choices"][0]["message"]["content"] == content
    # a different URI gives a different reference
    _, data3, _ = await post(http, url, body("https://example.com/a/scones.jpg?x=1"))
    other = data3["choices"][0]["message"]["content"]
    assert other.startswith("A simulated description of scones.jpg (ref ")
    assert other != content
    # string form with a data: URL is decoded too
    _, data4, _ = await post(http, url, body(PNG_URL))
    assert data4["choices"][0]["message"]["content"] == "A 64x48 PNG image, mostly red (#d02020)."


async def test_vertex_path(sim: Simulator) -> None:
    base = sim.vertex_base_url("my-proj", "europe-west4")
    assert base == (
        f"http://127.0.0.1:{sim.port}/v1/projects/my-proj/locations/europe-west4/endpoints/openapi"
    )
    c = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0, timeout=5.0)
    try:
        completion = await create(c)
    finally:
        await c.close()
    assert completion.choices[0].message.content == "A 64x48 PNG image, mostly red (#d02020)."
    assert sim.requests[-1].path == (
        "/v1/projects/my-proj/locations/europe-west4/endpoints/openapi/chat/completions"
    )


async def test_max_tokens_truncates(client: openai.AsyncOpenAI) -> None:
    completion = await create(client, max_tokens=3)
    assert completion.choices[0].message.content == "A 64x48 PNG"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    full = await create(client, max_completion_tokens=100)
    assert full.choices[0].finish_reason == "stop"


async def test_healthz_and_base_url(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
    async with http.get(f"http://127.0.0.1:{sim.port}/healthz") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"


# --------------------------------------------------------------------------- validation


def _no_image() -> dict[str, Any]:
    b = body()
    b["messages"][1]["content"] = [{"type": "text", "text": "hi"}]
    return b


def _no_text() -> dict[str, Any]:
    b = body()
    b["messages"][1]["content"] = b["messages"][1]["content"][1:]
    return b


def _no_model() -> dict[str, Any]:
    b = body()
    del b["model"]
    return b


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        pytest.param(_no_image(), "image_url", id="no-image"),
        pytest.param(_no_text(), "text", id="no-text"),
        pytest.param(_no_model(), "model", id="missing-model"),
        pytest.param({**body(), "model": ""}, "model", id="empty-model"),
        pytest.param({"model": "m", "messages": []}, "messages", id="empty-messages"),
        pytest.param([1, 2], "JSON object", id="not-object"),
        pytest.param(b"{not json", "JSON", id="not-json"),
        pytest.param(body("data:image/png;base64,@@@not-base64@@@"), "base64", id="bad-base64"),
        pytest.param(
            body("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()),
            "Provided image is not valid",
            id="non-image-bytes",
        ),
        pytest.param(body("data:text/plain;base64,aGVsbG8="), "MIME", id="bad-mime"),
        pytest.param(body("data:image/png," + "abc"), "base64", id="not-base64-form"),
        pytest.param(body("ftp://host/x.png"), "ftp://", id="bad-scheme"),
        pytest.param(body("/local/file.png"), "unsupported URL", id="no-scheme"),
        pytest.param(body({"detail": "high"}), "url", id="object-without-url"),
        pytest.param(body(max_tokens="ten"), "max_tokens", id="bad-max-tokens"),
    ],
)
async def test_bad_bodies_get_400(
    sim: Simulator, http: aiohttp.ClientSession, payload: Any, needle: str
) -> None:
    status, data, _ = await post(http, f"{sim.base_url}/chat/completions", payload)
    assert status == 400
    assert isinstance(data, list)
    assert len(data) == 1
    error = data[0]["error"]
    assert error["code"] == 400
    assert error["status"] == "INVALID_ARGUMENT"
    assert needle in error["message"]
    assert sim.stats().by_status == {400: 1}
    assert sim.stats().unique_images == 0


async def test_heic_is_accepted_without_decoding(client: openai.AsyncOpenAI) -> None:
    url = "data:image/heic;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypheic").decode()
    content = (await create(client, url)).choices[0].message.content
    assert content.startswith("A HEIC image of 12 bytes")


async def test_bad_request_through_sdk(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await create(client, "data:image/png;base64,AAAA")
    assert info.value.status_code == 400
    assert isinstance(info.value.body, list)
    assert "Provided image is not valid" in info.value.body[0]["error"]["message"]
    # the invalid result is cached but still answered the same way
    with pytest.raises(openai.BadRequestError):
        await create(client, "data:image/png;base64,AAAA")


# --------------------------------------------------------------------------- limits and faults


async def test_rate_limit_429_with_retry_after(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.config.rate_limit_rps = 1.0
    sim.config.rate_burst = 2.0
    sim.config.retry_after_s = 1.5
    url = f"{sim.base_url}/chat/completions"
    assert (await post(http, url, body()))[0] == 200
    assert (await post(http, url, body()))[0] == 200
    status, data, headers = await post(http, url, body())
    assert status == 429
    assert data == BODY_429
    assert headers["Retry-After"] == "2"
    assert headers["retry-after-ms"] == "1500"
    assert sim.stats().by_status == {200: 2, 429: 1}


async def test_rate_limit_through_sdk_without_retry_after(
    sim: Simulator, client: openai.AsyncOpenAI
) -> None:
    sim.config.rate_limit_rps = 0.5
    await create(client)
    with pytest.raises(openai.RateLimitError) as info:
        await create(client)
    assert info.value.status_code == 429
    assert info.value.body == BODY_429
    assert "retry-after" not in info.value.response.headers
    assert "retry-after-ms" not in info.value.response.headers


async def test_rate_limit_change_at_runtime(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.base_url}/chat/completions"
    statuses = [(await post(http, url, body()))[0] for _ in range(4)]
    assert statuses == [200] * 4
    sim.config.rate_limit_rps = 1.0  # burst defaults to max(1, rate) = 1
    statuses = [(await post(http, url, body()))[0] for _ in range(3)]
    assert statuses == [200, 429, 429]
    sim.config.rate_limit_rps = 1000.0  # burst 1000: refills within a few ms
    await asyncio.sleep(0.05)
    statuses = [(await post(http, url, body()))[0] for _ in range(5)]
    assert statuses == [200] * 5
    sim.config.rate_limit_rps = None
    statuses = [(await post(http, url, body()))[0] for _ in range(3)]
    assert statuses == [200] * 3


async def test_max_concurrency_429_is_immediate(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.config.max_concurrency = 2
    sim.config.latency_ms = 300.0

    async def timed() -> tuple[str, float]:
        start = time.perf_counter()
        try:
            await create(client)
            outcome = "ok"
        except openai.RateLimitError as exc:
            outcome = "429" if exc.body == BODY_429 else "wrong body"
        return outcome, time.perf_counter() - start

    results = await asyncio.gather(*(timed() for _ in range(5)))
    outcomes = sorted(o for o, _ in results)
    assert outcomes == ["429", "429", "429", "ok", "ok"]
    assert all(elapsed < 0.25 for o, elapsed in results if o == "429")
    assert all(elapsed >= 0.29 for o, elapsed in results if o == "ok")
    stats = sim.stats()
    assert stats.by_status == {200: 2, 429: 3}
    assert stats.in_flight == 0


async def test_error_rate_gives_500_and_503(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.config.error_rate = 1.0
    codes = []
    for _ in range(4):
        with pytest.raises(openai.InternalServerError) as info:
            await create(client)
        codes.append(info.value.status_code)
        assert isinstance(info.value.body, list)
        assert info.value.body[0]["error"]["status"] in {"INTERNAL", "UNAVAILABLE"}
    assert sorted(set(codes)) == [500, 503]
    assert sim.stats().by_status == {500: 2, 503: 2}


async def test_reset_rate_closes_connection(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.config.reset_rate = 1.0
    with pytest.raises(openai.APIConnectionError):
        await create(client)
    sim.config.reset_rate = 0.0
    completion = await create(client)  # the simulator keeps serving
    assert completion.choices[0].finish_reason == "stop"
    assert sim.stats().by_status == {0: 1, 200: 1}


async def test_reset_with_plain_aiohttp(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.config.reset_rate = 1.0
    with pytest.raises(aiohttp.ClientError):
        await post(http, f"{sim.base_url}/chat/completions", body())
    assert sim.stats().by_status == {0: 1}


# --------------------------------------------------------------------------- auth


async def test_require_token(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.config.require_token = True
    url = f"{sim.base_url}/chat/completions"

    async def call(token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        status, data, _ = await post(http, url, body(), headers=headers)
        return status, data

    status, data = await call(None)
    assert status == 401
    assert data[0]["error"]["status"] == "UNAUTHENTICATED"
    assert data[0]["error"]["code"] == 401
    assert data[0]["error"]["message"].startswith("Request had invalid authentication credentials")
    assert (await call("unknown"))[0] == 401

    sim.accept_token("good", time.time() + 60)
    assert (await call("good"))[0] == 200

    sim.accept_token("old", time.time() - 1)
    assert (await call("old"))[0] == 401

    sim.revoke_token("good")
    assert (await call("good"))[0] == 401

    stats = sim.stats()
    assert stats.missing_token_401 == 1
    assert stats.expired_token_401 == 1
    assert stats.invalid_token_401 == 2
    assert stats.by_status == {401: 4, 200: 1}


async def test_token_expiry_and_static_token_through_sdk(sim: Simulator) -> None:
    sim.config.require_token = True
    sim.config.static_token = "forever"
    clients = {
        name: openai.AsyncOpenAI(base_url=sim.base_url, api_key=name, max_retries=0, timeout=5.0)
        for name in ("forever", "short", "nope")
    }
    try:
        await create(clients["forever"])
        expires_at = time.time() + 0.3
        sim.accept_token("short", expires_at)
        await create(clients["short"])
        with pytest.raises(openai.AuthenticationError) as info:
            await create(clients["nope"])
        assert info.value.status_code == 401
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.02)
        with pytest.raises(openai.AuthenticationError):
            await create(clients["short"])
        await create(clients["forever"])
    finally:
        for c in clients.values():
            await c.close()
    assert sim.stats().expired_token_401 == 1


async def test_record_requests_redacts_authorization(sim: Simulator) -> None:
    sim.config.require_token = True
    sim.config.record_requests = 2
    sim.accept_token("secret-token", time.time() + 60)
    good = openai.AsyncOpenAI(base_url=sim.base_url, api_key="secret-token", max_retries=0)
    bad = openai.AsyncOpenAI(base_url=sim.base_url, api_key="wrong-token", max_retries=0)
    try:
        await create(good)
        with pytest.raises(openai.AuthenticationError):
            await create(bad)
        await create(good, max_tokens=7)
    finally:
        await good.close()
        await bad.close()
    recorded = list(sim.requests)
    assert len(recorded) == 2  # only the last N are kept
    assert [r.authorized for r in recorded] == [False, True]
    last = recorded[-1]
    assert last.path == "/v1/chat/completions"
    assert last.body["model"] == "google/gemini-2.0-flash"
    assert last.body["max_tokens"] == 7
    assert last.headers["Authorization"] == "<redacted>"
    assert last.headers["authorization"] == "<redacted>"
    assert "secret-token" not in repr(recorded)
    assert "wrong-token" not in repr(recorded)
    assert "content-type" in last.headers


async def test_no_recording_by_default(http: aiohttp.ClientSession) -> None:
    async with Simulator() as s:
        status, _, _ = await post(http, f"{s.base_url}/chat/completions", body())
        assert status == 200
        assert len(s.requests) == 0


# --------------------------------------------------------------------------- latency and stats


def test_lognormal_sampler_mean() -> None:
    sim = Simulator(SimConfig(latency_ms=40.0, latency_dist="lognormal", seed=7))
    samples = [sim._latency_s(sim.config) * 1000 for _ in range(4000)]
    assert statistics.fmean(samples) == pytest.approx(40.0, rel=0.05)
    assert statistics.median(samples) < 40.0  # right-skewed
    assert statistics.pstdev(samples) > 10.0
    sim.config.latency_dist = "fixed"
    assert {sim._latency_s(sim.config) for _ in range(10)} == {0.04}


async def test_lognormal_latency_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Simulator(SimConfig(latency_ms=40.0, latency_dist="lognormal", seed=3)) as sim:
        sampled: list[float] = []
        original = sim._latency_s

        def recording(cfg: SimConfig) -> float:
            value = original(cfg)
            sampled.append(value)
            return value

        monkeypatch.setattr(sim, "_latency_s", recording)
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
        try:

            async def timed() -> float:
                start = time.perf_counter()
                await create(client)
                return time.perf_counter() - start

            durations = await asyncio.gather(*(timed() for _ in range(30)))
        finally:
            await client.close()
    assert len(sampled) == 30
    assert 25.0 <= statistics.fmean(sampled) * 1000 <= 60.0  # roughly the configured mean
    assert (max(sampled) - min(sampled)) * 1000 > 20.0  # a spread, not a fixed delay
    # the sampled delays were really applied before answering
    assert statistics.fmean(durations) >= statistics.fmean(sampled) * 0.95
    assert min(durations) >= min(sampled) * 0.95


async def test_fixed_latency(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.config.latency_ms = 120.0
    start = time.perf_counter()
    await create(client)
    assert time.perf_counter() - start >= 0.119


async def test_stats_counts_and_endpoints(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.config.latency_ms = 100.0
    url = f"{sim.base_url}/chat/completions"
    images = [PNG_URL, "gs://b/one.jpg", PNG_URL, "gs://b/one.jpg", "gs://b/two.jpg"]
    results = await asyncio.gather(*(post(http, url, body(img)) for img in images))
    assert [r[0] for r in results] == [200] * 5
    stats = sim.stats()
    assert stats.requests == 5
    assert stats.by_status == {200: 5}
    assert stats.in_flight == 0
    assert stats.in_flight_max == 5
    assert stats.unique_images == 3

    async with http.get(f"http://127.0.0.1:{sim.port}/stats") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data == stats.to_json()
    assert data["by_status"] == {"200": 5}
    assert SimStats.from_json(data) == stats

    async with http.post(f"http://127.0.0.1:{sim.port}/stats/reset") as resp:
        assert resp.status == 200
    after = sim.stats()
    assert after.requests == 0
    assert after.by_status == {}
    assert after.in_flight_max == 0
    assert after.unique_images == 0
    sim.reset_stats()
    assert sim.stats() == after


def test_stats_json_round_trips_every_field() -> None:
    region = SimStats(requests=2, by_status={200: 1, 429: 1}, by_tier={"flex": 1})
    stats = SimStats(
        requests=9,
        by_status={0: 1, 200: 5, 400: 1, 429: 2},
        in_flight=1,
        in_flight_max=4,
        unique_images=3,
        expired_token_401=1,
        missing_token_401=2,
        invalid_token_401=3,
        by_tier={"standard": 2, "priority": 1, "flex": 1, "provisioned": 1},
        by_header={"shared-request-type=flex": 1, "request-type=dedicated": 2},
        structured=4,
        schema_mismatches_sent=1,
        settings_seen={"temperature=0.2": 3, 'stop=["."]': 1},
        regions={"europe-west4": region},
    )
    data = stats.to_json()
    assert set(data) == {f.name for f in dataclasses.fields(SimStats)}
    assert all(getattr(stats, f.name) != f.default for f in dataclasses.fields(SimStats))
    assert SimStats.from_json(json.loads(json.dumps(data))) == stats
    assert SimStats.from_json({}) == SimStats()


async def test_image_cache_is_bounded(sim: Simulator, http: aiohttp.ClientSession) -> None:
    from worker import simulator as mod

    url = f"{sim.base_url}/chat/completions"
    for i in range(3):
        assert (await post(http, url, body(data_url((i + 1, 1)))))[0] == 200
    assert len(sim._image_cache) == 3
    assert mod._IMAGE_CACHE_SIZE == 4096
    sim._image_cache.update({bytes([i, j]): (True, "x") for i in range(64) for j in range(64)})
    assert (await post(http, url, body(data_url((9, 9)))))[0] == 200
    assert len(sim._image_cache) <= mod._IMAGE_CACHE_SIZE


# --------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency_ms": -1.0},
        {"latency_dist": "uniform"},
        {"latency_sigma": -0.1},
        {"rate_limit_rps": -2.0},
        {"rate_burst": 0.5},
        {"retry_after_s": -1.0},
        {"rate_initial": -1.0},
        {"rate_initial": float("inf")},
        {"retry_after_exact": 1},
        {"ratelimit_headers": "yes"},
        {"max_concurrency": 0},
        {"error_rate": 1.5},
        {"reset_rate": -0.1},
        {"schema_mismatch_rate": 2.0},
        {"record_requests": -1},
        {"static_token": ""},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SimConfig(**kwargs)


def test_cli_arguments_round_trip() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-concurrency", dest="max_concurrency", type=int, default=64)
    sub = parser.add_subparsers(dest="cmd")
    simulate = sub.add_parser("simulate")
    add_simulator_arguments(simulate)
    ns = parser.parse_args(
        [
            "--max-concurrency",
            "7",
            "simulate",
            "--latency-ms",
            "25",
            "--latency-dist",
            "lognormal",
            "--latency-sigma",
            "0.3",
            "--rate-limit-rps",
            "50",
            "--rate-burst",
            "10",
            "--rate-initial",
            "5",
            "--ratelimit-headers",
            "--retry-after-exact",
            "--retry-after-s",
            "2.5",
            "--max-concurrency",
            "3",
            "--error-rate",
            "0.1",
            "--reset-rate",
            "0.05",
            "--schema-mismatch-rate",
            "0.25",
            "--require-token",
            "tok",
            "--seed",
            "42",
        ]
    )
    assert ns.max_concurrency == 7  # the worker's own flag is untouched
    assert all(not k.startswith("sim_") or hasattr(ns, k) for k in vars(ns))
    cfg = sim_config_from_args(ns)
    assert cfg == SimConfig(
        latency_ms=25.0,
        latency_dist="lognormal",
        latency_sigma=0.3,
        rate_limit_rps=50.0,
        rate_burst=10.0,
        rate_initial=5.0,
        retry_after_s=2.5,
        retry_after_exact=True,
        ratelimit_headers=True,
        max_concurrency=3,
        error_rate=0.1,
        reset_rate=0.05,
        schema_mismatch_rate=0.25,
        require_token=True,
        static_token="tok",
        seed=42,
    )
    defaults = sim_config_from_args(simulate.parse_args([]))
    assert defaults == SimConfig()


async def test_serve_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(serve_simulator(SimConfig(), "127.0.0.1", 0))
    line = ""
    for _ in range(200):
        await asyncio.sleep(0.01)
        line = capsys.readouterr().err
        if line:
            break
    match = re.fullmatch(r"simulator listening on http://127\.0\.0\.1:(\d+)/v1\n", line)
    assert match, line
    port = int(match.group(1))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                pass


async def test_start_stop_lifecycle() -> None:
    sim = Simulator()
    with pytest.raises(RuntimeError):
        _ = sim.port
    await sim.start()
    try:
        with pytest.raises(RuntimeError):
            await sim.start()
        assert sim.port > 0
    finally:
        await sim.stop()
    await sim.stop()  # idempotent


# --------------------------------------------------------------------------- structured output


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return kind == "object" and isinstance(value, dict)


def schema_errors(value: Any, schema: Any, root: Any = None, path: str = "$") -> list[str]:
    """A small JSON Schema validator for the keywords these tests use (jsonschema is not a
    dependency); written apart from the simulator's generator so that it checks it."""
    root = schema if root is None else root
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: false schema"]
    errors: list[str] = []
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#").strip("/").split("/"):
            node = node[part] if part else node
        errors += schema_errors(value, node, root, path)
    for sub in schema.get("allOf", []):
        errors += schema_errors(value, sub, root, path)
    if "anyOf" in schema and all(schema_errors(value, s, root, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches no anyOf branch")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(value, s, root, path)]
        if len(matching) != 1:
            errors.append(f"{path}: matches {len(matching)} oneOf branches")
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: {value!r} is not the const {schema['const']!r}")
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        errors.append(f"{path}: {value!r} is not in the enum")
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, k) for k in kinds):
            return [*errors, f"{path}: {value!r} is not of type {kinds}"]
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than minLength")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: longer than maxLength")
        fmt = schema.get("format")
        if fmt == "date-time" and not re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value
        ):
            errors.append(f"{path}: not a date-time")
        if fmt == "uri" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", value):
            errors.append(f"{path}: not a uri")
    if _type_ok(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: not above exclusiveMinimum")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errors.append(f"{path}: not below exclusiveMaximum")
        if "multipleOf" in schema and value % schema["multipleOf"]:
            errors.append(f"{path}: not a multiple of {schema['multipleOf']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required {name!r}")
        for name, item in value.items():
            if name in props:
                errors += schema_errors(item, props[name], root, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: additional property {name!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(
                    item, schema["additionalProperties"], root, f"{path}.{name}"
                )
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than minItems")
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: more than maxItems")
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items", True)
            errors += schema_errors(item, sub, root, f"{path}[{i}]")
    return errors


def test_schema_errors_helper_catches_mistakes() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 2}, "s": {"enum": ["a"]}},
        "required": ["n"],
        "additionalProperties": False,
    }
    assert schema_errors({"n": 2, "s": "a"}, schema) == []
    assert schema_errors({"n": 1}, schema)
    assert schema_errors({"n": True}, schema)
    assert schema_errors({"s": "a"}, schema)
    assert schema_errors({"n": 3, "x": 1}, schema)
    assert schema_errors({"n": 3, "s": "b"}, schema)


DESCRIPTION = "A 64x48 PNG image, mostly red (#d02020)."

SCHEMAS: dict[str, dict[str, Any]] = {
    "caption": {
        "type": "object",
        "properties": {"caption": {"type": "string"}, "alt_text": {"type": "string"}},
        "required": ["caption", "alt_text"],
        "additionalProperties": False,
    },
    "strings": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 12},
            "code": {"type": "string", "minLength": 30},
            "mood": {"type": "string", "enum": ["calm", "busy"]},
            "kind": {"const": "photo"},
            "taken": {"type": "string", "format": "date-time"},
            "source": {"type": "string", "format": "uri"},
        },
        "required": ["title", "code", "mood", "kind", "taken", "source"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "width": {"type": "integer", "minimum": 64},
            "tilt": {"type": "number", "exclusiveMinimum": 5, "exclusiveMaximum": 6},
            "count": {"type": "integer", "exclusiveMinimum": 3, "multipleOf": 5, "maximum": 20},
            "negative": {"type": "integer", "maximum": -3},
            "flag": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["confidence", "width", "tilt", "count", "negative", "flag", "nothing"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
            "scores": {"type": "array", "items": {"type": "number", "maximum": 0.5}},
            "empty": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["tags", "scores", "empty", "pair"],
    },
    "nullable": {
        "type": "object",
        "properties": {
            "note": {"type": ["string", "null"]},
            "size": {"type": ["null", "integer"], "minimum": 7},
            "maybe": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
            "either": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["note", "size", "maybe", "either"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {
            "Colour": {"type": "string", "enum": ["red", "green", "blue"]},
            "Box": {
                "type": "object",
                "properties": {"label": {"type": "string"}, "colour": {"$ref": "#/$defs/Colour"}},
                "required": ["label", "colour"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {"boxes": {"type": "array", "items": {"$ref": "#/$defs/Box"}}},
        "required": ["boxes"],
        "additionalProperties": False,
    },
    "definitions-and-recursion": {
        "definitions": {
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/definitions/Node"}},
                },
                "required": ["name", "children"],
            }
        },
        "$ref": "#/definitions/Node",
    },
    "allOf": {
        "allOf": [
            {
                "type": "object",
                "properties": {"summary": {"type": "string"}},
                "required": ["summary"],
            },
            {
                "type": "object",
                "properties": {"score": {"type": "integer", "minimum": 10, "maximum": 12}},
                "required": ["score"],
            },
        ]
    },
    "top-level-array": {"type": "array", "items": {"type": "integer"}, "minItems": 2},
    "top-level-enum": {"enum": ["cat", "dog"]},
    "untyped-properties": {"properties": {"description": {}}, "required": ["description"]},
}


def structured_body(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    return body(response_format=response_format, **extra)


@pytest.mark.parametrize("name", list(SCHEMAS))
async def test_structured_output_matches_the_schema(
    sim: Simulator, http: aiohttp.ClientSession, name: str
) -> None:
    schema = SCHEMAS[name]
    status, data, _ = await post(http, f"{sim.base_url}/chat/completions", structured_body(schema))
    assert status == 200, data
    content = data["choices"][0]["message"]["content"]
    value = json.loads(content)
    assert schema_errors(value, schema) == []
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == len(content.split())
    assert sim.stats().structured == 1
    assert sim.stats().schema_mismatches_sent == 0
    # deterministic: the same image and schema give the same answer
    again = await post(http, f"{sim.base_url}/chat/completions", structured_body(schema))
    assert again[1]["choices"][0]["message"]["content"] == content


_KEYWORDS = st.sampled_from(
    [
        "type", "properties", "required", "additionalProperties", "enum", "const", "format",
        "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "multipleOf", "items", "prefixItems", "minItems", "maxItems", "minProperties",
        "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "description", "tags",
    ]
)  # fmt: skip
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-100, 100)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(
        [
            *("object", "string", "number", "integer", "boolean", "null", "array", "bogus"),
            *("#", "#/$defs/a", "#/definitions/b", "#/properties", "date-time", "uri", "uuid"),
        ]
    )
)
_JUNK = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_KEYWORDS | st.sampled_from(["a", "b"]), inner, max_size=5)
    ),
    max_leaves=40,
)
_HYPOTHESIS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@_HYPOTHESIS
@given(_JUNK)
def test_schema_filler_never_fails_but_with_a_schema_error(schema: Any) -> None:
    root = schema if isinstance(schema, dict) else {}
    filler = _SchemaFiller(root, DESCRIPTION)
    try:
        value = filler.build(schema)
        json.dumps(value)
        filler.mismatch(schema, value, random.Random(0))
    except _SchemaError:
        pass


def _scalar_schemas() -> st.SearchStrategy[dict[str, Any]]:
    bound = st.integers(-20, 20)
    return st.one_of(
        st.builds(
            lambda lo, extra, fmt: (
                {"type": "string", "minLength": lo, "maxLength": lo + extra}
                | ({"format": fmt} if fmt else {})
            ),
            st.integers(0, 30),
            st.integers(0, 30),
            st.sampled_from([None, "date-time", "uri"]),
        ),
        st.builds(
            lambda kind, lo, hi, ex_lo, ex_hi, step: (
                {
                    "type": kind,
                    ("exclusiveMinimum" if ex_lo else "minimum"): min(lo, hi),
                    ("exclusiveMaximum" if ex_hi else "maximum"): max(lo, hi),
                }
                | ({"multipleOf": step} if step and kind == "integer" else {})
            ),
            st.sampled_from(["integer", "number"]),
            bound,
            bound,
            st.booleans(),
            st.booleans(),
            st.none() | st.integers(1, 6),
        ),
        st.builds(lambda kinds: {"type": kinds}, st.permutations(["string", "null"])),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(lambda v: {"enum": v}, st.lists(st.integers() | st.text(max_size=3), min_size=1)),
        st.builds(lambda v: {"const": v}, st.integers() | st.text(max_size=3) | st.booleans()),
    )


def _compound(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.sampled_from(["description", "title", "tags", "count", "x", "y"])
    return st.one_of(
        st.builds(
            lambda props, required, closed: {
                "type": "object",
                "properties": props,
                "required": [n for n in props if n in required],
                "additionalProperties": not closed,
            },
            st.dictionaries(names, inner, max_size=4),
            st.sets(names),
            st.booleans(),
        ),
        st.builds(
            lambda items, lo, extra: {
                "type": "array",
                "items": items,
                "minItems": lo,
                "maxItems": lo + extra,
            },
            inner,
            st.integers(0, 3),
            st.integers(0, 3),
        ),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
    )


@_HYPOTHESIS
@given(st.recursive(_scalar_schemas(), _compound, max_leaves=12), st.booleans(), st.integers(0, 3))
def test_schema_filler_builds_matching_and_breaks_for_sure(
    schema: Any, by_ref: bool, seed: int
) -> None:
    if by_ref:
        schema = {"$defs": {"D": schema}, "$ref": "#/$defs/D"}
    filler = _SchemaFiller(schema, DESCRIPTION)
    try:
        value = filler.build(schema)
    except _SchemaError:
        return  # e.g. no multiple of 4 between 1 and 3
    assert schema_errors(value, schema) == [], (schema, value)
    broken = filler.mismatch(schema, value, random.Random(seed))
    if broken is not _NOTHING:
        assert schema_errors(broken, schema), (schema, broken)


async def test_structured_strings_are_meaningful(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    url = f"{sim.base_url}/chat/completions"
    _, data, _ = await post(http, url, structured_body(SCHEMAS["caption"]))
    value = json.loads(data["choices"][0]["message"]["content"])
    assert value == {"caption": DESCRIPTION, "alt_text": DESCRIPTION}
    _, data, _ = await post(http, url, structured_body(SCHEMAS["strings"]))
    value = json.loads(data["choices"][0]["message"]["content"])
    assert value["title"] == "A 64x48 PNG"  # cut at a word to fit maxLength 12
    assert value["mood"] == "calm"
    assert value["kind"] == "photo"
    _, data, _ = await post(http, url, structured_body(SCHEMAS["arrays"]))
    value = json.loads(data["choices"][0]["message"]["content"])
    assert value["tags"] == ["png", "red", "png"]  # words of the description
    assert value["empty"] == []
    # another image, another description
    _, data, _ = await post(
        http, url, structured_body(SCHEMAS["caption"], messages=messages("gs://b/cat.jpg"))
    )
    value = json.loads(data["choices"][0]["message"]["content"])
    assert value["caption"].startswith("A simulated description of cat.jpg")


async def test_structured_output_through_the_sdk_parse(client: openai.AsyncOpenAI) -> None:
    from enum import StrEnum
    from typing import Literal

    from pydantic import BaseModel

    class Colour(StrEnum):
        RED = "red"
        BLUE = "blue"

    class Thing(BaseModel):
        label: str
        confidence: float

    class Caption(BaseModel):
        caption: str
        colour: Colour
        things: list[Thing]
        alt: str | None
        kind: Literal["photo", "drawing"]

    completion = await client.chat.completions.parse(
        model="google/gemini-2.0-flash", messages=messages(), response_format=Caption
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Caption)
    assert parsed.caption == DESCRIPTION
    assert parsed.colour is Colour.RED
    assert parsed.kind == "photo"
    assert parsed.things[0].confidence == 0.9


async def test_json_object_and_text_formats(sim: Simulator, client: openai.AsyncOpenAI) -> None:
    completion = await create(client, response_format={"type": "json_object"})
    assert json.loads(completion.choices[0].message.content) == {"description": DESCRIPTION}
    completion = await create(client, response_format={"type": "text"})
    assert completion.choices[0].message.content == DESCRIPTION
    assert sim.stats().structured == 0  # only json_schema answers count


@pytest.mark.parametrize(
    ("response_format", "needle"),
    [
        pytest.param("json", "'response_format' must be an object", id="not-object"),
        pytest.param({"type": "xml"}, "'response_format.type'", id="unknown-type"),
        pytest.param({}, "'response_format.type'", id="no-type"),
        pytest.param({"type": "json_schema"}, "json_schema", id="no-json-schema"),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "x"}}, "'schema'", id="no-schema"
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            "'schema'",
            id="schema-not-object",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
            "name",
            id="bad-name",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
            "strict",
            id="bad-strict",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/Nope"}}},
            "$ref",
            id="dangling-ref",
        ),
        pytest.param(
            {
                "type": "json_schema",
                "json_schema": {"schema": {"$ref": "https://example.com/s.json"}},
            },
            "only local references",
            id="remote-ref",
        ),
        pytest.param(
            {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "string", "minLength": 5, "maxLength": 2}},
            },
            "minLength",
            id="contradiction",
        ),
        pytest.param(
            {
                "type": "json_schema",
                "json_schema": {
                    "schema": {
                        "$defs": {
                            "L": {
                                "type": "object",
                                "properties": {"next": {"$ref": "#/$defs/L"}},
                                "required": ["next"],
                            }
                        },
                        "$ref": "#/$defs/L",
                    }
                },
            },
            "nests too deeply",
            id="endless-recursion",
        ),
    ],
)
async def test_bad_response_format_gets_400(
    sim: Simulator, http: aiohttp.ClientSession, response_format: Any, needle: str
) -> None:
    payload = body(response_format=response_format)
    status, data, _ = await post(http, f"{sim.base_url}/chat/completions", payload)
    assert status == 400
    assert data[0]["error"]["status"] == "INVALID_ARGUMENT"
    assert needle in data[0]["error"]["message"]
    assert sim.stats().structured == 0


async def test_schema_mismatch_rate(http: aiohttp.ClientSession) -> None:
    async def contents(rate: float, seed: int, n: int) -> tuple[list[str], SimStats]:
        async with Simulator(SimConfig(schema_mismatch_rate=rate, seed=seed)) as s:
            url = f"{s.base_url}/chat/completions"
            out = []
            for i in range(n):
                schema = list(SCHEMAS.values())[i % 3]
                _, data, _ = await post(http, url, structured_body(schema))
                out.append(data["choices"][0]["message"]["content"])
            return out, s.stats()

    # always: every answer breaks its schema
    answers, stats = await contents(1.0, 1, 9)
    for i, content in enumerate(answers):
        assert schema_errors(json.loads(content), list(SCHEMAS.values())[i % 3]), content
    assert (stats.structured, stats.schema_mismatches_sent) == (9, 9)
    # a share: counted exactly, and deterministic under the seed
    answers, stats = await contents(0.5, 7, 30)
    broken = [
        bool(schema_errors(json.loads(c), list(SCHEMAS.values())[i % 3]))
        for i, c in enumerate(answers)
    ]
    assert stats.structured == 30
    assert stats.schema_mismatches_sent == sum(broken)
    assert 5 <= sum(broken) <= 25
    again, _ = await contents(0.5, 7, 30)
    assert again == answers
    # both ways of breaking show up: a dropped required property and a wrong type
    missing = wrong = 0
    for i, content in enumerate(answers):
        errors = schema_errors(json.loads(content), list(SCHEMAS.values())[i % 3])
        missing += any("missing required" in e for e in errors)
        wrong += any("not of type" in e or "not in the enum" in e for e in errors)
    assert missing and wrong


async def test_schema_mismatch_when_nothing_can_break(http: aiohttp.ClientSession) -> None:
    # every value matches {}: the answer cannot mismatch, and is not counted as such
    async with Simulator(SimConfig(schema_mismatch_rate=1.0)) as s:
        status, _, _ = await post(http, f"{s.base_url}/chat/completions", structured_body({}))
        assert status == 200
        assert (s.stats().structured, s.stats().schema_mismatches_sent) == (1, 0)


async def test_structured_answer_truncated_by_max_tokens(client: openai.AsyncOpenAI) -> None:
    response_format = structured_body(SCHEMAS["caption"])["response_format"]
    completion = await create(client, response_format=response_format, max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == '{"caption": "A 64x48'


# --------------------------------------------------------------------------- generation settings


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        pytest.param({"temperature": "hot"}, "temperature", id="temperature-type"),
        pytest.param({"temperature": -0.1}, "temperature", id="temperature-low"),
        pytest.param({"temperature": 2.5}, "temperature", id="temperature-high"),
        pytest.param({"temperature": True}, "temperature", id="temperature-bool"),
        pytest.param({"top_p": 0}, "top_p", id="top-p-zero"),
        pytest.param({"top_p": 1.5}, "top_p", id="top-p-high"),
        pytest.param({"top_p": "0.5"}, "top_p", id="top-p-type"),
        pytest.param({"seed": 1.5}, "seed", id="seed-float"),
        pytest.param({"seed": "7"}, "seed", id="seed-string"),
        pytest.param({"seed": False}, "seed", id="seed-bool"),
        pytest.param({"stop": 5}, "stop", id="stop-type"),
        pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", id="stop-five"),
        pytest.param({"stop": []}, "stop", id="stop-empty-list"),
        pytest.param({"stop": [1]}, "stop", id="stop-item-type"),
        pytest.param({"stop": ""}, "stop", id="stop-empty-string"),
        pytest.param({"max_completion_tokens": 0}, "max_completion_tokens", id="max-tokens-0"),
    ],
)
async def test_bad_generation_settings_get_400(
    sim: Simulator, http: aiohttp.ClientSession, settings: dict[str, Any], field: str
) -> None:
    status, data, _ = await post(http, f"{sim.base_url}/chat/completions", body(**settings))
    assert status == 400
    error = data[0]["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert f"'{field}'" in error["message"]
    assert sim.stats().settings_seen == {}


async def test_valid_generation_settings_are_echoed_in_stats(
    sim: Simulator, client: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    completion = await create(client, temperature=0.2, max_tokens=50, seed=7, stop=["."])
    assert completion.choices[0].finish_reason == "stop"
    await create(client, temperature=0.2, top_p=1, seed=-3, stop="\n")
    await create(client, temperature=0, top_p=0.01, max_completion_tokens=9)
    await create(client, temperature=2.0)
    await create(client, temperature=None)  # null: as if absent
    expected = {
        "temperature=0.2": 2,
        "temperature=0": 1,
        "temperature=2.0": 1,
        "max_tokens=50": 1,
        "max_completion_tokens=9": 1,
        "seed=7": 1,
        "seed=-3": 1,
        'stop=["."]': 1,
        'stop="\\n"': 1,
        "top_p=1": 1,
        "top_p=0.01": 1,
    }
    stats = sim.stats()
    assert stats.settings_seen == expected
    async with http.get(f"{sim.root_url}/stats") as resp:
        data = await resp.json()
    assert data["settings_seen"] == expected
    assert SimStats.from_json(data) == stats
    # the recorded requests keep the bodies as sent
    assert sim.requests[-3].body["top_p"] == 0.01


async def test_stop_cuts_the_answer(client: openai.AsyncOpenAI) -> None:
    completion = await create(client, stop=",")
    assert completion.choices[0].message.content == "A 64x48 PNG image"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4
    # the first occurrence of any of the strings
    completion = await create(client, stop=["mostly", "PNG", "zebra"])
    assert completion.choices[0].message.content == "A 64x48 "
    assert completion.usage.completion_tokens == 2
    # not found: the whole answer
    completion = await create(client, stop=["zebra"])
    assert completion.choices[0].message.content == DESCRIPTION
    # max_tokens still applies to what is left
    completion = await create(client, stop=",", max_tokens=2)
    assert completion.choices[0].message.content == "A 64x48"
    assert completion.choices[0].finish_reason == "length"
    completion = await create(client, stop=",", max_tokens=4)
    assert completion.choices[0].finish_reason == "stop"


async def test_settings_seen_is_bounded(sim: Simulator, http: aiohttp.ClientSession) -> None:
    from worker import simulator as mod

    url = f"{sim.base_url}/chat/completions"
    region = sim._main
    region.count_settings(tuple(("seed", int, i) for i in range(mod._SETTINGS_SEEN_LIMIT)))
    assert (await post(http, url, body(seed=123456789)))[0] == 200
    assert (await post(http, url, body(seed=3)))[0] == 200  # already known: counted as itself
    seen = sim.stats().settings_seen
    assert len(seen) == mod._SETTINGS_SEEN_LIMIT + 1
    assert seen["seed=<other>"] == 1
    assert seen["seed=3"] == 2
