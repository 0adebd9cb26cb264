"""Records as JSON lines on standard output (the only thing that ever goes there)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import anyio.to_thread

from ..protocols import Record, SinkBase
from .jsonl import encode_records

__all__ = ["StdoutSink"]


class StdoutSink(SinkBase):
    """``stdout:``: records as JSON lines on standard output (logs go to stderr)."""

    name = "stdout:"

    def _write(self, data: bytes) -> None:
        out = sys.stdout.buffer
        out.write(data)
        out.flush()

    async def write(self, records: Sequence[Record]) -> None:
        # A full pipe blocks the write: keep that off the event loop.
        await anyio.to_thread.run_sync(self._write, encode_records(records))
