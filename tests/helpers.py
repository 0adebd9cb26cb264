"""Plain helpers shared by the test modules; the fixtures are in conftest.py.

Nothing from ``worker`` is imported at module level: conftest.py uses this module before
it has set up the environment that google-auth reads when it is first imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import pytest

if TYPE_CHECKING:
    from worker.errors import JobError
    from worker.settings import Settings

    from .fakes.pubsub_emulator import PubSubEmulator

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"
#: The project of the Pub/Sub emulator fixtures and of ``publish_jobs``.
PROJECT = "proj"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gcs_emulator_server(bucket: str) -> Iterator[tuple[Any, str]]:
    """gcp-storage-emulator on 127.0.0.1, in memory, with an empty ``bucket``: the
    server and its URL (what STORAGE_EMULATOR_HOST names)."""
    from http.server import HTTPServer

    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    # The emulator serves one request at a time from its own thread; socketserver's
    # listen backlog of 5 would drop the SYNs of concurrent uploads (a 1 s retransmit).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HTTPServer, "request_queue_size", 128)
        server.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.stop()  # takes up to 0.5 s


async def gcs_upload(
    base: str, bucket: str, name: str, data: bytes, content_type: str = "image/png"
) -> dict[str, Any]:
    """Write (or overwrite) an object in the emulator at ``base``; its metadata."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/upload/storage/v1/b/{bucket}/o",
            params={"uploadType": "media", "name": name},
            data=data,
            headers={"Content-Type": content_type},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        meta: dict[str, Any] = await resp.json()
        return meta


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gs_jobs(n: int, prefix: str = "job-") -> list[str]:
    """``n`` job lines with ids ``{prefix}{i}`` and gs:// images (which the simulator,
    standing in for Vertex AI, answers without reading)."""
    return [
        json.dumps({"id": f"{prefix}{i}", "image_uri": f"gs://bucket/img-{i}.jpg"})
        for i in range(n)
    ]


def jobs_file(tmp_path: Path, lines: Iterable[str]) -> str:
    """Write ``lines`` to ``tmp_path/jobs.jsonl``, one a line; the ``file:`` source for it."""
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return f"file:{path}"


def publish_jobs(emu: PubSubEmulator, n: int, prefix: str = "job-") -> list[str]:
    """Publish ``n`` jobs (ids ``{prefix}{i}``) to the emulator's ``jobs`` topic; their ids."""
    ids = [f"{prefix}{i}" for i in range(n)]
    for job_id in ids:
        job = {"id": job_id, "image_uri": f"gs://bucket/{job_id}.jpg"}
        emu.publish(PROJECT, "jobs", json.dumps(job).encode())
    return ids


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a worker subprocess: this one's without a developer's WORKER_*
    variables, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout_s``."""
    try:
        with anyio.fail_after(timeout_s):
            while not cond():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def http_get(url: str) -> tuple[int, str]:
    """GET ``url`` on a session of its own: (status, body)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def http_status(url: str) -> int | None:
    """The status of GET ``url``; None when nothing answers."""
    try:
        status, _ = await http_get(url)
    except aiohttp.ClientError:
        return None
    return status


async def job_error(aw: Awaitable[object]) -> JobError:
    """The JobError ``aw`` raises (the test fails if it raises none)."""
    from worker.errors import JobError

    with pytest.raises(JobError) as info:
        await aw
    return info.value


def quick_settings() -> Settings:
    """Settings for runs against the simulator: no credentials, a 10 s call timeout and
    retries that wait milliseconds, not seconds. Not validated: adjust, then validate."""
    from worker.settings import Settings

    s = Settings()
    s.model.auth = "none"
    s.model.timeout_s = 10.0
    s.retry.initial_backoff_s = 0.005
    s.retry.max_backoff_s = 0.02
    return s
