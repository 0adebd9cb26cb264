"""Job sources, chosen by the ``scheme:`` prefix of ``--source``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..protocols import Source
from .file import FileSource, StdinSource
from .memory import MemorySource

if TYPE_CHECKING:
    from ..pubsub import PubSubClient
    from ..settings import Settings

__all__ = ["FileSource", "MemorySource", "StdinSource", "open_source"]


def open_source(
    spec: str, *, settings: Settings | None = None, pubsub: PubSubClient | None = None
) -> Source:
    """``settings`` tunes queue sources; ``pubsub`` is the process's shared Pub/Sub client
    (without one, a Pub/Sub source makes and owns its own)."""
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(
            "worker.source", f"{spec!r} has no scheme; use file:PATH, stdin: or pubsub:..."
        )
    if scheme == "file":
        if not rest:
            raise ConfigError("worker.source", "file: needs a path (file:jobs.jsonl)")
        return FileSource(rest)
    if scheme == "stdin":
        return StdinSource()
    if scheme == "pubsub":
        return _pubsub_source(rest, settings, pubsub)
    raise ConfigError(
        "worker.source",
        f"unknown source scheme {scheme!r}; use file:PATH, stdin: or pubsub:projects/P/subscriptions/S",
    )


def _pubsub_source(rest: str, settings: Settings | None, client: PubSubClient | None) -> Source:
    from ..pubsub import PubSubClient
    from ..settings import Settings
    from .pubsub import PubSubSource, parse_subscription

    subscription = parse_subscription(rest)
    s = settings or Settings()
    p = s.pubsub
    owns = client is None
    if client is None:
        client = PubSubClient.from_environment(
            request_timeout_s=p.request_timeout_s, retry_deadline_s=p.retry_deadline_s
        )
    in_flight = s.worker.jobs_in_flight_limit
    return PubSubSource(
        subscription,
        client,
        max_outstanding_messages=p.max_outstanding_messages or in_flight + max(1, in_flight // 4),
        max_outstanding_bytes=p.max_outstanding_bytes,
        lease_extension_s=p.lease_extension_s,
        max_lease_s=p.max_lease_s,
        ack_window_s=p.ack_window_s,
        owns_client=owns,
    )
