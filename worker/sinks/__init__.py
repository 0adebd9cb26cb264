"""Result and dead-letter sinks, chosen by the ``scheme:`` prefix of ``--sink``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..protocols import Sink
from .batch import BatchWriter, SinkFailed
from .jsonl import JsonlSink
from .stdout import StdoutSink

if TYPE_CHECKING:
    from ..pubsub import PubSubClient
    from ..settings import Settings

__all__ = [
    "BatchWriter",
    "JsonlSink",
    "SinkFailed",
    "StdoutSink",
    "default_dead_letter",
    "open_sink",
]


def open_sink(
    spec: str,
    *,
    key: str = "worker.sink",
    settings: Settings | None = None,
    pubsub: PubSubClient | None = None,
) -> Sink:
    """``pubsub`` is the process's shared Pub/Sub client (without one, a Pub/Sub sink
    makes and owns its own)."""
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(key, f"{spec!r} has no scheme; use jsonl:PATH or stdout:")
    if scheme == "jsonl":
        if not rest:
            raise ConfigError(key, "jsonl: needs a path (jsonl:out/results.jsonl)")
        return JsonlSink(rest)
    if scheme == "stdout":
        return StdoutSink()
    if scheme == "pubsub":
        from ..pubsub import PubSubClient
        from .pubsub import PubSubSink, parse_topic

        topic = parse_topic(rest, key)
        if pubsub is not None:
            return PubSubSink(topic, pubsub)
        from ..settings import PubSubSettings

        p = settings.pubsub if settings is not None else PubSubSettings()
        client = PubSubClient.from_environment(
            request_timeout_s=p.request_timeout_s, retry_deadline_s=p.retry_deadline_s
        )
        return PubSubSink(topic, client, owns_client=True)
    raise ConfigError(
        key,
        f"unknown sink scheme {scheme!r}; use jsonl:PATH, stdout: or pubsub:projects/P/topics/T",
    )


def default_dead_letter(sink_spec: str) -> str:
    """``jsonl:out/results.jsonl`` -> ``jsonl:out/results.dead-letter.jsonl``; else the sink itself."""
    scheme, _, rest = sink_spec.partition(":")
    if scheme == "jsonl" and rest:
        path = Path(rest)
        stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
        return f"jsonl:{path.with_name(stem + '.dead-letter.jsonl')}"
    return sink_spec
