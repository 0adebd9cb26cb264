"""The gs:// sink against the real gcp-storage-emulator, started here on a free loopback
port, with a small aiohttp proxy in front of it where a test needs faults or what the
emulator leaves out: it enforces ``ifGenerationMatch=0`` (the emulator ignores
preconditions), pages listings, answers testPermissions and requires tokens on demand.

Time is a ManualClock wherever the sink's timers or retry waits matter, so nothing here
sleeps; waits are events, ``wait_all_tasks_blocked`` or polling under ``fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import pytest
from aiohttp import web

from worker.clock import ManualClock
from worker.errors import ConfigError, StorageError
from worker.protocols import Record
from worker.settings import GcsSinkSettings, Settings
from worker.simulator import Simulator
from worker.sinks.gcs import GcsSink, default_replica, object_name, parse_gcs_url

from .helpers import gcs_emulator_server, gcs_upload

BUCKET = "results"


@pytest.fixture(scope="module")
def _emulator_server() -> Iterator[tuple[Any, str]]:
    with gcs_emulator_server(BUCKET) as server:  # stopping takes 0.5 s: once per module
        yield server


@pytest.fixture
def emulator(_emulator_server: tuple[Any, str]) -> str:
    """gcp-storage-emulator on 127.0.0.1 with one empty bucket, ``results``: its URL."""
    server, base = _emulator_server
    server.wipe(keep_buckets=True)
    return base


class Proxy:
    """Forwards to the emulator; what it adds is switched on per test."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        #: One entry per upload, in order: "503", "drop" (stored, answer lost), "taken"
        #: (another writer stores the name first), "corrupt" (a byte changes on the way).
        self.upload_faults: list[str] = []
        #: Answer every request with this status.
        self.status: int | None = None
        #: Fail the next N requests (any kind) with 503.
        self.fail_next = 0
        #: Listings in pages of this many items.
        self.page_size: int | None = None
        #: testPermissions grants only these.
        self.granted: list[str] | None = None
        #: Require "Authorization: Bearer <this>"; else 401.
        self.token: str | None = None
        self.base_url = ""
        self.requests = 0
        self.uploads = 0
        self.authorization: list[str] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._http = aiohttp.ClientSession()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.authorization.append(request.headers.get("Authorization", ""))
        body = await request.read()
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return _error(401, "Invalid Credentials")
        if self.status is not None:
            return _error(self.status, "injected")
        if self.fail_next:
            self.fail_next -= 1
            return _error(503, "injected")
        q = request.query
        if request.method == "POST" and request.path.startswith("/upload/"):
            return await self._upload(request, body)
        if request.path.endswith("/iam/testPermissions") and self.granted is not None:
            asked = q.getall("permissions", [])
            return web.json_response({"permissions": [p for p in asked if p in self.granted]})
        if request.method == "GET" and request.path.endswith("/o") and self.page_size:
            return await self._page(request)
        return await self._forward(request.method, request.path_qs, body, request.headers)

    async def _upload(self, request: web.Request, body: bytes) -> web.StreamResponse:
        self.uploads += 1
        fault = self.upload_faults.pop(0) if self.upload_faults else "ok"
        name = request.query["name"]
        if fault == "503":
            return _error(503, "backend unavailable")
        if fault == "429":
            answer = _error(429, "rateLimitExceeded")
            answer.headers["Retry-After"] = "7"
            return answer
        if fault == "taken":
            await _put(self.upstream, name, b'{"id":"someone-else"}\n')
        if request.query.get("ifGenerationMatch") == "0" and await self._exists(name):
            return _error(412, "conditionNotMet")
        if fault == "corrupt":
            body = body[:-2] + b"X\n"
        answer = await self._forward("POST", request.path_qs, body, request.headers)
        if fault == "drop":
            # Stored upstream; the client never hears of it.
            assert request.transport is not None
            request.transport.close()
        return answer

    async def _exists(self, name: str) -> bool:
        assert self._http is not None
        url = f"{self.upstream}/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}"
        async with self._http.get(url) as resp:
            return resp.status == 200

    async def _page(self, request: web.Request) -> web.Response:
        assert self._http is not None and self.page_size
        query = {k: v for k, v in request.query.items() if k in ("prefix",)}
        async with self._http.get(f"{self.upstream}{request.path}", params=query) as resp:
            listing = await resp.json()
        items = sorted(listing.get("items") or [], key=lambda i: i["name"])
        start = int(request.query.get("pageToken", "0"))
        size = min(self.page_size, int(request.query.get("maxResults", "1000")))
        answer: dict[str, Any] = {"items": items[start : start + size]}
        if start + size < len(items):
            answer["nextPageToken"] = str(start + size)
        return web.json_response(answer)

    async def _forward(self, method: str, path_qs: str, body: bytes, headers: Any) -> web.Response:
        assert self._http is not None
        sent = {k: v for k, v in headers.items() if k.lower() == "content-type"}
        async with self._http.request(
            method, self.upstream + path_qs, data=body or None, headers=sent
        ) as resp:
            raw = await resp.read()
            kind = resp.headers.get("Content-Type")
        out = web.Response(status=resp.status, body=raw)
        if kind:
            out.headers["Content-Type"] = kind
        return out


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "message": message, "errors": [{"reason": message}]}},
        status=status,
    )


