"""The whole path with real parts: file source -> pipeline -> real AsyncOpenAI -> simulator
-> JSONL sinks. Retries are made fast by settings, not by patching."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from worker.app import run_worker
from worker.settings import Settings
from worker.simulator import Simulator

from .helpers import EXAMPLES, gs_jobs, jobs_file, read_jsonl


def _outputs(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results = Path(settings.worker.sink.removeprefix("jsonl:"))
    dead = results.with_name("results.dead-letter.jsonl")
    return read_jsonl(results), read_jsonl(dead)


async def test_happy_path_describes_every_job_from_its_content(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    lines = [json.dumps({"id": p.stem, "image_uri": str(p)}) for p in sorted(EXAMPLES.iterdir())]
    lines += gs_jobs(20)
    fast_settings.worker.source = jobs_file(tmp_path, lines)

    stats = await run_worker(fast_settings)

    results, dead = _outputs(fast_settings)
    assert dead == []
    assert stats.ok == len(lines) == len(results)
    by_id = {r["id"]: r for r in results}
    red = by_id["red-square"]
    assert red["status"] == "ok"
    assert "64x64 PNG" in str(red["description"])
    assert "red" in str(red["description"])
    assert red["model"] == "google/gemini-2.0-flash-001"
    assert red["attempts"] == 1
    assert set(red["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert str(red["finished_at"]).endswith("Z")
    # Local files were inlined as data: URLs with the type sniffed from the bytes.
    sent = [r.body["messages"][0]["content"][1]["image_url"] for r in sim.requests]
    assert any(u.startswith("data:image/webp;base64,") for u in sent)
    assert any(u.startswith("data:image/gif;base64,") for u in sent)


async def test_transient_errors_and_resets_are_retried_to_success(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    sim.config.error_rate = 0.3
    sim.config.reset_rate = 0.15
    sim.config.seed = 7
    # About 0.4 of attempts fail, in an order the jobs' timing decides. With the default 8
    # attempts, 0.4^8 per job made one job in 60 exhaust them in ~4% of runs; with 40 no
    # run will (0.4^40 ~ 1e-16 per job).
    fast_settings.retry.max_attempts = 40
    fast_settings.worker.source = jobs_file(tmp_path, gs_jobs(60))

    stats = await run_worker(fast_settings)

    results, dead = _outputs(fast_settings)
    assert dead == []
    assert len(results) == 60
    assert stats.ok == 60
    by_status = sim.stats().by_status
    assert by_status.get(500, 0) + by_status.get(503, 0) > 0
    assert by_status.get(0, 0) > 0  # resets happened and were survived
    assert max(int(r["attempts"]) for r in results) > 1


async def test_429_waits_without_using_attempts(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    sim.config.rate_limit_rps = 40.0
    sim.config.rate_burst = 1.0
    sim.config.retry_after_s = 0.02
    fast_settings.retry.max_attempts = 1  # a 429 must not count as one
    fast_settings.worker.source = jobs_file(tmp_path, gs_jobs(30))

    stats = await run_worker(fast_settings)

    results, dead = _outputs(fast_settings)
    assert dead == []
    assert len(results) == 30
    assert sim.stats().by_status.get(429, 0) > 0
    assert stats.rate_limited > 0
    assert max(int(r["attempts"]) for r in results) > 1


async def test_permanent_400_goes_to_dead_letter_with_reason(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    not_image = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    lines = [json.dumps({"id": "bad", "image_uri": not_image}), *gs_jobs(3)]
    fast_settings.worker.source = jobs_file(tmp_path, lines)

    stats = await run_worker(fast_settings)

    _results, dead = _outputs(fast_settings)
    assert stats.ok == 3
    assert stats.dead_lettered == 1
    assert stats.failed == 0
    assert [d["id"] for d in dead] == ["bad"]
    err = dead[0]["error"]
    assert isinstance(err, dict)
    assert err["type"] == "model_rejected"
    assert "400" in err["message"]
    assert dead[0]["attempts"] == 1  # permanent: no retry
    assert dead[0]["status"] == "error"
    assert "image_uri" in dead[0]
    assert "input" in dead[0]


async def test_retries_exhausted_is_dead_lettered_for_a_file_source(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    sim.config.error_rate = 1.0
    fast_settings.retry.max_attempts = 3
    fast_settings.worker.source = jobs_file(tmp_path, gs_jobs(2))

    stats = await run_worker(fast_settings)

    _, dead = _outputs(fast_settings)
    assert stats.dead_lettered == 2
    assert {d["error"]["type"] for d in dead} == {"retries_exhausted"}
    assert all(d["attempts"] == 3 for d in dead)
    assert sim.stats().requests == 6


@pytest.mark.parametrize("concurrency", [1, 5])
async def test_in_flight_never_exceeds_concurrency(
    fast_settings: Settings, sim: Simulator, tmp_path: Path, concurrency: int
) -> None:
    sim.config.latency_ms = 15.0
    fast_settings.worker.concurrency = concurrency
    fast_settings.worker.source = jobs_file(tmp_path, gs_jobs(60))

    stats = await run_worker(fast_settings)

    assert stats.ok == 60
    assert sim.stats().in_flight_max == concurrency  # reached, never exceeded


async def test_bad_lines_are_dead_lettered_and_the_run_goes_on(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    lines = [
        "{not json",
        json.dumps({"id": "no-uri"}),
        json.dumps({"id": "ftp", "image_uri": "ftp://example.com/a.png"}),
        json.dumps({"id": "http", "image_uri": "http://example.com/a.png"}),
        json.dumps({"id": "missing", "image_uri": str(EXAMPLES / "nope.png")}),
        json.dumps({"id": "outside", "image_uri": str(tmp_path / "x.png")}),
        json.dumps({"id": "not-image", "image_uri": str(Path(__file__))}),
        json.dumps({"id": "prompt", "image_uri": "gs://b/o.jpg", "prompt": 3}),
        "[1, 2]",
        "",
        "   ",
        *gs_jobs(5),
    ]
    fast_settings.worker.source = jobs_file(tmp_path, lines)

    stats = await run_worker(fast_settings)

    results, dead = _outputs(fast_settings)
    assert len(results) == 5
    assert stats.failed == 0
    types = {str(d["id"]): d["error"]["type"] for d in dead}
    assert types.pop("no-uri") == "missing_image_uri"
    assert types.pop("ftp") == "unsupported_scheme"
    assert types.pop("http") == "unsupported_scheme"
    assert types.pop("missing") == "file_not_found"
    assert types.pop("outside") == "file_not_allowed"
    assert types.pop("not-image") == "unsupported_media_type"
    assert types.pop("prompt") == "invalid_job"
    assert sorted(types.values()) == ["invalid_job", "invalid_json"]  # "[1, 2]", "{not json"
    assert sim.stats().requests == 5  # bad jobs never reached the model


async def test_rerun_skips_jobs_already_done(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    fast_settings.worker.source = jobs_file(tmp_path, ["{broken", *gs_jobs(10)])
    await run_worker(fast_settings)
    before = sim.stats().requests

    stats = await run_worker(fast_settings)

    assert stats.skipped == 11
    assert stats.ok == 0
    assert stats.dead_lettered == 0
    assert sim.stats().requests == before
    results, dead = _outputs(fast_settings)
    assert len(results) == 10
    assert len(dead) == 1


async def test_auto_concurrency_admits_jobs_in_proportion_to_the_limit(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    """A small quota settles the limit low; the pipeline must not hold hundreds of jobs
    (leased queue messages, in production) that it cannot send."""
    import anyio

    from worker.app import run_pipeline, runtime
    from worker.pipeline import Pipeline
    from worker.sinks import JsonlSink
    from worker.sources import MemorySource

    sim.config.latency_ms = 50.0
    sim.config.rate_limit_rps = 60.0
    sim.config.rate_burst = 5.0
    fast_settings.worker.concurrency = "auto"
    fast_settings.worker.max_concurrency = 200  # a fixed ceiling would admit 400 jobs
    source = MemorySource([f"gs://b/{i}.jpg".encode() for i in range(200)])
    sink = JsonlSink(str(tmp_path / "r.jsonl"))
    dead = JsonlSink(str(tmp_path / "d.jsonl"))
    started: list[Pipeline] = []
    samples: list[tuple[int, int]] = []

    async def sample() -> None:
        while not started:
            await anyio.sleep(0.005)
        while True:
            samples.append((started[0].in_flight, started[0].models.limit))
            await anyio.sleep(0.01)

    async with runtime(fast_settings) as rt, anyio.create_task_group() as tg:
        tg.start_soon(sample)
        stats = await run_pipeline(
            rt, source, sink, dead, resume=False, handle_signals=False, on_start=started.append
        )
        tg.cancel_scope.cancel()

    assert stats.ok == 200
    assert sim.stats().by_status.get(429, 0) > 0  # the quota was hit
    peak_in_flight = max(n for n, _ in samples)
    peak_limit = max(limit for _, limit in samples)
    assert peak_in_flight <= 2 * peak_limit + 8
    assert peak_in_flight < 100, samples[:20]


async def test_drain_hands_back_jobs_still_waiting_for_a_model_slot(
    fast_settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    """On SIGTERM, jobs talking to the model finish; jobs queued for a slot are handed
    back at once instead of starting calls the grace period may cut short."""
    import time

    import anyio

    from worker.app import run_pipeline, runtime
    from worker.pipeline import Pipeline
    from worker.sinks import JsonlSink
    from worker.sources import MemorySource

    sim.config.latency_ms = 800.0
    fast_settings.worker.concurrency = 2  # and 4 jobs admitted: 2 calling, 2 waiting
    source = MemorySource([f"gs://b/{i}.jpg".encode() for i in range(20)])
    sink = JsonlSink(str(tmp_path / "r.jsonl"))
    dead = JsonlSink(str(tmp_path / "d.jsonl"))
    started: list[Pipeline] = []

    async def drain_soon() -> None:
        while not started or sim.stats().in_flight < 2:
            await anyio.sleep(0.01)
        started[0].drain()

    t0 = time.monotonic()
    async with runtime(fast_settings) as rt, anyio.create_task_group() as tg:
        tg.start_soon(drain_soon)
        stats = await run_pipeline(
            rt, source, sink, dead, resume=False, handle_signals=False, on_start=started.append
        )
    elapsed = time.monotonic() - t0

    assert stats.ok == 2  # the two calls under way finished and were written
    assert stats.nacked == 2  # the two waiting for a slot went back untouched
    assert sim.stats().requests == 2
    assert elapsed < 1.5, "the drain did not wait for a second round of calls"
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 2
