"""A loopback Pub/Sub emulator speaking the v1 REST/JSON API.

Point code at it with ``PUBSUB_EMULATOR_HOST=<host_port>`` and call
``http://$PUBSUB_EMULATOR_HOST/v1/...`` exactly like https://pubsub.googleapis.com/v1/.
Authentication headers are accepted and ignored (like the official emulator).

Supported REST surface (the calls ``worker.pubsub.client`` makes; anything else is 404)::

    GET    /v1/projects/{p}/topics/{t}                      get topic (does it exist)
    POST   /v1/projects/{p}/topics/{t}:publish              publish
    GET    /v1/projects/{p}/subscriptions/{s}               get subscription
    POST   /v1/projects/{p}/subscriptions/{s}:pull
    POST   /v1/projects/{p}/subscriptions/{s}:acknowledge
    POST   /v1/projects/{p}/subscriptions/{s}:modifyAckDeadline

Topics and subscriptions are set up with the Python helpers (``create_topic``,
``create_subscription``), which tests may call before or after ``start()`` and from any
thread; other helpers read the state (``pending``, ``outstanding``, ``acked``, ...).

Semantics (matching the real service where it matters to a client):

* Publishing fans a message out to every subscription of the topic that exists at publish
  time. Limits: 1..1000 messages, request body <= 10 MB, no empty messages, at most 100
  attributes (key <= 256 bytes, value <= 1024 bytes, key not starting with ``goog`` except
  ``googclient_``, which Google's client libraries use, e.g. ``googclient_traceparent``).
* Pull answers at once (``{}`` when nothing is available) unless ``pull_wait_s`` > 0, in
  which case it waits up to that long for a message. ``maxMessages`` must be > 0; larger
  than 1000 is capped at 1000.
* Every delivery gets a new opaque ackId. An ackId is only honoured while its delivery is
  outstanding (delivered, not acked, deadline not passed). Acking/modacking a stale ackId
  (older delivery, already acked, deadline passed) answers 200 and does nothing; it is
  counted in ``stats["stale_acks"]``/``stats["stale_modacks"]``. An ackId this emulator
  never issued for that subscription is rejected with 400 INVALID_ARGUMENT (whole
  request, nothing applied).
* ``acknowledge`` and ``modifyAckDeadline`` accept at most 1000 ackIds and 512 KiB bodies.
  ``modifyAckDeadline`` with 0 is a nack: the message is available again immediately.
* When a deadline passes the message is redelivered (new ackId, ``deliveryAttempt`` + 1).
  ``deliveryAttempt`` is present only for subscriptions with a dead-letter policy. Once a
  message has been delivered ``maxDeliveryAttempts`` times and is nacked or expires, it is
  published to the dead-letter topic (same data/attributes plus the
  ``CloudPubSubDeadLetterSource*`` attributes) and removed from the subscription.
* Errors use Google's shape ``{"error": {"code", "message", "status"}}``.
* Fault injection (mutable at runtime): ``fail_pull``, ``fail_ack`` (acknowledge and
  modifyAckDeadline, not applied), ``fail_publish`` answer the next N such calls with 503
  UNAVAILABLE; ``slow_s`` delays every request before it is processed.
* Deadlines use ``time.monotonic()``; expiry is swept lazily on every request / helper
  call and by a background task every 0.1 s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import heapq
import itertools
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from . import start_app

MAX_PUBLISH_BYTES = 10_000_000
MAX_MESSAGES_PER_PUBLISH = 1000
MAX_ACK_IDS = 1000
MAX_ACK_BYTES = 512 * 1024
MAX_PULL_MESSAGES = 1000
MAX_ACK_DEADLINE_S = 600
DEFAULT_ACK_DEADLINE_S = 10
DEFAULT_MAX_DELIVERY_ATTEMPTS = 5

_STATUS = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    503: "UNAVAILABLE",
}


class _ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message, "status": _STATUS[self.code]}}
        return web.json_response(body, status=self.code)


def _unavailable() -> _ApiError:
    return _ApiError(503, "The service was unable to fulfill your request. Please try again.")


@dataclass
class _Message:
    message_id: str
    data: bytes
    attributes: dict[str, str]
    publish_time: str
    ordering_key: str

    def to_json(self) -> dict[str, Any]:
        # proto3 JSON: empty fields are omitted, like the real service does.
        out: dict[str, Any] = {}
        if self.data:
            out["data"] = base64.b64encode(self.data).decode("ascii")
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        out["messageId"] = self.message_id
        out["publishTime"] = self.publish_time
        if self.ordering_key:
            out["orderingKey"] = self.ordering_key
        return out

    def to_record(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "data": self.data,
            "attributes": dict(self.attributes),
            "publishTime": self.publish_time,
            "orderingKey": self.ordering_key,
        }


@dataclass
class _Lease:
    """A message's state inside one subscription."""

    msg: _Message
    attempts: int = 0
    ack_id: str | None = None
    deadline: float = 0.0


