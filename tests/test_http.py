"""The side server: /metrics against what the run wrote, /healthz on stalls, /readyz on
drain, and a port in use. In-process where the test needs the worker's objects, a
subprocess where it needs real signals."""

from __future__ import annotations

import base64
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path

import aiohttp
import anyio
from prometheus_client.parser import text_string_to_metric_families

from worker.app import run_pipeline, run_worker, runtime
from worker.http import HEALTHZ_PATH, METRICS_PATH, READYZ_PATH, serve_http
from worker.metrics import Telemetry
from worker.pipeline import Pipeline
from worker.protocols import SourceBase
from worker.settings import Settings
from worker.simulator import Simulator
from worker.sinks import JsonlSink
from worker.sources.memory import LocalDelivery

from .helpers import (
    REPO,
    free_port,
    gs_jobs,
    http_get,
    http_status,
    jobs_file,
    read_jsonl,
    worker_env,
)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_parse_and_agree_with_the_sink_and_dead_letter_files(
    sim: Simulator, fast_settings: Settings, tmp_path: Path
) -> None:
    sim.config.error_rate = 0.2  # 500/503 answers, retried to success
    sim.config.seed = 7
    fast_settings.retry.max_attempts = 30  # none of 50 jobs fails 30 times in a row by chance
    good = gs_jobs(50, "g")
    bad = [json.dumps({"id": f"b{i}", "image_uri": f"ftp://x/{i}.png"}) for i in range(7)]
    fast_settings.worker.source = jobs_file(tmp_path, [*good, *bad, "not json"])
    sink = Path(fast_settings.worker.sink.removeprefix("jsonl:"))
    dead = sink.with_name("results.dead-letter.jsonl")

    telemetry = Telemetry()
    async with serve_http(telemetry, "127.0.0.1", 0) as server:
        stats = await run_worker(fast_settings, telemetry=telemetry)
        status, text = await http_get(server.url + METRICS_PATH)

    assert status == 200
    m = _samples(text)
    results, dead_letters = read_jsonl(sink), read_jsonl(dead)
    assert len(results) == stats.ok == 50
    assert len(dead_letters) == stats.dead_lettered == 8
    assert m[("worker_jobs_received_total", ())] == 58
    assert m[("worker_jobs_succeeded_total", ())] == len(results)
    assert m[("worker_jobs_dead_lettered_total", ())] == len(dead_letters)
    by_type = {
        dict(labels)["error_type"]: v
        for (name, labels), v in m.items()
        if name == "worker_dead_letters_total"
    }
    assert by_type == {"unsupported_scheme": 7, "invalid_image_uri": 1}  # "not json": a bare URI
    assert by_type == Counter(r["error"]["type"] for r in dead_letters)
    assert m[("worker_jobs_nacked_total", ())] == 0
    assert m[("worker_jobs_in_flight", ())] == 0
    limits = {
        dict(labels)["endpoint"]: v
        for (name, labels), v in m.items()
        if name == "worker_concurrency_limit"
    }
    assert limits == {f"127.0.0.1:{sim.port}": 8}  # one endpoint, named by its host
    assert m[("worker_sink_records_total", (("sink", "results"),))] == len(results)
    assert m[("worker_sink_records_total", (("sink", "dead_letter"),))] == len(dead_letters)
    # Every model answer the simulator gave is counted under its status code.
    by_code = {
        dict(labels)["code"]: v
        for (name, labels), v in m.items()
        if name == "worker_model_requests_total"
        and dict(labels)["endpoint"] == f"127.0.0.1:{sim.port}"
    }
    st = sim.stats()
    assert by_code == {str(code): n for code, n in st.by_status.items()}
    assert by_code["200"] == 50
    assert m[("worker_model_retries_total", ())] == st.requests - 50 > 0
    assert m[("worker_model_latency_seconds_count", ())] == st.requests
    assert m[("worker_job_latency_seconds_count", ())] == 58
    assert m[("worker_job_latency_seconds_bucket", (("le", "+Inf"),))] == 58
    assert m[("worker_phase", (("phase", "stopped"),))] == 1


