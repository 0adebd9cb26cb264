"""Result and dead-letter sinks, chosen by the ``scheme:`` prefix of ``--sink``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..protocols import Sink
from .batch import BatchWriter
from .jsonl import JsonlSink
from .stdout import StdoutSink

if TYPE_CHECKING:
    from ..pubsub import PubSubClient
    from ..settings import Settings

__all__ = [
    "BatchWriter",
    "JsonlSink",
    "StdoutSink",
    "default_dead_letter",
    "open_sink",
    "open_sinks",
]

SINK_SCHEMES = (
    "jsonl:PATH, stdout:, pubsub:projects/P/topics/T, gs://BUCKET/PREFIX/ "
    "or bq:PROJECT.DATASET.TABLE"
)


def open_sink(
    spec: str,
    *,
    key: str = "worker.sink",
    pubsub: PubSubClient | None = None,
    settings: Settings | None = None,
) -> Sink:
    """A sink for ``spec`` (nothing is opened yet: see ``Sink.prepare``). ``pubsub`` is
    the process's Pub/Sub client, which a ``pubsub:`` sink needs; ``settings`` tunes the
    Cloud Storage and BigQuery sinks."""
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(key, f"{spec!r} has no scheme; use {SINK_SCHEMES}")
    if scheme == "gs":
        from ..settings import Settings
        from .gcs import GcsSink

        return GcsSink(spec, settings=(settings or Settings()).sinks.gcs, key=key)
    if scheme == "bq":
        from ..settings import Settings
        from .bigquery import BigQuerySink

        return BigQuerySink(spec, settings=(settings or Settings()).sinks.bigquery, key=key)
    if scheme == "jsonl":
        if not rest:
            raise ConfigError(key, "jsonl: needs a path (jsonl:out/results.jsonl)")
        return JsonlSink(rest, key=key)
    if scheme == "stdout":
        return StdoutSink()
    if scheme == "pubsub":
        from ..pubsub import PubSubSink, parse_topic

        topic = parse_topic(rest, key)
        if pubsub is None:
            raise ValueError("a pubsub: sink needs the process's Pub/Sub client")
        return PubSubSink(topic, pubsub, key=key)
    raise ConfigError(key, f"unknown sink scheme {scheme!r}; use {SINK_SCHEMES}")


def default_dead_letter(sink_spec: str) -> str:
    """Where dead letters go unless told: ``jsonl:out/results.jsonl`` ->
    ``jsonl:out/results.dead-letter.jsonl``; ``gs://b/results/`` ->
    ``gs://b/results.dead-letter/``; else the sink itself (a BigQuery table holds both:
    ``status`` tells them apart)."""
    scheme, _, rest = sink_spec.partition(":")
    if scheme == "jsonl" and rest:
        path = Path(rest)
        stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
        return f"jsonl:{path.with_name(stem + '.dead-letter.jsonl')}"
    if scheme == "gs" and rest.startswith("//"):
        bucket, _, prefix = rest[2:].partition("/")
        prefix = prefix.rstrip("/")
        return f"gs://{bucket}/{prefix + '.dead-letter' if prefix else 'dead-letter'}/"
    return sink_spec


def dead_letter_spec(settings: Settings) -> str:
    w = settings.worker
    return w.dead_letter or default_dead_letter(w.sink)


def open_sinks(settings: Settings, pubsub: PubSubClient | None) -> tuple[Sink, Sink]:
    """The result sink and the dead-letter sink of ``worker run`` and ``worker serve``
    (the same object when both specs are the same)."""
    spec = settings.worker.sink
    dl_spec = dead_letter_spec(settings)
    sink = open_sink(spec, pubsub=pubsub, settings=settings)
    if dl_spec == spec:
        return sink, sink
    return sink, open_sink(dl_spec, key="worker.dead_letter", pubsub=pubsub, settings=settings)
