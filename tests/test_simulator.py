"""Tests for worker.simulator, driven through the real OpenAI SDK and a plain aiohttp client."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from worker.simulator import (
    SimConfig,
    SimStats,
    Simulator,
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
        {"max_concurrency": 0},
        {"error_rate": 1.5},
        {"reset_rate": -0.1},
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
            "--retry-after-s",
            "2.5",
            "--max-concurrency",
            "3",
            "--error-rate",
            "0.1",
            "--reset-rate",
            "0.05",
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
        retry_after_s=2.5,
        max_concurrency=3,
        error_rate=0.1,
        reset_rate=0.05,
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
