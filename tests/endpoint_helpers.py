"""Helpers for the tests of several endpoints (regions, tiers, cost, failover).

Runs are in-process (``run_worker``) against the simulator's regions, each region an
endpoint of its own port; a test passes its own :class:`~worker.metrics.Telemetry` to
read the endpoint pool (limiters, circuits, spend) during and after the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from worker.endpoints import Endpoint, EndpointPool
from worker.metrics import Telemetry
from worker.settings import EndpointSettings, Settings
from worker.simulator import Simulator

from .helpers import quick_settings, read_jsonl

__all__ = [
    "endpoint",
    "metric_samples",
    "outputs",
    "pool_of",
    "region_settings",
    "telemetry",
]


def region_settings(sim: Simulator, tmp_path: Path, *regions: str) -> Settings:
    """Settings with one ``[[model.endpoints]]`` entry per simulator region (named after
    it), quick retries, and a JSONL sink under ``tmp_path``. Not validated."""
    s = quick_settings()
    s.model.endpoints = [EndpointSettings(url=sim.region_base_url(name)) for name in regions]
    s.retry.deadline_s = 10.0
    s.worker.concurrency = 4
    s.worker.sink = f"jsonl:{tmp_path / 'out' / 'results.jsonl'}"
    # The simulator stands in for Vertex AI, which reads gs:// itself.
    s.images.backend = "vertex"
    return s


def outputs(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results, dead letters) of a run with a ``jsonl:`` sink."""
    results = Path(settings.worker.sink.removeprefix("jsonl:"))
    return read_jsonl(results), read_jsonl(results.with_name("results.dead-letter.jsonl"))


def telemetry() -> Telemetry:
    return Telemetry(process_metrics=False)


def pool_of(t: Telemetry) -> EndpointPool:
    """The endpoint pool of the run ``t`` watches (once the pipeline is built)."""
    assert t.pipeline is not None, "the run has not started"
    return t.pipeline.models


def endpoint(pool: EndpointPool, name: str) -> Endpoint:
    (ep,) = (e for e in pool.endpoints if e.name == name)
    return ep


def metric_samples(t: Telemetry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric ``name`` (as exposed, e.g. ``worker_cost_usd_total``) on
    /metrics, keyed by their sorted labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(t.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out