@dataclass
class _Topic:
    name: str
    subscriptions: list[str] = field(default_factory=list)


@dataclass
class _Subscription:
    name: str
    project: str
    sub_id: str
    topic: str
    ack_deadline_s: float
    dead_letter_topic: str | None
    max_delivery_attempts: int
    available: deque[_Lease] = field(default_factory=deque)
    outstanding: dict[str, _Lease] = field(default_factory=dict)
    heap: list[tuple[float, int, str]] = field(default_factory=list)
    issued_ack_ids: dict[str, str] = field(default_factory=dict)
    delivery_counts: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    dead_lettered: list[str] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        deadline: int | float = self.ack_deadline_s
        if float(deadline).is_integer():
            deadline = int(deadline)
        out: dict[str, Any] = {
            "name": self.name,
            "topic": self.topic,
            "ackDeadlineSeconds": deadline,
        }
        if self.dead_letter_topic is not None:
            out["deadLetterPolicy"] = {
                "deadLetterTopic": self.dead_letter_topic,
                "maxDeliveryAttempts": self.max_delivery_attempts,
            }
        return out


def _new_stats() -> dict[str, int]:
    return dict.fromkeys(
        (
            "requests",
            "pulls",
            "empty_pulls",
            "deliveries",
            "redeliveries",
            "ack_requests",
            "acks",
            "stale_acks",
            "modack_requests",
            "modacks",
            "stale_modacks",
            "nacks",
            "expired",
            "publish_requests",
            "publishes",
            "dead_lettered",
            "invalid_requests",
            "failed_pulls",
            "failed_acks",
            "failed_publishes",
            "max_ack_ids_per_request",
            "max_ack_request_bytes",
            "max_modack_ids_per_request",
            "max_modack_request_bytes",
        ),
        0,
    )


