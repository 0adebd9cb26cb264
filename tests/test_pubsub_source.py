"""``worker run`` on a Pub/Sub subscription, as a subprocess, against the loopback emulator
(PUBSUB_EMULATOR_HOST) and the simulator. Results and dead letters go to Pub/Sub topics."""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from worker.simulator import Simulator

from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import PROJECT, REPO, publish_jobs, wait_until, worker_env

P = PROJECT
SUB = f"projects/{P}/subscriptions/work"
RESULTS = f"projects/{P}/topics/results"
FAILED = f"projects/{P}/topics/failed"


@pytest.fixture
async def emu() -> AsyncIterator[PubSubEmulator]:
    """Unlike conftest's: no subscription yet (each test makes ``work`` as it needs it),
    and topics for results and dead letters."""
    async with PubSubEmulator() as e:
        for topic in ("jobs", "results", "failed"):
            e.create_topic(P, topic)
        yield e


def records(emu: PubSubEmulator, topic: str = "results") -> list[dict[str, Any]]:
    return [json.loads(m["data"]) for m in emu.messages_on_topic(P, topic)]


def env_for(emu: PubSubEmulator, **settings: str) -> dict[str, str]:
    env = worker_env(PUBSUB_EMULATOR_HOST=emu.host_port)
    env.update({f"WORKER_{k.upper()}": v for k, v in settings.items()})
    return env


def worker_cmd(sim: Simulator, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker", "run",
        "--source", f"pubsub:{SUB}", "--sink", f"pubsub:{RESULTS}", "--dead-letter", f"pubsub:{FAILED}",
        "--base-url", sim.vertex_base_url(), "--auth", "none", "--log-format", "text", "--log-level", "warning",
        *extra,
    ]  # fmt: skip


async def stop(proc: anyio.abc.Process, timeout_s: float = 15.0) -> int:
    proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(timeout_s):
        return await proc.wait()


def distinct_ids(emu: PubSubEmulator, topic: str = "results") -> set[str]:
    return {str(r["id"]) for r in records(emu, topic)}


