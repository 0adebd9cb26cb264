"""What a running worker reports: Prometheus metrics, liveness and readiness.

Most numbers already exist as plain counters on the objects that do the work (the
pipeline's :class:`~worker.pipeline.RunStats`, its limiters, the token provider, the
source). :class:`Telemetry` reads them when ``/metrics`` is scraped instead of mirroring
every event into ``prometheus_client`` objects, so a job costs the worker a few integer
increments and one histogram bucket bump, not a handful of locked metric updates.

Each :class:`Telemetry` has its own :class:`~prometheus_client.CollectorRegistry` (not the
process-global one), so tests can run several workers in one process.

From the source it reads two declared capabilities (:class:`~worker.protocols.Source`):
``answered_at``, which tells liveness "had nothing to do" apart from "stuck" and
readiness that the source is reachable before the first job arrives, and ``counters``
(:class:`~worker.protocols.SourceCounters`), exported as ``worker_source_<name>_total``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .errors import ServiceError
from .protocols import SourceCounters

if TYPE_CHECKING:
    from .endpoints import EndpointPool
    from .pipeline import Pipeline
    from .protocols import Delivery, Source, TokenProvider

__all__ = ["LatencyHistogram", "Telemetry", "status_label"]

log = logging.getLogger("worker.metrics")

Phase = Literal["starting", "running", "budget_exhausted", "draining", "stopped"]

# Seconds. Model calls run from ~100 ms to the 120 s timeout; sink writes are an fsync
# or a publish round trip.
MODEL_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
JOB_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800)
SINK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Quota saturation: over this window, an endpoint counts as held by its quota if it
# answered 429 within QUOTA_429_WINDOW_S (AIMD probes the quota every few round trips).
SATURATION_WINDOW_S = 60.0
QUOTA_429_WINDOW_S = 10.0

# How often the loop watchdog ticks, and for how many multiples of max_loop_lag_s a lag
# it saw keeps /healthz at 503 (a probe answered right after a freeze must still see it).
WATCHDOG_TICK_S = 0.25
LAG_MEMORY_FACTOR = 2.0


class LatencyHistogram:
    """A Prometheus-style histogram without locks: the worker observes from one event
    loop thread, and the scrape reads it on the same loop."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "<=").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_fmt_bound(bound), running))
        out.append(("+Inf", self.count))
        return out


def _fmt_bound(bound: float) -> str:
    return str(int(bound)) + ".0" if bound.is_integer() else repr(bound)


def status_label(error: ServiceError | None) -> str:
    """The label of a model answer: its HTTP status, or what went wrong on the wire."""
    return "200" if error is None else error.label


