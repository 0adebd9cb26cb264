"""Acks and nacks in batches, each confirmed before the job that asked is told.

Settlements gathered for ``window_s`` go out as one acknowledge and one
modifyAckDeadline 0 (nack) request (split at 1,000 ids by the client, retried on
transient errors). A job's ``ack()`` returns only once Pub/Sub took its ack, and raises
if it did not; until then the message stays held and its lease extended.
"""

from __future__ import annotations

import asyncio
import logging

import anyio

from ..errors import PubSubError
from ..protocols import SourceCounters
from .client import PubSubClient

__all__ = ["Acker"]

log = logging.getLogger("worker.pubsub.acking")

_Waiting = list[tuple[str, "asyncio.Future[Exception | None]"]]


class Acker:
    """Batches acks and nacks for one subscription."""

    def __init__(
        self,
        client: PubSubClient,
        subscription: str,
        *,
        window_s: float,
        counters: SourceCounters,
    ) -> None:
        self.client = client
        self.subscription = subscription
        self.window_s = window_s
        self.counters = counters
        self._acks: _Waiting = []
        self._nacks: _Waiting = []
        self._wake = anyio.Event()
        self._running = False

    async def settle(self, ack_id: str, *, ack: bool) -> None:
        """Ack (or nack) one message; return once Pub/Sub confirmed it, raise if not."""
        future: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        (self._acks if ack else self._nacks).append((ack_id, future))
        if self._running:
            self._wake.set()
        else:
            await self.flush()
        error = await future
        if error is not None:
            raise error

    async def run(self) -> None:
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                if self.window_s > 0:
                    await anyio.sleep(self.window_s)
                # Whatever the outcome, the waiting jobs get their answer: a cancelled
                # send would leave them waiting forever, so it is shielded (and bounded).
                with anyio.CancelScope(shield=True):
                    await self.flush()
        finally:
            self._running = False

    async def flush(self) -> None:
        """Send every settlement waiting now."""
        acks, self._acks = self._acks, []
        nacks, self._nacks = self._nacks, []
        for batch, is_ack in ((acks, True), (nacks, False)):
            if batch:
                await self._send(batch, is_ack)

    async def _send(self, batch: _Waiting, is_ack: bool) -> None:
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
            error = PubSubError(
                0, "DEADLINE_EXCEEDED", "ack/nack did not complete in time", kind="transient"
            )
        c = self.counters
        if error is None:
            if is_ack:
                c.acked += len(ids)
            else:
                c.nacked += len(ids)
        else:
            if is_ack:
                c.ack_failures += 1
            else:
                c.modack_failures += 1
            log.warning(
                "pubsub_ack_failed" if is_ack else "pubsub_nack_failed",
                extra={"ids": len(ids), "error": str(error)[:200]},
            )
        for _, future in batch:
            if not future.done():
                future.set_result(error)

    async def nack_now(self, ack_ids: list[str]) -> None:
        """Hand messages back at once, nobody waiting (shutdown; a pull nobody will read)."""
        try:
            await self.client.modify_ack_deadline(self.subscription, ack_ids, 0)
            self.counters.nacked += len(ack_ids)
        except PubSubError as exc:
            self.counters.modack_failures += 1
            log.warning("pubsub_nack_failed", extra={"ids": len(ack_ids), "error": str(exc)[:200]})
