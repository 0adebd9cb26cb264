"""Source ``pubsub:projects/P/subscriptions/S``: pull with flow control.

:meth:`PubSubSource.run_services` (started by the app in its root task group before the
pipeline reads) runs three kinds of background work:

* pull loops (here), each asking for as many messages as there is free room; room is
  bounded by ``max_outstanding_messages`` and ``max_outstanding_bytes`` over everything
  held (pulled and not yet settled) and follows what the pipeline can take
  (:meth:`~PubSubSource.set_capacity`). Empty answers back off, because an emulator
  answers an empty pull at once where the service would hold it open; failed pulls are
  retried by :mod:`worker.retry` until they succeed or the source stops;
* the :class:`~worker.pubsub.leasing.Leaser`, which keeps leases alive;
* the :class:`~worker.pubsub.acking.Acker`, which sends acks and nacks in batches.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..errors import ConfigError, Kind, PubSubError, SourceUnavailable
from ..protocols import SourceBase, SourceCounters
from ..retry import RetryState
from .acking import Acker
from .client import PubSubClient, unbounded
from .leasing import Held, Leaser
from .messages import delivery_fields

__all__ = ["PubSubDelivery", "PubSubSource"]

log = logging.getLogger("worker.pubsub.pull")

MAX_PULL_MESSAGES = 1000
# The service's minimum; assumed when the subscription cannot be read (a subscriber-only
# role may not get it).
MIN_ACK_DEADLINE_S = 10.0
MAX_EMPTY_BACKOFF_S = 2.0


class PubSubDelivery:
    """One pulled message. ``ack``/``nack`` return once Pub/Sub confirmed them."""

    __slots__ = ("_held", "_source", "data", "default_id", "source_info", "traceparent")
    redeliverable = True

    def __init__(
        self,
        source: PubSubSource,
        held: Held,
        data: bytes,
        default_id: str | None,
        source_info: dict[str, Any],
        traceparent: str | None = None,
    ) -> None:
        self._source = source
        self._held = held
        self.data = data
        self.default_id = default_id
        self.source_info: dict[str, Any] | None = source_info
        self.traceparent = traceparent

    async def ack(self) -> None:
        await self._source._settle(self._held, ack=True)

    async def nack(self) -> None:
        await self._source._settle(self._held, ack=False)


class PubSubSource(SourceBase):
    """A pull subscription as a source of jobs.

    Owns what it holds: flow control, leases and acks. Holds no more than the pipeline
    can take, so the rest of the backlog stays with other replicas; never acks a message
    the pipeline has not acked; hands back (nacks) everything still held on close.
    """

    trusted = False
    redelivers = True

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
        key: str = "worker.source",
    ) -> None:
        self.subscription = subscription
        self.name = f"pubsub:{subscription}"
        self.client = client
        self._key = key
        self.max_messages = max(1, max_outstanding_messages)
        self._configured_max_messages = self.max_messages
        self.max_bytes = max_outstanding_bytes
        # Several pulls in flight only pay when there is room for many messages.
        self.pull_loops = max(1, min(4, self.max_messages // 100))
        # Below this much free room, wait a moment for more rather than pull a handful.
        self._min_pull = max(1, min(100, self.max_messages // 10))
        self._sub_deadline_s = MIN_ACK_DEADLINE_S
        self._held: dict[str, Held] = {}
        self._held_bytes = 0
        self._reserved = 0
        self._ready: deque[PubSubDelivery] = deque()
        self._wake_reader = anyio.Event()
        self._wake_puller = anyio.Event()
        self._stopping = False
        self._services_running = False
        self._prepared = False
        self._closed = False
        self._error: BaseException | None = None
        self._counters = SourceCounters()
        self.leaser = Leaser(
            client,
            subscription,
            self._held,
            extension_s=lease_extension_s,
            max_lease_s=max_lease_s,
            counters=self._counters,
            on_expired=self._forget,
        )
        self.acker = Acker(client, subscription, window_s=ack_window_s, counters=self._counters)
        #: Messages received in all.
        self.received = 0
        self._answered_at: float | None = None

    # -- declared capabilities (see worker.protocols) --------------------------------------

    @property
    def answered_at(self) -> float | None:
        """Monotonic time of the latest pull answer, empty or not."""
        return self._answered_at

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    @property
    def held(self) -> int:
        return len(self._held)

    def set_capacity(self, jobs: int) -> None:
        """The pipeline can take ``jobs`` now (it follows an adaptive model limit): hold
        about that many, a quarter more so the next jobs are already pulled, never more
        than configured. Messages beyond it stay in the subscription for other replicas."""
        self.max_messages = max(1, min(self._configured_max_messages, jobs + max(1, jobs // 4)))
        self._min_pull = max(1, min(100, self.max_messages // 10))
        self._capacity_changed()

    # -- capacity ----------------------------------------------------------------------

    def _free(self) -> int:
        if self._held_bytes >= self.max_bytes:
            return 0
        return max(0, self.max_messages - len(self._held) - self._reserved)

    def _capacity_changed(self) -> None:
        self._wake_puller.set()
        self._wake_puller = anyio.Event()

    def _forget(self, held: Held) -> None:
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

    async def _settle(self, held: Held, *, ack: bool) -> None:
        if held.settling:
            return
        held.settling = True
        try:
            await self.acker.settle(held.ack_id, ack=ack)
        finally:
            # Released only now: until the ack is in, the leaser keeps extending.
            self._forget(held)

    # -- services ------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Read the subscription: its ack deadline, and whether it exists at all."""
        self._prepared = True
        try:
            sub = await self.client.get_subscription(self.subscription)
        except PubSubError as exc:
            if exc.status == 404:
                raise ConfigError(self._key, f"{self.name} does not exist") from None
            # Subscriber-only roles may not read the subscription: assume the minimum.
            log.info("pubsub_subscription_unreadable", extra={"status": exc.status})
            return
        self._answered_at = time.monotonic()
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

    async def run_services(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        if not self._prepared:
            await self.prepare()
        try:
            async with anyio.create_task_group() as tg:
                self._services_running = True
                # Several pulls in flight only pay when there is room for many messages.
                self.pull_loops = max(1, min(4, self.max_messages // 100))
                for _ in range(self.pull_loops):
                    tg.start_soon(self._pull_loop)
                tg.start_soon(self.leaser.run)
                tg.start_soon(self.acker.run)
                task_status.started()
        finally:
            self._services_running = False

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

    def _pull_failed(self, exc: BaseException, kind: Kind, delay: float, state: RetryState) -> None:
        log.warning(
            "pubsub_pull_failed",
            extra={
                "status": exc.status if isinstance(exc, PubSubError) else None,
                "code": exc.code if isinstance(exc, PubSubError) else None,
                "retry_in_s": round(delay, 2),
            },
        )

    async def _pull_loop(self) -> None:
        # Pulls are retried until they succeed or the source stops: a subscription that
        # is unreachable for a while is waited for, not given up on.
        forever = unbounded(self.client.retry)
        empty_backoff_s = 0.0
        while not self._stopping:
            n = await self._reserve()
            if n == 0:
                return
            sent_at = time.monotonic()
            try:
                received = await self.client.pull(
                    self.subscription, n, policy=forever, on_retry=self._pull_failed
                )
            except PubSubError as exc:
                self._fail(SourceUnavailable(f"{self.name}: pull failed: {exc}"))
                return
            finally:
                self._reserved -= n
                self._capacity_changed()
            if self._stopping and received:
                # Nobody will read these: hand them straight back.
                await self.acker.nack_now([m["ackId"] for m in received])
                return
            self._admit(received, sent_at)
            if received:
                empty_backoff_s = 0.0
            else:
                empty_backoff_s = min(MAX_EMPTY_BACKOFF_S, max(0.05, empty_backoff_s * 2))
                await anyio.sleep(empty_backoff_s * random.uniform(0.5, 1.0))

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wake_reader.set()

    def _admit(self, received: list[dict[str, Any]], sent_at: float) -> None:
        self._answered_at = time.monotonic()
        for item in received:
            message = item.get("message")
            if not isinstance(message, dict):
                message = {}
            data, default_id, info, traceparent = delivery_fields(
                message, self.subscription, item.get("deliveryAttempt")
            )
            size = len(data) + sum(
                len(str(k)) + len(str(v)) for k, v in (message.get("attributes") or {}).items()
            )
            held = Held(
                ack_id=str(item["ackId"]),
                size=size,
                received_at=sent_at,
                # Counted from when the pull was sent: never later than the service's clock.
                lease_until=sent_at + self._sub_deadline_s,
            )
            self._held[held.ack_id] = held
            self._held_bytes += size
            self._ready.append(PubSubDelivery(self, held, data, default_id, info, traceparent))
            self.received += 1
        if received:
            self._wake_reader.set()
            self.leaser.wake()

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
        await self.acker.flush()
        if unsettled:
            await self.acker.nack_now([h.ack_id for h in unsettled])
            log.info("pubsub_returned_on_close", extra={"messages": len(unsettled)})
        for held in unsettled:
            self._forget(held)
        c = self._counters
        log.info(
            "pubsub_source_closed",
            extra={
                "received": self.received,
                "acked": c.acked,
                "nacked": c.nacked,
                "extended": c.extended,
            },
        )