def _publish_epoch(source_info: Mapping[str, Any] | None) -> float | None:
    if not source_info:
        return None
    text = source_info.get("publish_time")
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class Telemetry:
    """Live state for ``/healthz``, ``/readyz`` and ``/metrics``.

    The pipeline calls :meth:`received`, :meth:`model_answered` and :meth:`finished`
    (through its ``observer``); sink writers call the function from :meth:`sink_observer`.
    Everything else is read from the attached objects when scraped.
    """

    def __init__(
        self,
        *,
        stall_timeout_s: float = 300.0,
        max_loop_lag_s: float = 5.0,
        process_metrics: bool = True,
        watch_progress: bool = True,
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        # False for the push server: no request for an hour is not a stall.
        self.watch_progress = watch_progress
        self.max_loop_lag_s = max_loop_lag_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.phase: Phase = "starting"
        self.started_at = time.monotonic()
        self.drain_started_at: float | None = None
        #: Set by the first SIGTERM/SIGINT (begin_drain).
        self.stop_requested = anyio.Event()
        self.pipeline: Pipeline | None = None
        self.source: Source | None = None
        self.tokens: TokenProvider | None = None
        self._source_answered = False
        self._last_progress = self.started_at
        # Loop watchdog.
        self._last_tick = self.started_at
        self.loop_lag_s = 0.0
        self._lag_seen_at = -math.inf
        self._lag_seen_s = 0.0
        # Per-event aggregates (cheap: see LatencyHistogram).
        self.model_latency = LatencyHistogram(MODEL_BUCKETS_S)
        self.job_latency = LatencyHistogram(JOB_BUCKETS_S)
        self.sink_latency: dict[str, LatencyHistogram] = {}
        self.sink_records: dict[str, int] = {}
        #: Model answers by (endpoint, code).
        self.model_requests: dict[tuple[str, str], int] = {}
        # One sample per watchdog tick over the last minute: were requests held back by
        # the quota (every endpoint that could take them recently 429ed, paused or out)?
        self._quota_bound: deque[bool] = deque(maxlen=int(SATURATION_WINDOW_S / WATCHDOG_TICK_S))
        self.queue_lag_s: float | None = None
        self.registry.register(_Collector(self))
        if process_metrics:
            ProcessCollector(registry=self.registry)

    # -- wiring ----------------------------------------------------------------------

    def attach(self, pipeline: Pipeline, source: Source) -> None:
        self.pipeline = pipeline
        self.source = source

    def set_tokens(self, tokens: TokenProvider) -> None:
        """The runtime holds its first token (``start()`` returned)."""
        self.tokens = tokens

    def sink_observer(self, name: str) -> Callable[[int, float], None]:
        """An ``on_write`` callback for :class:`~worker.sinks.batch.BatchWriter`."""
        hist = self.sink_latency.setdefault(name, LatencyHistogram(SINK_BUCKETS_S))
        self.sink_records.setdefault(name, 0)

        def on_write(records: int, seconds: float) -> None:
            hist.observe(seconds)
            self.sink_records[name] += records

        return on_write

    # -- lifecycle -------------------------------------------------------------------

    def mark_running(self) -> None:
        if self.phase == "starting":
            self.phase = "running"
            self._last_progress = time.monotonic()

    def begin_drain(self) -> None:
        self.stop_requested.set()
        if self.phase in ("starting", "running", "budget_exhausted"):
            self.phase = "draining"
            self.drain_started_at = time.monotonic()

    def mark_budget_exhausted(self) -> None:
        """The budget is spent: not ready (send no more work), but alive."""
        if self.phase == "running":
            self.phase = "budget_exhausted"

    def mark_stopped(self) -> None:
        self.phase = "stopped"

    def mark_source_answered(self) -> None:
        """Upstream answered outside the source's own account (e.g. ``prepare``)."""
        self._source_answered = True
        self._last_progress = time.monotonic()

    # -- pipeline observer (hot path: keep these to a few operations) -------------------

    def received(self, delivery: Delivery) -> None:
        self._source_answered = True
        self._last_progress = time.monotonic()
        published = _publish_epoch(delivery.source_info)
        if published is not None:
            self.queue_lag_s = max(0.0, time.time() - published)

    def model_answered(self, endpoint: str, error: ServiceError | None, latency_s: float) -> None:
        key = (endpoint, status_label(error))
        self.model_requests[key] = self.model_requests.get(key, 0) + 1
        self.model_latency.observe(latency_s)

    def finished(self, latency_s: float) -> None:
        self._last_progress = time.monotonic()
        self.job_latency.observe(latency_s)

    # -- health ----------------------------------------------------------------------

    async def watch_loop(self) -> None:
        """Tick until cancelled; a late tick is time the loop could not run anything."""
        while True:
            before = time.monotonic()
            await anyio.sleep(WATCHDOG_TICK_S)
            now = time.monotonic()
            self._last_tick = now
            self.loop_lag_s = max(0.0, now - before - WATCHDOG_TICK_S)
            if self.loop_lag_s > self.max_loop_lag_s:
                self._lag_seen_at = now
                self._lag_seen_s = self.loop_lag_s
                log.warning("event_loop_stalled", extra={"latency_s": round(self.loop_lag_s, 3)})
            if self.pipeline is not None:
                self._quota_bound.append(self.pipeline.models.quota_bound(QUOTA_429_WINDOW_S))

    @property
    def quota_saturation(self) -> float:
        """Share of the last minute in which admitted jobs waited for a model slot while
        every endpoint that could serve them was held back by its quota: near 1, the
        quota (not this replica) limits throughput, and another replica would not help."""
        samples = self._quota_bound
        return sum(samples) / len(samples) if samples else 0.0

    def last_progress(self) -> float:
        answered = self.source.answered_at if self.source is not None else None
        if answered is not None and answered > self._last_progress:
            return answered
        return self._last_progress

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        behind_s = now - self._last_tick - WATCHDOG_TICK_S
        recent_lag = now - self._lag_seen_at <= LAG_MEMORY_FACTOR * self.max_loop_lag_s
        idle_s = now - self.last_progress()
        detail: dict[str, Any] = {
            "phase": self.phase,
            "loop_lag_s": round(max(behind_s, self.loop_lag_s), 3),
            "since_progress_s": round(idle_s, 3),
        }
        if behind_s > self.max_loop_lag_s or recent_lag:
            detail["reason"] = "event loop stalled"
            if recent_lag:
                detail["loop_lag_s"] = round(max(detail["loop_lag_s"], self._lag_seen_s), 3)
            return False, detail
        # A draining worker is finishing work on a clock of its own (the grace period).
        stalled = self.watch_progress and idle_s > self.stall_timeout_s
        if self.phase in ("starting", "running") and stalled:
            detail["reason"] = f"no progress for {idle_s:.1f} s"
            return False, detail
        return True, detail

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"phase": self.phase}
        if self.phase != "running":
            detail["reason"] = self.phase
            return False, detail
        if self.tokens is not None and not self._token_held():
            detail["reason"] = "no usable token"
            return False, detail
        answered = self._source_answered or (
            self.source is not None and self.source.answered_at is not None
        )
        if not answered:
            detail["reason"] = "source has not answered yet"
            return False, detail
        return True, detail

    def _token_held(self) -> bool:
        if self.tokens is None:
            return False
        expires_at = self.tokens.expires_at
        return expires_at is None or expires_at > time.time()

    # -- exposition ------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(
    name: str, doc: str, hist: LatencyHistogram, labels: Mapping[str, str] | None = None
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), hist.buckets(), hist.total)
    return family


