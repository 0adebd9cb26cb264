"""``worker loadtest``: synthetic jobs through the real pipeline, with a live display and
a report.

Jobs come from memory by default (or a real ``--source``, optionally filled first through
``--publish-to``), go through the same :class:`~worker.pipeline.Pipeline`, limiter,
``AsyncOpenAI`` client and retry policy as ``worker run``, and land in a counting sink
that keeps only what the report needs (latency, attempts, error type), so the measurement
is of the worker, not of a results file. The target is the bundled simulator, started
in-process (``--target sim``), or any ``--base-url``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .app import pubsub_session, run_pipeline, runtime
from .errors import ConfigError
from .limits import AdaptiveLimiter
from .pipeline import Pipeline, RunStats
from .protocols import Record, SinkBase, Source
from .pubsub import PubSubClient, client_for
from .settings import EndpointSettings, Settings
from .simulator import SimConfig, Simulator
from .sources import MemorySource, open_source

__all__ = ["LoadtestOptions", "ReportSink", "percentile", "render_chart", "run_loadtest"]

log = logging.getLogger("worker.loadtest")

PUBLISH_BATCH = 1000


@dataclass
class LoadtestOptions:
    jobs: int | None = None
    duration_s: float | None = None
    #: Start this simulator in-process and aim at it; None: use ``settings.model``'s URL.
    sim: SimConfig | None = None
    source: str | None = None
    publish_to: str | None = None
    report: Path | None = None
    chart: Path | None = None
    #: "auto": a redrawn bar on a terminal, a line every few seconds otherwise.
    progress: str = "auto"
    sample_interval_s: float = 0.5
    handle_signals: bool = True

    def validate(self) -> None:
        if (self.jobs is None) == (self.duration_s is None):
            raise ConfigError("loadtest", "give exactly one of --jobs N or --duration-s S")
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError("--jobs", "must be >= 1")
        if self.duration_s is not None and not 0 < self.duration_s <= 86_400:
            raise ConfigError("--duration-s", "must be > 0 and <= 86400")
        if self.publish_to and not self.source:
            raise ConfigError("--publish-to", "needs --source (the subscription to read back)")
        if self.publish_to and self.jobs is None:
            raise ConfigError("--publish-to", "needs --jobs N (how many jobs to publish)")
        if self.progress not in ("auto", "bar", "lines", "off"):
            raise ConfigError("--progress", "must be auto, bar, lines or off")
        if self.chart is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--chart",
                    "needs matplotlib: pip install 'image-describer-worker[chart]'",
                ) from None


def synthetic_job(run_id: str, i: int) -> dict[str, str]:
    return {"id": f"lt-{run_id}-{i:07d}", "image_uri": f"gs://loadtest/{run_id}/img-{i:07d}.jpg"}


def _memory_jobs(run_id: str, n: int | None) -> Iterator[bytes]:
    i = 0
    while n is None or i < n:
        yield json.dumps(synthetic_job(run_id, i), separators=(",", ":")).encode()
        i += 1


class ReportSink(SinkBase):
    """Keeps what the report needs from each record, and nothing else."""

    name = "loadtest:"

    def __init__(self) -> None:
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.attempts: Counter[int] = Counter()
        self.latency_s = array("d")

    async def write(self, records: Sequence[Record]) -> None:
        for rec in records:
            self.attempts[int(rec.get("attempts") or 0)] += 1
            if rec.get("status") == "ok":
                self.ok += 1
                self.latency_s.append(float(rec.get("latency_s") or 0.0))
            else:
                self.errors[str(rec["error"]["type"])] += 1


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


class _Monitor:
    """Samples the running pipeline for the display, the report's timeline and the chart."""

    def __init__(self, opts: LoadtestOptions, total: int | None) -> None:
        self.opts = opts
        self.total = total
        self.pipeline: Pipeline | None = None
        self.started = time.monotonic()
        self.samples: list[dict[str, float]] = []
        self._last_done = 0
        self._last_t = 0.0
        mode = opts.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self._last_line_t = 0.0

    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.started = time.monotonic()

    def done(self) -> int:
        p = self.pipeline
        if p is None:
            return 0
        s = p.stats
        return s.ok + s.dead_lettered + s.failed + s.nacked + s.skipped

    def sample(self) -> dict[str, float] | None:
        p = self.pipeline
        if p is None:
            return None
        now = time.monotonic()
        t = now - self.started
        done = self.done()
        dt = t - self._last_t
        rate = (done - self._last_done) / dt if dt > 0 else 0.0
        self._last_done, self._last_t = done, t
        counts = p.models.counts
        point = {
            "t_s": round(t, 3),
            "done": done,
            "jobs_per_s": round(rate, 2),
            "in_flight": p.models.in_use,
            "limit": p.models.limit,
            "rate_limited": counts.get("rate_limited", 0),
            "requests": sum(counts.values()),
        }
        self.samples.append(point)
        return point

    def show(self, point: dict[str, float], *, final: bool = False) -> None:
        if self.mode == "off":
            return
        t = point["t_s"]
        overall = point["done"] / t if t > 0 else 0.0
        if self.total:
            frac = min(1.0, point["done"] / self.total)
            head = f"{int(point['done'])}/{self.total}"
        else:
            dur = self.opts.duration_s or 1.0
            frac = min(1.0, t / dur)
            head = f"{int(point['done'])} in {t:.0f}/{dur:.0f}s"
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] {head} done  {overall:7.1f} jobs/s  in flight {int(point['in_flight']):4d}"
            f"  limit {int(point['limit']):4d}  429s {int(point['rate_limited'])}"
        )
        if self.mode == "bar":
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        elif final or t - self._last_line_t >= 5.0:
            self._last_line_t = t
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.opts.sample_interval_s)
            point = self.sample()
            if point is not None:
                self.show(point)


