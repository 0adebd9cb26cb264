"""Sink ``pubsub:projects/P/topics/T``: each record published as one message.

:meth:`PubSubSink.write` returns only when every publish request of the batch has
succeeded, so the jobs behind it may be acked. A publish retried after a lost answer may
publish twice: consumers dedupe on ``id``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError, PubSubError
from ..protocols import Record, SinkBase
from .client import PubSubClient
from .messages import record_message

__all__ = ["PubSubSink"]


class PubSubSink(SinkBase):
    """Publishes records to a topic through the process's client (which it does not own)."""

    def __init__(self, topic: str, client: PubSubClient, *, key: str = "worker.sink") -> None:
        self.topic = topic
        self.name = f"pubsub:{topic}"
        self.client = client
        self._key = key
        self.published = 0

    async def prepare(self) -> None:
        """A topic that does not exist is a start-up error. A publisher-only role may not
        read the topic: then the first publish will tell."""
        try:
            await self.client.get_topic(self.topic)
        except PubSubError as exc:
            if exc.status == 404:
                raise ConfigError(self._key, f"{self.name} does not exist") from None

    async def write(self, records: Sequence[Record]) -> None:
        messages = [record_message(r) for r in records]
        ids = await self.client.publish(self.topic, messages)
        if len(ids) != len(messages):
            raise RuntimeError(f"{self.name}: {len(ids)} message ids for {len(messages)} records")
        self.published += len(ids)