class _Collector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def collect(self) -> Iterator[Metric]:
        t = self.t
        p = t.pipeline
        if p is not None:
            s = p.stats
            yield _counter("worker_jobs_received", "Jobs taken from the source.", s.received)
            yield _counter(
                "worker_jobs_succeeded", "Jobs whose result is in the result sink.", s.ok
            )
            yield _counter(
                "worker_jobs_dead_lettered",
                "Jobs that failed permanently; their error record is in the dead-letter sink.",
                s.dead_lettered,
            )
            by_type = CounterMetricFamily(
                "worker_dead_letters",
                "Dead-letter records written, by error.type (see the README's error types).",
                labels=["error_type"],
            )
            for error_type, n in sorted(s.dead_lettered_by_type.items()):
                by_type.add_metric([error_type], n)
            yield by_type
            yield _counter(
                "worker_jobs_nacked", "Jobs handed back to the source unfinished.", s.nacked
            )
            yield _counter(
                "worker_jobs_skipped", "Jobs skipped because their id was already done.", s.skipped
            )
            yield _counter(
                "worker_jobs_failed",
                "Jobs that could be put nowhere (sink down, source cannot take them back).",
                s.failed,
            )
            yield _counter("worker_model_retries", "Model requests retried (any cause).", s.retries)
            yield _gauge(
                "worker_jobs_in_flight", "Jobs admitted and not yet finished.", p.in_flight
            )
            yield from _endpoint_metrics(p.models)
            yield _gauge(
                "worker_quota_saturation",
                "Share of the last minute in which jobs waited for a model slot while every "
                "endpoint that could serve them was held back by its quota (429s, pauses).",
                t.quota_saturation,
            )
            yield from _cost_metrics(p.models, budget_exhausted=p.budget_exhausted)
            if p.reuse is not None:
                yield _counter(
                    "worker_store_hits",
                    "Jobs answered from the result store (no model call).",
                    p.reuse.hits,
                )
                yield _counter(
                    "worker_duplicates_suppressed",
                    "Deliveries of a job already done or under way elsewhere, answered with "
                    "its record instead of a model call.",
                    p.reuse.duplicates_suppressed,
                )
                yield _counter(
                    "worker_store_errors",
                    "Result store operations that failed (each treated as a miss).",
                    p.reuse.errors,
                )
        requests = CounterMetricFamily(
            "worker_model_requests",
            "Model requests by answer: HTTP status, timeout or connection_error.",
            labels=["endpoint", "code"],
        )
        for (endpoint, code), n in sorted(t.model_requests.items()):
            requests.add_metric([endpoint, code], n)
        yield requests
        yield _histogram(
            "worker_model_latency_seconds",
            "Time of one model request, answer or failure.",
            t.model_latency,
        )
        yield _histogram(
            "worker_job_latency_seconds",
            "End to end: from admission to the job's ack or nack.",
            t.job_latency,
        )
        sink = HistogramMetricFamily(
            "worker_sink_write_seconds",
            "Time of one group-committed sink write.",
            labels=["sink"],
        )
        records = CounterMetricFamily(
            "worker_sink_records", "Records durably written.", labels=["sink"]
        )
        for name, hist in sorted(t.sink_latency.items()):
            sink.add_metric([name], hist.buckets(), hist.total)
            records.add_metric([name], t.sink_records[name])
        yield sink
        yield records
        if t.queue_lag_s is not None:
            yield _gauge(
                "worker_queue_lag_seconds",
                "Now minus publish time of the latest job received, at its receipt.",
                t.queue_lag_s,
            )
        tokens = t.tokens
        if tokens is not None and tokens.google:
            yield _counter("worker_token_refreshes", "Access-token refreshes.", tokens.refreshes)
            yield _counter(
                "worker_token_refresh_failures",
                "Access-token refreshes that failed.",
                tokens.refresh_failures,
            )
            expires_at = tokens.expires_at
            if expires_at is not None:
                yield _gauge(
                    "worker_token_expiry_seconds",
                    "Seconds until the access token held expires.",
                    expires_at - time.time(),
                )
        if t.source is not None:
            yield from _source_counters(t.source.counters)
        yield _gauge(
            "worker_event_loop_lag_seconds",
            "How late the loop watchdog's latest tick was.",
            t.loop_lag_s,
        )
        yield _phase(t.phase)


