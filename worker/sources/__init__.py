"""Job sources, chosen by the ``scheme:`` prefix of ``--source``."""

from __future__ import annotations

from ..errors import ConfigError
from ..protocols import Source
from .file import FileSource, StdinSource
from .memory import MemorySource

__all__ = ["FileSource", "MemorySource", "StdinSource", "open_source"]


def open_source(spec: str) -> Source:
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
    raise ConfigError("worker.source", f"unknown source scheme {scheme!r}; use file:PATH or stdin:")
