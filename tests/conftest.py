"""Shared fixtures: real servers on 127.0.0.1 and settings for in-process runs (plain
helpers are in helpers.py).

google-auth reads GCE_METADATA_HOST when it is first imported, so the fake metadata
server's port is reserved here, before anything imports google.auth, and every test that
needs it starts the server on that port. ADC must find nothing else on this machine:
no key file, no gcloud user credentials.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .helpers import PROJECT, REPO, free_port, quick_settings

METADATA_PORT = free_port()
os.environ["GCE_METADATA_HOST"] = f"127.0.0.1:{METADATA_PORT}"
os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{METADATA_PORT}"
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
os.environ.pop("NO_GCE_CHECK", None)
os.environ["CLOUDSDK_CONFIG"] = tempfile.mkdtemp(prefix="worker-tests-gcloud-")
# Settings read WORKER_* from the environment; a developer's shell must not leak in.
for _name in [n for n in os.environ if n.startswith("WORKER_")]:
    del os.environ[_name]

from worker.settings import Settings  # noqa: E402
from worker.simulator import SimConfig, Simulator  # noqa: E402

from .fakes.metadata_server import MetadataServer  # noqa: E402
from .fakes.pubsub_emulator import PubSubEmulator  # noqa: E402


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(SimConfig(record_requests=2000))
    await simulator.start("127.0.0.1", 0)
    try:
        yield simulator
    finally:
        await simulator.stop()


@pytest.fixture
async def metadata() -> AsyncIterator[MetadataServer]:
    server = MetadataServer(token_ttl_s=3600.0)
    await server.start("127.0.0.1", METADATA_PORT)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def emu() -> AsyncIterator[PubSubEmulator]:
    """The Pub/Sub emulator with topic ``jobs`` and its subscription ``work`` (project
    ``helpers.PROJECT``)."""
    async with PubSubEmulator() as e:
        e.create_topic(PROJECT, "jobs")
        e.create_subscription(PROJECT, "work", "jobs")
        yield e


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def fast_settings(sim: Simulator, tmp_path: Path) -> Settings:
    """Settings pointed at the simulator, with retries that wait milliseconds, not seconds."""
    s = quick_settings()
    s.model.base_url = sim.base_url
    s.retry.deadline_s = 20.0
    s.worker.concurrency = 8
    s.worker.sink = f"jsonl:{tmp_path / 'out' / 'results.jsonl'}"
    s.worker.allow_file_root = str(REPO)
    # The simulator stands in for Vertex AI, which reads gs:// and data: itself.
    s.images.backend = "vertex"
    return s.validate()
