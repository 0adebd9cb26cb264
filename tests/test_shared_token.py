"""One Google token for every endpoint: real google-auth against the fake metadata server,
three simulator regions that accept only the tokens that server issued (until they
expire), and tokens short-lived enough that the run outlives several of them."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from worker.app import run_worker, runtime
from worker.simulator import RegionConfig, SimConfig, Simulator

from .endpoint_helpers import outputs, region_settings
from .fakes.metadata_server import MetadataServer
from .helpers import gs_jobs, jobs_file

REGIONS = ("us-central1", "europe-west4", "asia-northeast1")
TTL_S = 2.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    cfg = SimConfig(regions=tuple(RegionConfig(name) for name in REGIONS), require_token=True)
    async with Simulator(cfg) as s:
        yield s


def _answered(sim: Simulator) -> dict[str, int]:
    return {name: sim.region_stats(name).by_status.get(200, 0) for name in REGIONS}


async def test_every_endpoint_shares_the_one_provider(
    metadata: MetadataServer, sim: Simulator, tmp_path: Path
) -> None:
    metadata.on_issue = sim.accept_token
    s = region_settings(sim, tmp_path, *REGIONS)
    s.model.auth = "google"
    async with runtime(s.validate()) as rt:
        assert [resolved.name for resolved, _ in rt.models] == list(REGIONS)
        assert all(client.tokens is rt.tokens for _, client in rt.models)
        assert rt.tokens.google
    assert len(metadata.issued) == 1  # three endpoints, one token fetched


async def test_one_refresh_serves_all_endpoints_for_the_whole_run(
    metadata: MetadataServer, sim: Simulator, tmp_path: Path
) -> None:
    # Each new token is accepted by the simulator as it is issued, and at that moment we
    # note how many answers each region has given so far.
    at_issue: list[dict[str, int]] = []

    def issued(token: str, expires_at: float) -> None:
        sim.accept_token(token, expires_at)
        at_issue.append(_answered(sim))

    metadata.on_issue = issued
    metadata.token_ttl_s = TTL_S
    sim.config.latency_ms = 40.0
    s = region_settings(sim, tmp_path, *REGIONS)
    s.model.auth = "google"
    s.worker.concurrency = 2  # per endpoint: 6 in flight, ~150 jobs/s
    s.worker.source = jobs_file(tmp_path, gs_jobs(300))

    started = time.time()
    stats = await run_worker(s.validate())
    run_s = time.time() - started

    results, dead = outputs(s)
    assert dead == []
    assert stats.ok == 300
    assert {r["endpoint"] for r in results} == set(REGIONS)
    for name in REGIONS:
        region = sim.region_stats(name)
        assert region.expired_token_401 == 0, name
        assert region.missing_token_401 == 0, name
        assert region.invalid_token_401 == 0, name
        assert region.by_status == {200: region.requests}, name
    issued_at = [at for _, at, _ in metadata.issued]
    assert len(issued_at) >= 2, "the run must outlive its first token"
    # One refresher for the process, at 75% of each token's life: never one token per
    # endpoint, and no more tokens than the run's length calls for.
    for earlier, later in itertools.pairwise(issued_at):
        assert later - earlier >= 0.6 * TTL_S
    assert len(issued_at) <= 2 + run_s / (0.75 * TTL_S)
    # Between one issue and the next, every region answered with the token of the day.
    for before, after in itertools.pairwise(at_issue):
        for name in REGIONS:
            assert after[name] > before[name], (name, at_issue)