_SOURCE_COUNTER_DOCS = {
    "acked": "Messages acknowledged, confirmed by the service.",
    "nacked": "Messages handed back (modifyAckDeadline 0), confirmed by the service.",
    "extended": "Lease extensions sent (modifyAckDeadline), per message.",
    "lease_expired": "Messages let go at max_lease_s.",
    "ack_failures": "Acks that failed after retries (the message will be redelivered).",
    "modack_failures": "Lease extensions or nacks that failed after retries.",
}


def _source_counters(counters: SourceCounters | None) -> Iterator[Metric]:
    if counters is None:
        return
    for f in dataclasses.fields(counters):
        doc = _SOURCE_COUNTER_DOCS[f.name]
        yield _counter(f"worker_source_{f.name}", doc, getattr(counters, f.name))


def _labelled(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    values: Iterable[tuple[str, float]],
) -> Metric:
    family = kind(name, doc, labels=["endpoint"])
    for endpoint, value in values:
        family.add_metric([endpoint], value)
    return family


def _endpoint_metrics(models: EndpointPool) -> Iterator[Metric]:
    eps = models.endpoints
    yield _labelled(
        GaugeMetricFamily,
        "worker_concurrency_limit",
        "Model requests allowed in flight now (moves under --concurrency auto).",
        [(ep.name, ep.limiter.limit) for ep in eps],
    )
    yield _labelled(
        GaugeMetricFamily,
        "worker_model_requests_in_flight",
        "Model requests in flight now.",
        [(ep.name, ep.limiter.in_use) for ep in eps],
    )
    yield _labelled(
        CounterMetricFamily,
        "worker_model_rate_limited",
        "Model answers 429 / RESOURCE_EXHAUSTED.",
        [(ep.name, ep.limiter.counts["rate_limited"]) for ep in eps],
    )
    yield _labelled(
        CounterMetricFamily,
        "worker_endpoint_circuit_opened",
        "Times the endpoint was taken out of rotation (circuit opened).",
        [(ep.name, ep.circuit.opened) for ep in eps],
    )
    state = GaugeMetricFamily(
        "worker_endpoint_circuit_state",
        "1 for the endpoint's circuit state: closed (in rotation), open, half_open (probing).",
        labels=["endpoint", "state"],
    )
    for ep in eps:
        for name in ("closed", "open", "half_open"):
            state.add_metric([ep.name, name], 1.0 if ep.circuit.state == name else 0.0)
    yield state
    yield _gauge(
        "worker_model_requests_waiting",
        "Model requests waiting for a slot on any endpoint.",
        models.waiting,
    )


def _cost_metrics(models: EndpointPool, *, budget_exhausted: bool) -> Iterator[Metric]:
    cost = CounterMetricFamily(
        "worker_cost_usd",
        "What the answers cost at list price, USD (answers whose price is known).",
        labels=["model", "tier"],
    )
    for (model, tier), usd in sorted(models.spent_usd.items()):
        cost.add_metric([model, tier], usd)
    yield cost
    tokens = CounterMetricFamily(
        "worker_model_tokens",
        "Tokens the model's answers used (their usage), by model, tier and kind.",
        labels=["model", "tier", "kind"],
    )
    for (model, tier, kind), n in sorted(models.tokens_used.items()):
        tokens.add_metric([model, tier, kind], n)
    yield tokens
    budget = models.budget
    if budget is not None:
        yield _gauge("worker_budget_usd", "The --budget-usd of this run.", budget.limit_usd)
        yield _gauge(
            "worker_budget_exhausted",
            "1 once the budget is spent (nothing more is admitted).",
            1.0 if budget_exhausted else 0.0,
        )


def _phase(phase: Phase) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "worker_phase", "1 for the phase the worker is in.", labels=["phase"]
    )
    for name in ("starting", "running", "budget_exhausted", "draining", "stopped"):
        family.add_metric([name], 1.0 if name == phase else 0.0)
    return family
