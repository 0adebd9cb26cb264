"""Sink ``pubsub:projects/P/topics/T``: each record published as one message.

``data`` is the record's JSON; attributes ``id``, ``status`` and ``image_uri`` let
subscribers filter without decoding it. :meth:`PubSubSink.write` returns only when every
publish request of the batch has succeeded, so the jobs behind it may be acked. A publish
retried after a lost answer may publish twice: consumers dedupe on ``id``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ..errors import ConfigError
from ..protocols import Record
from ..pubsub import PubSubClient, encode_data

__all__ = ["PubSubSink", "parse_topic"]

_TOPIC_RE = re.compile(r"^projects/[^/\s]+/topics/[^/\s:]+$")
MAX_ATTRIBUTE_BYTES = 1024


def parse_topic(rest: str, key: str = "worker.sink") -> str:
    if not _TOPIC_RE.match(rest):
        raise ConfigError(key, f"pubsub:{rest} is not pubsub:projects/PROJECT/topics/TOPIC")
    return rest


def _attributes(record: Record) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("id", "status", "image_uri"):
        value = record.get(key)
        if value is None:
            continue
        text = str(value)
        # The service refuses attribute values over 1 KiB (a long data: URI); the record
        # in ``data`` still carries it.
        if len(text.encode()) <= MAX_ATTRIBUTE_BYTES:
            out[key] = text
    return out


class PubSubSink:
    def __init__(self, topic: str, client: PubSubClient, *, owns_client: bool = False) -> None:
        self.topic = topic
        self.name = f"pubsub:{topic}"
        self.client = client
        self._owns_client = owns_client
        self.published = 0

    async def write(self, records: Sequence[Record]) -> None:
        messages = [
            {
                "data": encode_data(
                    json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode()
                ),
                "attributes": _attributes(r),
            }
            for r in records
        ]
        ids = await self.client.publish(self.topic, messages)
        if len(ids) != len(messages):
            raise RuntimeError(f"{self.name}: {len(ids)} message ids for {len(messages)} records")
        self.published += len(ids)

    async def existing_ids(self) -> set[str]:
        return set()  # a topic cannot be read back

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()
