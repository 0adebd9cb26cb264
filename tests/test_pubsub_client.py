"""The Pub/Sub REST client against the loopback emulator: real HTTP, real retries."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from worker.errors import PubSubError
from worker.pubsub import PUBSUB_URL, PubSubClient, chunk_ack_ids, encode_data

from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import PROJECT

P = PROJECT
SUB = f"projects/{P}/subscriptions/work"
TOPIC = f"projects/{P}/topics/jobs"


@pytest.fixture
async def client(emu: PubSubEmulator) -> AsyncIterator[PubSubClient]:
    c = PubSubClient.from_environment(
        {"PUBSUB_EMULATOR_HOST": emu.host_port}, initial_backoff_s=0.01, max_backoff_s=0.05
    )
    try:
        yield c
    finally:
        await c.aclose()


def test_emulator_host_means_plain_http_without_credentials() -> None:
    c = PubSubClient.from_environment({"PUBSUB_EMULATOR_HOST": "localhost:8085"})
    assert c.base_url == "http://localhost:8085/v1"
    assert c.emulator
    real = PubSubClient.from_environment({})
    assert real.base_url == PUBSUB_URL == "https://pubsub.googleapis.com/v1"
    assert not real.emulator


async def test_publish_pull_ack_round_trip(emu: PubSubEmulator, client: PubSubClient) -> None:
    ids = await client.publish(
        TOPIC,
        [{"data": encode_data(b"gs://b/1.jpg"), "attributes": {"k": "v"}}, {"data": "eA=="}],
    )
    assert len(ids) == 2
    got = await client.pull(SUB, 10)
    assert sorted(base64.b64decode(m["message"]["data"]) for m in got) == [b"gs://b/1.jpg", b"x"]
    assert (await client.get_subscription(SUB))["ackDeadlineSeconds"] == 10
    assert await client.acknowledge(SUB, [m["ackId"] for m in got]) == []
    assert emu.acked(P, "work") == 2
    assert emu.outstanding(P, "work") == 0


async def test_nack_makes_the_message_available_at_once(
    emu: PubSubEmulator, client: PubSubClient
) -> None:
    emu.publish(P, "jobs", b"a")
    (first,) = await client.pull(SUB, 1)
    await client.modify_ack_deadline(SUB, [first["ackId"]], 0)
    (again,) = await client.pull(SUB, 1)
    assert again["message"]["messageId"] == first["message"]["messageId"]
    assert emu.stats["nacks"] == 1


async def test_transient_failures_are_retried(emu: PubSubEmulator, client: PubSubClient) -> None:
    emu.publish(P, "jobs", b"a")
    emu.fail_pull = 2
    got = await client.pull(SUB, 5)
    assert len(got) == 1
    emu.fail_ack = 2
    await client.acknowledge(SUB, [got[0]["ackId"]])
    emu.fail_publish = 1
    assert len(await client.publish(TOPIC, [{"data": "eA=="}])) == 1
    assert emu.stats["failed_pulls"] == emu.stats["failed_acks"] == 2
    assert emu.acked(P, "work") == 1
    assert client.retries == 5


async def test_retries_stop_at_the_deadline(emu: PubSubEmulator) -> None:
    c = PubSubClient.from_environment(
        {"PUBSUB_EMULATOR_HOST": emu.host_port},
        retry_deadline_s=0.3,
        initial_backoff_s=0.05,
        max_backoff_s=0.1,
    )
    emu.fail_pull = 1000
    try:
        with pytest.raises(PubSubError) as info:
            await c.pull(SUB, 1)
    finally:
        await c.aclose()
    assert info.value.status == 503 and info.value.transient
    assert 2 <= emu.stats["failed_pulls"] < 20


async def test_permanent_errors_are_not_retried(client: PubSubClient, emu: PubSubEmulator) -> None:
    with pytest.raises(PubSubError) as info:
        await client.pull(f"projects/{P}/subscriptions/nope", 1)
    assert info.value.status == 404 and not info.value.transient
    assert emu.stats["pulls"] == 1


async def test_big_ack_is_split_under_the_request_limits(
    emu: PubSubEmulator, client: PubSubClient
) -> None:
    for i in range(2500):
        emu.publish(P, "jobs", f"m{i}".encode())
    ack_ids: list[str] = []
    while len(ack_ids) < 2500:
        ack_ids += [m["ackId"] for m in await client.pull(SUB, 1000)]
    await client.modify_ack_deadline(SUB, ack_ids, 60)
    await client.acknowledge(SUB, ack_ids)
    assert emu.acked(P, "work") == 2500
    assert emu.stats["ack_requests"] == 3
    assert emu.stats["max_ack_ids_per_request"] <= 1000
    assert emu.stats["max_ack_request_bytes"] < 512 * 1024
    assert emu.stats["max_modack_ids_per_request"] <= 1000


def test_chunks_respect_bytes_as_well_as_count() -> None:
    long_ids = ["x" * 1000] * 1000  # 1 MB of ids: two requests by size, not one by count
    chunks = list(chunk_ack_ids(long_ids))
    assert len(chunks) >= 3
    assert all(len(json.dumps({"ackIds": c})) < 512 * 1024 for c in chunks)
    assert sum(map(len, chunks)) == 1000


async def test_one_invalid_ack_id_does_not_block_the_others(
    emu: PubSubEmulator, client: PubSubClient
) -> None:
    for i in range(5):
        emu.publish(P, "jobs", f"m{i}".encode())
    ack_ids = [m["ackId"] for m in await client.pull(SUB, 10)]
    refused = await client.acknowledge(SUB, [*ack_ids[:2], "not-an-ack-id", *ack_ids[2:]])
    assert refused == ["not-an-ack-id"]
    assert emu.acked(P, "work") == 5


async def test_bearer_token_is_sent_to_the_real_service_shape() -> None:
    """Without the emulator the client authenticates; a 401 refreshes the token once."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if len(seen) == 1:
            return web.json_response(
                {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "no"}}, status=401
            )
        return web.json_response({"name": "projects/p/subscriptions/s"})

    class Tokens:
        """A TokenProvider: what the client needs is ``token`` and the refresh on a 401."""

        expires_at = None
        google = True

        def __init__(self) -> None:
            self.value = "t1"
            self.refreshes = self.refresh_failures = 0

        async def start(self) -> None:
            return None

        async def token(self) -> str:
            return self.value

        async def refresh_after_rejection(self, rejected: str) -> None:
            self.value = "t2"

        async def run_refresher(self) -> None:
            return None

    app = web.Application()
    app.router.add_get("/v1/projects/p/subscriptions/s", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    c = PubSubClient(base_url=f"http://127.0.0.1:{port}/v1", tokens=Tokens())
    try:
        assert (await c.get_subscription("projects/p/subscriptions/s"))["name"]
    finally:
        await c.aclose()
        await runner.cleanup()
    assert seen == ["Bearer t1", "Bearer t2"]


def test_pubsub_config_file_loads_and_bad_pubsub_settings_are_refused() -> None:
    from worker.errors import ConfigError
    from worker.settings import load_settings
    from worker.sources import open_source

    from .helpers import REPO

    s = load_settings(REPO / "config" / "pubsub.toml", env={})
    assert s.worker.source.startswith("pubsub:projects/")
    assert s.worker.sink.startswith("pubsub:projects/") and s.worker.dead_letter
    with pytest.raises(ConfigError, match=r"pubsub\.lease_extension_s"):
        load_settings(env={"WORKER_PUBSUB__LEASE_EXTENSION_S": "5"})
    with pytest.raises(ConfigError, match=r"worker\.source"):
        open_source("pubsub:projects/p/topics/not-a-subscription", settings=s)
