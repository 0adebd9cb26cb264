"""Tests for the Pub/Sub REST emulator fixture, over real HTTP with aiohttp."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import time
from typing import Any

import aiohttp
import pytest

from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import wait_until

P = "proj"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Api:
    """Minimal REST client: returns (status, json body)."""

    def __init__(self, session: aiohttp.ClientSession, emu: PubSubEmulator) -> None:
        self.session = session
        self.emu = emu

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json", "Authorization": "Bearer ignored"}
        payload = None if data is None else io.BytesIO(data)
        async with self.session.request(
            method, f"http://{self.emu.host_port}/v1/{path}", data=payload, headers=headers
        ) as resp:
            answer: dict[str, Any] = await resp.json()
            return resp.status, answer

    async def publish(self, topic: str, *messages: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return await self.call(
            "POST", f"projects/{P}/topics/{topic}:publish", {"messages": messages}
        )

    async def pull(self, sub: str, n: int = 10) -> list[dict[str, Any]]:
        status, body = await self.call(
            "POST", f"projects/{P}/subscriptions/{sub}:pull", {"maxMessages": n}
        )
        assert status == 200, body
        received: list[dict[str, Any]] = body.get("receivedMessages", [])
        return received

    async def ack(self, sub: str, *ack_ids: str) -> tuple[int, dict[str, Any]]:
        return await self.call(
            "POST", f"projects/{P}/subscriptions/{sub}:acknowledge", {"ackIds": list(ack_ids)}
        )

    async def modack(
        self, sub: str, seconds: int | float, *ack_ids: str
    ) -> tuple[int, dict[str, Any]]:
        return await self.call(
            "POST",
            f"projects/{P}/subscriptions/{sub}:modifyAckDeadline",
            {"ackIds": list(ack_ids), "ackDeadlineSeconds": seconds},
        )


def assert_error(status: int, body: dict[str, Any], code: int, grpc_status: str) -> None:
    assert status == code, body
    assert body["error"]["code"] == code
    assert body["error"]["status"] == grpc_status
    assert body["error"]["message"]


async def test_get_topic_and_subscription(http: aiohttp.ClientSession) -> None:
    """The two reads the worker makes at start-up: does the topic exist, what is the
    subscription's ack deadline."""
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "plain", "jobs")
        emu.create_subscription(P, "work", "jobs", dead_letter_topic="dlq")
        api = Api(http, emu)
        status, body = await api.call("GET", f"projects/{P}/topics/jobs")
        assert (status, body) == (200, {"name": f"projects/{P}/topics/jobs"})
        assert (await api.call("GET", f"projects/{P}/topics/dlq"))[0] == 200  # created for it
        assert_error(*await api.call("GET", f"projects/{P}/topics/nope"), 404, "NOT_FOUND")

        status, got = await api.call("GET", f"projects/{P}/subscriptions/work")
        assert status == 200, got
        assert got == {
            "name": f"projects/{P}/subscriptions/work",
            "topic": f"projects/{P}/topics/jobs",
            "ackDeadlineSeconds": 10,
            "deadLetterPolicy": {
                "deadLetterTopic": f"projects/{P}/topics/dlq",
                "maxDeliveryAttempts": 5,
            },
        }
        status, got = await api.call("GET", f"projects/{P}/subscriptions/plain")
        assert status == 200
        assert "deadLetterPolicy" not in got
        assert_error(*await api.call("GET", f"projects/{P}/subscriptions/bad"), 404, "NOT_FOUND")


async def test_only_the_calls_the_worker_makes_are_routed(
    http: aiohttp.ClientSession,
) -> None:
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "work", "jobs")
        api = Api(http, emu)
        for method, path in [
            ("PUT", f"projects/{P}/topics/new"),
            ("DELETE", f"projects/{P}/topics/jobs"),
            ("GET", f"projects/{P}/topics"),
            ("GET", f"projects/{P}/topics/jobs/subscriptions"),
            ("PUT", f"projects/{P}/subscriptions/new"),
            ("DELETE", f"projects/{P}/subscriptions/work"),
            ("GET", f"projects/{P}/subscriptions"),
            ("POST", f"projects/{P}/subscriptions/work:seek"),
            ("POST", f"projects/{P}/topics/jobs:pull"),
            ("GET", "v2/whatever"),
        ]:
            assert_error(*await api.call(method, path, {}), 404, "NOT_FOUND")
        assert (await api.call("GET", f"projects/{P}/subscriptions/work"))[0] == 200


