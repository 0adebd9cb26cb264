"""Wiring: settings -> token provider, model client, source, sinks -> one root task group.

The commands: ``worker run`` (:func:`run_worker`), ``worker serve`` (:func:`serve_push`),
``worker describe`` (:func:`describe_uris`); ``worker loadtest`` builds on
:func:`runtime` and :func:`run_pipeline` too.

One root task group holds the long-lived tasks (sink writers, token refresher, signal
watcher, loop watchdog) and the pipeline; when the pipeline returns, the group is
cancelled. Cleanup (closing the source, sinks and HTTP clients) is shielded and
time-bounded.

Shutdown: the first SIGTERM/SIGINT turns readiness to 503 and stops reading; jobs in
flight get ``shutdown_grace_s`` to finish and be acked; the rest are nacked. A second
signal nacks at once. The source then flushes its acks and the sinks close; signals that
arrive meanwhile are swallowed so they cannot cut the flush short.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from .auth import GoogleTokens, LazyGoogleTokens, NoTokens, make_token_provider
from .cost import Budget, Prices
from .endpoints import Endpoint, EndpointPool
from .fetch import ImageFetcher
from .http import add_routes, serve_http
from .images import ImagePolicy, backend_reads_uris
from .limits import AdaptiveLimiter, Limiter, RateCeiling
from .logs import current_format
from .metrics import Telemetry
from .model import ModelClient
from .pipeline import Pipeline, RunStats
from .progress import Progress
from .protocols import Sink, Source, TokenProvider
from .pubsub import PubSubClient, PushSource, client_for, make_verifier
from .retry import RetryPolicy
from .reuse import Reuse
from .schemas import load_schemas
from .settings import ResolvedEndpoint, Settings, resolve_endpoints
from .sinks import BatchWriter, StdoutSink, dead_letter_spec, open_sinks
from .sources import FileSource, MemorySource, StdinSource, open_source
from .store import open_store
from .tracing import Tracing

if TYPE_CHECKING:
    from .simulator import Simulator

__all__ = [
    "Runtime",
    "describe_uris",
    "make_ceiling",
    "make_limiter",
    "run_pipeline",
    "run_worker",
    "runtime",
    "serve_push",
    "tune_gc",
]

log = logging.getLogger("worker.app")

CLEANUP_TIMEOUT_S = 10.0


@dataclass
class Runtime:
    """The process-wide parts every command shares."""

    settings: Settings
    tokens: TokenProvider
    #: One client per endpoint, in the order of ``resolve_endpoints``.
    models: tuple[tuple[ResolvedEndpoint, ModelClient], ...]
    #: Google credentials for Google APIs (Pub/Sub, Cloud Storage, BigQuery): the model's
    #: when they are Google's, else loaded on first use. Never an API key.
    google_tokens: TokenProvider = field(default_factory=LazyGoogleTokens)
    simulator: Simulator | None = None
    #: Fetches image bytes for jobs (https://, gs://); owns its HTTP sessions.
    fetcher: ImageFetcher | None = None


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
        endpoints = resolve_endpoints(settings)
        # One token provider for every endpoint: one refresh, never a stampede.
        await tokens.start()
        models = tuple(
            (
                ep,
                ModelClient(
                    settings.model,
                    tokens,
                    base_url=ep.base_url,
                    name=ep.name,
                    max_connections=ep.max_concurrency or settings.worker.concurrency_ceiling,
                ),
            )
            for ep in endpoints
        )

        async def close_models() -> None:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                for _, model in models:
                    await model.aclose()

        stack.push_async_callback(close_models)
        # gs:// is read with Google's token only; a third-party API key must never be sent
        # to Cloud Storage (without a Google token, public objects are read anonymously).
        gcs_tokens = tokens if isinstance(tokens, GoogleTokens) else None
        # Loading the CA bundle reads files: off the event loop.
        fetcher = await anyio.to_thread.run_sync(
            lambda: ImageFetcher.from_settings(settings.images, gcs_tokens=gcs_tokens)
        )

        async def close_fetcher() -> None:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await fetcher.aclose()

        stack.push_async_callback(close_fetcher)
        tune_gc()
        yield Runtime(
            settings=settings,
            tokens=tokens,
            models=models,
            google_tokens=tokens if tokens.google else LazyGoogleTokens(),
            simulator=simulator,
            fetcher=fetcher,
        )


_gc_tuned = False


def tune_gc() -> None:
    """Once per process, after start-up: what exists then (modules, settings, clients)
    lives as long as the process, so keep it out of the cyclic GC's full collections,
    which would otherwise walk all of it again and again under load. And collect the
    young generation every 10,000 net allocations, not 700: a model request allocates
    thousands of short-lived objects that reference counting frees anyway. Measured
    together: ~17% less CPU per model request (bench/, P3)."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def retry_policy(settings: Settings) -> RetryPolicy:
    """A job's budget for model calls (``[retry]``)."""
    r = settings.retry
    return RetryPolicy(
        attempts=r.max_attempts,
        deadline_s=r.deadline_s,
        initial_backoff_s=r.initial_backoff_s,
        max_backoff_s=r.max_backoff_s,
    )