async def _publish(
    spec: str, run_id: str, n: int, settings: Settings, pubsub: PubSubClient | None
) -> None:
    """Fill a queue through its sink: each job is one record (one message)."""
    from .sinks import open_sink

    sink = open_sink(spec, key="--publish-to", pubsub=pubsub)
    try:
        for start in range(0, n, PUBLISH_BATCH):
            await sink.write(
                [synthetic_job(run_id, i) for i in range(start, min(n, start + PUBLISH_BATCH))]
            )
    finally:
        await sink.aclose()


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


async def run_loadtest(settings: Settings, opts: LoadtestOptions) -> dict[str, Any]:
    """Run the load test; return the report (also written to ``opts.report``)."""
    opts.validate()
    run_id = uuid.uuid4().hex[:8]
    sim: Simulator | None = None
    if opts.sim is not None:
        sim = Simulator(opts.sim)
        await sim.start("127.0.0.1", 0)
        # The Vertex-shaped path: the worker treats the simulator as Vertex AI, which reads
        # the synthetic gs:// URIs itself.
        settings.model.base_url = sim.vertex_base_url()
        if sim.region_names:
            # --regions: one endpoint per simulated region, each on its own port.
            settings.model.endpoints = [
                EndpointSettings(url=sim.region_base_url(name), name=name)
                for name in sim.region_names
            ]
        settings.model.auth = "none"
        settings.simulator.embedded = False
    try:
        # One Pub/Sub client for the publisher and the source, sharing the model's token.
        pubsub = client_for(settings, *(s for s in (opts.source, opts.publish_to) if s))
        sink = ReportSink()
        monitor = _Monitor(opts, opts.jobs)
        stats = None
        async with (
            runtime(settings) as rt,
            pubsub_session(pubsub, rt),
            anyio.create_task_group() as tg,
        ):
            source: Source
            if opts.source:
                if opts.publish_to:
                    assert opts.jobs is not None
                    await _publish(opts.publish_to, run_id, opts.jobs, settings, pubsub)
                source = open_source(opts.source, settings=settings, pubsub=pubsub, key="--source")
            else:
                source = MemorySource(_memory_jobs(run_id, opts.jobs), name="loadtest")
            # The worker's CPU from here: not the publisher's, not the start-up's.
            cpu0 = time.process_time()
            tg.start_soon(monitor.run)

            def started(pipeline: Pipeline) -> None:
                monitor.attach(pipeline)
                if opts.duration_s is not None:
                    tg.start_soon(_stop_after, pipeline, opts.duration_s)

            stats = await run_pipeline(
                rt,
                source,
                sink,
                sink,
                resume=False,
                handle_signals=opts.handle_signals,
                on_start=started,
                # A subscription never ends: stop reading once --jobs have come.
                max_jobs=opts.jobs if opts.source else None,
            )
            tg.cancel_scope.cancel()
        cpu_s = time.process_time() - cpu0
        final = monitor.sample()
        if final is not None:
            monitor.show(final, final=True)
        assert stats is not None
        assert monitor.pipeline is not None
        report = _report(settings, opts, monitor, sink, stats, cpu_s, sim)
    finally:
        if sim is not None:
            await sim.stop()
    if opts.report is not None:
        path = opts.report
        text = json.dumps(report, indent=2) + "\n"
        await anyio.to_thread.run_sync(_write_text, path, text)
    if opts.chart is not None:
        await anyio.to_thread.run_sync(render_chart, report, opts.chart)
    return report


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