@pytest.fixture
async def proxy(emulator: str) -> AsyncIterator[Proxy]:
    p = Proxy(emulator)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


# -- helpers ------------------------------------------------------------------------------


async def _put(base: str, name: str, data: bytes) -> None:
    await gcs_upload(base, BUCKET, name, data, "application/octet-stream")


async def stored(base: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix``, by name, straight from the emulator."""
    async with aiohttp.ClientSession() as http:
        params = {"prefix": prefix} if prefix else {}
        async with http.get(f"{base}/storage/v1/b/{BUCKET}/o", params=params) as resp:
            assert resp.status == 200
            items = (await resp.json()).get("items") or []
        out: dict[str, bytes] = {}
        for item in items:
            url = f"{base}/storage/v1/b/{BUCKET}/o/{quote(item['name'], safe='')}"
            async with http.get(url, params={"alt": "media"}) as resp:
                out[item["name"]] = await resp.read()
        return out


def ids_of(data: bytes) -> list[str]:
    return [json.loads(line)["id"] for line in data.splitlines() if line.strip()]


async def wait_for_objects(base: str, n: int, prefix: str = "") -> dict[str, bytes]:
    with anyio.fail_after(10):
        while True:
            found = await stored(base, prefix)
            if len(found) >= n:
                return found
            await anyio.sleep(0.01)


def records(n: int, start: int = 0, pad: int = 0) -> list[Record]:
    return [{"id": f"r{i}", "status": "ok", "text": "x" * pad} for i in range(start, start + n)]


def settings(**kw: Any) -> GcsSinkSettings:
    s = GcsSinkSettings(
        roll_records=1000,
        roll_age_s=10.0,
        roll_idle_s=0.0,
        replica="t1",
        request_timeout_s=10.0,
        retry_deadline_s=30.0,
    )
    for k, v in kw.items():
        setattr(s, k, v)
    s.validate()
    return s


class Writes:
    """``sink.write`` calls running in a task group, each with an event when it ends."""

    def __init__(self, sink: GcsSink, tg: anyio.abc.TaskGroup) -> None:
        self.sink = sink
        self.tg = tg
        self.done: list[anyio.Event] = []
        self.errors: list[BaseException | None] = []

    def start(self, batch: Sequence[Record]) -> int:
        i = len(self.done)
        self.done.append(anyio.Event())
        self.errors.append(None)

        async def run() -> None:
            try:
                await self.sink.write(batch)
            except Exception as exc:
                self.errors[i] = exc
            finally:
                self.done[i].set()

        self.tg.start_soon(run)
        return i

    async def wait(self, i: int) -> BaseException | None:
        with anyio.fail_after(10):
            await self.done[i].wait()
        return self.errors[i]


# -- URLs and names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("gs://results/", "results", ""),
        ("gs://results", "results", ""),
        ("gs://results/out", "results", "out/"),
        ("gs://my-bucket.example.com/a/b c/", "my-bucket.example.com", "a/b c/"),
        ("gs://b_1/ünï/", "b_1", "ünï/"),
    ],
)
def test_good_urls_parse(url: str, bucket: str, prefix: str) -> None:
    assert parse_gcs_url(url) == (bucket, prefix)


@pytest.mark.parametrize(
    "url",
    [
        "s3://results/",
        "gs:/results/",
        "gs:///out/",
        "gs://Results/",
        "gs://ab/",
        "gs://" + "a" * 64 + "/",
        "gs://-results/",
        "gs://res..ults/",
        "gs://192.168.1.1/",
        "gs://google-results/",
        "gs://goog-results/",
        "gs://res ults/",
        "gs://results/a//b/",
        "gs://results/../b/",
        "gs://results/./",
        "gs://results/a\nb/",
        "gs://results/a?b/",
        "gs://results/a#b/",
        "gs://results/a*/",
        "gs://results/" + "p" * 1000 + "/",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        GcsSink(url, settings=settings(), key="worker.dead_letter", storage_host="127.0.0.1:1")
    assert err.value.key == "worker.dead_letter"


def test_object_names_sort_by_time_and_never_repeat_across_runs() -> None:
    t = 1_741_964_966_123_456_789  # 2025-03-14T15:09:26.123456789Z
    name = object_name("out/", t, "worker-a", "3f9c2e1d", 42)
    assert name == "out/2025/03/14/15/20250314T150926.123456Z-worker-a-3f9c2e1d-000042.jsonl"
    later = [
        object_name("out/", t + d, "worker-a", "3f9c2e1d", 0) for d in (1000, 10**9, 3600 * 10**9)
    ]
    assert sorted([name, *later]) == [name, *later]
    assert object_name("", t, "r", "x", 1).startswith("2025/03/14/15/")

    # Same replica name (a restarted pod keeps its name and pid), another run token.
    a = GcsSink("gs://results/", settings=settings(replica="pod-0"), storage_host="h:1")
    b = GcsSink("gs://results/", settings=settings(replica="pod-0"), storage_host="h:1")
    assert a.run != b.run

    replica = default_replica()
    assert replica.rsplit("-", 1)[1].isdigit()
    assert all(c.isalnum() or c in "-_" for c in replica)
    assert GcsSink("gs://results/", settings=settings(replica=""), storage_host="h:1").replica


def test_storage_emulator_host_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    sink = GcsSink("gs://results/", settings=settings())
    assert sink.emulator and sink.base_url == "http://127.0.0.1:9"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    sink = GcsSink("gs://results/", settings=settings())
    assert not sink.emulator and sink.base_url == "https://storage.googleapis.com"


# -- rolling --------------------------------------------------------------------------------


async def test_rolls_by_record_count(emulator: str) -> None:
    clock = ManualClock()
    sink = GcsSink(
        "gs://results/out/", settings=settings(roll_records=3), clock=clock, storage_host=emulator
    )
    try:
        async with anyio.create_task_group() as tg:
            w = Writes(sink, tg)
            first = w.start(records(7))  # 3 + 3 + 1: waits on three objects
            found = await wait_for_objects(emulator, 2)
            await anyio.wait_all_tasks_blocked()
            assert not w.done[first].is_set()  # its last record is in the open object
            second = w.start(records(2, start=7))  # fills that object to 3
            assert await w.wait(first) is None
            assert await w.wait(second) is None
        found = await stored(emulator)
        assert sorted(len(ids_of(d)) for d in found.values()) == [3, 3, 3]
        assert sorted(i for d in found.values() for i in ids_of(d)) == sorted(
            r["id"] for r in records(9)
        )
        assert clock.pending == 0
    finally:
        await sink.aclose()


async def test_rolls_by_bytes(emulator: str) -> None:
    clock = ManualClock()
    sink = GcsSink(
        "gs://results/", settings=settings(roll_bytes=1024), clock=clock, storage_host=emulator
    )
    try:
        async with anyio.create_task_group() as tg:
            w = Writes(sink, tg)
            # ~300 bytes a record: three fit under 1024, a fourth would overflow.
            started = [w.start(records(1, start=i, pad=250)) for i in range(7)]
            await wait_for_objects(emulator, 2)
            await anyio.wait_all_tasks_blocked()
            assert not w.done[started[-1]].is_set()
            await sink.aclose()  # the seventh record's object, finalised on close
            for i in started:
                assert await w.wait(i) is None
        found = await stored(emulator)
        assert sorted(len(ids_of(d)) for d in found.values()) == [1, 3, 3]
        assert all(len(d) <= 1024 for d in found.values())
    finally:
        await sink.aclose()


async def test_rolls_by_age_and_a_write_returns_only_once_its_object_is_stored(
    emulator: str,
) -> None:
    clock = ManualClock()
    sink = GcsSink(
        "gs://results/", settings=settings(roll_age_s=5.0), clock=clock, storage_host=emulator
    )
    try:
        async with anyio.create_task_group() as tg:
            w = Writes(sink, tg)
            a = w.start(records(2))
            await anyio.wait_all_tasks_blocked()
            clock.advance(3.0)
            b = w.start(records(1, start=2))  # joins the same object: its age counts from a
            await anyio.wait_all_tasks_blocked()
            clock.advance(1.75)
            assert sink.open_records == 3
            await anyio.wait_all_tasks_blocked()
            assert not w.done[a].is_set() and not w.done[b].is_set()
            assert await stored(emulator) == {}
            clock.advance(0.25)  # 5 s after the first record
            assert sink.open_records == 0
            assert await w.wait(a) is None
            # Returned: so the object is there already, with every record of both writes.
            found = await stored(emulator)
            assert [ids_of(d) for d in found.values()] == [["r0", "r1", "r2"]]
            assert await w.wait(b) is None
        (name,) = found
        assert name.endswith(f"-t1-{sink.run}-000000.jsonl")
    finally:
        await sink.aclose()


async def test_an_idle_object_is_finalised_before_its_age(emulator: str) -> None:
    clock = ManualClock()
    sink = GcsSink(
        "gs://results/",
        settings=settings(roll_age_s=60.0, roll_idle_s=1.0),
        clock=clock,
        storage_host=emulator,
    )
    try:
        async with anyio.create_task_group() as tg:
            w = Writes(sink, tg)
            a = w.start(records(1))
            await anyio.wait_all_tasks_blocked()
            clock.advance(0.5)
            b = w.start(records(1, start=1))  # records still coming: not idle yet
            await anyio.wait_all_tasks_blocked()
            clock.advance(0.75)  # 1.25 s after the first record, 0.75 s after the latest
            assert sink.open_records == 2  # not finalised
            await anyio.wait_all_tasks_blocked()
            assert not w.done[a].is_set()
            clock.advance(0.25)  # 1 s after the latest record
            assert await w.wait(a) is None
            assert await w.wait(b) is None
        found = await stored(emulator)
        assert [ids_of(d) for d in found.values()] == [["r0", "r1"]]
    finally:
        await sink.aclose()


async def test_aclose_finalises_the_open_object(emulator: str) -> None:
    sink = GcsSink("gs://results/", settings=settings(), clock=ManualClock(), storage_host=emulator)
    async with anyio.create_task_group() as tg:
        w = Writes(sink, tg)
        a = w.start(records(3))
        await anyio.wait_all_tasks_blocked()
        await sink.aclose()
        assert await w.wait(a) is None
    assert [ids_of(d) for d in (await stored(emulator)).values()] == [["r0", "r1", "r2"]]
    with pytest.raises(RuntimeError, match="closed"):
        await sink.write(records(1))


# -- failures -------------------------------------------------------------------------------


def _faulty_sink(proxy: Proxy, clock: ManualClock | None = None, **kw: Any) -> GcsSink:
    # auto_advance: retry waits move the clock instead of being slept.
    return GcsSink(
        "gs://results/out/",
        settings=settings(roll_records=5, **kw),
        clock=clock or ManualClock(auto_advance=True),
        storage_host=proxy.base_url,
    )


async def test_an_upload_answered_503_is_retried_into_one_complete_object(
    proxy: Proxy, emulator: str
) -> None:
    proxy.upload_faults = ["503"]
    sink = _faulty_sink(proxy)
    try:
        await sink.write(records(5))
    finally:
        await sink.aclose()
    assert proxy.uploads == 2
    assert sink.retries == 1
    found = await stored(emulator)
    assert [ids_of(d) for d in found.values()] == [[f"r{i}" for i in range(5)]]


async def test_a_429_is_retried_after_the_pause_the_service_asks_for(
    proxy: Proxy, emulator: str
) -> None:
    proxy.upload_faults = ["429"]
    clock = ManualClock(auto_advance=True)
    sink = _faulty_sink(proxy, clock)
    try:
        await sink.write(records(5))
    finally:
        await sink.aclose()
    assert len(clock.slept) == 1 and 7.0 <= clock.slept[0] <= 7.8
    assert len(await stored(emulator)) == 1


async def test_a_lost_answer_meets_412_on_retry_and_the_stored_object_is_taken_as_ours(
    proxy: Proxy, emulator: str
) -> None:
    proxy.upload_faults = ["drop"]
    sink = _faulty_sink(proxy)
    try:
        await sink.write(records(5))
    finally:
        await sink.aclose()
    assert proxy.uploads == 2  # the retry met 412, then the metadata matched
    assert sink.landed_earlier == 1
    assert sink.collisions == 0
    found = await stored(emulator)
    assert [ids_of(d) for d in found.values()] == [[f"r{i}" for i in range(5)]]


async def test_a_name_taken_by_someone_else_is_never_overwritten(
    proxy: Proxy, emulator: str
) -> None:
    proxy.upload_faults = ["taken"]
    sink = _faulty_sink(proxy)
    try:
        await sink.write(records(5))
    finally:
        await sink.aclose()
    assert sink.collisions == 1
    found = await stored(emulator)
    assert sorted(ids_of(d) for d in found.values()) == [
        [f"r{i}" for i in range(5)],
        ["someone-else"],  # untouched
    ]
    ours = next(n for n, d in found.items() if b"someone-else" not in d)
    assert ours.endswith("-000001.jsonl")  # renamed


async def test_an_object_stored_corrupted_is_replaced(proxy: Proxy, emulator: str) -> None:
    proxy.upload_faults = ["corrupt"]
    sink = _faulty_sink(proxy)
    try:
        await sink.write(records(5))
    finally:
        await sink.aclose()
    found = await stored(emulator)
    assert [ids_of(d) for d in found.values()] == [[f"r{i}" for i in range(5)]]
    assert proxy.uploads == 2


async def test_a_final_failure_fails_every_write_waiting_on_the_object(
    proxy: Proxy, emulator: str
) -> None:
    proxy.status = 503
    sink = _faulty_sink(proxy, retry_deadline_s=2.0)
    try:
        async with anyio.create_task_group() as tg:
            w = Writes(sink, tg)
            started = [w.start(records(1, start=i)) for i in range(5)]  # one object of 5
            errors = [await w.wait(i) for i in started]
        assert all(isinstance(e, StorageError) and e.status == 503 for e in errors)
        assert len({id(e) for e in errors}) == 5  # one exception per waiter
        assert proxy.requests > 2  # retried until the deadline
        proxy.status = None
        await sink.write(records(5, start=10))  # the sink goes on with the next object
    finally:
        await sink.aclose()
    found = await stored(emulator)
    assert [ids_of(d) for d in found.values()] == [[f"r{i}" for i in range(10, 15)]]


# -- replicas, resuming ---------------------------------------------------------------------


async def test_two_replicas_under_one_prefix_never_collide(emulator: str) -> None:
    clock = ManualClock()
    sinks = [
        GcsSink(
            "gs://results/shared/",
            settings=settings(roll_records=10, replica=name),
            clock=clock,
            storage_host=emulator,
        )
        for name in ("replica-a", "replica-b")
    ]
    try:
        async with anyio.create_task_group() as tg:
            for k, sink in enumerate(sinks):
                for batch in range(10):  # the same object times and sequence numbers
                    tg.start_soon(sink.write, records(5, start=1000 * k + 5 * batch))
    finally:
        for sink in sinks:
            await sink.aclose()
    found = await stored(emulator, "shared/")
    assert len(found) == 10
    assert {n.split("-")[-3] for n in found} == {"a", "b"}
    every = [i for d in found.values() for i in ids_of(d)]
    assert len(every) == 100 and len(set(every)) == 100


async def test_existing_ids_reads_every_object_under_the_prefix(
    proxy: Proxy, emulator: str
) -> None:
    proxy.page_size = 2  # pages, as the real service returns for long listings
    base = proxy.base_url
    sink = GcsSink("gs://results/run/", settings=settings(roll_records=2), storage_host=base)
    try:
        await sink.write(records(6))  # three objects of two
        await _put(
            emulator,
            "run/2025/01/01/00/hand-made.jsonl",
            b'{"id":"x1"}\nnot json\n{"id":2}\n[]\n{"id":"x2"}',
        )
        await _put(emulator, "other/elsewhere.jsonl", b'{"id":"not-mine"}\n')
        reader = GcsSink("gs://results/run/", settings=settings(), storage_host=base)
        try:
            ids = await reader.existing_ids()
        finally:
            await reader.aclose()
    finally:
        await sink.aclose()
    assert ids == {f"r{i}" for i in range(6)} | {"x1", "x2"}
    empty = GcsSink("gs://results/nothing/", settings=settings(), storage_host=emulator)
    try:
        assert await empty.existing_ids() == set()
    finally:
        await empty.aclose()


# -- prepare --------------------------------------------------------------------------------


async def test_prepare_accepts_a_usable_bucket_and_retries_transient_failures(
    proxy: Proxy,
) -> None:
    proxy.fail_next = 2
    sink = GcsSink(
        "gs://results/out/",
        settings=settings(),
        clock=ManualClock(auto_advance=True),
        storage_host=proxy.base_url,
    )
    try:
        await sink.prepare()
    finally:
        await sink.aclose()
    assert proxy.fail_next == 0


async def test_a_missing_bucket_is_a_config_error(emulator: str) -> None:
    sink = GcsSink("gs://no-such-bucket/out/", settings=settings(), storage_host=emulator)
    try:
        with pytest.raises(ConfigError, match="no-such-bucket does not exist"):
            await sink.prepare()
    finally:
        await sink.aclose()


async def test_missing_permissions_are_config_errors_that_name_them(proxy: Proxy) -> None:
    base = proxy.base_url
    proxy.status = 403
    sink = GcsSink("gs://results/out/", settings=settings(), storage_host=base, key="k")
    try:
        with pytest.raises(ConfigError, match=r"storage\.objects\.list") as err:
            await sink.prepare()
        assert err.value.key == "k"
        proxy.status = None
        proxy.granted = ["storage.objects.list", "storage.objects.get"]
        with pytest.raises(ConfigError, match=r"lack storage\.objects\.create"):
            await sink.prepare()
    finally:
        await sink.aclose()


# -- credentials ----------------------------------------------------------------------------


class FakeTokens:
    def __init__(self, *, google: bool) -> None:
        self.google = google
        self.value = "tok-1"
        self.refreshed: list[str] = []
        self.refreshes = 0
        self.refresh_failures = 0
        self.expires_at = None

    async def start(self) -> None:
        return None

    async def token(self) -> str:
        return self.value

    async def refresh_after_rejection(self, rejected: str) -> None:
        self.refreshed.append(rejected)
        self.value = "tok-2"

    async def run_refresher(self) -> None:
        return None


async def test_google_tokens_go_to_cloud_storage_and_a_401_refreshes_them(
    proxy: Proxy, emulator: str
) -> None:
    base = proxy.base_url
    tokens = FakeTokens(google=True)
    sink = GcsSink("gs://results/", settings=settings(roll_records=1), storage_host=base)
    sink.emulator = False  # stand in for storage.googleapis.com
    try:
        with pytest.raises(ConfigError, match="no Google credentials"):
            await sink.prepare()
        sink.set_tokens(FakeTokens(google=False))  # an API key is never sent
        with pytest.raises(ConfigError, match="no Google credentials"):
            await sink.prepare()
        sink.set_tokens(tokens)
        proxy.token = "tok-2"
        await sink.write(records(1))
    finally:
        await sink.aclose()
    assert tokens.refreshed == ["tok-1"]
    assert proxy.authorization == ["Bearer tok-1", "Bearer tok-2"]
    assert len(await stored(emulator)) == 1


async def test_no_token_is_sent_to_an_emulator(proxy: Proxy) -> None:
    sink = GcsSink(
        "gs://results/",
        settings=settings(roll_records=1),
        tokens=FakeTokens(google=True),
        storage_host=proxy.base_url,
    )
    try:
        await sink.prepare()
        await sink.write(records(1))
    finally:
        await sink.aclose()
    assert proxy.authorization and set(proxy.authorization) == {""}


# -- end to end -----------------------------------------------------------------------------


async def test_every_job_of_a_pipeline_run_is_stored_exactly_once(
    emulator: str, fast_settings: Settings, sim: Simulator
) -> None:
    from worker.app import run_pipeline, runtime
    from worker.sources import MemorySource

    n = 300
    jobs = [
        json.dumps({"id": f"job-{i}", "image_uri": f"gs://images/{i}.jpg"}).encode()
        for i in range(n)
    ]
    jobs += [json.dumps({"id": f"bad-{i}"}).encode() for i in range(5)]  # no image_uri
    fast_settings.worker.max_jobs_in_flight = 64
    gcs = settings(roll_records=40, roll_age_s=5.0, roll_idle_s=0.05)
    sink = GcsSink("gs://results/run/ok/", settings=gcs, storage_host=emulator)
    dead = GcsSink("gs://results/run/dead/", settings=gcs, storage_host=emulator)
    with anyio.fail_after(30):
        async with runtime(fast_settings) as rt:
            sink.set_tokens(rt.tokens)
            dead.set_tokens(rt.tokens)
            stats = await run_pipeline(
                rt, MemorySource(jobs), sink, dead, resume=False, handle_signals=False
            )
    assert stats.ok == n
    ok = [i for d in (await stored(emulator, "run/ok/")).values() for i in ids_of(d)]
    bad = [i for d in (await stored(emulator, "run/dead/")).values() for i in ids_of(d)]
    assert sorted(ok) == sorted(f"job-{i}" for i in range(n))
    assert sorted(bad) == sorted(f"bad-{i}" for i in range(5))
    assert sink.records == n and sink.objects >= n // 40

    # Resuming reads the same ids back.
    again = GcsSink("gs://results/run/ok/", settings=gcs, storage_host=emulator)
    try:
        assert await again.existing_ids() == set(ok)
    finally:
        await again.aclose()
