"""Consumption tiers: the headers Vertex AI reads, as the simulator receives them; flex
only on the global endpoint; and flex's own (longer) request timeout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from worker.app import run_worker
from worker.auth import NoTokens
from worker.cli import main
from worker.errors import ConfigError, ModelError
from worker.model import ModelCall, ModelClient, tier_headers
from worker.settings import EndpointSettings, ProvisionedMode, Tier, resolve_endpoints
from worker.simulator import RegionConfig, SimConfig, Simulator

from .endpoint_helpers import outputs, region_settings
from .helpers import jobs_file, quick_settings

REGIONAL, GLOBAL = "us-central1", "global"
SHARED = "x-vertex-ai-llm-shared-request-type"
REQUEST = "x-vertex-ai-llm-request-type"
TIMEOUT = "x-server-timeout"
TIER_HEADERS = (SHARED, REQUEST, TIMEOUT)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    cfg = SimConfig(
        regions=(RegionConfig(REGIONAL), RegionConfig(GLOBAL)),
        record_requests=500,
        provisioned_rps=1000.0,  # the project has Provisioned Throughput
        flex_latency_factor=1.0,
    )
    async with Simulator(cfg) as s:
        yield s


# What each (tier, provisioned) sends, and the tier the simulator served it from.
CASES: list[tuple[Tier, ProvisionedMode, dict[str, str], str]] = [
    ("standard", "auto", {}, "provisioned"),
    ("priority", "auto", {SHARED: "priority"}, "provisioned"),
    ("flex", "auto", {SHARED: "flex", TIMEOUT: "30"}, "provisioned"),
    ("standard", "never", {REQUEST: "shared"}, "standard"),
    ("priority", "never", {REQUEST: "shared", SHARED: "priority"}, "priority"),
    ("flex", "never", {REQUEST: "shared", SHARED: "flex", TIMEOUT: "30"}, "flex"),
    ("standard", "only", {REQUEST: "dedicated"}, "provisioned"),
    ("priority", "only", {REQUEST: "dedicated"}, "provisioned"),
    ("flex", "only", {REQUEST: "dedicated"}, "provisioned"),
]


@pytest.mark.parametrize(("tier", "provisioned", "expected", "served"), CASES)
def test_tier_headers(
    tier: Tier, provisioned: ProvisionedMode, expected: dict[str, str], served: str
) -> None:
    headers = {k.lower(): v for k, v in tier_headers(tier, provisioned, 30.0).items()}
    assert headers == expected


@pytest.mark.parametrize(("tier", "provisioned", "expected", "served"), CASES)
async def test_the_simulator_sees_the_tier_headers(
    sim: Simulator, tier: Tier, provisioned: ProvisionedMode, expected: dict[str, str], served: str
) -> None:
    s = quick_settings()
    s.model.provisioned = provisioned
    s.model.flex_timeout_s = 30.0
    client = ModelClient(s.model, NoTokens(), base_url=sim.region_base_url(GLOBAL))
    try:
        answer = await client.describe(ModelCall("gs://bucket/img.jpg", tier=tier))
    finally:
        await client.aclose()
    assert answer.tier == tier
    assert answer.endpoint == GLOBAL
    (request,) = sim.requests
    seen = {name: request.headers[name] for name in TIER_HEADERS if name in request.headers}
    assert seen == expected
    assert sim.region_stats(GLOBAL).by_tier == {served: 1}


def _tier_jobs(tiers: list[Tier | None]) -> list[str]:
    lines = []
    for i, tier in enumerate(tiers):
        job: dict[str, str] = {"id": f"job-{i}", "image_uri": f"gs://bucket/img-{i}.jpg"}
        if tier is not None:
            job["tier"] = tier
        lines.append(json.dumps(job))
    return lines


async def test_flex_goes_only_to_the_global_endpoint(sim: Simulator, tmp_path: Path) -> None:
    sim.config.provisioned_rps = None
    tiers: list[Tier | None] = ["flex", None, "priority", "standard"] * 6
    s = region_settings(sim, tmp_path, REGIONAL, GLOBAL)
    s.worker.source = jobs_file(tmp_path, _tier_jobs(tiers))
    stats = await run_worker(s.validate())
    results, dead = outputs(s)
    assert dead == []
    assert stats.ok == len(tiers)
    by_id = {r["id"]: r for r in results}
    for i, tier in enumerate(tiers):
        record = by_id[f"job-{i}"]
        assert record["tier"] == (tier or "standard")
        if tier == "flex":
            assert record["endpoint"] == GLOBAL
    # The regional endpoint took its share of the rest, and never saw a flex header.
    regional = sim.region_stats(REGIONAL)
    assert regional.requests > 0
    assert "shared-request-type=flex" not in regional.by_header
    assert regional.by_status == {200: regional.requests}
    assert sim.region_stats(GLOBAL).by_tier["flex"] == 6
    flex_paths = [r.path for r in sim.requests if r.headers.get(SHARED) == "flex"]
    assert len(flex_paths) == 6
    assert all("/locations/global/" in path for path in flex_paths)


async def test_a_flex_job_without_a_global_endpoint_is_an_invalid_job(
    sim: Simulator, tmp_path: Path
) -> None:
    s = region_settings(sim, tmp_path, REGIONAL)
    s.worker.source = jobs_file(tmp_path, _tier_jobs(["flex", "standard", "priority"]))
    stats = await run_worker(s.validate())
    results, dead = outputs(s)
    assert stats.ok == 2
    assert stats.dead_lettered == 1
    assert sorted(r["id"] for r in results) == ["job-1", "job-2"]
    (record,) = dead
    assert record["id"] == "job-0"
    assert record["error"]["type"] == "invalid_job"
    assert "global" in record["error"]["message"]
    assert record["attempts"] == 0
    # It was refused before any request: the region saw two, neither of them flex.
    assert sim.region_stats(REGIONAL).requests == 2


def test_tier_flex_without_a_global_endpoint_is_a_config_error() -> None:
    s = quick_settings()
    s.model.endpoints = [EndpointSettings(url="http://127.0.0.1:9/v1")]
    s.model.tier = "flex"
    with pytest.raises(ConfigError) as info:
        resolve_endpoints(s.validate())
    assert info.value.key == "model.tier"
    # An endpoint entry may not claim flex on a regional location either.
    s = quick_settings()
    s.model.endpoints = [
        EndpointSettings(
            url="http://127.0.0.1:9/v1/projects/p/locations/us-central1/endpoints/openapi",
            tier="flex",
        )
    ]
    with pytest.raises(ConfigError) as info:
        resolve_endpoints(s.validate())
    assert info.value.key == "model.endpoints[0].tier"


def test_cli_tier_flex_without_a_global_endpoint_exits_2(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("")
    argv = [
        "run",
        "--source", f"file:{jobs}",
        "--sink", f"jsonl:{tmp_path / 'out.jsonl'}",
        "--auth", "none",
        "--endpoint", sim.region_base_url(REGIONAL),
        "--tier", "flex",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "config error" in err
    assert "model.tier" in err
    assert "flex" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert sim.stats().requests == 0
    assert sim.region_stats(REGIONAL).requests == 0


async def test_flex_requests_use_the_flex_timeout(sim: Simulator) -> None:
    # Answers take 0.6 s: longer than the standard timeout, well within flex's.
    sim.config.latency_ms = 600.0
    s = quick_settings()
    s.model.timeout_s = 0.3
    s.model.flex_timeout_s = 3.0
    client = ModelClient(s.model, NoTokens(), base_url=sim.region_base_url(GLOBAL))
    try:
        with pytest.raises(ModelError) as info:
            await client.describe(ModelCall("gs://bucket/std.jpg", tier="standard"))
        flex = await client.describe(ModelCall("gs://bucket/flex.jpg", tier="flex"))
    finally:
        await client.aclose()
    assert info.value.code == "timeout"
    assert flex.tier == "flex"
    assert "flex.jpg" in flex.text
    headers = [r.headers for r in sim.requests]
    assert [h.get(TIMEOUT) for h in headers] == [None, "3"]
    assert [h.get(SHARED) for h in headers] == [None, "flex"]
