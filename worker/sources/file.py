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

from ..errors import ConfigError
from ..protocols import SourceBase
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


class FileSource(SourceBase):
    """``file:PATH``: one job per non-blank line, read once, front to back.

    Trusted (the operator's own input). Opened by :meth:`prepare`, so a missing or
    unreadable file is a one-line start-up error, not a failure mid-run. Nothing is
    handed back: a job not finished is simply not in the sink, and a rerun resumes it.
    """

    trusted = True

    def __init__(self, path: str, *, key: str = "worker.source") -> None:
        self.path = path
        self.name = f"file:{path}"
        self._key = key
        self._handle: BinaryIO | None = None

    async def prepare(self) -> None:
        try:
            self._handle = await anyio.to_thread.run_sync(open, self.path, "rb")
        except IsADirectoryError:
            raise ConfigError(
                self._key, f"{self.path} is a directory, not a file of jobs"
            ) from None
        except OSError as exc:
            raise ConfigError(
                self._key, f"cannot read {self.path}: {exc.strerror} (file:PATH names a JSONL file)"
            ) from None

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        if self._handle is None:
            await self.prepare()
        handle, self._handle = self._handle, None
        assert handle is not None
        try:
            async for line in _lines(handle):
                yield LocalDelivery(line)
        finally:
            handle.close()

    async def aclose(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()


class StdinSource(SourceBase):
    """``stdin:``: one job per line until end of input. Trusted, like a file."""

    trusted = True
    name = "stdin:"

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        async for line in _lines(sys.stdin.buffer):
            yield LocalDelivery(line)