async def _stop_after(pipeline: Pipeline, seconds: float) -> None:
    await anyio.sleep(seconds)
    pipeline.stop_reading()


def _report(
    settings: Settings,
    opts: LoadtestOptions,
    monitor: _Monitor,
    sink: ReportSink,
    stats: RunStats,
    cpu_s: float,
    sim: Simulator | None,
) -> dict[str, Any]:
    pipeline = monitor.pipeline
    assert pipeline is not None
    models = pipeline.models
    limiter = models.endpoints[0].limiter
    lat = sorted(sink.latency_s)
    done = stats.ok + stats.dead_lettered
    secs = stats.seconds
    counts = models.counts
    requests = sum(counts.values())
    rate_limited = counts["rate_limited"]
    concurrency: dict[str, Any] = {
        "mode": "auto" if models.adaptive else "fixed",
        "final_limit": models.limit,
        "peak_limit": max((int(s["limit"]) for s in monitor.samples), default=models.limit),
    }
    if isinstance(limiter, AdaptiveLimiter):
        concurrency.update(
            min=limiter.min_limit,
            max=limiter.max_limit,
            decreases=limiter.decreases,
            increases=limiter.increases,
            pauses=limiter.pauses,
            rtt_ms=round(limiter.rtt_s * 1000, 2),
        )
    spent = sum(models.spent_usd.values())
    priced = models.priced
    endpoints = {
        ep.name: {
            "requests": sum(ep.limiter.counts.values()),
            "ok": ep.limiter.counts["ok"],
            "rate_limited": ep.limiter.counts["rate_limited"],
            "final_limit": ep.limiter.limit,
            "circuit_opened": ep.circuit.opened,
        }
        for ep in models.endpoints
    }
    return {
        "target": "sim" if sim is not None else models.endpoints[0].client.base_url,
        "endpoints": endpoints,
        "cost_usd": round(spent, 6) if priced else None,
        "cost_usd_per_1000": round(1000 * spent / stats.ok, 6) if priced and stats.ok else None,
        "simulator": _sim_summary(sim.config) if sim is not None else None,
        "source": opts.source or "memory",
        "jobs_sent": stats.received,
        "ok": stats.ok,
        "dead_lettered": stats.dead_lettered,
        "failed": stats.failed,
        "nacked": stats.nacked,
        "skipped": stats.skipped,
        "lost": stats.received - stats.ok - stats.dead_lettered - stats.skipped,
        "seconds": round(secs, 3),
        "jobs_per_s": round(done / secs, 2) if secs > 0 else 0.0,
        "latency_s": {
            "p50": round(percentile(lat, 50), 4),
            "p90": round(percentile(lat, 90), 4),
            "p99": round(percentile(lat, 99), 4),
            "max": round(lat[-1], 4) if lat else 0.0,
        },
        "attempts": {str(k): v for k, v in sorted(sink.attempts.items())},
        "errors_by_type": dict(sorted(sink.errors.items())),
        "model_requests": requests,
        "requests_by_outcome": {k: v for k, v in counts.items() if v},
        "rate_limited_share": round(rate_limited / requests, 4) if requests else 0.0,
        "concurrency": concurrency,
        "worker_cpu_s": round(cpu_s, 3),
        "worker_cpu_ms_per_job": round(1000 * cpu_s / done, 4) if done else None,
        # With --target sim the simulator shares this process, and its CPU is included.
        "cpu_includes_simulator": sim is not None,
        "peak_rss_mb": round(_peak_rss_bytes() / 2**20, 1),
        "python": sys.version.split()[0],
        "event_loop": _loop_name(),
        "pid": os.getpid(),
        "timeline": monitor.samples,
    }


