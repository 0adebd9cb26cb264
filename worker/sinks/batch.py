"""Group commit: many jobs' records share one sink write (one fsync, one publish).

Jobs call :meth:`BatchWriter.put` and wait; a writer task takes everything pending,
writes it, and wakes the waiters. While one write is under way the next batch gathers, so
batches grow with load and no timer is needed. A sink that declares
``max_concurrent_writes > 1`` (its write waits on something batches share, such as an
object that is finalised when full or old) gets that many writes under way at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import anyio

from ..errors import RecordRejected, SinkFailed
from ..protocols import Record, Sink

__all__ = ["BatchWriter"]


class BatchWriter:
    """Feeds one sink. Owns the batching and the waiting, never the records' content:
    it does not reorder, drop or retry; a failed write fails every job in its batch
    with :class:`~worker.errors.SinkFailed` (the pipeline then hands them back)."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_batch: int = 1000,
        on_write: Callable[[int, float], None] | None = None,
    ) -> None:
        self.sink = sink
        self.max_batch = max_batch
        self._pending: list[tuple[Record, asyncio.Future[None]]] = []
        self._wakeup = anyio.Event()
        self._on_write = on_write
        self._writes = anyio.Semaphore(max(1, sink.max_concurrent_writes))
        self.batches = 0
        self.records = 0

    async def put(self, record: Record) -> None:
        """Return once ``record`` is durable; raise :class:`SinkFailed` if the batch was
        not stored, :class:`RecordRejected` if the sink refused this record for good."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wakeup.set()
        await future

    async def run(self) -> None:
        """The writer task; runs until cancelled, and finishes the batches it started."""
        async with anyio.create_task_group() as writes:
            while True:
                if not self._pending:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                await self._writes.acquire()
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                if not batch:
                    self._writes.release()
                    continue
                writes.start_soon(self._write, batch)

    async def _write(self, batch: list[tuple[Record, asyncio.Future[None]]]) -> None:
        # Once taken, a batch is written even if we are being cancelled: the jobs in it
        # are waiting on this write to ack.
        try:
            with anyio.CancelScope(shield=True):
                await self._write_batch(batch)
        finally:
            self._writes.release()

    async def _write_batch(self, batch: list[tuple[Record, asyncio.Future[None]]]) -> None:
        started = time.perf_counter()
        try:
            rejected = await self.sink.write([record for record, _ in batch])
        except Exception as exc:
            error = SinkFailed(f"{self.sink.name}: {type(exc).__name__}: {exc}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.batches += 1
        self.records += len(batch)
        if self._on_write is not None:
            self._on_write(len(batch), time.perf_counter() - started)
        refused = {r.index: r.reason for r in rejected or ()}
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            if i in refused:
                future.set_exception(RecordRejected(refused[i]))
            else:
                future.set_result(None)