def make_limiter(settings: Settings, endpoint: ResolvedEndpoint | None = None) -> Limiter:
    """``--concurrency N``: a fixed limit; ``auto``: AIMD between min and max concurrency.
    Per endpoint; its own ``max_concurrency`` overrides the worker's ceiling."""
    w = settings.worker
    own = endpoint.max_concurrency if endpoint is not None else 0
    if w.concurrency == "auto":
        high = own or w.max_concurrency
        return AdaptiveLimiter(min(w.min_concurrency, high), high)
    return Limiter(own or max(1, int(w.concurrency)))


def make_ceiling(endpoint: ResolvedEndpoint) -> RateCeiling | None:
    if not (endpoint.rpm or endpoint.tpm):
        return None
    return RateCeiling(rpm=endpoint.rpm, tpm=endpoint.tpm)


def make_endpoints(
    rt: Runtime, observer: Telemetry | None, tracing: Tracing | None = None
) -> EndpointPool:
    """This run's endpoints, each with its own limiter, ceiling, quota and circuit."""
    settings = rt.settings
    endpoints = [
        Endpoint(
            name=resolved.name,
            client=client,
            limiter=make_limiter(settings, resolved),
            ceiling=make_ceiling(resolved),
            weight=resolved.weight,
            tiers=resolved.tiers,
        )
        for resolved, client in rt.models
    ]
    w = settings.worker
    return EndpointPool(
        endpoints,
        observer=observer,
        prices=Prices(settings.prices, provisioned=settings.model.provisioned),
        model=settings.model.model,
        budget=Budget(w.budget_usd) if w.budget_usd > 0 else None,
        tracing=tracing,
    )


def backend_reads_uris_for(rt: Runtime) -> bool:
    """Whether every endpoint reads gs:// and data: itself (Vertex AI does): one that does
    not would be sent a URI it cannot read."""
    s = rt.settings
    return all(
        backend_reads_uris(
            s.images.backend, resolved.base_url, embedded_simulator=s.simulator.embedded
        )
        for resolved, _ in rt.models
    )


