"""In-process runs for the result-store, schema and generation tests: jobs from memory (or
a source the test feeds), the real pipeline, the real AsyncOpenAI client against the
simulator, and JSONL sinks the test reads back.

Each :func:`run_jobs` call is a fresh process as far as the worker can tell: a new
runtime (model clients, image fetcher), a new store connection and new sinks; only what
the store keeps (a SQLite file, a Redis server) carries over, as it would across restarts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.app import run_pipeline, runtime
from worker.metrics import Telemetry
from worker.pipeline import Pipeline, RunStats
from worker.protocols import SourceBase
from worker.settings import Settings
from worker.sinks import JsonlSink
from worker.sources import MemorySource
from worker.sources.memory import LocalDelivery

from .helpers import read_jsonl

Job = dict[str, Any] | str


def job_bytes(job: Job) -> bytes:
    return (job if isinstance(job, str) else json.dumps(job)).encode()


@dataclass
class Run:
    """What one run wrote and counted."""

    results: list[dict[str, Any]]
    dead: list[dict[str, Any]]
    stats: RunStats
    telemetry: Telemetry

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {str(r["id"]): r for r in self.results + self.dead}

    def metric(self, name: str) -> float | None:
        """A sample of the run's Prometheus metrics (``worker_store_hits_total``...)."""
        return metric(self.telemetry, name)


def metric(telemetry: Telemetry, name: str) -> float | None:
    text = generate_latest(telemetry.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def _telemetry() -> Telemetry:
    return Telemetry(process_metrics=False)


async def run_jobs(
    settings: Settings,
    jobs: Sequence[Job],
    out: Path,
    *,
    on_start: Callable[[Pipeline], None] | None = None,
) -> Run:
    """Run ``jobs`` through a fresh runtime; results go to ``out``.jsonl, dead letters to
    ``out``.dead.jsonl (both must not exist yet: a run never resumes here)."""
    results_path = out.with_suffix(".jsonl")
    dead_path = out.with_suffix(".dead.jsonl")
    assert not results_path.exists() and not dead_path.exists(), "one sink per run"
    telemetry = _telemetry()
    source = MemorySource([job_bytes(j) for j in jobs])
    async with runtime(settings) as rt:
        stats = await run_pipeline(
            rt,
            source,
            JsonlSink(str(results_path)),
            JsonlSink(str(dead_path)),
            resume=False,
            handle_signals=False,
            on_start=on_start,
            telemetry=telemetry,
        )
    return Run(read_jsonl(results_path), read_jsonl(dead_path), stats, telemetry)


class FeedSource(SourceBase):
    """Jobs the test sends one at a time while the pipeline runs (a local, trusted,
    non-redelivering source); the run ends when the test closes ``feed``."""

    name = "feed"
    trusted = True

    def __init__(self) -> None:
        send: MemoryObjectSendStream[bytes]
        receive: MemoryObjectReceiveStream[bytes]
        send, receive = anyio.create_memory_object_stream[bytes](100)
        self.feed = send
        self._receive = receive

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        async with self._receive:
            async for data in self._receive:
                yield LocalDelivery(data)
