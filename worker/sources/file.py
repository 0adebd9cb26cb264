"""Jobs from a file or stdin, one per line.

Reads in 64 KiB chunks on a worker thread and splits lines on the event loop: a thread hop
per chunk, not per line, and only as far ahead as the pipeline asks (it pulls the next
job when it has room), so memory stays flat on a file of millions of lines.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, AsyncIterator
from typing import BinaryIO

import anyio
import anyio.to_thread

from .memory import LocalDelivery

__all__ = ["FileSource", "StdinSource"]

CHUNK_BYTES = 65_536


async def _lines(read: BinaryIO) -> AsyncIterator[bytes]:
    tail = b""
    while True:
        chunk = await anyio.to_thread.run_sync(read.read, CHUNK_BYTES)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if line.strip():
                yield line.rstrip(b"\r")
    if tail.strip():
        yield tail.rstrip(b"\r")


class FileSource:
    trusted = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"file:{path}"

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        try:
            handle = await anyio.to_thread.run_sync(open, self.path, "rb")
        except OSError as exc:
            raise SourceUnavailable(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            async for line in _lines(handle):
                yield LocalDelivery(line)
        finally:
            handle.close()

    async def aclose(self) -> None:
        return None


class StdinSource:
    trusted = True
    name = "stdin:"

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        async for line in _lines(sys.stdin.buffer):
            yield LocalDelivery(line)

    async def aclose(self) -> None:
        return None


class SourceUnavailable(Exception):
    """The source itself cannot be read (not a job's fault)."""