async def run_pipeline(
    rt: Runtime,
    source: Source,
    sink: Sink,
    dead_letter: Sink,
    *,
    resume: bool,
    handle_signals: bool = True,
    shutdown_grace_s: float = 20.0,
    on_start: Callable[[Pipeline], None] | None = None,
    telemetry: Telemetry | None = None,
    max_jobs: int | None = None,
    tracing: Tracing | None = None,
    progress: Progress | None = None,
) -> RunStats:
    """Run ``source`` through the pipeline. ``on_start`` is handed the pipeline before the
    first job (the load test reads its limiter and counters, and stops it); ``telemetry``
    is what the side server reports on; ``max_jobs`` stops reading after that many;
    ``tracing`` replaces what the OTEL_* variables would set up (tests); ``progress`` is
    the live display, if any.

    The source and the sinks are prepared first, outside any task group, so what the
    operator must fix (a missing file, a subscription that does not exist, a directory
    that cannot be written) surfaces as one :class:`~worker.errors.ConfigError`."""
    settings = rt.settings
    # Schemas are checked (and a bad one refused) before anything is opened.
    schemas = await anyio.to_thread.run_sync(
        load_schemas, settings.model.response_schema, settings.schemas
    )
    store = open_store(settings.store.uri)
    reuse = (
        Reuse(
            store,
            key_mode=settings.store.key,
            ttl_s=settings.store.ttl_s,
            lease_s=settings.store.lease_s,
            wait_s=settings.store.wait_s,
            gcs_identity=rt.fetcher.gcs_identity if rt.fetcher is not None else None,
        )
        if store is not None
        else None
    )
    if telemetry is None:
        telemetry = Telemetry(
            stall_timeout_s=settings.http.stall_timeout_s,
            max_loop_lag_s=settings.http.max_loop_lag_s,
            process_metrics=False,
        )
    results = BatchWriter(sink, on_write=telemetry.sink_observer("results"))
    dead = BatchWriter(dead_letter, on_write=telemetry.sink_observer("dead_letter"))
    for s in {id(sink): sink, id(dead_letter): dead_letter}.values():
        s.set_tokens(rt.google_tokens)
    try:
        await source.prepare()
        await sink.prepare()
        if dead_letter is not sink:
            await dead_letter.prepare()
        if store is not None:
            await store.prepare()
    except BaseException:
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await source.aclose()
            await sink.aclose()
            if dead_letter is not sink:
                await dead_letter.aclose()
            if store is not None:
                await store.aclose()
        raise
    if source.answered_at is not None:
        telemetry.mark_source_answered()
    done_ids: set[str] = set()
    if resume:
        done_ids = await sink.existing_ids()
        if dead_letter is not sink:
            done_ids |= await dead_letter.existing_ids()
        if done_ids:
            log.info("resuming", extra={"already_done": len(done_ids)})
    file_root = settings.worker.allow_file_root or ("." if source.trusted else None)
    if tracing is None:
        tracing = Tracing.from_environment(
            project=settings.model.project or os.environ.get("GOOGLE_CLOUD_PROJECT", "")
        )
    if tracing is not None:
        tracing.install_log_fields()
    models = make_endpoints(rt, telemetry, tracing)
    pipeline = Pipeline(
        source=source,
        results=results,
        dead_letter=dead,
        models=models,
        retry=retry_policy(settings),
        images=ImagePolicy(
            file_root=file_root,
            max_image_bytes=settings.images.max_image_bytes,
            inline_images=settings.images.inline_images,
            backend_reads_uris=backend_reads_uris_for(rt),
            allow_http=settings.images.allow_http,
            fetcher=rt.fetcher,
            inline_budget_bytes=settings.images.max_inline_bytes_in_flight,
        ),
        jobs_in_flight=settings.worker.jobs_in_flight_limit,
        done_ids=done_ids,
        observer=telemetry,
        max_jobs=max_jobs,
        default_tier=settings.model.tier,
        generation=settings.model.generation(),
        schemas=schemas if schemas else None,
        reuse=reuse,
        prompt=settings.model.prompt,
        tracing=tracing,
    )
    if models.budget is not None:
        models.budget.on_exhausted = pipeline.budget_reached
    telemetry.attach(pipeline, source)
    try:
        async with anyio.create_task_group() as root:
            root.start_soon(results.run)
            if dead is not results:
                root.start_soon(dead.run)
            root.start_soon(rt.tokens.run_refresher)
            root.start_soon(telemetry.watch_loop)
            if progress is not None:
                root.start_soon(progress.run, pipeline)
            if reuse is not None:
                root.start_soon(reuse.run_renewer)
            if handle_signals:
                # Before the source's services start: a SIGTERM during start-up drains too.
                root.start_soon(_watch_signals, pipeline, shutdown_grace_s, telemetry)
            # Queue sources pull, extend leases and ack in the background.
            await root.start(source.run_services)
            if on_start is not None:
                on_start(pipeline)
            telemetry.mark_running()
            await pipeline.run()
            if pipeline.budget_exhausted and source.redelivers:
                pipeline.stats.idled_at_budget = True
                await _idle_until_stopped(source, telemetry)
            root.cancel_scope.cancel()
    finally:
        telemetry.mark_stopped()
        with (
            _swallow_signals() if handle_signals else contextlib.nullcontext(),
            anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True) as cleanup,
        ):
            await source.aclose()
            await sink.aclose()
            if dead_letter is not sink:
                await dead_letter.aclose()
            if store is not None:
                await store.aclose()
            if tracing is not None:
                await anyio.to_thread.run_sync(tracing.shutdown)  # flush buffered spans
        if cleanup.cancelled_caught:
            log.error("cleanup_timed_out", extra={"timeout_s": CLEANUP_TIMEOUT_S})
    if telemetry.drain_started_at is not None:
        log.info(
            "shutdown_complete",
            extra={
                "drain_s": round(time.monotonic() - telemetry.drain_started_at, 3),
                "nacked": pipeline.stats.nacked,
            },
        )
    return pipeline.stats