class _SilentSource(SourceBase):
    """A source that never yields a job; with ``beats`` it says "nothing to do" often."""

    name = "silent"
    trusted = True

    def __init__(self, *, beats: bool) -> None:
        self.beats = beats
        self._answered_at: float | None = None

    @property
    def answered_at(self) -> float | None:
        return self._answered_at

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        while True:
            if self.beats:
                self._answered_at = time.monotonic()
            await anyio.sleep(0.05)
        yield LocalDelivery(b"")  # pragma: no cover - makes this an async generator


async def _probe_stalled_source(
    settings: Settings, source: _SilentSource, tmp_path: Path
) -> list[tuple[float, int, int]]:
    """Run the real pipeline on ``source``; return (t, /healthz, /readyz) over ~1 s."""
    telemetry = Telemetry(stall_timeout_s=0.4)
    sink = JsonlSink(str(tmp_path / "r.jsonl"))
    seen: list[tuple[float, int, int]] = []
    pipelines: list[Pipeline] = []
    async with serve_http(telemetry, "127.0.0.1", 0) as server, runtime(settings) as rt:
        telemetry.set_tokens(rt.tokens)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_pipeline(
                    rt,
                    source,
                    sink,
                    sink,
                    resume=False,
                    handle_signals=False,
                    on_start=pipelines.append,
                    telemetry=telemetry,
                )
            )
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                health, _ = await http_get(server.url + HEALTHZ_PATH)
                ready, _ = await http_get(server.url + READYZ_PATH)
                seen.append((time.monotonic() - t0, health, ready))
                await anyio.sleep(0.05)
            pipelines[0].abandon_in_flight()
    return seen


async def test_healthz_turns_503_when_the_worker_makes_no_progress(
    fast_settings: Settings, tmp_path: Path
) -> None:
    seen = await _probe_stalled_source(fast_settings, _SilentSource(beats=False), tmp_path)
    assert seen[0][1] == 200, seen  # just started: that counts as progress
    late = [h for t, h, _ in seen if t > 0.6]
    assert late and set(late) == {503}, seen
    assert {r for _, _, r in seen} == {503}, "the source never answered: not ready"


async def test_a_source_with_nothing_to_do_is_live_and_ready(
    fast_settings: Settings, tmp_path: Path
) -> None:
    seen = await _probe_stalled_source(fast_settings, _SilentSource(beats=True), tmp_path)
    assert {h for _, h, _ in seen} == {200}, seen
    assert seen[-1][2] == 200, seen


async def test_healthz_turns_503_when_the_event_loop_is_blocked() -> None:
    telemetry = Telemetry(max_loop_lag_s=0.3)
    telemetry.mark_running()
    answers: list[int] = []

    def probe(url: str) -> None:
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=10) as response:
                answers.append(response.status)
        except urllib.error.HTTPError as exc:
            answers.append(exc.code)

    async with serve_http(telemetry, "127.0.0.1", 0) as server, anyio.create_task_group() as tg:
        tg.start_soon(telemetry.watch_loop)
        await anyio.sleep(0.6)
        assert (await http_get(server.url + HEALTHZ_PATH))[0] == 200
        # A probe arrives while something blocks the loop for 1 s (the bug liveness is
        # for): it is answered only afterwards, and the answer must be 503.
        thread = threading.Thread(target=probe, args=(server.url + HEALTHZ_PATH,))
        thread.start()
        time.sleep(1.0)  # noqa: ASYNC251 - deliberately blocking the event loop
        with anyio.fail_after(5):
            while thread.is_alive():
                await anyio.sleep(0.01)
        assert answers == [503]
        status, body = await http_get(server.url + HEALTHZ_PATH)
        assert status == 503 and "event loop stalled" in body
        # Once the loop has run freely for a while (the lag is remembered for twice
        # max_loop_lag_s), it is healthy again.
        with anyio.fail_after(5):
            while (await http_get(server.url + HEALTHZ_PATH))[0] != 200:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()


