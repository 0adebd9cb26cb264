"""Answers reused by content (worker/reuse.py) on a SQLite store: what makes a hit and what
misses, and how an image is known (its bytes, a gs:// object's generation, or its URI).

Every run is a fresh runtime on the same store file, as a restarted worker would be;
model calls are counted at the simulator.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from worker.app import run_pipeline, runtime
from worker.settings import Settings
from worker.simulator import Simulator
from worker.sinks import JsonlSink

from .helpers import (
    EXAMPLES,
    free_port,
    gcs_emulator_server,
    gcs_upload,
    quick_settings,
    read_jsonl,
    wait_until,
)
from .inprocess import FeedSource, job_bytes, run_jobs

PNG = (EXAMPLES / "red-square.png").read_bytes()
JPEG = (EXAMPLES / "green-banner.jpg").read_bytes()
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["caption", "count"],
    "additionalProperties": False,
}


@pytest.fixture
def settings(sim: Simulator, tmp_path: Path) -> Settings:
    """Vertex-shaped simulator URL (gs:// and data: pass through), a SQLite store."""
    s = quick_settings()
    s.model.base_url = sim.vertex_base_url()
    s.retry.deadline_s = 20.0
    s.worker.concurrency = 8
    s.worker.allow_file_root = str(tmp_path)
    s.store.uri = f"sqlite:{tmp_path / 'state' / 'store.sqlite'}"
    return s.validate()


def image(tmp_path: Path, name: str, data: bytes = PNG) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def calls(sim: Simulator) -> int:
    return sim.stats().requests


# -- hits and misses per key part ------------------------------------------------------------


async def test_the_same_image_twice_is_one_model_call_and_a_cached_record(
    settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    uri = image(tmp_path, "red.png")
    # Two jobs at once: the second waits on the first one's claim, then reuses its answer.
    run = await run_jobs(
        settings, [{"id": "a", "image_uri": uri}, {"id": "b", "image_uri": uri}], tmp_path / "r1"
    )

    assert run.dead == [] and run.stats.ok == 2
    assert calls(sim) == 1
    fresh, cached = sorted(run.results, key=lambda r: bool(r["cached"]))
    assert fresh["cached"] is False and fresh["attempts"] == 1
    assert fresh["cost_usd"] > 0  # the default model has a list price
    assert cached["cached"] is True
    assert cached["attempts"] == 0
    assert cached["cost_usd"] == 0  # a price is known, and nothing was paid
    assert cached["endpoint"] is None  # no endpoint answered: the store did
    assert cached["status"] == "ok"
    assert cached["image_uri"] == uri
    for same in ("description", "model", "usage", "tier"):
        assert cached[same] == fresh[same], same
    assert run.metric("worker_store_hits_total") == 1
    assert run.metric("worker_duplicates_suppressed_total") == 0

    # A restarted worker answers from the store too.
    again = await run_jobs(settings, [{"id": "c", "image_uri": uri}], tmp_path / "r2")
    assert calls(sim) == 1
    assert [r["cached"] for r in again.results] == [True]
    assert again.results[0]["description"] == fresh["description"]


@dataclass
class Variant:
    """A change to one part of the content key: of the worker's settings, or the job's."""

    worker: Callable[[Settings, Path], None] | None = None
    job: dict[str, Any] = field(default_factory=dict)


def _model(s: Settings, _: Path) -> None:
    s.model.model = "google/gemini-2.5-flash"


def _schema(s: Settings, tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    s.model.response_schema = str(path)


def _worker_temperature(s: Settings, _: Path) -> None:
    s.model.temperature = 0.5


def _worker_max_tokens(s: Settings, _: Path) -> None:
    s.model.max_tokens = 64


VARIANTS = {
    "prompt": Variant(job={"prompt": "List the colours in this image:"}),
    "model": Variant(worker=_model),
    "schema": Variant(worker=_schema),
    "job temperature": Variant(job={"temperature": 0.5}),
    "worker temperature": Variant(worker=_worker_temperature),
    "top_p": Variant(job={"top_p": 0.9}),
    "seed": Variant(job={"seed": 7}),
    "stop": Variant(job={"stop": ["zzz"]}),
    "job max_tokens": Variant(job={"max_tokens": 64}),
    "worker max_tokens": Variant(worker=_worker_max_tokens),
}


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
async def test_changing_one_part_of_the_key_misses(
    settings: Settings, sim: Simulator, tmp_path: Path, variant: Variant
) -> None:
    uri = image(tmp_path, "red.png")
    base = await run_jobs(settings, [{"id": "base", "image_uri": uri}], tmp_path / "base")
    assert [r["cached"] for r in base.results] == [False]
    assert calls(sim) == 1

    if variant.worker is not None:
        variant.worker(settings, tmp_path)
    changed = {"image_uri": uri, **variant.job}
    first = await run_jobs(settings, [{"id": "v1", **changed}], tmp_path / "v1")
    assert first.dead == []
    assert [r["cached"] for r in first.results] == [False]
    assert calls(sim) == 2  # a miss: the model was asked again

    # The changed request's answer is stored under its own key: asked again, it hits.
    second = await run_jobs(settings, [{"id": "v2", **changed}], tmp_path / "v2")
    assert [r["cached"] for r in second.results] == [True]
    assert second.results[0]["description"] == first.results[0]["description"]
    assert calls(sim) == 2


async def test_editing_the_schema_file_misses(
    settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    uri = image(tmp_path, "red.png")
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    settings.model.response_schema = str(path)
    await run_jobs(settings, [{"id": "a", "image_uri": uri}], tmp_path / "r1")
    # Same file name, same schema name ("default"): only the document changes.
    edited = {**SCHEMA, "properties": {**SCHEMA["properties"], "count": {"type": "number"}}}
    path.write_text(json.dumps(edited))
    run = await run_jobs(settings, [{"id": "b", "image_uri": uri}], tmp_path / "r2")
    assert [r["cached"] for r in run.results] == [False]
    assert calls(sim) == 2


async def test_the_tier_is_not_part_of_the_key(
    settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    """The consumption tier changes how a request is served and billed, not its answer."""
    uri = image(tmp_path, "red.png")
    await run_jobs(settings, [{"id": "a", "image_uri": uri}], tmp_path / "r1")
    run = await run_jobs(
        settings, [{"id": "b", "image_uri": uri, "tier": "priority"}], tmp_path / "r2"
    )
    assert calls(sim) == 1
    [record] = run.results
    assert record["cached"] is True and record["tier"] == "priority"


# -- content keys for inlined images -----------------------------------------------------------


async def test_local_files_are_known_by_their_bytes(
    settings: Settings, sim: Simulator, tmp_path: Path
) -> None:
    one = image(tmp_path, "one.png")
    copy = image(tmp_path, "elsewhere/copy-of-one.png")
    run = await run_jobs(
        settings, [{"id": "a", "image_uri": one}, {"id": "b", "image_uri": copy}], tmp_path / "r1"
    )
    assert calls(sim) == 1  # two paths, the same bytes
    assert sorted(r["cached"] for r in run.results) == [False, True]

    # The same path with other bytes is another image.
    image(tmp_path, "one.png", JPEG)
    again = await run_jobs(settings, [{"id": "c", "image_uri": one}], tmp_path / "r2")
    assert calls(sim) == 2
    [record] = again.results
    assert record["cached"] is False
    assert "green" in record["description"]  # the simulator described the new pixels
    assert all("green" not in r["description"] for r in run.results)


@dataclass
class WebImages:
    """A plain-http image server on 127.0.0.1 whose bytes the test changes between runs."""

    port: int
    bodies: dict[str, bytes]
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
async def web_images() -> AsyncIterator[WebImages]:
    state = WebImages(port=free_port(), bodies={})

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        state.hits[name] = state.hits.get(name, 0) + 1
        if name not in state.bodies:
            return web.Response(status=404)
        return web.Response(body=state.bodies[name], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", state.port).start()
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_web_images_are_known_by_their_bytes(
    settings: Settings, sim: Simulator, tmp_path: Path, web_images: WebImages
) -> None:
    # The server is on loopback over plain http: both must be allowed explicitly.
    settings.images.allow_http = True
    settings.images.allow_private_networks = True
    web_images.bodies.update({"a.png": PNG, "b.png": PNG})
    run = await run_jobs(
        settings,
        [{"id": "a", "image_uri": web_images.url("a.png")}, {"id": "b", "image_uri": web_images.url("b.png")}],
        tmp_path / "r1",
    )  # fmt: skip
    assert run.dead == []
    assert calls(sim) == 1  # two URLs, the same bytes
    assert sorted(r["cached"] for r in run.results) == [False, True]
    # Fetched and inlined: the model was sent the bytes, not the URL.
    [request] = sim.requests
    assert request.body["messages"][0]["content"][1]["image_url"].startswith("data:image/png")

    web_images.bodies["a.png"] = JPEG  # the same URL now serves another image
    again = await run_jobs(
        settings, [{"id": "c", "image_uri": web_images.url("a.png")}], tmp_path / "r2"
    )
    assert calls(sim) == 2
    assert [r["cached"] for r in again.results] == [False]
    assert web_images.hits == {"a.png": 2, "b.png": 1}  # each job read its image once


# -- gs:// objects passed through to Vertex AI: known by generation and checksum ------------------


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """gcp-storage-emulator on loopback with a bucket ``images``; the worker's image
    fetcher finds it through STORAGE_EMULATOR_HOST, as Google's clients do."""
    with gcs_emulator_server("images") as (_, url):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        yield url


async def upload(base: str, name: str, data: bytes) -> str:
    """Write (or overwrite) an object; its new generation."""
    return str((await gcs_upload(base, "images", name, data))["generation"])


async def test_gs_objects_are_known_by_generation_and_checksum(
    settings: Settings, sim: Simulator, tmp_path: Path, gcs: str
) -> None:
    first_generation = await upload(gcs, "cat.png", PNG)
    job = {"image_uri": "gs://images/cat.png"}
    await run_jobs(settings, [{"id": "a", **job}], tmp_path / "r1")
    assert calls(sim) == 1
    # Passed through: Vertex AI reads the object itself; the worker only asked for its
    # metadata.
    assert sim.requests[0].body["messages"][0]["content"][1]["image_url"] == job["image_uri"]

    same = await run_jobs(settings, [{"id": "b", **job}], tmp_path / "r2")
    assert calls(sim) == 1
    assert [r["cached"] for r in same.results] == [True]

    # Rewritten in place (even with the very same bytes): a new generation, a new image.
    assert await upload(gcs, "cat.png", PNG) != first_generation
    rewritten = await run_jobs(settings, [{"id": "c", **job}], tmp_path / "r3")
    assert calls(sim) == 2
    assert [r["cached"] for r in rewritten.results] == [False]


async def test_store_key_uri_lets_the_uri_alone_decide(
    settings: Settings, sim: Simulator, tmp_path: Path, gcs: str
) -> None:
    settings.store.key = "uri"
    await upload(gcs, "cat.png", PNG)
    job = {"image_uri": "gs://images/cat.png"}
    await run_jobs(settings, [{"id": "a", **job}], tmp_path / "r1")
    await upload(gcs, "cat.png", JPEG)  # another image under the same name
    run = await run_jobs(settings, [{"id": "b", **job}], tmp_path / "r2")
    assert calls(sim) == 1  # the URI is all that counts: still a hit
    assert [r["cached"] for r in run.results] == [True]


async def test_an_unreadable_gs_object_is_known_by_its_uri(
    settings: Settings, sim: Simulator, tmp_path: Path, gcs: str
) -> None:
    """The worker may not read what Vertex AI's service agent can: its metadata GET fails
    (here: no such object at the emulator) and the URI stands in for the identity."""
    job = {"image_uri": "gs://images/absent.png"}
    await run_jobs(settings, [{"id": "a", **job}], tmp_path / "r1")
    run = await run_jobs(settings, [{"id": "b", **job}], tmp_path / "r2")
    assert run.dead == []
    assert calls(sim) == 1
    assert [r["cached"] for r in run.results] == [True]


@pytest.mark.xfail(
    strict=True,
    reason="worker/reuse.py remembers a gs:// identity for IDENTITY_TTL_S (30 s) per "
    "process: an object rewritten within that window is answered from the old answer",
)
async def test_an_object_rewritten_while_the_worker_runs_is_a_new_image(
    settings: Settings, sim: Simulator, tmp_path: Path, gcs: str
) -> None:
    await upload(gcs, "cat.png", PNG)
    source = FeedSource()
    results = tmp_path / "r.jsonl"

    async def worker() -> None:
        async with runtime(settings) as rt:
            await run_pipeline(
                rt,
                source,
                JsonlSink(str(results)),
                JsonlSink(str(tmp_path / "d.jsonl")),
                resume=False,
                handle_signals=False,
            )

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await source.feed.send(job_bytes({"id": "a", "image_uri": "gs://images/cat.png"}))
        await wait_until(lambda: len(read_jsonl(results)) == 1, 10, "the first record")
        await upload(gcs, "cat.png", JPEG)  # another image under the same name
        await source.feed.send(job_bytes({"id": "b", "image_uri": "gs://images/cat.png"}))
        await wait_until(lambda: len(read_jsonl(results)) == 2, 10, "the second record")
        await source.feed.aclose()

    assert [r["cached"] for r in read_jsonl(results)] == [False, False]
    assert calls(sim) == 2


# -- claims: the holder that finishes between a look and a claim -------------------------------


async def test_a_result_stored_between_the_look_and_the_claim_is_used(tmp_path: Path) -> None:
    """Another worker holds the claim; it stores its answer and lets go just after our
    first look found nothing. Our claim then succeeds, but the answer is there: it is
    returned and the claim let go, with no second model call."""
    from worker.reuse import Reuse
    from worker.store import SqliteStore

    store = SqliteStore(str(tmp_path / "store.sqlite"))
    await store.prepare()
    reuse = Reuse(store)
    try:
        assert await store.claim("img:k", "other-replica:0", lease_s=60)
        looks = 0

        async def fetch() -> bytes | None:
            nonlocal looks
            looks += 1
            found = await store.get("ans:k")
            if looks == 1:
                # The holder finishes right after this look.
                await store.put("ans:k", b"the answer", ttl_s=None)
                await store.release("img:k", "other-replica:0")
            return found

        assert await reuse.find_or_claim("img:k", fetch) == (b"the answer", None)
        assert looks == 2
        # Our claim was let go: a third party can take it at once.
        assert await store.claim("img:k", "third:0", lease_s=60)
    finally:
        await store.aclose()
