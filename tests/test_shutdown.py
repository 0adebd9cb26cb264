"""Graceful shutdown of ``worker run`` on a Pub/Sub subscription: real SIGTERM to a worker
subprocess (loopback Pub/Sub emulator + simulator), with the side server up.

SIGKILL-and-restart is covered in test_pubsub_source.py
(``test_sigkill_then_restart_loses_nothing``).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import anyio
from prometheus_client.parser import text_string_to_metric_families

from worker.http import HEALTHZ_PATH, METRICS_PATH, READYZ_PATH
from worker.simulator import Simulator

from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import (
    PROJECT,
    REPO,
    free_port,
    http_status,
    publish_jobs,
    read_jsonl,
    wait_until,
    worker_env,
)

P = PROJECT
SUB = f"projects/{P}/subscriptions/work"


def _env(emu: PubSubEmulator) -> dict[str, str]:
    return worker_env(PUBSUB_EMULATOR_HOST=emu.host_port, WORKER_HTTP__HOST="127.0.0.1")


def _cmd(sim: Simulator, sink: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker", "run", "--source", f"pubsub:{SUB}",
        "--sink", f"jsonl:{sink}", "--base-url", sim.vertex_base_url(), "--auth", "none",
        "--http-port", str(port), "--log-format", "json", *extra,
    ]  # fmt: skip


async def _sigterm_and_watch(
    proc: anyio.abc.Process, base: str, timeout_s: float
) -> tuple[int, float, list[int | None]]:
    """SIGTERM; poll /readyz until the process exits. (exit code, seconds, statuses)."""
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    seen: list[int | None] = []
    with anyio.fail_after(timeout_s):
        while proc.returncode is None:
            seen.append(await http_status(base + READYZ_PATH))
            await anyio.sleep(0.01)
        code = await proc.wait()
    return code, time.monotonic() - sent_at, seen


def _ids(sink: Path) -> list[str]:
    return [str(r["id"]) for r in read_jsonl(sink)]


async def test_sigterm_drains_hands_back_the_rest_and_a_restart_finishes(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    ids = publish_jobs(emu, 400)
    sim.config.latency_ms = 300.0
    sink = tmp_path / "results.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    grace_s = 5.0
    cmd = _cmd(sim, sink, port, "--concurrency", "40", "--shutdown-grace-s", str(grace_s))
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = await anyio.open_process(cmd, env=_env(emu), cwd=REPO, stderr=stderr)
    async with proc:
        await wait_until(lambda: len(_ids(sink)) >= 60, 20, "60 results")
        assert await http_status(base + READYZ_PATH) == 200
        assert await http_status(base + HEALTHZ_PATH) == 200
        assert sim.stats().in_flight > 0, "SIGTERM lands with jobs in flight"
        code, drain_s, readiness = await _sigterm_and_watch(proc, base, grace_s + 5)

    assert code == 0, err.read_text()[-3000:]
    assert drain_s < grace_s, f"drained in {drain_s:.2f} s"
    assert 503 in readiness, readiness  # not ready while draining
    assert 200 not in readiness[readiness.index(503) :], readiness
    done = _ids(sink)
    assert len(done) == len(set(done)) < 400
    # Every job it received is in the sink and acked, or back in the subscription now
    # (nacked, not waiting for a deadline); nothing is left leased to the dead process.
    assert emu.outstanding(P, "work") == 0
    assert emu.acked(P, "work") == len(done)
    assert emu.pending(P, "work") == 400 - len(done)
    events = [json.loads(line)["message"] for line in err.read_text().splitlines()]
    assert "shutdown_requested" in events and "shutdown_complete" in events

    # A new worker takes the rest.
    with err.open("wb") as stderr:
        proc = await anyio.open_process(cmd, env=_env(emu), cwd=REPO, stderr=stderr)
    async with proc:
        await wait_until(lambda: emu.acked(P, "work") >= 400, 30, "every job acked")
        code, _, _ = await _sigterm_and_watch(proc, base, grace_s + 5)
    assert code == 0, err.read_text()[-3000:]
    counts = Counter(_ids(sink))
    assert set(counts) == set(ids)  # no job lost
    assert max(counts.values()) == 1  # none done twice
    assert emu.pending(P, "work") == emu.outstanding(P, "work") == 0


async def test_drain_time_with_200_jobs_in_flight(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    """The closing note's figure: SIGTERM with 200 model calls in flight at 200 ms each."""
    publish_jobs(emu, 1000)
    sim.config.latency_ms = 200.0
    sink = tmp_path / "results.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = _cmd(sim, sink, port, "--concurrency", "200")
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = await anyio.open_process(cmd, env=_env(emu), cwd=REPO, stderr=stderr)
    async with proc:
        await wait_until(lambda: sim.stats().in_flight >= 200, 20, "200 requests in flight")
        in_flight = sim.stats().in_flight
        async with aiohttp.ClientSession() as s, s.get(base + METRICS_PATH) as r:
            metrics: dict[str, float] = {}
            for family in text_string_to_metric_families(await r.text()):
                for sample in family.samples:
                    if not sample.labels or set(sample.labels) == {"endpoint"}:
                        # One endpoint: its labelled series is the total.
                        metrics[sample.name] = sample.value
        code, drain_s, _ = await _sigterm_and_watch(proc, base, 20 + 5)

    assert code == 0, err.read_text()[-3000:]
    done = _ids(sink)
    assert emu.outstanding(P, "work") == 0
    assert emu.acked(P, "work") == len(done) == len(set(done))
    assert emu.pending(P, "work") == 1000 - len(done)
    complete = [
        e
        for e in map(json.loads, err.read_text().splitlines())
        if e["message"] == "shutdown_complete"
    ]
    assert complete, "shutdown_complete was logged"
    # The 200 calls under way at SIGTERM finished, were written and acked: every call
    # made became a record. Every message the worker took was done or handed back, the
    # jobs it had admitted (counted as nacked) among them. That jobs waiting for a slot
    # go back without a call is checked exactly, one pipeline at a time, in
    # test_pipeline.py; here the worker admits more between any count the test could
    # take and the signal, so no count taken before it bounds the nacks (one did, and
    # failed on a loaded machine).
    assert len(done) >= in_flight
    assert sim.stats().requests == len(done)
    assert emu.stats["deliveries"] == len(done) + emu.stats["nacks"]
    assert complete[0]["nacked"] <= emu.stats["nacks"]
    assert metrics["worker_concurrency_limit"] == 200
    assert metrics["worker_model_requests_in_flight"] == 200
    assert metrics["worker_jobs_in_flight"] >= 200
    assert metrics["worker_source_acked_total"] <= emu.acked(P, "work")
    assert metrics["worker_queue_lag_seconds"] >= 0
    print(f"\ndrain: {in_flight} in flight at SIGTERM, exited 0 after {drain_s:.3f} s")
    assert drain_s < 2.0


