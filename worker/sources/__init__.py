"""Job sources, chosen by the ``scheme:`` prefix of ``--source``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..protocols import Source
from .file import FileSource, StdinSource
from .memory import LocalDelivery, MemorySource

if TYPE_CHECKING:
    from ..pubsub import PubSubClient
    from ..settings import Settings

__all__ = ["FileSource", "LocalDelivery", "MemorySource", "StdinSource", "open_source"]

# Messages held with no configured cap: the pipeline's capacity decides (set_capacity).
UNCAPPED_MESSAGES = 1_000_000
SOURCE_SCHEMES = "file:PATH, stdin: or pubsub:projects/P/subscriptions/S"


def open_source(
    spec: str,
    *,
    settings: Settings,
    pubsub: PubSubClient | None = None,
    key: str = "worker.source",
) -> Source:
    """A source for ``spec`` (nothing is opened yet: see ``Source.prepare``). ``pubsub``
    is the process's Pub/Sub client, which a ``pubsub:`` source needs."""
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(key, f"{spec!r} has no scheme; use {SOURCE_SCHEMES}")
    if scheme == "file":
        if not rest:
            raise ConfigError(key, "file: needs a path (file:jobs.jsonl)")
        return FileSource(rest, key=key)
    if scheme == "stdin":
        return StdinSource()
    if scheme == "pubsub":
        from ..pubsub import PubSubSource, parse_subscription

        subscription = parse_subscription(rest, key)
        if pubsub is None:
            raise ValueError("a pubsub: source needs the process's Pub/Sub client")
        p = settings.pubsub
        return PubSubSource(
            subscription,
            pubsub,
            # 0: follow what the pipeline can take (set_capacity), with no cap of its own.
            max_outstanding_messages=p.max_outstanding_messages or UNCAPPED_MESSAGES,
            max_outstanding_bytes=p.max_outstanding_bytes,
            lease_extension_s=p.lease_extension_s,
            max_lease_s=p.max_lease_s,
            ack_window_s=p.ack_window_s,
            key=key,
        )
    raise ConfigError(key, f"unknown source scheme {scheme!r}; use {SOURCE_SCHEMES}")
