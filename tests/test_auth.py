"""Real google-auth against a fake GCE metadata server on loopback; the simulator accepts
only the tokens that server issued, until they expire."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import anyio

from worker.app import run_worker
from worker.auth import GoogleTokens
from worker.settings import Settings
from worker.simulator import Simulator

from .fakes.metadata_server import MetadataServer
from .helpers import gs_jobs, jobs_file, read_jsonl


def _wire(metadata: MetadataServer, sim: Simulator) -> None:
    sim.config.require_token = True
    metadata.on_issue = sim.accept_token


async def test_short_lived_tokens_are_refreshed_ahead_of_expiry(
    metadata: MetadataServer, sim: Simulator, fast_settings: Settings, tmp_path: Path
) -> None:
    _wire(metadata, sim)
    metadata.token_ttl_s = 3.0
    sim.config.latency_ms = 50.0
    fast_settings.model.auth = "google"
    fast_settings.worker.concurrency = 2
    # 240 jobs x 50 ms / 2 in flight = about 6 s: over three token lifetimes.
    fast_settings.worker.source = jobs_file(tmp_path, gs_jobs(240, "j"))

    started = time.time()
    stats = await run_worker(fast_settings)
    elapsed = time.time() - started

    assert elapsed > 3 * 2.0, "the run must outlive several tokens"
    assert stats.ok == 240
    st = sim.stats()
    assert st.expired_token_401 == 0
    assert st.missing_token_401 == 0
    issued = metadata.issued
    assert len(issued) >= 3
    for (_, _, expires), (_, next_issued, _) in itertools.pairwise(issued):
        assert next_issued < expires - 0.3, "each refresh lands well before the old token expires"


async def test_revoked_token_is_recovered_with_one_refresh(
    metadata: MetadataServer, sim: Simulator, fast_settings: Settings, tmp_path: Path
) -> None:
    _wire(metadata, sim)
    metadata.token_ttl_s = 3600.0
    fast_settings.model.auth = "google"
    fast_settings.worker.concurrency = 16
    fast_settings.retry.max_attempts = 1  # the 401 path must recover without a retry attempt
    sim.config.latency_ms = 20.0
    fast_settings.worker.source = jobs_file(tmp_path, gs_jobs(200, "j"))

    async def revoke_soon() -> None:
        while sim.stats().requests < 50:
            await anyio.sleep(0.005)
        for token, _, _ in metadata.issued:
            sim.revoke_token(token)

    async with anyio.create_task_group() as tg:
        tg.start_soon(revoke_soon)
        stats = await run_worker(fast_settings)

    assert stats.ok == 200, read_jsonl(
        Path(fast_settings.worker.sink[6:]).with_name("results.dead-letter.jsonl")
    )
    assert sim.stats().by_status.get(401, 0) > 0
    # Many requests saw the revoked token; the single-flight refresh fetched one new token.
    assert len(metadata.issued) == 2


async def test_refresh_runs_off_the_event_loop(metadata: MetadataServer) -> None:
    metadata.delay_s = 0.6
    tokens = GoogleTokens()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await tokens.start()
        tg.cancel_scope.cancel()

    assert (await tokens.token()).startswith("ya29.fixture-")
    assert tokens.project_id == metadata.project_id
    assert sum(gaps) > 0.5, "start() really waited for the slow metadata server"
    assert max(gaps) < 0.2, f"the event loop stalled for {max(gaps):.2f}s"


async def test_concurrent_callers_share_one_refresh(metadata: MetadataServer) -> None:
    metadata.delay_s = 0.2
    tokens = GoogleTokens()
    await tokens.start()
    first = await tokens.token()

    async def reject() -> None:
        await tokens.refresh_after_rejection(first)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(reject)

    assert len(metadata.issued) == 2
    assert await tokens.token() != first
