"""Append JSON lines to a file; a batch is durable once flushed and fsynced."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread

from ..errors import ConfigError
from ..protocols import Record, SinkBase

__all__ = ["JsonlSink", "add_ids", "encode_records", "read_ids"]


def encode_records(records: Sequence[Record]) -> bytes:
    return b"".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in records
    )


def read_ids(path: Path) -> set[str]:
    """Ids in an existing JSONL file. A torn last line (a crash mid-write) is ignored."""
    ids: set[str] = set()
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return ids
    with handle:
        add_ids(handle, ids)
    return ids


def add_ids(lines: Iterable[bytes], ids: set[str]) -> None:
    """Add the ``id`` of every record among ``lines`` to ``ids``; a line that is not a
    record (blank, torn, not JSON) is passed over."""
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            ids.add(rec["id"])


class JsonlSink(SinkBase):
    """``jsonl:PATH``: records appended as JSON lines; a write is durable once flushed
    and fsynced. Opened by :meth:`prepare`, so a directory that cannot be created or a
    file that cannot be written is a one-line start-up error. Never rewrites a line."""

    def __init__(self, path: str, *, key: str = "worker.sink") -> None:
        self.path = Path(path)
        self.name = f"jsonl:{path}"
        self._key = key
        self._handle: BinaryIO | None = None

    async def prepare(self) -> None:
        if self._handle is not None:
            return
        try:
            self._handle = await anyio.to_thread.run_sync(self._open)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError(
                self._key,
                f"cannot write {self.path}: {exc.filename} is a file, not a directory; "
                "choose a writable path for jsonl:PATH",
            ) from None
        except OSError as exc:
            where = exc.filename or self.path
            raise ConfigError(
                self._key,
                f"cannot write {self.path}: {exc.strerror} ({where}); "
                "choose a writable path for jsonl:PATH",
            ) from None

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab")
        # A crash can leave a torn last line; start ours on a fresh line so it stays whole.
        if handle.tell() > 0:
            with self.path.open("rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    handle.write(b"\n")
        return handle

    def _write(self, data: bytes) -> None:
        if self._handle is None:
            self._handle = self._open()
        self._handle.write(data)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    async def write(self, records: Sequence[Record]) -> None:
        data = encode_records(records)
        await anyio.to_thread.run_sync(self._write, data)

    async def existing_ids(self) -> set[str]:
        return await anyio.to_thread.run_sync(read_ids, self.path)

    async def aclose(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await anyio.to_thread.run_sync(handle.close)