async def _idle_until_stopped(source: Source, telemetry: Telemetry) -> None:
    """The budget is spent and the jobs come from a queue: hand back what is held, answer
    not-ready, and wait for SIGTERM. Exiting would only get the worker restarted with a
    fresh budget, spending again."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
        await source.aclose()
    telemetry.mark_budget_exhausted()
    log.warning("budget_exhausted_idle", extra={"source": source.name})
    await telemetry.stop_requested.wait()


@contextlib.contextmanager
def _swallow_signals() -> Iterator[None]:
    """Queue SIGTERM/SIGINT unread while cleanup runs: the shutdown is under way already."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT):
        yield


@asynccontextmanager
async def pubsub_session(client: PubSubClient | None, rt: Runtime) -> AsyncIterator[None]:
    """Give ``client`` a Google token (the runtime's when it holds Google credentials, else
    its own, never an API key); close it after the sources and sinks."""
    if client is not None and not client.emulator:
        client.share_tokens(rt.google_tokens)
    try:
        yield
    finally:
        if client is not None:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await client.aclose()


async def _watch_signals(pipeline: Pipeline, grace_s: float, telemetry: Telemetry) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            telemetry.begin_drain()  # readiness 503 first: stop being sent work
            pipeline.drain()
            log.info(
                "shutdown_requested",
                extra={
                    "signal": signal.Signals(signum).name,
                    "grace_s": grace_s,
                    "in_flight": pipeline.in_flight,
                },
            )
            break
        with anyio.move_on_after(grace_s) as grace:
            async for signum in signals:
                log.warning(
                    "shutdown_forced",
                    extra={"signal": signal.Signals(signum).name, "in_flight": pipeline.in_flight},
                )
                break
        if grace.cancelled_caught and pipeline.in_flight:
            log.warning(
                "shutdown_grace_expired",
                extra={"grace_s": grace_s, "in_flight": pipeline.in_flight},
            )
        pipeline.abandon_in_flight()
        # Stay subscribed until the group is cancelled: a third signal must not kill the
        # process while the nacks go out.
        async for signum in signals:
            log.warning("shutdown_signal_ignored", extra={"signal": signal.Signals(signum).name})


