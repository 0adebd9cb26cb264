"""Sinks and group commit: durable JSONL, start-up checks, batches shared by many jobs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from worker.errors import ConfigError, SinkFailed
from worker.protocols import Record, SinkBase
from worker.settings import Settings
from worker.sinks import BatchWriter, JsonlSink, default_dead_letter, open_sink, open_sinks

from .helpers import read_jsonl


async def test_jsonl_appends_and_reads_back_ids(tmp_path: Path) -> None:
    sink = JsonlSink(str(tmp_path / "out" / "r.jsonl"))
    await sink.prepare()
    await sink.write([{"id": "a", "v": "ü"}, {"id": "b"}])
    await sink.write([{"id": "c"}])
    await sink.aclose()
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "r.jsonl")] == ["a", "b", "c"]
    assert await JsonlSink(str(tmp_path / "out" / "r.jsonl")).existing_ids() == {"a", "b", "c"}


async def test_a_torn_last_line_is_ignored_and_not_glued_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "desc')  # killed mid-write
    sink = JsonlSink(str(path))
    assert await sink.existing_ids() == {"a"}
    await sink.prepare()
    await sink.write([{"id": "c"}])
    await sink.aclose()
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[-1]) == {"id": "c"}
    assert await JsonlSink(str(path)).existing_ids() == {"a", "c"}


async def test_a_sink_that_cannot_be_written_is_a_start_up_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sink = JsonlSink(str(blocker / "sub" / "r.jsonl"), key="worker.dead_letter")
    with pytest.raises(ConfigError) as raised:
        await sink.prepare()
    assert raised.value.key == "worker.dead_letter"
    assert "cannot write" in str(raised.value) and "a-file" in str(raised.value)


def test_sink_specs() -> None:
    assert default_dead_letter("jsonl:out/results.jsonl") == "jsonl:out/results.dead-letter.jsonl"
    assert default_dead_letter("jsonl:out/results") == "jsonl:out/results.dead-letter.jsonl"
    assert default_dead_letter("stdout:") == "stdout:"
    with pytest.raises(ConfigError, match=r"worker\.sink: unknown sink scheme 's3'"):
        open_sink("s3:bucket")
    with pytest.raises(ConfigError, match="has no scheme"):
        open_sink("results.jsonl")
    with pytest.raises(ConfigError, match=r"pubsub:projects/PROJECT/topics/TOPIC"):
        open_sink("pubsub:projects/p/subscriptions/s")
    s = Settings()
    s.worker.sink = "jsonl:x.jsonl"
    sink, dead = open_sinks(s, None)
    assert sink.name == "jsonl:x.jsonl" and dead.name == "jsonl:x.dead-letter.jsonl"
    s.worker.sink = "stdout:"
    sink, dead = open_sinks(s, None)
    assert sink is dead


class _GatedSink(SinkBase):
    """Each write waits until the test opens the gate; records what it was given."""

    name = "gated"

    def __init__(self, concurrent: int = 1) -> None:
        self.max_concurrent_writes = concurrent
        self.batches: list[list[str]] = []
        self.in_progress = 0
        self.most_in_progress = 0
        self.gate = anyio.Event()
        self.fail = False

    async def write(self, records: Sequence[Record]) -> None:
        self.in_progress += 1
        self.most_in_progress = max(self.most_in_progress, self.in_progress)
        try:
            await self.gate.wait()
            if self.fail:
                raise OSError("disk full")
            self.batches.append([r["id"] for r in records])
        finally:
            self.in_progress -= 1


async def test_records_that_arrive_during_a_write_share_the_next_one() -> None:
    sink = _GatedSink()
    writer = BatchWriter(sink)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        async with anyio.create_task_group() as jobs:
            jobs.start_soon(writer.put, {"id": "first"})
            await wait_all_tasks_blocked()  # "first" is being written
            for i in range(5):
                jobs.start_soon(writer.put, {"id": f"j{i}"})
            await wait_all_tasks_blocked()
            assert sink.batches == []  # nobody returns before their write is done
            sink.gate.set()
        tg.cancel_scope.cancel()
    assert sink.batches == [["first"], ["j0", "j1", "j2", "j3", "j4"]]
    assert (writer.batches, writer.records) == (2, 6)


async def test_a_failed_write_fails_every_job_in_its_batch() -> None:
    sink = _GatedSink()
    sink.fail = True
    sink.gate.set()
    writer = BatchWriter(sink)
    failures: list[str] = []

    async def put(i: int) -> None:
        try:
            await writer.put({"id": str(i)})
        except SinkFailed as exc:
            failures.append(str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        async with anyio.create_task_group() as jobs:
            for i in range(3):
                jobs.start_soon(put, i)
        tg.cancel_scope.cancel()
    assert len(failures) == 3
    assert all("gated: OSError: disk full" in f for f in failures)


@pytest.mark.parametrize("concurrent", [1, 3])
async def test_a_sink_gets_as_many_writes_at_once_as_it_declares(concurrent: int) -> None:
    sink = _GatedSink(concurrent)
    writer = BatchWriter(sink)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        async with anyio.create_task_group() as jobs:
            for i in range(6):
                jobs.start_soon(writer.put, {"id": str(i)})
                await wait_all_tasks_blocked()  # one batch per record
            assert sink.in_progress == concurrent
            sink.gate.set()
        tg.cancel_scope.cancel()
    assert sink.most_in_progress == concurrent
    assert sorted(i for batch in sink.batches for i in batch) == [str(i) for i in range(6)]