async def test_a_second_signal_nacks_at_once_and_exits(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    publish_jobs(emu, 100)
    sim.config.latency_ms = 30_000.0  # nothing would finish inside the test
    sink = tmp_path / "results.jsonl"
    port = free_port()
    cmd = _cmd(sim, sink, port, "--concurrency", "20", "--shutdown-grace-s", "20")
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = await anyio.open_process(cmd, env=_env(emu), cwd=REPO, stderr=stderr)
    async with proc:
        await wait_until(lambda: sim.stats().in_flight >= 20, 20, "20 requests in flight")
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "shutdown_requested" in err.read_text(), 5, "the first signal")
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            code = await proc.wait()
        exit_s = time.monotonic() - sent_at

    assert code == 0, err.read_text()[-3000:]
    assert exit_s < 5, f"took {exit_s:.2f} s: the 20 s grace was not cut short"
    assert read_jsonl(sink) == []
    assert emu.acked(P, "work") == 0
    assert emu.outstanding(P, "work") == 0  # handed back, not left to a deadline
    assert emu.pending(P, "work") == 100
    events = [json.loads(line)["message"] for line in err.read_text().splitlines()]
    assert "shutdown_forced" in events


async def _idle_worker_probes(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path, path: str, stall_timeout_s: float
) -> list[int | None]:
    """An empty subscription: what ``path`` says for a while past the stall timeout."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = _cmd(sim, tmp_path / "r.jsonl", port, "--stall-timeout-s", str(stall_timeout_s))
    seen: list[int | None] = []
    async with await anyio.open_process(cmd, env=_env(emu), cwd=REPO) as proc:
        with anyio.fail_after(15):
            while await http_status(base + READYZ_PATH) is None:
                await anyio.sleep(0.05)
        started = time.monotonic()
        while time.monotonic() - started < stall_timeout_s + 1.0:
            seen.append(await http_status(base + path))
            await anyio.sleep(0.1)
        code, _, _ = await _sigterm_and_watch(proc, base, 10)
    assert code == 0
    return seen


async def test_an_idle_worker_is_ready_before_its_first_job(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    seen = await _idle_worker_probes(emu, sim, tmp_path, READYZ_PATH, 0.5)
    assert seen[-5:] == [200] * 5, seen


async def test_an_idle_worker_stays_live_past_the_stall_timeout(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    # Empty pulls back off up to 2 s (the emulator answers at once); 2.5 s covers that.
    seen = await _idle_worker_probes(emu, sim, tmp_path, HEALTHZ_PATH, 2.5)
    assert set(seen) == {200}, seen
