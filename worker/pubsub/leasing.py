"""Lease extension for pulled messages: a job may take longer than the subscription's
ack deadline, and a message whose deadline lapses is redelivered to someone else.

The first extension comes right after receipt whatever the subscription's deadline, so
it is not the subscription but ``extension_s`` that decides how soon a dead worker's
messages come back. Extensions go out in batches (one modifyAckDeadline per tick for
every message whose lease is running low), until the message is settled or
``max_lease_s`` old: then it is let go and will be redelivered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio

from ..errors import PubSubError
from ..protocols import SourceCounters
from .client import PubSubClient

__all__ = ["Held", "Leaser"]

log = logging.getLogger("worker.pubsub.leasing")


@dataclass(slots=True, eq=False)
class Held:
    """A message pulled and not yet settled (acked or nacked, confirmed)."""

    ack_id: str
    size: int
    received_at: float
    lease_until: float
    #: An ack or nack is on its way: no longer handed out, still extended.
    settling: bool = False


class Leaser:
    """Extends the leases of the messages in ``held`` (the source's table, read only)."""

    def __init__(
        self,
        client: PubSubClient,
        subscription: str,
        held: Mapping[str, Held],
        *,
        extension_s: int,
        max_lease_s: int,
        counters: SourceCounters,
        on_expired: Callable[[Held], None],
    ) -> None:
        self.client = client
        self.subscription = subscription
        self.held = held
        self.extension_s = extension_s
        self.max_lease_s = max_lease_s
        self.counters = counters
        self._on_expired = on_expired
        self._wake = anyio.Event()

    def wake(self) -> None:
        """New messages arrived: extend now (the subscription's deadline may be 10 s)."""
        self._wake.set()

    async def run(self) -> None:
        ext = self.extension_s
        tick_s = min(1.0, ext / 10)
        # Extend when less than this is left: a round trip or two, with room for retries.
        margin_s = max(3.0, ext / 3)
        while True:
            self._wake = anyio.Event()
            with anyio.move_on_after(tick_s):
                await self._wake.wait()
            now = time.monotonic()
            due: list[Held] = []
            for held in list(self.held.values()):
                if now - held.received_at >= self.max_lease_s:
                    # Let it lapse and be redelivered; stop counting it against capacity.
                    self.counters.lease_expired += 1
                    log.warning("pubsub_max_lease_reached", extra={"max_lease_s": self.max_lease_s})
                    self._on_expired(held)
                elif held.lease_until - now <= margin_s:
                    due.append(held)
            if due:
                await self._extend(due, ext)

    async def _extend(self, due: list[Held], ext: int) -> None:
        sent_at = time.monotonic()
        try:
            refused = set(
                await self.client.modify_ack_deadline(
                    self.subscription, [h.ack_id for h in due], ext
                )
            )
        except PubSubError as exc:
            # The next tick tries again, while the leases still have margin left.
            self.counters.modack_failures += 1
            log.warning("pubsub_lease_extension_failed", extra={"status": exc.status})
            return
        for held in due:
            if held.ack_id not in refused:
                held.lease_until = sent_at + ext
        self.counters.extended += len(due)
