"""Traces with the OpenTelemetry SDK's in-memory exporter: a Pub/Sub job continues its
publisher's trace, each model attempt is a child span, published results carry the
job's context on, and JSON log lines written in a job carry Cloud Logging's trace fields."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.app import run_pipeline, runtime
from worker.logs import JsonFormatter
from worker.pubsub import client_for
from worker.settings import Settings
from worker.simulator import Simulator
from worker.sinks import open_sinks
from worker.sources import open_source
from worker.tracing import Tracing

from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import PROJECT

PUBLISHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
PUBLISHER_SPAN = "b7ad6b7169203331"


def _tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, project=PROJECT), exporter


def _children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_pubsub_job_continues_its_publishers_trace_and_passes_it_on(
    emu: PubSubEmulator,
    sim: Simulator,
    fast_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emu.host_port)
    emu.create_topic(PROJECT, "results")
    parent = f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"
    emu.publish(
        PROJECT,
        "jobs",
        b'{"id": "a", "image_uri": "gs://b/a.jpg"}',
        {"googclient_traceparent": parent},
    )
    emu.publish(
        PROJECT, "jobs", b'{"id": "b", "image_uri": "gs://b/b.jpg"}', {"traceparent": parent}
    )
    emu.publish(PROJECT, "jobs", b'{"id": "c", "image_uri": "gs://b/c.jpg"}')
    # Half the answers fail, one request at a time with a seeded simulator: some jobs need
    # more than one attempt, the same ones every run.
    sim.config.error_rate = 0.5
    sim.config.seed = 3
    sim._rng.seed(3)
    fast_settings.worker.concurrency = 1
    fast_settings.worker.source = f"pubsub:projects/{PROJECT}/subscriptions/work"
    fast_settings.worker.sink = f"pubsub:projects/{PROJECT}/topics/results"
    fast_settings.worker.dead_letter = f"jsonl:{tmp_path / 'dead.jsonl'}"
    tracing, exporter = _tracing()

    pubsub = client_for(fast_settings, fast_settings.worker.source, fast_settings.worker.sink)
    source = open_source(fast_settings.worker.source, settings=fast_settings, pubsub=pubsub)
    sink, dead = open_sinks(fast_settings, pubsub)
    async with runtime(fast_settings) as rt:
        stats = await run_pipeline(
            rt, source, sink, dead, resume=False, handle_signals=False, max_jobs=3, tracing=tracing
        )
    assert pubsub is not None
    await pubsub.aclose()
    assert stats.ok == 3

    spans = exporter.get_finished_spans()
    jobs = {s.attributes["messaging.message.id"]: s for s in spans if s.name == "job"}  # type: ignore[index]
    assert len(jobs) == 3
    published = {json.loads(m["data"])["id"]: m for m in emu.messages_on_topic(PROJECT, "results")}
    continued = 0
    for job in jobs.values():
        assert job.context is not None
        children = _children(spans, job)
        names = [c.name for c in children]
        record = json.loads(published[_job_id(job, emu)]["data"])
        # One child per model attempt, each naming its endpoint and outcome.
        attempts = [c for c in children if c.name == "model.attempt"]
        assert len(attempts) == record["attempts"]
        assert {c.attributes["endpoint"] for c in attempts} == {record["endpoint"]}  # type: ignore[index]
        assert attempts[-1].attributes["http.response.status_code"] == 200  # type: ignore[index]
        assert {"image.resolve", "sink.write"} <= set(names)
        # The published result carries the job's own context on.
        attrs = published[record["id"]]["attributes"]
        trace_id = f"{job.context.trace_id:032x}"
        span_id = f"{job.context.span_id:016x}"
        assert attrs["googclient_traceparent"] == attrs["traceparent"] == record["traceparent"]
        assert record["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
        if record["id"] in ("a", "b"):
            assert job.parent is not None and f"{job.parent.span_id:016x}" == PUBLISHER_SPAN
            assert trace_id == PUBLISHER_TRACE
            continued += 1
        else:
            assert job.parent is None and trace_id != PUBLISHER_TRACE  # a new trace
    assert continued == 2
    assert any(len(_children(spans, j)) > 3 for j in jobs.values()), "some job was retried"


def _job_id(span: ReadableSpan, emu: PubSubEmulator) -> str:
    """The job id of the message a job span was for (message ids come from the emulator)."""
    message_id = span.attributes["messaging.message.id"]  # type: ignore[index]
    for m in emu.messages_on_topic(PROJECT, "jobs"):
        if m["messageId"] == message_id:
            return str(json.loads(m["data"])["id"])
    raise AssertionError(f"no message {message_id}")


def test_json_log_lines_inside_a_job_carry_the_trace() -> None:
    tracing, _ = _tracing()
    tracing.install_log_fields()
    try:
        record = logging.LogRecord(
            "worker.test", logging.INFO, __file__, 1, "job_succeeded", None, None
        )
        outside = json.loads(JsonFormatter().format(record))
        assert "logging.googleapis.com/trace" not in outside
        with tracing.job(f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01", {}) as span:
            line = json.loads(JsonFormatter().format(record))
        assert (
            line["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/{PUBLISHER_TRACE}"
        )
        assert line["logging.googleapis.com/spanId"] == f"{span.get_span_context().span_id:016x}"
        assert line["logging.googleapis.com/trace_sampled"] is True
    finally:
        tracing.shutdown()


def test_tracing_is_off_unless_configured() -> None:
    assert Tracing.from_environment(env={}) is None
    assert Tracing.from_environment(env={"OTEL_TRACES_EXPORTER": "none"}) is None
    assert (
        Tracing.from_environment(
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}
        )
        is None
    )
    on = Tracing.from_environment(env={"OTEL_TRACES_EXPORTER": "console"})
    assert on is not None
    on.shutdown()


def test_records_without_tracing_carry_no_trace_attributes() -> None:
    from worker.pubsub import record_message

    message = record_message({"id": "x", "status": "ok"})
    assert set(message["attributes"]) == {"id", "status"}
    assert json.loads(base64.b64decode(message["data"])) == {"id": "x", "status": "ok"}
