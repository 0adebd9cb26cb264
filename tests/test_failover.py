"""Failover with a real endpoint killed mid-run: one endpoint is ``worker simulate`` in a
process of its own, the other the in-process simulator; the first is SIGKILLed (process
gone, port closed, requests in flight cut) after it has answered some jobs.

Every job must end in the result file exactly once, and the dead endpoint's circuit must
keep the traffic off it: besides the requests in flight when it died, it may be sent
only the few that open its circuit and the single probes after each backoff.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from worker.app import run_worker
from worker.settings import EndpointSettings
from worker.simulator import SimConfig, Simulator

from .endpoint_helpers import endpoint, metric_samples, outputs, pool_of, telemetry
from .helpers import REPO, free_port, gs_jobs, http_status, jobs_file, quick_settings, wait_until

DEAD, ALIVE = "us-east1", "us-west1"
N = 400
CONCURRENCY = 4  # per endpoint


@pytest.fixture
async def doomed() -> AsyncIterator[tuple[anyio.abc.Process, int]]:
    """``worker simulate`` in a process of its own: (the process, its port)."""
    port = free_port()
    cmd = [sys.executable, "-m", "worker", "simulate", "--port", str(port), "--latency-ms", "20"]
    proc = await anyio.open_process(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with anyio.fail_after(20):
            while await http_status(f"http://127.0.0.1:{port}/healthz") != 200:
                await anyio.sleep(0.05)
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.move_on_after(5, shield=True):
            await proc.wait()
        await proc.aclose()


@pytest.fixture
async def alive() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(latency_ms=20.0)) as sim:
        yield sim


async def test_a_killed_endpoint_loses_no_job_and_gets_only_a_handful_of_requests(
    doomed: tuple[anyio.abc.Process, int], alive: Simulator, tmp_path: Path
) -> None:
    proc, port = doomed
    dead_url = f"http://127.0.0.1:{port}/v1/projects/p/locations/{DEAD}/endpoints/openapi"
    s = quick_settings()
    s.model.endpoints = [
        EndpointSettings(url=dead_url),
        EndpointSettings(url=alive.vertex_base_url(location=ALIVE)),
    ]
    s.worker.concurrency = CONCURRENCY
    s.retry.deadline_s = 20.0
    s.images.backend = "vertex"
    s.worker.sink = f"jsonl:{tmp_path / 'out' / 'results.jsonl'}"
    s.worker.source = jobs_file(tmp_path, gs_jobs(N))
    t = telemetry()
    ok_at_kill = -1

    def dead_answered() -> int:
        return t.model_requests.get((DEAD, "200"), 0)

    async def kill_after_some_answers() -> None:
        nonlocal ok_at_kill
        await wait_until(lambda: dead_answered() >= 30, 20, "answers from the doomed endpoint")
        proc.kill()
        await proc.wait()
        assert t.pipeline is not None
        ok_at_kill = t.pipeline.stats.ok

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_after_some_answers)
        with anyio.fail_after(40):
            stats = await run_worker(s.validate(), telemetry=t)

    assert await http_status(f"http://127.0.0.1:{port}/healthz") is None  # really gone
    results, dead = outputs(s)
    assert dead == []
    assert stats.ok == N
    assert stats.failed == 0
    assert Counter(r["id"] for r in results) == Counter(f"job-{i}" for i in range(N))
    # The kill came mid-run: most jobs were still to do.
    assert 0 <= ok_at_kill <= N // 2, ok_at_kill
    by_endpoint = Counter(r["endpoint"] for r in results)
    assert by_endpoint[DEAD] == dead_answered()
    assert by_endpoint[DEAD] + by_endpoint[ALIVE] == N
    assert alive.stats().by_status == {200: by_endpoint[ALIVE]}

    ep = endpoint(pool_of(t), DEAD)
    assert ep.circuit.opened >= 1
    assert metric_samples(t, "worker_endpoint_circuit_opened_total")[
        (("endpoint", DEAD),)
    ] == float(ep.circuit.opened)
    # Every request the dead endpoint was sent after it died failed (cut in flight,
    # refused): at most the CONCURRENCY in flight, the few that completed the streak of 5
    # that opened its circuit, and one probe per backoff (1 s, doubling) of the rest of
    # the run. Without the circuit it would get about half of the ~N retries and new jobs.
    failures = {code: n for (name, code), n in t.model_requests.items() if name == DEAD}
    failures.pop("200", None)
    sent_after_death = sum(failures.values())
    assert 5 <= sent_after_death <= CONCURRENCY + 5 + 3, failures  # 5: the streak
    assert set(failures) <= {"connection_error", "timeout"}
    assert failures.get("timeout", 0) == 0, "a dead peer is a connection error"
    # The retries of the jobs cut in flight went to the other endpoint at once.
    retried = [r for r in results if r["attempts"] > 1]
    assert len(retried) >= CONCURRENCY
    assert {r["endpoint"] for r in retried} == {ALIVE}
