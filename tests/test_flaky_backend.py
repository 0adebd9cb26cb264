"""How a broken connection reaches the worker through the real SDK: a reset, a peer that
hangs up, a refused connection and a real timeout, each as its own ModelError code; and
why it matters: a timeout is congestion to an adaptive limit, a broken connection is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from worker.auth import NoTokens
from worker.endpoints import Endpoint, EndpointPool
from worker.errors import ModelError
from worker.limits import AdaptiveLimiter
from worker.model import ModelCall, ModelClient
from worker.simulator import SimConfig, Simulator

from .helpers import free_port, quick_settings

CALL = ModelCall("gs://bucket/img.jpg")


def _client(base_url: str, timeout_s: float = 10.0) -> ModelClient:
    s = quick_settings()
    s.model.timeout_s = timeout_s
    return ModelClient(s.model, NoTokens(), base_url=base_url, name="flaky")


async def _error(client: ModelClient) -> ModelError:
    with pytest.raises(ModelError) as info:
        await client.describe(CALL)
    return info.value


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1)) as s:
        yield s


@pytest.fixture
async def hang_up_url() -> AsyncIterator[str]:
    """A server that reads the request and closes the connection without a word (a FIN,
    as from a backend process that died or a proxy that dropped the request)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_reset_connection_is_a_connection_error_not_a_timeout(sim: Simulator) -> None:
    client = _client(sim.base_url)
    try:
        sim.config.reset_rate = 1.0
        error = await _error(client)
        sim.config.reset_rate = 0.0
        answer = await client.describe(CALL)  # and the client goes on working
    finally:
        await client.aclose()
    assert error.code == "connection_error"
    assert error.status == 0
    assert error.kind == "transient"
    assert error.label == "connection_error"
    assert sim.stats().by_status == {0: 1, 200: 1}
    assert answer.text


async def test_a_peer_that_hangs_up_is_a_connection_error_not_a_timeout(
    hang_up_url: str,
) -> None:
    client = _client(hang_up_url)
    try:
        error = await _error(client)
    finally:
        await client.aclose()
    assert error.code == "connection_error", error
    assert error.kind == "transient"


async def test_a_refused_connection_is_a_connection_error() -> None:
    client = _client(f"http://127.0.0.1:{free_port()}/v1")
    try:
        error = await _error(client)
    finally:
        await client.aclose()
    assert error.code == "connection_error"
    assert "Refused" in error.message


async def test_no_answer_within_the_request_timeout_is_a_timeout(sim: Simulator) -> None:
    sim.config.latency_ms = 700.0
    client = _client(sim.base_url, timeout_s=0.2)
    try:
        error = await _error(client)
    finally:
        await client.aclose()
    assert error.code == "timeout"
    assert error.kind == "transient"


async def _through_pool(pool: EndpointPool) -> ModelError | None:
    slot = await pool.acquire("standard")
    try:
        await slot.describe(CALL)
    except ModelError as exc:
        return exc
    return None


async def test_resets_do_not_cut_an_adaptive_limit(sim: Simulator) -> None:
    client = _client(sim.base_url)
    limiter = AdaptiveLimiter(1, 64, initial=8)
    ep = Endpoint(name="flaky", client=client, limiter=limiter)
    pool = EndpointPool([ep])
    errors: list[ModelError | None] = []
    try:
        for _ in range(4):
            sim.config.reset_rate = 1.0  # this request's connection is reset...
            errors.append(await _through_pool(pool))
            sim.config.reset_rate = 0.0  # ...and the next one is answered
            errors.append(await _through_pool(pool))
    finally:
        await client.aclose()
    codes = [e.code if e is not None else "ok" for e in errors]
    assert codes == ["connection_error", "ok"] * 4
    assert limiter.decreases == 0
    assert limiter.limit == 8
    assert limiter.counts["transient"] == 4
    assert limiter.counts["timeout"] == 0
    # Each answer broke the streak of failures: a flaky endpoint stays in rotation.
    assert ep.circuit.state == "closed"
    assert ep.circuit.opened == 0


async def test_a_timeout_does_cut_an_adaptive_limit(sim: Simulator) -> None:
    # The contrast to the test above: the same drive with a timeout is a cut.
    client = _client(sim.base_url, timeout_s=0.2)
    limiter = AdaptiveLimiter(1, 64, initial=8)
    pool = EndpointPool([Endpoint(name="slow", client=client, limiter=limiter)])
    try:
        sim.config.latency_ms = 700.0
        error = await _through_pool(pool)
    finally:
        await client.aclose()
    assert error is not None
    assert error.code == "timeout"
    assert limiter.decreases == 1
    assert limiter.limit < 8