def test_helpers_validate_what_they_create() -> None:
    emu = PubSubEmulator()
    emu.create_topic(P, "jobs")
    with pytest.raises(ValueError, match="Invalid resource name"):
        emu.create_topic(P, "projects/only-two")
    with pytest.raises(ValueError, match="ack deadline"):
        emu.create_subscription(P, "bad", "jobs", ack_deadline_s=601)
    with pytest.raises(ValueError, match="max_delivery_attempts"):
        emu.create_subscription(P, "bad", "jobs", dead_letter_topic="dlq", max_delivery_attempts=4)
    with pytest.raises(ValueError, match="max_delivery_attempts"):
        emu.create_subscription(
            P, "bad", "jobs", dead_letter_topic="dlq", max_delivery_attempts=101
        )
    with pytest.raises(KeyError):
        emu.create_subscription(P, "bad", "none")
    with pytest.raises(KeyError):
        emu.pending(P, "bad")  # nothing was created by the failed calls


async def test_publish_fanout_pull_ack(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "a", "jobs")
        emu.create_subscription(P, "b", f"projects/{P}/topics/jobs")
        api = Api(http, emu)
        status, body = await api.publish(
            "jobs",
            {"data": b64(b"one"), "attributes": {"k": "v1"}},
            {"data": b64(b"two"), "orderingKey": "ok"},
            {"attributes": {"only": "attrs"}},
        )
        assert status == 200, body
        ids = body["messageIds"]
        assert len(set(ids)) == 3
        emu.create_subscription(P, "late", "jobs")  # created after publish: gets nothing
        assert emu.pending(P, "a") == emu.pending(P, "b") == 3
        assert emu.pending(P, "late") == 0

        first = await api.pull("a", 2)
        assert len(first) == 2
        assert emu.pending(P, "a") == 1
        assert emu.outstanding(P, "a") == 2
        m0 = first[0]
        assert "deliveryAttempt" not in m0  # no dead-letter policy
        assert base64.b64decode(m0["message"]["data"]) == b"one"
        assert m0["message"]["attributes"] == {"k": "v1"}
        assert m0["message"]["messageId"] == ids[0]
        publish_time = m0["message"]["publishTime"]
        assert publish_time.endswith("Z")
        parsed = datetime.datetime.fromisoformat(publish_time.replace("Z", "+00:00"))
        assert abs((datetime.datetime.now(datetime.UTC) - parsed).total_seconds()) < 5
        assert first[1]["message"]["orderingKey"] == "ok"
        assert "attributes" not in first[1]["message"]

        rest = await api.pull("a", 10)
        assert len(rest) == 1
        assert "data" not in rest[0]["message"]
        assert rest[0]["message"]["attributes"] == {"only": "attrs"}
        ack_ids = [m["ackId"] for m in [*first, *rest]]
        assert len(set(ack_ids)) == 3
        assert await api.ack("a", *ack_ids) == (200, {})
        assert emu.outstanding(P, "a") == 0
        assert emu.acked(P, "a") == 3
        assert emu.stats["acks"] == 3
        assert emu.stats["max_ack_ids_per_request"] == 3

        status, body = await api.call(
            "POST", f"projects/{P}/subscriptions/a:pull", {"maxMessages": 5}
        )
        assert (status, body) == (200, {})
        assert len(await api.pull("b", 100)) == 3
        assert emu.delivery_counts(P, "a") == dict.fromkeys(ids, 1)
        records = emu.messages_on_topic(P, "jobs")
        assert [r["data"] for r in records] == [b"one", b"two", b""]
        assert records[0]["attributes"] == {"k": "v1"}
        assert emu.stats["publishes"] == 3
        assert emu.stats["deliveries"] == 6

        assert_error(
            *await api.call("POST", f"projects/{P}/subscriptions/a:pull", {"maxMessages": 0}),
            400,
            "INVALID_ARGUMENT",
        )
        assert_error(
            *await api.call("POST", f"projects/{P}/subscriptions/zz:pull", {"maxMessages": 1}),
            404,
            "NOT_FOUND",
        )


