"""Source ``pubsub:projects/P/subscriptions/S``: pull with flow control and lease extension.

Three background loops run in :meth:`PubSubSource.run_services` (the app starts it in its
root task group before the pipeline reads):

* pull loops, each asking for as many messages as there is free capacity; capacity is
  bounded by ``max_outstanding_messages`` and ``max_outstanding_bytes`` over everything
  held (pulled and not yet acked or nacked). Empty answers and errors back off, because
  an emulator answers an empty pull at once where the service would hold it open;
* the lease manager, which extends every held message's deadline in batches
  (modifyAckDeadline by ``lease_extension_s``) before it lapses, until it is settled or
  ``max_lease_s`` old. The first extension comes right after receipt whatever the
  subscription's deadline, so it is not the subscription but ``lease_extension_s`` that
  decides how soon a dead worker's messages come back;
* the acker, which gathers acks and nacks (modifyAckDeadline 0) for ``ack_window_s`` and
  sends each kind in one request (split at 1,000 ids), retried on transient errors.

``Delivery.ack()`` returns once Pub/Sub has taken the ack. A message stays held, and its
lease extended, until then, so a slow ack never lets the deadline lapse.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..errors import ConfigError
from ..pubsub import PubSubClient, PubSubError
from .file import SourceUnavailable

__all__ = ["PubSubDelivery", "PubSubSource", "delivery_fields", "parse_subscription"]

log = logging.getLogger("worker.sources.pubsub")

_SUBSCRIPTION_RE = re.compile(r"^projects/[^/\s]+/subscriptions/[^/\s:]+$")
MAX_PULL_MESSAGES = 1000
# The service's minimum; assumed when the subscription cannot be read (a subscriber-only
# role may not get it).
MIN_ACK_DEADLINE_S = 10.0
MAX_EMPTY_BACKOFF_S = 2.0


def parse_subscription(rest: str, key: str = "worker.source") -> str:
    if not _SUBSCRIPTION_RE.match(rest):
        raise ConfigError(
            key, f"pubsub:{rest} is not pubsub:projects/PROJECT/subscriptions/SUBSCRIPTION"
        )
    return rest


def delivery_fields(
    message: dict[str, Any], subscription: str, delivery_attempt: Any
) -> tuple[bytes, str | None, dict[str, Any]]:
    """A Pub/Sub message -> (job bytes, default id, source info). Shared with push.

    The job is ``data`` (base64 of a JSON job or a bare URI); a message without data may
    carry it in attributes (``image_uri``, optional ``id`` and ``prompt``).
    """
    data = b""
    encoded = message.get("data")
    if isinstance(encoded, str) and encoded:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            data = encoded.encode()  # not base64: let the job parser refuse it
    attributes = message.get("attributes")
    if not data.strip() and isinstance(attributes, dict) and "image_uri" in attributes:
        job = {k: attributes[k] for k in ("id", "image_uri", "prompt") if k in attributes}
        data = json.dumps(job).encode()
    raw_id = message.get("messageId") or message.get("message_id")
    message_id = str(raw_id) if raw_id is not None else None
    info: dict[str, Any] = {
        "subscription": subscription,
        "message_id": message_id,
        "publish_time": message.get("publishTime") or message.get("publish_time"),
        "delivery_attempt": delivery_attempt if isinstance(delivery_attempt, int) else None,
    }
    return data, message_id, info


@dataclass(slots=True, eq=False)
class _Held:
    ack_id: str
    size: int
    received_at: float
    lease_until: float
    settling: bool = False


class PubSubDelivery:
    __slots__ = ("_held", "_source", "data", "default_id", "source_info")
    redeliverable = True

    def __init__(
        self,
        source: PubSubSource,
        held: _Held,
        data: bytes,
        default_id: str | None,
        source_info: dict[str, Any],
    ) -> None:
        self._source = source
        self._held = held
        self.data = data
        self.default_id = default_id
        self.source_info: dict[str, Any] | None = source_info

    async def ack(self) -> None:
        await self._source._settle(self._held, ack=True)

    async def nack(self) -> None:
        await self._source._settle(self._held, ack=False)


class PubSubSource:
    trusted = False

    def __init__(
        self,
        subscription: str,
        client: PubSubClient,
        *,
        max_outstanding_messages: int = 1000,
        max_outstanding_bytes: int = 100 * 1024 * 1024,
        lease_extension_s: int = 60,
        max_lease_s: int = 3600,
        ack_window_s: float = 0.05,
        owns_client: bool = False,
    ) -> None:
        self.subscription = subscription
        self.name = f"pubsub:{subscription}"
        self.client = client
        self.max_messages = max(1, max_outstanding_messages)
        self._configured_max_messages = self.max_messages
        self.max_bytes = max_outstanding_bytes
        self.lease_extension_s = lease_extension_s
        self.max_lease_s = max_lease_s
        self.ack_window_s = ack_window_s
        self._owns_client = owns_client
        # Several pulls in flight only pay when there is room for many messages.
        self.pull_loops = max(1, min(4, self.max_messages // 100))
        # Below this much free room, wait a moment for more rather than pull a handful.
        self._min_pull = max(1, min(100, self.max_messages // 10))
        self._sub_deadline_s = MIN_ACK_DEADLINE_S
        self._held: dict[str, _Held] = {}
        self._held_bytes = 0
        self._reserved = 0
        self._ready: deque[PubSubDelivery] = deque()
        self._acks: list[tuple[str, asyncio.Future[Exception | None]]] = []
        self._nacks: list[tuple[str, asyncio.Future[Exception | None]]] = []
        self._wake_reader = anyio.Event()
        self._wake_puller = anyio.Event()
        self._wake_acker = anyio.Event()
        self._wake_lease = anyio.Event()
        self._stopping = False
        self._services_running = False
        self._prepared = False
        self._closed = False
        self._error: BaseException | None = None
        # Counters for logs and tests.
        self.received = 0
        self.acked = 0
        self.nacked = 0
        self.extended = 0
        self.lease_expired = 0
        self.ack_failures = 0
        self.modack_failures = 0
        #: time.monotonic() of the latest pull answer, empty or not: liveness uses it to
        #: tell "nothing to do" from "stuck".
        self.answered_at: float | None = None

    # -- capacity ----------------------------------------------------------------------

    @property
    def held(self) -> int:
        return len(self._held)

    def _free(self) -> int:
        if self._held_bytes >= self.max_bytes:
            return 0
        return max(0, self.max_messages - len(self._held) - self._reserved)

    def set_capacity(self, jobs: int) -> None:
        """The pipeline can take ``jobs`` now (it follows an adaptive model limit): hold
        about that many, a quarter more so the next jobs are already pulled, never more
        than configured. Messages beyond it stay in the subscription for other replicas."""
        self.max_messages = max(1, min(self._configured_max_messages, jobs + max(1, jobs // 4)))
        self._min_pull = max(1, min(100, self.max_messages // 10))
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        self._wake_puller.set()
        self._wake_puller = anyio.Event()

    def _forget(self, held: _Held) -> None:
        if self._held.pop(held.ack_id, None) is not None:
            self._held_bytes -= held.size
            self._capacity_changed()

    # -- consumer side -------------------------------------------------------------------

    async def deliveries(self) -> AsyncGenerator[PubSubDelivery, None]:
        if not self._services_running:
            raise RuntimeError("PubSubSource.run_services must be running before deliveries()")
        try:
            while True:
                if self._error is not None:
                    raise self._error
                if self._ready:
                    delivery = self._ready.popleft()
                    if delivery._held.ack_id in self._held:  # not dropped at max lease
                        yield delivery
                    continue
                self._wake_reader = anyio.Event()
                await self._wake_reader.wait()
        finally:
            # The consumer stopped reading: pull nothing more.
            self._stopping = True
            self._capacity_changed()

    async def _settle(self, held: _Held, *, ack: bool) -> None:
        if held.settling:
            return
        held.settling = True
        future: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        (self._acks if ack else self._nacks).append((held.ack_id, future))
        try:
            if self._services_running:
                self._wake_acker.set()
            else:
                await self._send_settlements()
            error = await future
        finally:
            # Released only now: until the ack is in, the lease manager keeps extending.
            self._forget(held)
        if error is not None:
            raise error

    # -- services ------------------------------------------------------------------------

    async def run_services(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        if not self._prepared:
            await self.prepare()
        try:
            async with anyio.create_task_group() as tg:
                self._services_running = True
                for _ in range(self.pull_loops):
                    tg.start_soon(self._pull_loop)
                tg.start_soon(self._lease_loop)
                tg.start_soon(self._ack_loop)
                task_status.started()
        finally:
            self._services_running = False

    async def prepare(self) -> None:
        """Read the subscription: its ack deadline, and whether it exists at all."""
        self._prepared = True
        try:
            sub = await self.client.get_subscription(self.subscription)
        except PubSubError as exc:
            if exc.status == 404:
                raise ConfigError("worker.source", f"{self.name} does not exist") from None
            # Subscriber-only roles may not read the subscription: assume the minimum.
            log.info("pubsub_subscription_unreadable", extra={"status": exc.status})
            return
        try:
            self._sub_deadline_s = max(1.0, float(sub.get("ackDeadlineSeconds") or 10))
        except (TypeError, ValueError):
            self._sub_deadline_s = MIN_ACK_DEADLINE_S
        log.info(
            "pubsub_source_ready",
            extra={
                "subscription": self.subscription,
                "ack_deadline_s": self._sub_deadline_s,
                "max_outstanding_messages": self.max_messages,
                "pull_loops": self.pull_loops,
            },
        )

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wake_reader.set()

    async def _reserve(self) -> int:
        """Wait for free room; take it (up to one pull's worth). 0 when stopping."""
        patience_until: float | None = None
        while not self._stopping:
            free = self._free()
            now = time.monotonic()
            if free >= self._min_pull or (free > 0 and patience_until and now >= patience_until):
                n = min(free, MAX_PULL_MESSAGES)
                self._reserved += n
                return n
            if free > 0 and patience_until is None:
                patience_until = now + 0.05
            wake = self._wake_puller
            if patience_until is None:
                await wake.wait()
            else:
                with anyio.move_on_after(max(0.0, patience_until - now)):
                    await wake.wait()
        return 0

    async def _pull_loop(self) -> None:
        empty_backoff_s = 0.0
        failures = 0
        while not self._stopping:
            n = await self._reserve()
            if n == 0:
                return
            sent_at = time.monotonic()
            try:
                received = await self.client.pull(self.subscription, n)
            except PubSubError as exc:
                if not exc.transient:
                    self._fail(SourceUnavailable(f"{self.name}: pull failed: {exc}"))
                    return
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
                log.warning(
                    "pubsub_pull_failed",
                    extra={"status": exc.status, "code": exc.code, "retry_in_s": round(delay, 2)},
                )
                await anyio.sleep(delay)
                continue
            finally:
                self._reserved -= n
                self._capacity_changed()
            failures = 0
            if self._stopping and received:
                # Nobody will read these: hand them straight back.
                await self._nack_now([m["ackId"] for m in received])
                return
            self._admit(received, sent_at)
            if received:
                empty_backoff_s = 0.0
            else:
                empty_backoff_s = min(MAX_EMPTY_BACKOFF_S, max(0.05, empty_backoff_s * 2))
                await anyio.sleep(empty_backoff_s * random.uniform(0.5, 1.0))

    def _admit(self, received: list[dict[str, Any]], sent_at: float) -> None:
        self.answered_at = time.monotonic()
        for item in received:
            message = item.get("message")
            if not isinstance(message, dict):
                message = {}
            data, default_id, info = delivery_fields(
                message, self.subscription, item.get("deliveryAttempt")
            )
            size = len(data) + sum(
                len(str(k)) + len(str(v)) for k, v in (message.get("attributes") or {}).items()
            )
            held = _Held(
                ack_id=str(item["ackId"]),
                size=size,
                received_at=sent_at,
                # Counted from when the pull was sent: never later than the service's clock.
                lease_until=sent_at + self._sub_deadline_s,
            )
            self._held[held.ack_id] = held
            self._held_bytes += size
            self._ready.append(PubSubDelivery(self, held, data, default_id, info))
            self.received += 1
        if received:
            self._wake_reader.set()
            # Extend at once: the subscription's deadline may be as short as 10 s.
            self._wake_lease.set()

    async def _lease_loop(self) -> None:
        ext = self.lease_extension_s
        tick_s = min(1.0, ext / 10)
        # Extend when less than this is left: a round trip or two, with room for retries.
        margin_s = max(3.0, ext / 3)
        while True:
            self._wake_lease = anyio.Event()
            with anyio.move_on_after(tick_s):
                await self._wake_lease.wait()
            now = time.monotonic()
            due: list[_Held] = []
            for held in list(self._held.values()):
                if now - held.received_at >= self.max_lease_s:
                    # Let it lapse and be redelivered; stop counting it against capacity.
                    self.lease_expired += 1
                    log.warning("pubsub_max_lease_reached", extra={"max_lease_s": self.max_lease_s})
                    self._forget(held)
                elif held.lease_until - now <= margin_s:
                    due.append(held)
            if not due:
                continue
            sent_at = time.monotonic()
            try:
                refused = set(
                    await self.client.modify_ack_deadline(
                        self.subscription, [h.ack_id for h in due], ext
                    )
                )
            except PubSubError as exc:
                self.modack_failures += 1
                log.warning("pubsub_lease_extension_failed", extra={"status": exc.status})
                continue
            for held in due:
                if held.ack_id not in refused:
                    held.lease_until = sent_at + ext
            self.extended += len(due)

    async def _ack_loop(self) -> None:
        while True:
            await self._wake_acker.wait()
            self._wake_acker = anyio.Event()
            if self.ack_window_s > 0:
                await anyio.sleep(self.ack_window_s)
            # Whatever the outcome, the waiting jobs get their answer: a cancelled send
            # would leave them waiting forever, so it is shielded (and bounded).
            with anyio.CancelScope(shield=True):
                await self._send_settlements()

    async def _send_settlements(self) -> None:
        acks, self._acks = self._acks, []
        nacks, self._nacks = self._nacks, []
        for batch, is_ack in ((acks, True), (nacks, False)):
            if not batch:
                continue
            ids = [ack_id for ack_id, _ in batch]
            error: Exception | None = None
            with anyio.move_on_after(self.client.retry_deadline_s + 5) as scope:
                try:
                    if is_ack:
                        await self.client.acknowledge(self.subscription, ids)
                    else:
                        await self.client.modify_ack_deadline(self.subscription, ids, 0)
                except PubSubError as exc:
                    error = exc
            if scope.cancelled_caught:
                error = PubSubError(0, "DEADLINE_EXCEEDED", "ack/nack did not complete in time")
            if error is None:
                if is_ack:
                    self.acked += len(ids)
                else:
                    self.nacked += len(ids)
            else:
                if is_ack:
                    self.ack_failures += 1
                else:
                    self.modack_failures += 1
                log.warning(
                    "pubsub_ack_failed" if is_ack else "pubsub_nack_failed",
                    extra={"ids": len(ids), "error": str(error)[:200]},
                )
            for _, future in batch:
                if not future.done():
                    future.set_result(error)

    async def _nack_now(self, ack_ids: list[str]) -> None:
        try:
            await self.client.modify_ack_deadline(self.subscription, ack_ids, 0)
            self.nacked += len(ack_ids)
        except PubSubError as exc:
            self.modack_failures += 1
            log.warning("pubsub_nack_failed", extra={"ids": len(ack_ids), "error": str(exc)[:200]})

    async def aclose(self) -> None:
        """Stop pulling; hand back everything not settled; send acks still waiting.

        Called once the consumer is done with its deliveries (the pipeline has returned),
        so whatever is still held, handed out or not, will not be finished here.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._capacity_changed()
        unsettled = [h for h in self._held.values() if not h.settling]
        for held in unsettled:
            held.settling = True
        self._ready.clear()
        try:
            await self._send_settlements()
            if unsettled:
                await self._nack_now([h.ack_id for h in unsettled])
                log.info("pubsub_returned_on_close", extra={"messages": len(unsettled)})
            for held in unsettled:
                self._forget(held)
        finally:
            if self._owns_client:
                await self.client.aclose()
        log.info(
            "pubsub_source_closed",
            extra={
                "received": self.received,
                "acked": self.acked,
                "nacked": self.nacked,
                "extended": self.extended,
            },
        )