def _sim_summary(cfg: SimConfig) -> dict[str, Any]:
    return {
        "latency_ms": cfg.latency_ms,
        "latency_dist": cfg.latency_dist,
        "rate_limit_rps": cfg.rate_limit_rps,
        "retry_after_s": cfg.retry_after_s,
        "error_rate": cfg.error_rate,
        "reset_rate": cfg.reset_rate,
    }


def _loop_name() -> str:
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return type(loop).__module__.split(".")[0]


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Throughput, limit (and in flight) and 429s over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    t = [p["t_s"] for p in tl]
    rl = [p["rate_limited"] for p in tl]
    rl_rate = [0.0] + [
        (rl[i] - rl[i - 1]) / (t[i] - t[i - 1]) if t[i] > t[i - 1] else 0.0
        for i in range(1, len(tl))
    ]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    try:
        axes[0].plot(t, [p["jobs_per_s"] for p in tl], color="tab:blue")
        axes[0].set_ylabel("jobs/s")
        axes[0].set_title(
            f"worker loadtest: {report['ok']} ok of {report['jobs_sent']}, "
            f"{report['jobs_per_s']} jobs/s, 429 share {report['rate_limited_share']:.1%}"
        )
        axes[1].plot(t, [p["limit"] for p in tl], label="limit", color="tab:green")
        axes[1].plot(t, [p["in_flight"] for p in tl], label="in flight", color="tab:gray")
        axes[1].set_ylabel("requests")
        axes[1].legend(loc="upper right")
        axes[2].plot(t, rl_rate, color="tab:red")
        axes[2].set_ylabel("429s/s")
        axes[2].set_xlabel("seconds")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=90)
    finally:
        plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    """The human summary printed on stderr at the end."""
    lat = report["latency_s"]
    cpu = report["worker_cpu_ms_per_job"]
    lines = [
        f"jobs: {report['jobs_sent']} sent, {report['ok']} ok, {report['dead_lettered']} "
        f"dead-lettered, {report['lost']} lost in {report['seconds']:.2f} s "
        f"= {report['jobs_per_s']:.1f} jobs/s",
        f"latency: p50 {lat['p50'] * 1000:.0f} ms  p90 {lat['p90'] * 1000:.0f} ms  "
        f"p99 {lat['p99'] * 1000:.0f} ms  max {lat['max'] * 1000:.0f} ms",
        "attempts: " + ", ".join(f"{k}: {v}" for k, v in report["attempts"].items()),
        "errors: "
        + (", ".join(f"{k}: {v}" for k, v in report["errors_by_type"].items()) or "none"),
        f"model requests: {report['model_requests']}, 429 share "
        f"{report['rate_limited_share']:.2%}; limit {report['concurrency']['mode']}, "
        f"final {report['concurrency']['final_limit']}",
        *(
            [
                "endpoints: "
                + ", ".join(
                    f"{name} {e['ok']} ok / {e['requests']} requests, {e['rate_limited']} 429s"
                    for name, e in report["endpoints"].items()
                )
            ]
            if len(report["endpoints"]) > 1
            else []
        ),
        "cost: "
        + (
            f"${report['cost_usd']:.4f} (${report['cost_usd_per_1000']:.4f} per 1,000 images)"
            if report["cost_usd"] is not None and report["cost_usd_per_1000"] is not None
            else "unknown (no price for the model)"
        ),
        f"worker CPU: {report['worker_cpu_s']:.2f} s"
        + (f" = {cpu:.3f} ms/job" if cpu is not None else "")
        + (" (includes the in-process simulator)" if report["cpu_includes_simulator"] else "")
        + f"; peak RSS {report['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)
