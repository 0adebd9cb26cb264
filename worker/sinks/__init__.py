"""Result and dead-letter sinks, chosen by the ``scheme:`` prefix of ``--sink``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..protocols import Sink
from .batch import BatchWriter, SinkFailed
from .jsonl import JsonlSink
from .stdout import StdoutSink

__all__ = [
    "BatchWriter",
    "JsonlSink",
    "SinkFailed",
    "StdoutSink",
    "default_dead_letter",
    "open_sink",
]


def open_sink(spec: str, *, key: str = "worker.sink") -> Sink:
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(key, f"{spec!r} has no scheme; use jsonl:PATH or stdout:")
    if scheme == "jsonl":
        if not rest:
            raise ConfigError(key, "jsonl: needs a path (jsonl:out/results.jsonl)")
        return JsonlSink(rest)
    if scheme == "stdout":
        return StdoutSink()
    raise ConfigError(key, f"unknown sink scheme {scheme!r}; use jsonl:PATH or stdout:")


def default_dead_letter(sink_spec: str) -> str:
    """``jsonl:out/results.jsonl`` -> ``jsonl:out/results.dead-letter.jsonl``; else the sink itself."""
    scheme, _, rest = sink_spec.partition(":")
    if scheme == "jsonl" and rest:
        path = Path(rest)
        stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
        return f"jsonl:{path.with_name(stem + '.dead-letter.jsonl')}"
    return sink_spec
