"""Traces, with OpenTelemetry when it is installed and configured (the ``otel`` extra).

One span per job (``job``), with children for the image fetch (``image.resolve``), each
model attempt (``model.attempt``: endpoint, tier, status), the result store look-up
(``store.lookup``) and the sink write (``sink.write``: until the record is durable). A
Pub/Sub job continues its publisher's trace: google-cloud-pubsub puts the W3C
traceparent in the ``googclient_traceparent`` attribute (a plain ``traceparent`` attribute
is read too), and a result published to a topic carries the job's context on in both.
Log lines written inside a job carry ``logging.googleapis.com/trace`` and
``logging.googleapis.com/spanId``, so Cloud Logging links them to the trace.

Configuration is OpenTelemetry's own: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``),
``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``... Tracing is
off when the packages are missing, when none of those says where traces go, or with
``OTEL_SDK_DISABLED=true``; off, the worker pays one ``is None`` test per step.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import logs

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

__all__ = ["TRACEPARENT_ATTRIBUTES", "Tracing", "traceparent_of"]

log = logging.getLogger("worker.tracing")

#: Message attributes that may carry a publisher's W3C trace context, in this order.
TRACEPARENT_ATTRIBUTES = ("googclient_traceparent", "traceparent")


def traceparent_of(attributes: Mapping[str, Any] | None) -> str | None:
    """The W3C traceparent a message's attributes carry, if any."""
    if not attributes:
        return None
    for name in TRACEPARENT_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _configured(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class Tracing:
    """The worker's spans (see the module docstring). Build it with
    :meth:`from_environment`; tests hand it their own provider."""

    def __init__(self, provider: TracerProvider, *, project: str = "") -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._trace = trace
        self._tracer = provider.get_tracer("image-describer-worker")
        self._propagator = TraceContextTextMapPropagator()
        self.project = project

    @classmethod
    def from_environment(
        cls, *, project: str = "", env: Mapping[str, str] | None = None
    ) -> Tracing | None:
        """Tracing as the OTEL_* variables describe it; None when off."""
        environ = os.environ if env is None else env
        if not _configured(environ):
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        except ImportError:
            log.warning("tracing_unavailable", extra={"reason": "pip install '.[otel]'"})
            return None
        resource = Resource.create({"service.name": "image-describer-worker"})
        provider = TracerProvider(resource=resource)
        names = [
            n.strip()
            for n in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").lower().split(",")
            if n.strip() and n.strip() != "none"
        ]
        for name in names:
            if name == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            elif name == "otlp":
                try:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                        OTLPSpanExporter,
                    )
                except ImportError:
                    log.warning("tracing_unavailable", extra={"reason": "no OTLP exporter"})
                    return None
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                log.warning("tracing_exporter_unknown", extra={"exporter": name})
        tracing = cls(provider, project=project)
        log.info("tracing_enabled", extra={"exporters": ",".join(names)})
        return tracing

    def install_log_fields(self) -> None:
        """Make JSON log lines written inside a span carry its trace (Cloud Logging)."""
        logs.trace_fields = self.log_fields

    def shutdown(self) -> None:
        """Flush what is buffered (blocking: call it off the event loop)."""
        if logs.trace_fields == self.log_fields:
            logs.trace_fields = None
        self.provider.shutdown()

    # -- spans ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def job(self, traceparent: str | None, attributes: Mapping[str, Any]) -> Iterator[Span]:
        """The job's span, current for the code inside, child of the publisher's span
        when ``traceparent`` is given."""
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        with self._tracer.start_as_current_span(
            "job", context=parent, attributes=_attributes(attributes)
        ) as span:
            yield span

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child of the current span."""
        with self._tracer.start_as_current_span(name, attributes=_attributes(attributes)) as span:
            yield span

    def traceparent(self) -> str | None:
        """The current span's W3C traceparent (for a published result)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent")

    def log_fields(self) -> dict[str, Any]:
        ctx = self._trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return {}
        trace_id = f"{ctx.trace_id:032x}"
        return {
            "logging.googleapis.com/trace": (
                f"projects/{self.project}/traces/{trace_id}" if self.project else trace_id
            ),
            "logging.googleapis.com/spanId": f"{ctx.span_id:016x}",
            "logging.googleapis.com/trace_sampled": bool(ctx.trace_flags.sampled),
        }


def _attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    # OpenTelemetry refuses None values; a secret-free subset is all that is passed here.
    return {k: v for k, v in attributes.items() if v is not None}
