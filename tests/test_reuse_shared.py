"""The result store shared between workers and across restarts: one model call per job id
(two in-process workers on one Pub/Sub subscription and one real Redis server), claims of
a dead holder lapsing, and outages that never lose or block a job.

Images are data: URLs or local files, known by their bytes: a gs:// image would make the
worker ask Cloud Storage for the object's metadata, and these tests talk to nothing
beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio

from worker.app import pubsub_session, run_pipeline, runtime
from worker.metrics import Telemetry
from worker.pipeline import Pipeline, RunStats
from worker.pubsub import client_for
from worker.reuse import OUTAGE_SKIP_S
from worker.settings import Settings
from worker.simulator import Simulator
from worker.sinks import JsonlSink, dead_letter_spec, open_sinks
from worker.sources import open_source
from worker.store import RedisStore
from worker.store.redis import DEFAULT_PREFIX

from .fakes.pubsub_emulator import PubSubEmulator
from .fakes.redis_server import RedisServer
from .helpers import EXAMPLES, PROJECT, quick_settings, read_jsonl, wait_until
from .inprocess import FeedSource, job_bytes, metric, run_jobs

PNG = (EXAMPLES / "red-square.png").read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


def base_settings(sim: Simulator, store_uri: str) -> Settings:
    s = quick_settings()
    s.model.base_url = sim.vertex_base_url()  # Vertex-shaped: data: passes through
    s.retry.deadline_s = 20.0
    s.worker.concurrency = 4
    s.store.uri = store_uri
    return s


def calls(sim: Simulator) -> int:
    return sim.stats().requests


# -- exactly once per job id -----------------------------------------------------------------


SUB = f"projects/{PROJECT}/subscriptions/work"
RESULTS = f"projects/{PROJECT}/topics/results"
FAILED = f"projects/{PROJECT}/topics/failed"


async def pubsub_worker(
    settings: Settings, telemetry: Telemetry, started: list[Pipeline]
) -> RunStats:
    """``worker run`` on the subscription, in this process, until its pipeline is drained."""
    w = settings.worker
    pubsub = client_for(settings, w.source, w.sink, dead_letter_spec(settings))
    source = open_source(w.source, settings=settings, pubsub=pubsub)
    sink, dead = open_sinks(settings, pubsub)
    async with runtime(settings) as rt, pubsub_session(pubsub, rt):
        return await run_pipeline(
            rt,
            source,
            sink,
            dead,
            resume=False,
            handle_signals=False,
            on_start=started.append,
            telemetry=telemetry,
        )


async def test_a_duplicated_message_is_one_model_call_across_two_workers(
    emu: PubSubEmulator,
    sim: Simulator,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emu.host_port)
    emu.create_topic(PROJECT, "results")
    emu.create_topic(PROJECT, "failed")
    settings = base_settings(sim, redis_server.url)
    settings.worker.source = f"pubsub:{SUB}"
    settings.worker.sink = f"pubsub:{RESULTS}"
    settings.worker.dead_letter = f"pubsub:{FAILED}"
    # Each worker holds one message at most: while one is busy with the first delivery,
    # the duplicate can only go to the other.
    settings.pubsub.max_outstanding_messages = 1
    settings.validate()
    # Hold every model call (429, which never uses up a job's attempts) until both
    # deliveries are inside a worker: then the two really overlap, whoever pulled first.
    sim.config.rate_limit_rps = 0.0
    sim.config.rate_burst = 1.0
    sim.config.rate_initial = 0.0
    sim.config.retry_after_s = 0.02

    telemetry = {name: Telemetry(process_metrics=False) for name in ("a", "b")}
    started: dict[str, list[Pipeline]] = {name: [] for name in telemetry}
    async with anyio.create_task_group() as tg:
        for name in telemetry:
            tg.start_soon(pubsub_worker, settings, telemetry[name], started[name])
        await wait_until(lambda: all(started.values()), 10, "both workers running")
        pipelines = [found[0] for found in started.values()]

        job = job_bytes({"id": "dup-1", "image_uri": DATA_URL})
        emu.publish(PROJECT, "jobs", job)
        emu.publish(PROJECT, "jobs", job)
        await wait_until(
            lambda: [p.stats.received for p in pipelines] == [1, 1], 10, "a delivery each"
        )
        assert sim.stats().by_status.get(200, 0) == 0
        sim.config.rate_limit_rps = None  # the quota is back: the holder's call goes through

        await wait_until(lambda: emu.acked(PROJECT, "work") == 2, 15, "both deliveries acked")
        await wait_until(
            lambda: len(emu.messages_on_topic(PROJECT, "results")) == 2, 5, "two results"
        )
        for p in pipelines:
            p.drain()

    assert sim.stats().by_status.get(200, 0) == 1  # one answer paid for
    assert set(sim.stats().by_status) <= {200, 429}
    assert emu.messages_on_topic(PROJECT, "failed") == []
    assert emu.pending(PROJECT, "work") == 0 and emu.outstanding(PROJECT, "work") == 0
    first, second = emu.messages_on_topic(PROJECT, "results")
    # The second delivery re-emits the very record the first one wrote, byte for byte
    # (a consumer that hashes records to drop duplicates sees one).
    assert first["data"] == second["data"]
    assert first["attributes"] == second["attributes"]
    record = json.loads(first["data"])
    assert record["id"] == "dup-1" and record["status"] == "ok" and record["cached"] is False
    assert record["image_uri"] == DATA_URL
    assert [p.stats.ok for p in pipelines] == [1, 1]
    suppressed = [metric(t, "worker_duplicates_suppressed_total") for t in telemetry.values()]
    assert sorted(-1 if n is None else n for n in suppressed) == [0, 1]
    # Claims are released: nothing is left held in the store.
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.keys(f"{DEFAULT_PREFIX}c:*") == []
        assert await client.exists(f"{DEFAULT_PREFIX}v:rec:dup-1") == 1
    finally:
        await client.aclose()


DEAD_HOLDER = "dead-replica:0"


async def test_a_dead_holders_claim_lapses_and_the_job_then_runs(
    sim: Simulator, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = base_settings(sim, redis_server.url).validate()
    claim_key = f"{DEFAULT_PREFIX}c:job:orphan"
    dead = RedisStore(redis_server.url)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    source = FeedSource()
    stats: list[RunStats] = []

    async def worker() -> None:
        async with runtime(settings) as rt:
            stats.append(
                await run_pipeline(
                    rt,
                    source,
                    JsonlSink(str(tmp_path / "r.jsonl")),
                    JsonlSink(str(tmp_path / "d.jsonl")),
                    resume=False,
                    handle_signals=False,
                )
            )

    try:
        await dead.prepare()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            # A replica took the job and died: its claim is never released or renewed.
            assert await dead.claim("job:orphan", DEAD_HOLDER, lease_s=1.5)
            await source.feed.send(job_bytes({"id": "orphan", "image_uri": DATA_URL}))
            await source.feed.aclose()
            seen_held = False
            with anyio.fail_after(10):
                while not stats:
                    # Calls first, then the claim: the dead replica's claim, held now, was
                    # held then too (once lapsed it never comes back; the key itself does,
                    # as the claim of the worker that took the job over).
                    n = calls(sim)
                    if await client.get(claim_key) == DEAD_HOLDER.encode():
                        assert n == 0, "the model was called while another replica held the job"
                        seen_held = True
                    await anyio.sleep(0.02)
        assert seen_held
    finally:
        await dead.aclose()
        await client.aclose()

    assert stats[0].ok == 1
    assert calls(sim) == 1
    [record] = read_jsonl(tmp_path / "r.jsonl")
    assert record["id"] == "orphan" and record["cached"] is False


# -- outages ---------------------------------------------------------------------------------


async def test_a_redis_outage_never_loses_or_blocks_jobs(
    sim: Simulator, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = base_settings(sim, redis_server.url)
    settings.worker.allow_file_root = str(EXAMPLES)
    settings.validate()
    x, y, z = (str(EXAMPLES / n) for n in ("red-square.png", "green-banner.jpg", "grey-card.png"))
    source = FeedSource()
    telemetry = Telemetry(process_metrics=False)
    started: list[Pipeline] = []
    stats: list[RunStats] = []

    async def worker() -> None:
        async with runtime(settings) as rt:
            stats.append(
                await run_pipeline(
                    rt,
                    source,
                    JsonlSink(str(tmp_path / "r.jsonl")),
                    JsonlSink(str(tmp_path / "d.jsonl")),
                    resume=False,
                    handle_signals=False,
                    on_start=started.append,
                    telemetry=telemetry,
                )
            )

    sent = 0

    async def one(job_id: str, uri: str) -> dict[str, Any]:
        """Send a job and wait for its record (a job blocked by the store fails this)."""
        nonlocal sent
        await source.feed.send(job_bytes({"id": job_id, "image_uri": uri}))
        sent += 1
        p = started[0]
        await wait_until(lambda: p.stats.ok + p.stats.dead_lettered == sent, 10, job_id)
        [record] = [r for r in read_jsonl(tmp_path / "r.jsonl") if r["id"] == job_id]
        return record

    with caplog.at_level(logging.WARNING, logger="worker.reuse"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await wait_until(lambda: bool(started), 10, "the pipeline")
            # Up: the second job reuses the first one's answer.
            assert (await one("up-1", x))["cached"] is False
            assert (await one("up-2", x))["cached"] is True
            assert calls(sim) == 1
            assert caplog.messages == []

            await redis_server.stop()
            # Down: every job is answered by the model, none is lost or held up.
            down = [await one(f"down-{i}", uri) for i, uri in enumerate((y, y, x))]
            assert [r["cached"] for r in down] == [False, False, False]
            assert calls(sim) == 4
            assert "store_unavailable" in caplog.messages
            errors = metric(telemetry, "worker_store_errors_total")
            assert errors is not None and errors > 0
            assert metric(telemetry, "worker_store_hits_total") == 1

            await redis_server.start()  # empty again: nothing was persisted
            # Back: once the worker tries the store again (it skips a failed store for
            # OUTAGE_SKIP_S), reuse works again, on the same connection pool.
            backs = 0
            with anyio.fail_after(OUTAGE_SKIP_S + 10):
                while not (await one(f"back-{backs}", z))["cached"]:
                    backs += 1
                    await anyio.sleep(0.2)
            assert backs >= 1  # the first answer after the outage had to come from the model
            assert calls(sim) == 4 + backs  # each answer until then came from the model
            assert metric(telemetry, "worker_store_hits_total") == 2
            await source.feed.aclose()

    assert stats[0].ok == 6 + backs and stats[0].failed == 0 and stats[0].dead_lettered == 0
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 6 + backs


async def test_a_sqlite_store_survives_a_restart(sim: Simulator, tmp_path: Path) -> None:
    settings = base_settings(sim, f"sqlite:{tmp_path / 'state' / 'store.sqlite'}")
    settings.worker.allow_file_root = str(EXAMPLES)
    settings.validate()
    red, green = str(EXAMPLES / "red-square.png"), str(EXAMPLES / "green-banner.jpg")
    jobs = [{"id": "a", "image_uri": red}, {"id": "b", "image_uri": green}]
    first = await run_jobs(settings, jobs, tmp_path / "r1")
    assert calls(sim) == 2

    # A new process on the same file (and a new sink: nothing to resume from): the same
    # jobs are their records again, and another job on a known image is answered.
    second = await run_jobs(settings, [*jobs, {"id": "c", "image_uri": red}], tmp_path / "r2")
    assert calls(sim) == 2
    assert second.dead == [] and second.stats.ok == 3
    before, after = first.by_id(), second.by_id()
    assert after["a"] == before["a"] and after["b"] == before["b"]
    assert after["c"]["cached"] is True
    assert after["c"]["description"] == before["a"]["description"]
    assert second.metric("worker_duplicates_suppressed_total") == 2
    assert second.metric("worker_store_hits_total") == 1