async def run_worker(settings: Settings, *, telemetry: Telemetry | None = None) -> RunStats:
    """``worker run``. With ``http.port`` set, the side server is up before the first token
    is fetched, so probes see "starting" rather than a refused connection. A test can
    pass its own ``telemetry`` (and serve it itself) to read it after the run."""
    w = settings.worker
    h = settings.http
    if telemetry is None:
        telemetry = Telemetry(stall_timeout_s=h.stall_timeout_s, max_loop_lag_s=h.max_loop_lag_s)
    # One Pub/Sub client (one session, one token) shared by source and sinks.
    pubsub = client_for(settings, w.source, w.sink, dead_letter_spec(settings))
    source = open_source(w.source, settings=settings, pubsub=pubsub)
    sink, dead_letter = open_sinks(settings, pubsub)
    async with AsyncExitStack() as stack:
        if h.port:
            await stack.enter_async_context(serve_http(telemetry, h.host, h.port))
        rt = await stack.enter_async_context(runtime(settings))
        await stack.enter_async_context(pubsub_session(pubsub, rt))
        telemetry.set_tokens(rt.tokens)
        stats = await run_pipeline(
            rt,
            source,
            sink,
            dead_letter,
            resume=isinstance(source, FileSource | StdinSource),
            shutdown_grace_s=w.shutdown_grace_s,
            telemetry=telemetry,
            # A file's jobs are counted (its lines, on a thread) for done/total and ETA.
            progress=Progress.for_run(
                settings.log.progress,
                count_path=source.path if isinstance(source, FileSource) else None,
            ),
        )
    summary = stats.summary()
    if current_format() == "text":
        # A person at a terminal gets one readable line; JSON logs carry run_finished.
        cost = "" if stats.cost_usd is None else f", cost ${stats.cost_usd:.4f}"
        print(
            f"done: {summary['ok']} ok, {summary['dead_lettered']} dead-lettered, "
            f"{summary['skipped']} skipped (already done), {summary['failed']} failed "
            f"in {summary['seconds']:.2f} s ({summary['jobs_per_s']:.1f} jobs/s{cost}); "
            f"results: {sink.name}, dead letters: {dead_letter.name}",
            file=sys.stderr,
            flush=True,
        )
        if stats.budget_exhausted and not stats.idled_at_budget:
            print(
                f"budget reached: ${stats.cost_usd or 0:.4f} spent of "
                f"${settings.worker.budget_usd:.4f}; run again with a larger --budget-usd "
                "to go on (finished jobs are skipped)",
                file=sys.stderr,
                flush=True,
            )
    log.info("run_finished", extra=summary)
    return stats


async def serve_push(
    settings: Settings,
    *,
    host: str = "0.0.0.0",  # Cloud Run sends traffic to the container's interfaces
    port: int = 8080,
    on_listening: Callable[[int], None] | None = None,
    handle_signals: bool = True,
) -> RunStats:
    """``worker serve``: Pub/Sub push requests through the pipeline until SIGTERM/SIGINT
    (or cancellation). Probes and metrics are served on the same port."""
    w = settings.worker
    pubsub = client_for(settings, w.sink, dead_letter_spec(settings))
    sink, dead_letter = open_sinks(settings, pubsub)
    telemetry = Telemetry(max_loop_lag_s=settings.http.max_loop_lag_s, watch_progress=False)
    source = PushSource(
        host=host,
        port=port,
        max_waiting=w.jobs_in_flight_limit,
        verifier=make_verifier(settings.pubsub),
        on_listening=on_listening,
        add_routes=lambda app: add_routes(app, telemetry),
    )
    async with runtime(settings) as rt, pubsub_session(pubsub, rt):
        telemetry.set_tokens(rt.tokens)
        stats = await run_pipeline(
            rt,
            source,
            sink,
            dead_letter,
            resume=False,
            handle_signals=handle_signals,
            shutdown_grace_s=w.shutdown_grace_s,
            telemetry=telemetry,
            progress=Progress.for_run(settings.log.progress),
        )
    log.info("run_finished", extra=stats.summary())
    return stats


async def describe_uris(settings: Settings, uris: list[str]) -> RunStats:
    """``worker describe URI...``: one result line per URI on stdout."""
    source = MemorySource([json.dumps({"image_uri": u}).encode() for u in uris], name="argv")
    out = StdoutSink()
    async with runtime(settings) as rt:
        return await run_pipeline(rt, source, out, out, resume=False)