async def test_end_to_end_every_job_lands_in_the_sink_and_the_subscription_drains(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    emu.create_subscription(P, "work", "jobs", dead_letter_topic="dlq", max_delivery_attempts=5)
    ids = publish_jobs(emu, 1000)
    emu.fail_pull = 3  # the worker must ride out UNAVAILABLE on pull and ack
    emu.fail_ack = 3
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        async with await anyio.open_process(
            worker_cmd(sim, "--concurrency", "50"), env=env_for(emu), stderr=stderr, cwd=REPO
        ) as proc:
            await wait_until(lambda: len(distinct_ids(emu)) >= 1000, 40, "1000 results")
            await wait_until(lambda: emu.acked(P, "work") >= 1000, 10, "1000 acks")
            assert await stop(proc) == 0, err.read_text()
    results = records(emu)
    assert sorted(str(r["id"]) for r in results) == sorted(ids)  # all there, none twice
    assert emu.pending(P, "work") == 0
    assert emu.outstanding(P, "work") == 0
    assert emu.stats["redeliveries"] == 0
    assert records(emu, "failed") == []
    r = results[0]
    assert r["status"] == "ok"
    assert set(r["source"]) == {"subscription", "message_id", "publish_time", "delivery_attempt"}
    assert r["source"]["subscription"] == SUB
    assert r["source"]["delivery_attempt"] == 1
    attrs = emu.messages_on_topic(P, "results")[0]["attributes"]
    assert attrs == {"id": r["id"], "status": "ok", "image_uri": r["image_uri"]}
    # Acks were batched, not one request per job.
    assert emu.stats["ack_requests"] < 200
    assert "done: 1000 ok" in err.read_text()


async def test_flow_control_bounds_what_is_held(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    emu.create_subscription(P, "work", "jobs")
    publish_jobs(emu, 60)
    sim.config.latency_ms = 20
    seen = 0
    async with await anyio.open_process(
        worker_cmd(sim, "--concurrency", "4"),
        env=env_for(emu, pubsub__max_outstanding_messages="6"),
        cwd=REPO,
    ) as proc:

        def done() -> bool:
            nonlocal seen
            seen = max(seen, emu.outstanding(P, "work"))
            return emu.acked(P, "work") >= 60

        await wait_until(done, 30, "60 acks")
        assert await stop(proc) == 0
    assert 4 <= seen <= 6


async def test_sigterm_hands_back_what_is_held_and_exits_0(
    emu: PubSubEmulator, sim: Simulator
) -> None:
    emu.create_subscription(P, "work", "jobs")
    publish_jobs(emu, 400)
    sim.config.latency_ms = 100
    async with await anyio.open_process(
        worker_cmd(sim, "--concurrency", "8"), env=env_for(emu)
    ) as proc:
        await wait_until(lambda: len(distinct_ids(emu)) >= 16, 20, "some results")
        started = time.monotonic()
        assert await stop(proc) == 0
        assert time.monotonic() - started < 5
    # Nothing left leased to a dead process: what was not done is available again now,
    # not after a deadline.
    assert emu.outstanding(P, "work") == 0
    acked = emu.acked(P, "work")
    assert acked + emu.pending(P, "work") == 400
    assert len(distinct_ids(emu)) == acked  # acked only after the sink took it
    assert emu.stats["nacks"] > 0


async def test_sigkill_then_restart_loses_nothing(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    emu.create_subscription(P, "work", "jobs")
    ids = publish_jobs(emu, 300)
    sim.config.latency_ms = 30
    env = env_for(emu, pubsub__lease_extension_s="10")
    cmd = worker_cmd(sim, "--concurrency", "8")
    async with await anyio.open_process(cmd, env=env) as proc:
        await wait_until(lambda: len(records(emu)) >= 60, 20, "60 results")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    held_at_kill = emu.outstanding(P, "work")
    assert 0 < len(distinct_ids(emu)) < 300

    async with await anyio.open_process(cmd, env=env) as again:
        # What the dead worker held comes back within one lease extension (10 s).
        await wait_until(lambda: distinct_ids(emu) == set(ids), 30, "every job")
        assert await stop(again) == 0

    results = records(emu)
    counts = Counter(str(r["id"]) for r in results)
    duplicates = {i for i, n in counts.items() if n > 1}
    assert len(duplicates) <= held_at_kill  # only what was in flight at the kill
    for job_id in duplicates:
        copies = [r for r in results if r["id"] == job_id]
        assert len({c["source"]["message_id"] for c in copies}) == 1  # the same job again
    assert emu.outstanding(P, "work") == 0 and emu.pending(P, "work") == 0


async def test_transient_failure_is_nacked_and_the_redelivery_succeeds(
    emu: PubSubEmulator, sim: Simulator
) -> None:
    emu.create_subscription(P, "work", "jobs", dead_letter_topic="dlq", max_delivery_attempts=100)
    ids = publish_jobs(emu, 3)
    sim.config.error_rate = 1.0
    env = env_for(emu, retry__max_attempts="1")
    async with await anyio.open_process(worker_cmd(sim), env=env) as proc:
        await wait_until(lambda: emu.stats["nacks"] >= 3, 20, "nacks")
        sim.config.error_rate = 0.0
        await wait_until(lambda: distinct_ids(emu) == set(ids), 20, "results")
        await wait_until(lambda: emu.acked(P, "work") == 3, 5, "acks")
        assert await stop(proc) == 0
    assert all(r["source"]["delivery_attempt"] >= 2 for r in records(emu))
    assert records(emu, "failed") == []
    assert emu.dead_lettered(P, "work") == []


async def test_permanent_failure_goes_to_the_dead_letter_topic_and_is_acked(
    emu: PubSubEmulator, sim: Simulator
) -> None:
    emu.create_subscription(P, "work", "jobs")
    not_png = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    emu.publish(P, "jobs", json.dumps({"id": "bad-image", "image_uri": not_png}).encode())
    emu.publish(P, "jobs", b"{not json")
    emu.publish(P, "jobs", b"gs://bkt/bare-uri.jpg")  # a bare URI: id is the messageId
    emu.publish(P, "jobs", b"", {"image_uri": "gs://bkt/attr.jpg", "id": "from-attrs"})
    async with await anyio.open_process(worker_cmd(sim), env=env_for(emu)) as proc:
        await wait_until(lambda: emu.acked(P, "work") == 4, 20, "4 acks")
        assert await stop(proc) == 0
    failed = {str(r["id"]): r for r in records(emu, "failed")}
    assert len(failed) == 2 and "bad-image" in failed
    bad_json = next(r for i, r in failed.items() if i != "bad-image")
    assert bad_json["id"] == bad_json["source"]["message_id"]  # no id of its own
    assert failed["bad-image"]["error"]["type"] == "model_rejected"
    assert sorted(r["error"]["type"] for r in failed.values()) == ["invalid_json", "model_rejected"]
    attrs = [m["attributes"] for m in emu.messages_on_topic(P, "failed")]
    assert all(a["status"] == "error" for a in attrs)
    ok = {str(r["id"]): r for r in records(emu)}
    assert "from-attrs" in ok
    bare = [r for r in ok.values() if r["image_uri"] == "gs://bkt/bare-uri.jpg"]
    assert bare and bare[0]["id"] == bare[0]["source"]["message_id"]
    assert set(emu.delivery_counts(P, "work").values()) == {1}  # acked, not redelivered
    assert emu.outstanding(P, "work") == 0


async def test_three_workers_share_one_subscription(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    emu.create_subscription(P, "work", "jobs")
    ids = publish_jobs(emu, 600)
    sim.config.latency_ms = 20
    errs = [tmp_path / f"err{i}" for i in range(3)]
    async with AsyncExitStack() as stack:
        procs: list[anyio.abc.Process] = []
        for path in errs:
            stderr = stack.enter_context(path.open("wb"))
            proc = await anyio.open_process(
                worker_cmd(sim, "--concurrency", "10", "--log-level", "info"),
                env=env_for(emu),
                stderr=stderr,
            )
            procs.append(await stack.enter_async_context(proc))
        await wait_until(lambda: distinct_ids(emu) == set(ids), 40, "every job")
        await wait_until(lambda: emu.acked(P, "work") >= 600, 10, "acks")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with anyio.fail_after(15):
                assert await proc.wait() == 0
    done = []
    for path in errs:
        line = next(ln for ln in path.read_text().splitlines() if ln.startswith("done: "))
        done.append(int(line.split()[1]))
    assert all(n > 0 for n in done), done  # every replica took a share
    assert sum(done) >= 600
    assert emu.outstanding(P, "work") == 0 and emu.pending(P, "work") == 0


@pytest.mark.timeout(120)
async def test_lease_extension_keeps_slow_jobs_from_being_redelivered(
    emu: PubSubEmulator, sim: Simulator
) -> None:
    """10 s subscription deadline, 30 s per model call, 10 s lease extensions."""
    emu.create_subscription(P, "work", "jobs", ack_deadline_s=10)
    ids = publish_jobs(emu, 4)
    sim.config.latency_ms = 30_000
    env = env_for(emu, pubsub__lease_extension_s="10")
    async with await anyio.open_process(worker_cmd(sim, "--timeout-s", "90"), env=env) as proc:
        await wait_until(lambda: emu.acked(P, "work") == 4, 70, "4 acks")
        assert await stop(proc) == 0
    assert distinct_ids(emu) == set(ids)
    assert len(records(emu)) == 4
    assert set(emu.delivery_counts(P, "work").values()) == {1}
    assert emu.stats["expired"] == 0
    assert emu.stats["modacks"] >= 4 * 3  # extended again and again, not once