async def test_a_port_in_use_is_a_start_up_error(sim: Simulator, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "worker",
                "run",
                "--source",
                "stdin:",
                "--base-url",
                sim.vertex_base_url(),
                "--auth",
                "none",
                "--http-port",
                str(port),
            ],
            env=worker_env(WORKER_HTTP__HOST="127.0.0.1"),
            check=False,
            input=b"",
        )
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "http.port" in err[0] and "in use" in err[0], err
    assert sim.stats().requests == 0


async def test_sigterm_drains_a_file_run_readiness_goes_503_and_a_rerun_finishes(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.config.latency_ms = 700.0
    n = 40
    source = jobs_file(tmp_path, gs_jobs(n, "t"))
    sink = tmp_path / "out" / "results.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "worker", "run", "--source", source, "--sink", f"jsonl:{sink}",
        "--base-url", sim.vertex_base_url(), "--auth", "none", "--concurrency", "4",
        "--http-port", str(port), "--shutdown-grace-s", "5", "--log-format", "json",
    ]  # fmt: skip
    env = worker_env(WORKER_HTTP__HOST="127.0.0.1")
    statuses: list[tuple[int | None, int | None]] = []
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = await anyio.open_process(cmd, env=env, cwd=REPO, stderr=stderr)
    async with proc:
        with anyio.fail_after(20):
            while await http_status(base + READYZ_PATH) != 200:
                await anyio.sleep(0.05)
            while len(read_jsonl(sink)) < 4:
                await anyio.sleep(0.05)
        assert sim.stats().in_flight > 0
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(5 + 3):
            while proc.returncode is None:
                statuses.append(
                    (await http_status(base + READYZ_PATH), await http_status(base + HEALTHZ_PATH))
                )
                await anyio.sleep(0.02)
            code = await proc.wait()
        drain_s = time.monotonic() - sent_at
    assert code == 0, err.read_text()
    assert drain_s < 5, "in-flight jobs (0.7 s each) finish well inside the grace"
    assert (503, 200) in statuses, statuses  # draining: not ready, still live
    assert (200, 200) not in statuses[1:], statuses
    done = {r["id"] for r in read_jsonl(sink)}
    assert 4 <= len(done) < n

    events = [json.loads(line) for line in err.read_text().splitlines()]
    names = [e["message"] for e in events]
    assert "shutdown_requested" in names and "shutdown_complete" in names

    again = await anyio.run_process(cmd, env=env, cwd=REPO, check=False)
    assert again.returncode == 0, again.stderr.decode()
    ids = [r["id"] for r in read_jsonl(sink)]
    assert sorted(ids) == sorted(f"t{i}" for i in range(n))  # all there, none twice


async def test_serve_answers_probes_and_metrics_on_its_own_port(
    sim: Simulator, fast_settings: Settings
) -> None:
    from worker.app import serve_push

    fast_settings.model.base_url = sim.vertex_base_url()
    listening = anyio.Event()
    ports: list[int] = []

    def ready(port: int) -> None:
        ports.append(port)
        listening.set()

    body = {
        "message": {
            "data": base64.b64encode(
                json.dumps({"id": "p1", "image_uri": "gs://sample-bucket/p1.jpg"}).encode()
            ).decode(),
            "messageId": "m-1",
            "publishTime": "2025-01-01T00:00:00.000Z",
        },
        "subscription": "projects/p/subscriptions/push",
    }
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: serve_push(
                fast_settings, host="127.0.0.1", port=0, on_listening=ready, handle_signals=False
            )
        )
        with anyio.fail_after(10):
            await listening.wait()
        base = f"http://127.0.0.1:{ports[0]}"
        assert (await http_get(base + HEALTHZ_PATH))[0] == 200
        assert (await http_get(base + READYZ_PATH))[0] == 200
        async with aiohttp.ClientSession() as session, session.post(base + "/", json=body) as r:
            assert r.status < 300
        status, text = await http_get(base + METRICS_PATH)
        tg.cancel_scope.cancel()
    m = _samples(text)
    assert status == 200
    assert m[("worker_jobs_received_total", ())] == 1
    assert m[("worker_jobs_succeeded_total", ())] == 1
    assert m[("worker_queue_lag_seconds", ())] > 0  # publish time is in the past
