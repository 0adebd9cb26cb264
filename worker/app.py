"""Wiring: settings -> token provider, model client, source, sinks -> one root task group.

One root task group holds the long-lived tasks (sink writers, token refresher, signal
watcher) and the pipeline; when the pipeline returns, the group is cancelled. Cleanup
(closing the HTTP client and sinks) is shielded and time-bounded.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from .auth import NoTokens, TokenProvider, make_token_provider
from .images import ImagePolicy
from .limits import Limiter
from .model import ModelClient
from .pipeline import Pipeline, RunStats
from .protocols import Sink, Source
from .settings import Settings
from .sinks import BatchWriter, default_dead_letter, open_sink
from .sources import FileSource, StdinSource, open_source

__all__ = ["Runtime", "describe_uris", "run_worker", "runtime"]

log = logging.getLogger("worker.app")

CLEANUP_TIMEOUT_S = 10.0


@dataclass
class Runtime:
    """The process-wide parts every command shares."""

    settings: Settings
    tokens: TokenProvider
    model: ModelClient
    simulator: Any = None


@asynccontextmanager
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Start the embedded simulator (if asked), the token provider and the model client."""
    async with AsyncExitStack() as stack:
        simulator = None
        if settings.simulator.embedded:
            from .simulator import SimConfig, Simulator

            s = settings.simulator
            simulator = Simulator(
                SimConfig(
                    latency_ms=s.latency_ms,
                    latency_dist=s.latency_dist,
                    rate_limit_rps=s.rate_limit_rps or None,
                    error_rate=s.error_rate,
                    reset_rate=s.reset_rate,
                )
            )
            await simulator.start("127.0.0.1", 0)
            stack.push_async_callback(simulator.stop)
            settings.model.base_url = simulator.base_url
            log.info("simulator_started", extra={"base_url": simulator.base_url})
        tokens: TokenProvider = (
            NoTokens()
            if settings.simulator.embedded
            else make_token_provider(settings.model.auth, settings.model.api_key_env)
        )
        await tokens.start()
        model = ModelClient(
            settings.model, tokens, max_connections=settings.worker.concurrency_ceiling
        )

        async def close_model() -> None:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await model.aclose()

        stack.push_async_callback(close_model)
        yield Runtime(settings=settings, tokens=tokens, model=model, simulator=simulator)


def _limiter(settings: Settings) -> Limiter:
    w = settings.worker
    start = w.min_concurrency if w.concurrency == "auto" else int(w.concurrency)
    return Limiter(max(1, start))


async def run_pipeline(
    rt: Runtime,
    source: Source,
    sink: Sink,
    dead_letter: Sink,
    *,
    resume: bool,
    handle_signals: bool = True,
    shutdown_grace_s: float = 20.0,
) -> RunStats:
    settings = rt.settings
    results = BatchWriter(sink)
    dead = BatchWriter(dead_letter)
    done_ids: set[str] = set()
    if resume:
        done_ids = await sink.existing_ids()
        if dead_letter is not sink:
            done_ids |= await dead_letter.existing_ids()
        if done_ids:
            log.info("resuming", extra={"already_done": len(done_ids)})
    file_root = settings.worker.allow_file_root or ("." if source.trusted else None)
    pipeline = Pipeline(
        source=source,
        results=results,
        dead_letter=dead,
        model=rt.model,
        limiter=_limiter(settings),
        retry=settings.retry,
        images=ImagePolicy(file_root=file_root),
        jobs_in_flight=settings.worker.jobs_in_flight_limit,
        done_ids=done_ids,
    )
    try:
        async with anyio.create_task_group() as root:
            root.start_soon(results.run)
            if dead is not results:
                root.start_soon(dead.run)
            root.start_soon(rt.tokens.run_refresher)
            if handle_signals:
                root.start_soon(_watch_signals, pipeline, shutdown_grace_s)
            await pipeline.run()
            root.cancel_scope.cancel()
    finally:
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await source.aclose()
            await sink.aclose()
            if dead_letter is not sink:
                await dead_letter.aclose()
    return pipeline.stats


async def _watch_signals(pipeline: Pipeline, grace_s: float) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "shutdown_requested",
                extra={"signal": signal.Signals(signum).name, "grace_s": grace_s},
            )
            pipeline.stop_reading()
            break
        with anyio.move_on_after(grace_s):
            async for signum in signals:
                log.warning("shutdown_forced", extra={"signal": signal.Signals(signum).name})
                break
        pipeline.abandon_in_flight()


async def run_worker(settings: Settings) -> RunStats:
    w = settings.worker
    source = open_source(w.source)
    sink = open_sink(w.sink)
    dl_spec = w.dead_letter or default_dead_letter(w.sink)
    dead_letter = sink if dl_spec == w.sink else open_sink(dl_spec, key="worker.dead_letter")
    async with runtime(settings) as rt:
        stats = await run_pipeline(
            rt, source, sink, dead_letter, resume=isinstance(source, FileSource | StdinSource)
        )
    summary = stats.summary()
    print(
        f"done: {summary['ok']} ok, {summary['dead_lettered']} dead-lettered, "
        f"{summary['skipped']} skipped (already done), {summary['failed']} failed "
        f"in {summary['seconds']:.2f} s ({summary['jobs_per_s']:.1f} jobs/s); "
        f"results: {sink.name}, dead letters: {dead_letter.name}",
        file=sys.stderr,
        flush=True,
    )
    log.info("run_finished", extra=summary)
    return stats


async def describe_uris(settings: Settings, uris: list[str]) -> RunStats:
    import json

    from .sinks import StdoutSink
    from .sources import MemorySource

    source = MemorySource([json.dumps({"image_uri": u}).encode() for u in uris], name="argv")
    out = StdoutSink()
    async with runtime(settings) as rt:
        return await run_pipeline(rt, source, out, out, resume=False)