def _now_rfc3339() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _as_int(value: Any, what: str) -> int:
    """Parse a proto3 JSON int (number or decimal string)."""
    if isinstance(value, bool):
        raise _ApiError(400, f"Invalid value for {what}: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    raise _ApiError(400, f"Invalid value for {what}: {value!r}")


def _as_seconds(value: Any, what: str) -> float:
    """Like ``_as_int`` but lets tests of this fake use fractional deadlines."""
    if isinstance(value, float) and not value.is_integer():
        return value
    return float(_as_int(value, what))


def _decode_b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _ApiError(400, "Invalid value at 'messages.data' (TYPE_BYTES): expected a string")
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _ApiError(
            400, f"Invalid value at 'messages.data' (TYPE_BYTES), Base64 decoding failed: {exc}"
        ) from None


def _check_name(name: str, collection: str) -> None:
    """``projects/{p}/{collection}/{id}``, else ValueError (helpers accept short test ids)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "projects" or parts[2] != collection or "" in parts:
        raise ValueError(f"Invalid resource name given (name={name}).")


class PubSubEmulator:
    """Loopback Pub/Sub REST emulator (see module docstring)."""

    def __init__(self, *, pull_wait_s: float = 0.0, min_ack_deadline_s: float = 10.0) -> None:
        self.pull_wait_s = pull_wait_s
        #: Lowest ack deadline ``create_subscription`` accepts (real service: 10 s).
        self.min_ack_deadline_s = min_ack_deadline_s
        self.fail_pull = 0
        self.fail_ack = 0
        self.fail_publish = 0
        self.slow_s = 0.0
        self.stats: dict[str, int] = _new_stats()
        self.host = "127.0.0.1"
        self.port = 0
        self._lock = threading.RLock()
        self._topics: dict[str, _Topic] = {}
        self._topic_logs: dict[str, list[_Message]] = {}
        self._subs: dict[str, _Subscription] = {}
        self._ids = itertools.count(4_000_000_000_000_001)
        self._seq = itertools.count()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("PubSubEmulator already started")
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner, self.port = await start_app(app, host, port)
        self._runner = runner
        self.host = host
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        self._closing = True
        self._fire()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._loop = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ naming
    @staticmethod
    def topic_path(project: str, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"

    @staticmethod
    def subscription_path(project: str, sub: str) -> str:
        return sub if sub.startswith("projects/") else f"projects/{project}/subscriptions/{sub}"

    # ------------------------------------------------------------------ sync helpers
    def create_topic(self, project: str, topic: str) -> str:
        """Create a topic (idempotent). Returns its full name."""
        name = self.topic_path(project, topic)
        with self._lock:
            if name not in self._topics:
                _check_name(name, "topics")
                self._topics[name] = _Topic(name)
                self._topic_logs.setdefault(name, [])
        return name

    def create_subscription(
        self,
        project: str,
        sub: str,
        topic: str,
        ack_deadline_s: float = DEFAULT_ACK_DEADLINE_S,
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int = DEFAULT_MAX_DELIVERY_ATTEMPTS,
    ) -> str:
        """Create a subscription; the topic must exist, a missing dead-letter topic is created.

        Raises ValueError if the subscription exists or a limit is violated, KeyError when
        the topic does not exist. Returns the subscription's full name.
        """
        name = self.subscription_path(project, sub)
        topic_name = self.topic_path(project, topic)
        _check_name(name, "subscriptions")
        if not (self.min_ack_deadline_s <= ack_deadline_s <= MAX_ACK_DEADLINE_S):
            raise ValueError(
                f"Invalid ack deadline given: {ack_deadline_s}. The minimum ack deadline is "
                f"{self.min_ack_deadline_s:g} seconds and the maximum is {MAX_ACK_DEADLINE_S}."
            )
        if dead_letter_topic is not None and not (5 <= max_delivery_attempts <= 100):
            raise ValueError(
                "Invalid max_delivery_attempts: must be between 5 and 100, got "
                f"{max_delivery_attempts}."
            )
        with self._lock:
            if name in self._subs:
                raise ValueError(f"Resource already exists (name={name}).")
            topic_obj = self._topics.get(topic_name)
            if topic_obj is None:
                raise KeyError(f"topic not found: {topic_name}")
            dlq = None
            if dead_letter_topic is not None:
                dlq = self.create_topic(project, dead_letter_topic)
            self._subs[name] = _Subscription(
                name=name,
                project=name.split("/")[1],
                sub_id=name.split("/")[3],
                topic=topic_name,
                ack_deadline_s=ack_deadline_s,
                dead_letter_topic=dlq,
                max_delivery_attempts=max_delivery_attempts,
            )
            topic_obj.subscriptions.append(name)
        return name

    def publish(
        self,
        project: str,
        topic: str,
        data: bytes,
        attributes: dict[str, str] | None = None,
        ordering_key: str = "",
    ) -> str:
        """Publish one message (no size validation). Returns its message id."""
        name = self.topic_path(project, topic)
        with self._lock:
            if name not in self._topics:
                raise KeyError(f"topic not found: {name}")
            msg_id = self._publish_locked(name, bytes(data), dict(attributes or {}), ordering_key)
            self.stats["publishes"] += 1
        self._notify()
        return msg_id

    def pending(self, project: str, sub: str) -> int:
        """Messages available for delivery (not outstanding)."""
        with self._lock:
            self._sweep()
            return len(self._sub(self.subscription_path(project, sub)).available)

    def outstanding(self, project: str, sub: str) -> int:
        """Messages delivered, not yet acked, whose deadline has not passed."""
        with self._lock:
            self._sweep()
            return len(self._sub(self.subscription_path(project, sub)).outstanding)

    def acked(self, project: str, sub: str) -> int:
        """Messages acknowledged on the subscription."""
        with self._lock:
            return self._sub(self.subscription_path(project, sub)).acked

    def delivery_counts(self, project: str, sub: str) -> dict[str, int]:
        """message_id -> number of deliveries, for every message routed to the subscription."""
        with self._lock:
            self._sweep()
            return dict(self._sub(self.subscription_path(project, sub)).delivery_counts)

    def dead_lettered(self, project: str, sub: str) -> list[str]:
        """Message ids forwarded from this subscription to its dead-letter topic."""
        with self._lock:
            self._sweep()
            return list(self._sub(self.subscription_path(project, sub)).dead_lettered)

    def messages_on_topic(self, project: str, topic: str) -> list[dict[str, Any]]:
        """Everything ever published to the topic: messageId, data (bytes), attributes,
        publishTime, orderingKey."""
        with self._lock:
            self._sweep()
            log = self._topic_logs.get(self.topic_path(project, topic), [])
            return [m.to_record() for m in log]

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = _new_stats()

    # ------------------------------------------------------------------ core (lock held)
    def _sub(self, name: str) -> _Subscription:
        try:
            return self._subs[name]
        except KeyError:
            raise KeyError(f"subscription not found: {name}") from None

    def _publish_locked(
        self, topic: str, data: bytes, attributes: dict[str, str], ordering_key: str
    ) -> str:
        msg = _Message(
            message_id=str(next(self._ids)),
            data=data,
            attributes=attributes,
            publish_time=_now_rfc3339(),
            ordering_key=ordering_key,
        )
        self._topic_logs.setdefault(topic, []).append(msg)
        for sub_name in self._topics[topic].subscriptions:
            sub = self._subs[sub_name]
            sub.available.append(_Lease(msg))
            sub.delivery_counts[msg.message_id] = 0
        return msg.message_id

    def _release(self, sub: _Subscription, lease: _Lease) -> None:
        """A delivery ended without an ack (nack or expiry)."""
        lease.ack_id = None
        if sub.dead_letter_topic is not None and lease.attempts >= sub.max_delivery_attempts:
            msg = lease.msg
            attrs = dict(msg.attributes)
            attrs.update(
                CloudPubSubDeadLetterSourceDeliveryCount=str(lease.attempts),
                CloudPubSubDeadLetterSourceSubscription=sub.sub_id,
                CloudPubSubDeadLetterSourceSubscriptionProject=sub.project,
                CloudPubSubDeadLetterSourceTopicPublishTime=msg.publish_time,
            )
            self._publish_locked(sub.dead_letter_topic, msg.data, attrs, msg.ordering_key)
            sub.dead_lettered.append(msg.message_id)
            self.stats["dead_lettered"] += 1
        else:
            sub.available.append(lease)

    def _sweep(self, now: float | None = None) -> int:
        """Expire passed deadlines. Returns how many deliveries expired."""
        now = time.monotonic() if now is None else now
        expired = 0
        with self._lock:
            for sub in list(self._subs.values()):
                heap = sub.heap
                while heap and heap[0][0] <= now:
                    deadline, _, ack_id = heapq.heappop(heap)
                    lease = sub.outstanding.get(ack_id)
                    if lease is None or lease.deadline != deadline:
                        continue  # acked, nacked or extended since
                    del sub.outstanding[ack_id]
                    expired += 1
                    self.stats["expired"] += 1
                    self._release(sub, lease)
        return expired

    def _take(self, sub: _Subscription, max_messages: int) -> list[dict[str, Any]]:
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        while sub.available and len(out) < max_messages:
            lease = sub.available.popleft()
            lease.attempts += 1
            ack_id = f"{next(self._seq):x}-{secrets.token_urlsafe(18)}"
            lease.ack_id = ack_id
            lease.deadline = now + sub.ack_deadline_s
            sub.outstanding[ack_id] = lease
            heapq.heappush(sub.heap, (lease.deadline, next(self._seq), ack_id))
            msg_id = lease.msg.message_id
            sub.issued_ack_ids[ack_id] = msg_id
            sub.delivery_counts[msg_id] = sub.delivery_counts.get(msg_id, 0) + 1
            self.stats["deliveries"] += 1
            if lease.attempts > 1:
                self.stats["redeliveries"] += 1
            item: dict[str, Any] = {"ackId": ack_id, "message": lease.msg.to_json()}
            if sub.dead_letter_topic is not None:
                item["deliveryAttempt"] = lease.attempts
            out.append(item)
        return out

    # ------------------------------------------------------------------ wakeups
    def _fire(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fire()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(self._fire)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self._sweep():
                self._fire()

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.stats["requests"] += 1
        try:
            if self.slow_s > 0:
                await asyncio.sleep(self.slow_s)
            return await self._dispatch(request)
        except _ApiError as exc:
            if exc.code == 400:
                with self._lock:
                    self.stats["invalid_requests"] += 1
            return exc.response()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        parts = request.path.split("/")
        # ['', 'v1', 'projects', p, collection, name[:verb]]
        if len(parts) != 6 or parts[:3] != ["", "v1", "projects"] or not parts[3]:
            raise _ApiError(404, f"Method not found: {method} {request.path}")
        project, collection = parts[3], parts[4]
        resource, _, verb = parts[5].partition(":")
        name = f"projects/{project}/{collection}/{resource}"
        route = (collection, method, verb)
        if route == ("topics", "GET", ""):
            return self._get_topic(name)
        if route == ("topics", "POST", "publish"):
            return await self._publish(request, name)
        if route == ("subscriptions", "GET", ""):
            return self._get_subscription(name)
        if route == ("subscriptions", "POST", "pull"):
            return await self._pull(request, name)
        if route == ("subscriptions", "POST", "acknowledge"):
            return await self._acknowledge(request, name)
        if route == ("subscriptions", "POST", "modifyAckDeadline"):
            return await self._modify_ack_deadline(request, name)
        raise _ApiError(404, f"Method not found: {method} {request.path}")

    @staticmethod
    async def _read_raw(request: web.Request, limit: int, what: str) -> bytes:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _ApiError(
                400, f"Request payload size exceeds the limit: {limit} bytes."
            ) from None
        if len(raw) > limit:
            raise _ApiError(400, f"Request payload size exceeds the limit: {limit} bytes ({what}).")
        return raw

    @staticmethod
    def _parse_json(raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _ApiError(400, f"Invalid JSON payload received. {exc}") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "Invalid JSON payload received. Expected an object.")
        return body

    # -- resources
    def _get_topic(self, name: str) -> web.Response:
        with self._lock:
            if name in self._topics:
                return web.json_response({"name": name})
        raise _ApiError(404, f"Resource not found (resource={name.split('/')[-1]}).")

    def _get_subscription(self, name: str) -> web.Response:
        with self._lock:
            if name in self._subs:
                return web.json_response(self._subs[name].config())
        raise _ApiError(404, f"Resource not found (resource={name.split('/')[-1]}).")

    # -- data plane
    async def _publish(self, request: web.Request, name: str) -> web.Response:
        raw = await self._read_raw(request, MAX_PUBLISH_BYTES, "publish")
        with self._lock:
            self.stats["publish_requests"] += 1
            if self.fail_publish > 0:
                self.fail_publish -= 1
                self.stats["failed_publishes"] += 1
                raise _unavailable()
        body = self._parse_json(raw)
        with self._lock:
            if name not in self._topics:
                raise _ApiError(404, f"Resource not found (resource={name.split('/')[-1]}).")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "The request contains no messages.")
        if len(messages) > MAX_MESSAGES_PER_PUBLISH:
            raise _ApiError(
                400,
                f"The value for message_count is too large. You passed {len(messages)} in the "
                f"request, but the maximum value is {MAX_MESSAGES_PER_PUBLISH}.",
            )
        parsed = [self._parse_message(m) for m in messages]
        with self._lock:
            ids = [self._publish_locked(name, d, a, k) for d, a, k in parsed]
            self.stats["publishes"] += len(ids)
        self._notify()
        return web.json_response({"messageIds": ids})

    @staticmethod
    def _parse_message(message: Any) -> tuple[bytes, dict[str, str], str]:
        if not isinstance(message, dict):
            raise _ApiError(400, "Invalid value at 'messages': expected an object.")
        data = _decode_b64(message.get("data", ""))
        attributes = message.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _ApiError(400, "Invalid value at 'messages.attributes': expected an object.")
        if len(attributes) > 100:
            raise _ApiError(400, "Too many attributes (the maximum is 100).")
        size = len(data)
        for key, value in attributes.items():
            if not isinstance(value, str):
                raise _ApiError(400, f"Invalid value for attribute {key!r}: expected a string.")
            if not key or len(key.encode()) > 256:
                raise _ApiError(400, f"Invalid attribute key {key!r}: 1..256 bytes required.")
            if len(value.encode()) > 1024:
                raise _ApiError(400, f"Attribute {key!r} value exceeds 1024 bytes.")
            if key.lower().startswith("goog") and not key.startswith("googclient_"):
                raise _ApiError(400, f"Attribute key {key!r} must not start with 'goog'.")
            size += len(key.encode()) + len(value.encode())
        if not data and not attributes:
            raise _ApiError(400, "Some messages are empty (neither data nor attributes).")
        if size > MAX_PUBLISH_BYTES:
            raise _ApiError(400, f"Message size exceeds the limit: {MAX_PUBLISH_BYTES} bytes.")
        ordering_key = message.get("orderingKey", "")
        if not isinstance(ordering_key, str):
            raise _ApiError(400, "Invalid value at 'messages.ordering_key'.")
        return data, {str(k): v for k, v in attributes.items()}, ordering_key

    async def _pull(self, request: web.Request, name: str) -> web.Response:
        raw = await self._read_raw(request, MAX_PUBLISH_BYTES, "pull")
        with self._lock:
            self.stats["pulls"] += 1
            if self.fail_pull > 0:
                self.fail_pull -= 1
                self.stats["failed_pulls"] += 1
                raise _unavailable()
        body = self._parse_json(raw)
        max_messages = _as_int(body.get("maxMessages", 0), "maxMessages")
        if max_messages <= 0:
            raise _ApiError(
                400, 'A required argument is missing in the request: (argument="max_messages").'
            )
        max_messages = min(max_messages, MAX_PULL_MESSAGES)
        give_up = time.monotonic() + max(0.0, self.pull_wait_s)
        while True:
            changed = self._changed
            with self._lock:
                self._sweep()
                sub = self._subs.get(name)
                if sub is None:
                    raise _ApiError(404, f"Resource not found (resource={name.split('/')[-1]}).")
                received = self._take(sub, max_messages)
            remaining = give_up - time.monotonic()
            if received or remaining <= 0 or self._closing:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        if not received:
            with self._lock:
                self.stats["empty_pulls"] += 1
            return web.json_response({})
        return web.json_response({"receivedMessages": received})

    async def _read_ack_ids(self, request: web.Request, kind: str) -> tuple[dict[str, Any], int]:
        raw = await self._read_raw(request, MAX_PUBLISH_BYTES, kind)
        body = self._parse_json(raw)
        ack_ids = body.get("ackIds")
        n_ids = len(ack_ids) if isinstance(ack_ids, list) else 0
        with self._lock:
            prefix = "max_ack" if kind == "acknowledge" else "max_modack"
            ids_key, bytes_key = f"{prefix}_ids_per_request", f"{prefix}_request_bytes"
            self.stats[ids_key] = max(self.stats[ids_key], n_ids)
            self.stats[bytes_key] = max(self.stats[bytes_key], len(raw))
            if self.fail_ack > 0:
                self.fail_ack -= 1
                self.stats["failed_acks"] += 1
                raise _unavailable()
        if len(raw) > MAX_ACK_BYTES:
            raise _ApiError(
                400, f"Request payload size exceeds the limit: {MAX_ACK_BYTES} bytes ({kind})."
            )
        if not isinstance(ack_ids, list) or not ack_ids:
            raise _ApiError(400, "No ack ids specified.")
        if len(ack_ids) > MAX_ACK_IDS:
            raise _ApiError(
                400,
                f"Too many ack ids: {len(ack_ids)} given, the maximum per request is {MAX_ACK_IDS}.",
            )
        if not all(isinstance(a, str) for a in ack_ids):
            raise _ApiError(400, "Invalid value at 'ack_ids': expected strings.")
        return body, len(raw)

    def _check_issued(self, sub: _Subscription, ack_ids: list[str]) -> None:
        unknown = [a for a in ack_ids if a not in sub.issued_ack_ids]
        if unknown:
            raise _ApiError(
                400, f"You have passed an invalid ack ID to the service (ack_id={unknown[0]})."
            )

    async def _acknowledge(self, request: web.Request, name: str) -> web.Response:
        body, _ = await self._read_ack_ids(request, "acknowledge")
        ack_ids: list[str] = body["ackIds"]
        with self._lock:
            self._sweep()
            sub = self._subs.get(name)
            if sub is None:
                raise _ApiError(404, f"Resource not found (resource={name.split('/')[-1]}).")
            self._check_issued(sub, ack_ids)
            self.stats["ack_requests"] += 1
            for ack_id in ack_ids:
                if sub.outstanding.pop(ack_id, None) is not None:
                    sub.acked += 1
                    self.stats["acks"] += 1
                else:
                    self.stats["stale_acks"] += 1
        return web.json_response({})

    async def _modify_ack_deadline(self, request: web.Request, name: str) -> web.Response:
        body, _ = await self._read_ack_ids(request, "modifyAckDeadline")
        ack_ids: list[str] = body["ackIds"]
        seconds = _as_seconds(body.get("ackDeadlineSeconds", 0), "ackDeadlineSeconds")
        if not (0 <= seconds <= MAX_ACK_DEADLINE_S):
            raise _ApiError(
                400,
                f"Invalid ack deadline given: {seconds:g}. The minimum ack deadline is 0 seconds "
                f"and the maximum is {MAX_ACK_DEADLINE_S}.",
            )
        released = False
        with self._lock:
            self._sweep()
            sub = self._subs.get(name)
            if sub is None:
                raise _ApiError(404, f"Resource not found (resource={name.split('/')[-1]}).")
            self._check_issued(sub, ack_ids)
            self.stats["modack_requests"] += 1
            now = time.monotonic()
            for ack_id in ack_ids:
                lease = sub.outstanding.get(ack_id)
                if lease is None:
                    self.stats["stale_modacks"] += 1
                elif seconds == 0:
                    del sub.outstanding[ack_id]
                    self.stats["nacks"] += 1
                    self._release(sub, lease)
                    released = True
                else:
                    lease.deadline = now + seconds
                    heapq.heappush(sub.heap, (lease.deadline, next(self._seq), ack_id))
                    self.stats["modacks"] += 1
        if released:
            self._notify()
        return web.json_response({})
