"""Pub/Sub messages <-> jobs and records, and the names of subscriptions and topics.

A job is a message's ``data`` (base64 of a JSON job or a bare URI); a message without
data may carry the job in its attributes (``image_uri``, optional ``id`` and ``prompt``).
A record is published as its JSON in ``data``, with ``id``, ``status`` and ``image_uri``
as attributes so subscribers can filter without decoding it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from ..errors import ConfigError
from ..protocols import Record
from ..tracing import traceparent_of

__all__ = [
    "MAX_ATTRIBUTE_BYTES",
    "delivery_fields",
    "encode_data",
    "parse_subscription",
    "parse_topic",
    "record_message",
    "uses_pubsub",
]

_SUBSCRIPTION_RE = re.compile(r"^projects/[^/\s]+/subscriptions/[^/\s:]+$")
_TOPIC_RE = re.compile(r"^projects/[^/\s]+/topics/[^/\s:]+$")
# The service refuses attribute values over 1 KiB (a long data: URI); the record in
# ``data`` still carries it.
MAX_ATTRIBUTE_BYTES = 1024


def uses_pubsub(*specs: str) -> bool:
    return any(spec.startswith("pubsub:") for spec in specs)


def parse_subscription(rest: str, key: str = "worker.source") -> str:
    if not _SUBSCRIPTION_RE.match(rest):
        raise ConfigError(
            key, f"pubsub:{rest} is not pubsub:projects/PROJECT/subscriptions/SUBSCRIPTION"
        )
    return rest


def parse_topic(rest: str, key: str = "worker.sink") -> str:
    if not _TOPIC_RE.match(rest):
        raise ConfigError(key, f"pubsub:{rest} is not pubsub:projects/PROJECT/topics/TOPIC")
    return rest


def encode_data(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def delivery_fields(
    message: dict[str, Any], subscription: str, delivery_attempt: Any
) -> tuple[bytes, str | None, dict[str, Any], str | None]:
    """A received message (pull or push) -> (job bytes, default id, source info, the
    publisher's traceparent)."""
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
    return (
        data,
        message_id,
        info,
        traceparent_of(attributes if isinstance(attributes, dict) else None),
    )


def record_message(record: Record) -> dict[str, Any]:
    """A record as a publish request's message (``data`` base64, filterable attributes)."""
    attributes: dict[str, str] = {}
    for key in ("id", "status", "image_uri"):
        value = record.get(key)
        if value is None:
            continue
        text = str(value)
        if len(text.encode()) <= MAX_ATTRIBUTE_BYTES:
            attributes[key] = text
    traceparent = record.get("traceparent")
    if isinstance(traceparent, str) and traceparent:
        # The job's trace goes on with the result (google-cloud-pubsub reads the first).
        attributes["googclient_traceparent"] = traceparent
        attributes["traceparent"] = traceparent
    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return {"data": encode_data(data), "attributes": attributes}