async def test_publish_validation_and_faults(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs")
        api = Api(http, emu)
        assert_error(*await api.publish("missing", {"data": b64(b"x")}), 404, "NOT_FOUND")
        assert_error(*await api.publish("jobs"), 400, "INVALID_ARGUMENT")
        assert_error(*await api.publish("jobs", {}), 400, "INVALID_ARGUMENT")
        assert_error(
            *await api.publish("jobs", {"data": "!!not base64!!"}), 400, "INVALID_ARGUMENT"
        )
        assert_error(
            *await api.publish("jobs", {"data": b64(b"x"), "attributes": {"googx": "1"}}),
            400,
            "INVALID_ARGUMENT",
        )
        many = [{"data": b64(b"x")}] * 1001
        assert_error(*await api.publish("jobs", *many), 400, "INVALID_ARGUMENT")
        big = {"messages": [{"data": "A" * 10_000_000}]}
        assert_error(
            *await api.call("POST", f"projects/{P}/topics/jobs:publish", big),
            400,
            "INVALID_ARGUMENT",
        )
        assert emu.pending(P, "s") == 0

        ok = [{"data": b64(b"x")}] * 1000
        status, body = await api.publish("jobs", *ok)
        assert status == 200
        assert len(body["messageIds"]) == 1000

        emu.fail_publish = 1
        assert_error(*await api.publish("jobs", {"data": b64(b"y")}), 503, "UNAVAILABLE")
        assert emu.pending(P, "s") == 1000
        assert (await api.publish("jobs", {"data": b64(b"y")}))[0] == 200
        assert emu.pending(P, "s") == 1001
        assert emu.stats["failed_publishes"] == 1


async def test_deadline_expiry_redelivers_with_new_ack_id(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator(min_ack_deadline_s=0.1) as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs", ack_deadline_s=0.3, dead_letter_topic="dlq")
        api = Api(http, emu)
        msg_id = emu.publish(P, "jobs", b"payload", {"a": "1"})

        (d1,) = await api.pull("s")
        assert d1["deliveryAttempt"] == 1
        assert emu.outstanding(P, "s") == 1
        await asyncio.sleep(0.45)
        assert emu.outstanding(P, "s") == 0
        assert emu.pending(P, "s") == 1

        (d2,) = await api.pull("s")
        assert d2["message"]["messageId"] == msg_id
        assert d2["deliveryAttempt"] == 2
        assert d2["ackId"] != d1["ackId"]
        # The stale ackId of the first delivery is accepted but must not ack the new one.
        assert await api.ack("s", d1["ackId"]) == (200, {})
        assert emu.stats["stale_acks"] == 1
        assert emu.outstanding(P, "s") == 1
        assert await api.ack("s", d2["ackId"]) == (200, {})
        assert emu.outstanding(P, "s") == emu.pending(P, "s") == 0
        assert emu.stats["acks"] == 1
        assert emu.stats["redeliveries"] == 1
        assert emu.stats["expired"] == 1
        assert emu.delivery_counts(P, "s") == {msg_id: 2}
        # Acking again after the ack: stale, still 200.
        assert await api.ack("s", d2["ackId"]) == (200, {})
        assert emu.stats["stale_acks"] == 2
        # Never-issued ack ids are rejected.
        assert_error(*await api.ack("s", "bogus"), 400, "INVALID_ARGUMENT")


async def test_short_deadline_needs_knob(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator() as strict, PubSubEmulator(min_ack_deadline_s=1) as loose:
        for emu in (strict, loose):
            emu.create_topic(P, "jobs")
        with pytest.raises(ValueError, match="ack deadline"):
            strict.create_subscription(P, "short-sub", "jobs", ack_deadline_s=1)
        loose.create_subscription(P, "short-sub", "jobs", ack_deadline_s=1)
        status, cfg = await Api(http, loose).call("GET", f"projects/{P}/subscriptions/short-sub")
        assert status == 200
        assert cfg["ackDeadlineSeconds"] == 1


async def test_background_sweep_wakes_waiting_pull(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator(pull_wait_s=1.5, min_ack_deadline_s=0.1) as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs", ack_deadline_s=0.3)
        api = Api(http, emu)
        emu.publish(P, "jobs", b"x")
        (d1,) = await api.pull("s")
        t0 = time.monotonic()
        (d2,) = await api.pull("s")  # waits for the deadline to pass, then gets a redelivery
        waited = time.monotonic() - t0
        assert 0.15 < waited < 1.0
        assert d2["ackId"] != d1["ackId"]
        assert "deliveryAttempt" not in d2

        # A waiting pull is woken by a publish.
        await api.ack("s", d2["ackId"])
        pulls = emu.stats["pulls"]
        pull = asyncio.create_task(api.pull("s"))
        # The pull is counted on arrival and, finding nothing, waits without a step between:
        # once it is counted it is waiting.
        await wait_until(lambda: emu.stats["pulls"] > pulls, 5, "the pull to arrive")
        t0 = time.monotonic()
        emu.publish(P, "jobs", b"y")
        (d3,) = await pull
        assert time.monotonic() - t0 < 0.6  # woken, not answered when pull_wait_s ran out
        assert base64.b64decode(d3["message"]["data"]) == b"y"


async def test_empty_pull_waits_at_most_pull_wait(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator(pull_wait_s=0.3) as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs")
        t0 = time.monotonic()
        assert await Api(http, emu).pull("s") == []
        assert 0.25 < time.monotonic() - t0 < 1.0
        assert emu.stats["empty_pulls"] == 1


async def test_nack_and_modack(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator(min_ack_deadline_s=0.1) as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs", ack_deadline_s=0.3, dead_letter_topic="dlq")
        api = Api(http, emu)
        emu.publish(P, "jobs", b"a")
        emu.publish(P, "jobs", b"b")
        d1, d2 = await api.pull("s")

        assert await api.modack("s", 0, d1["ackId"]) == (200, {})  # nack
        assert emu.stats["nacks"] == 1
        assert emu.pending(P, "s") == 1
        (again,) = await api.pull("s")
        assert again["message"]["messageId"] == d1["message"]["messageId"]
        assert again["deliveryAttempt"] == 2

        # Extend d2 well past its 0.3 s deadline.
        assert await api.modack("s", 30, d2["ackId"]) == (200, {})
        await asyncio.sleep(0.45)
        assert emu.outstanding(P, "s") == 1  # d2 extended, `again` expired
        assert emu.pending(P, "s") == 1
        assert emu.stats["modacks"] == 1
        # Modack on a stale id: ignored.
        assert await api.modack("s", 30, again["ackId"]) == (200, {})
        assert emu.stats["stale_modacks"] == 1
        assert emu.pending(P, "s") == 1

        assert_error(*await api.modack("s", 601, d2["ackId"]), 400, "INVALID_ARGUMENT")
        assert_error(*await api.modack("s", -1, d2["ackId"]), 400, "INVALID_ARGUMENT")
        assert_error(*await api.modack("s", 10, "never-issued"), 400, "INVALID_ARGUMENT")
        assert await api.ack("s", d2["ackId"]) == (200, {})
        assert emu.outstanding(P, "s") == 0


async def test_dead_letter_after_max_attempts(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs", dead_letter_topic="dlq", max_delivery_attempts=5)
        emu.create_subscription(P, "dlq-sub", "dlq")
        api = Api(http, emu)
        msg_id = emu.publish(P, "jobs", b"poison", {"job": "7"})
        attempts = []
        for _ in range(5):
            (d,) = await api.pull("s")
            attempts.append(d["deliveryAttempt"])
            assert await api.modack("s", 0, d["ackId"]) == (200, {})
        assert attempts == [1, 2, 3, 4, 5]
        assert await api.pull("s") == []
        assert emu.pending(P, "s") == emu.outstanding(P, "s") == 0
        assert emu.delivery_counts(P, "s") == {msg_id: 5}
        assert emu.dead_lettered(P, "s") == [msg_id]
        assert emu.stats["dead_lettered"] == 1

        (dead,) = emu.messages_on_topic(P, "dlq")
        assert dead["data"] == b"poison"
        assert dead["attributes"]["job"] == "7"
        assert dead["attributes"]["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
        assert dead["attributes"]["CloudPubSubDeadLetterSourceSubscription"] == "s"
        assert dead["attributes"]["CloudPubSubDeadLetterSourceSubscriptionProject"] == P
        (on_dlq,) = await api.pull("dlq-sub")
        assert base64.b64decode(on_dlq["message"]["data"]) == b"poison"


async def test_ack_request_limits(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs")
        api = Api(http, emu)
        for i in range(1001):
            emu.publish(P, "jobs", str(i).encode())
        got = await api.pull("s", 1000)
        assert len(got) == 1000
        got += await api.pull("s", 1000)
        ids = [m["ackId"] for m in got]
        assert len(ids) == 1001

        assert_error(*await api.ack("s", *ids), 400, "INVALID_ARGUMENT")
        assert_error(*await api.modack("s", 20, *ids), 400, "INVALID_ARGUMENT")
        assert_error(*await api.ack("s"), 400, "INVALID_ARGUMENT")
        assert emu.outstanding(P, "s") == 1001  # nothing applied
        assert emu.stats["max_ack_ids_per_request"] == 1001

        padded = json.dumps({"ackIds": ids[:10], "pad": "x" * (512 * 1024)}).encode()
        assert_error(
            *await api.call("POST", f"projects/{P}/subscriptions/s:acknowledge", raw=padded),
            400,
            "INVALID_ARGUMENT",
        )
        assert emu.stats["max_ack_request_bytes"] > 512 * 1024

        assert await api.ack("s", *ids[:1000]) == (200, {})
        assert await api.ack("s", ids[1000]) == (200, {})
        assert emu.outstanding(P, "s") == 0
        assert emu.stats["acks"] == 1001


async def test_fault_injection(http: aiohttp.ClientSession) -> None:
    async with PubSubEmulator() as emu:
        emu.create_topic(P, "jobs")
        emu.create_subscription(P, "s", "jobs")
        api = Api(http, emu)
        emu.publish(P, "jobs", b"x")

        emu.fail_pull = 2
        for _ in range(2):
            assert_error(
                *await api.call("POST", f"projects/{P}/subscriptions/s:pull", {"maxMessages": 1}),
                503,
                "UNAVAILABLE",
            )
        assert emu.pending(P, "s") == 1  # failed pulls delivered nothing
        (d,) = await api.pull("s")

        emu.fail_ack = 2
        assert_error(*await api.ack("s", d["ackId"]), 503, "UNAVAILABLE")
        assert_error(*await api.modack("s", 0, d["ackId"]), 503, "UNAVAILABLE")
        assert emu.outstanding(P, "s") == 1  # not applied
        assert emu.stats["failed_acks"] == 2

        emu.slow_s = 0.3
        t0 = time.monotonic()
        assert await api.ack("s", d["ackId"]) == (200, {})
        assert time.monotonic() - t0 >= 0.3
        emu.slow_s = 0.0
        assert emu.outstanding(P, "s") == 0
        assert emu.stats["failed_pulls"] == 2


async def test_helpers_before_start_and_restart(http: aiohttp.ClientSession) -> None:
    emu = PubSubEmulator()
    emu.create_topic(P, "jobs")
    emu.create_topic(P, "jobs")  # idempotent
    emu.create_subscription(P, "s", "jobs")
    with pytest.raises(ValueError, match="already exists"):
        emu.create_subscription(P, "s", "jobs")
    with pytest.raises(KeyError):
        emu.create_subscription(P, "t", "missing")
    with pytest.raises(KeyError):
        emu.publish(P, "missing", b"x")
    emu.publish(P, "jobs", b"early")
    async with emu:
        (d,) = await Api(http, emu).pull("s")
        assert base64.b64decode(d["message"]["data"]) == b"early"
    # State survives a restart; the outstanding delivery is still tracked.
    async with emu:
        assert emu.outstanding(P, "s") == 1
        assert await Api(http, emu).ack("s", d["ackId"]) == (200, {})
    assert emu.acked(P, "s") == 1
