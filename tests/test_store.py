"""Result stores: one conformance suite run on SQLite and on a real Redis server, then
what each backend owns (SQLite's file, Redis's outages) and ``open_store``'s parsing.

Expiry on SQLite is driven by a ManualClock; on Redis the server keeps time, so those
tests use short leases and wait by bounded polling for the lapse they expect.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import redis.asyncio

from worker.clock import ManualClock
from worker.errors import ConfigError, StoreUnavailable
from worker.protocols import ResultStore
from worker.store import RedisStore, SqliteStore, open_store
from worker.store import sqlite as sqlite_module
from worker.store.redis import MAX_CONNECTIONS

from .fakes.redis_server import RedisServer, free_port

PASSWORD = "s3cret-Pa55"
# Generous: these bound how long an outage blocks a call, they are not speed figures.
OUTAGE_BOUND_S = 3.5


@dataclass
class Backend:
    """A store factory on one shared file or server, and how time passes for it."""

    kind: str
    make: Callable[[], ResultStore]
    #: SQLite: expiry follows this clock. Redis: None (the server's clock).
    clock: ManualClock | None
    #: A lease or TTL short enough to wait out in a test.
    short_s: float
    server: RedisServer | None = None
    opened: list[ResultStore] = field(default_factory=list)

    async def open(self) -> ResultStore:
        store = self.make()
        self.opened.append(store)
        await store.prepare()
        return store

    def advance(self, seconds: float) -> None:
        """Move a manual clock on; real time needs no help."""
        if self.clock is not None:
            self.clock.advance(seconds)

    async def until(self, after_s: float, check: Callable[[], Awaitable[bool]]) -> None:
        """``check`` turns true once ``after_s`` have passed (and not because of anything
        else): at once after moving a manual clock, else within a bounded poll."""
        if self.clock is not None:
            self.clock.advance(after_s)
            assert await check()
            return
        with anyio.fail_after(after_s + 5):
            while not await check():
                await anyio.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        clock = ManualClock()
        path = str(tmp_path / "state" / "store.sqlite")
        b = Backend("sqlite", lambda: SqliteStore(path, clock=clock), clock, short_s=10.0)
    else:
        server = RedisServer()
        await server.start()
        b = Backend("redis", lambda: RedisStore(server.url), None, short_s=0.4, server=server)
    try:
        yield b
    finally:
        for store in b.opened:
            await store.aclose()
        if b.server is not None:
            await b.server.aclose()


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    s = RedisServer()
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


# ---- conformance: both backends --------------------------------------------------------


async def test_put_get_round_trip_and_overwrite(backend: Backend) -> None:
    store = await backend.open()
    assert await store.get("missing") is None
    blob = bytes(range(256)) + b"\x00tail"
    await store.put("k", blob, ttl_s=None)
    assert await store.get("k") == blob
    await store.put("k", b"second", ttl_s=None)
    assert await store.get("k") == b"second"
    # Keys are text, any text.
    await store.put("sha256:ü/∑ key", b"v", ttl_s=None)
    assert await store.get("sha256:ü/∑ key") == b"v"
    # Another store on the same file or server sees it.
    other = await backend.open()
    assert await other.get("k") == b"second"


async def test_values_and_claims_are_separate(backend: Backend) -> None:
    store = await backend.open()
    await store.put("k", b"v", ttl_s=None)
    assert await store.claim("k", "A", lease_s=60)
    assert await store.get("k") == b"v"
    await store.release("k", "A")
    assert await store.get("k") == b"v"
    assert await store.claim("k", "B", lease_s=60)


async def test_a_value_lapses_after_its_ttl(backend: Backend) -> None:
    store = await backend.open()
    ttl_s = backend.short_s
    await store.put("brief", b"v", ttl_s=ttl_s)
    await store.put("kept", b"v", ttl_s=ttl_s)
    # Overwriting without a TTL keeps the value for good.
    await store.put("kept", b"v2", ttl_s=None)
    assert await store.get("brief") == b"v"
    backend.advance(ttl_s * 0.9)
    if backend.clock is not None:
        assert await store.get("brief") == b"v"

    async def lapsed() -> bool:
        return await store.get("brief") is None

    await backend.until(ttl_s * 0.1 + 0.001, lapsed)
    assert await store.get("kept") == b"v2"


async def test_claim_refuse_renew_release(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    assert await a.claim("job-1", "A", lease_s=60)
    assert not await b.claim("job-1", "B", lease_s=60)
    assert await a.claim("job-1", "A", lease_s=60)  # renewal by the holder
    await b.release("job-1", "B")  # not B's to release: nothing happens
    assert not await b.claim("job-1", "B", lease_s=60)
    await a.release("job-1", "A")
    assert await b.claim("job-1", "B", lease_s=60)
    assert not await a.claim("job-1", "A", lease_s=60)
    await a.release("never-claimed", "A")  # harmless


async def test_renewal_extends_the_lease(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    lease_s = backend.short_s
    assert await a.claim("renewed", "A", lease_s=lease_s)
    assert await a.claim("control", "A", lease_s=lease_s)
    assert await a.claim("renewed", "A", lease_s=600)

    # Once the control claim (same first lease) has lapsed, the renewed one still holds.
    async def control_lapsed() -> bool:
        return await b.claim("control", "B", lease_s=600)

    await backend.until(lease_s + 0.001, control_lapsed)
    assert not await b.claim("renewed", "B", lease_s=600)


async def test_a_dead_holders_lease_lapses(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    lease_s = backend.short_s
    assert await a.claim("job-2", "A", lease_s=lease_s)
    await a.aclose()  # A dies without releasing
    assert not await b.claim("job-2", "B", lease_s=60)
    backend.advance(lease_s * 0.9)
    if backend.clock is not None:
        assert not await b.claim("job-2", "B", lease_s=60)

    async def taken() -> bool:
        return await b.claim("job-2", "B", lease_s=60)

    await backend.until(lease_s * 0.1 + 0.001, taken)
    # B holds it now: A, back from the dead, is refused.
    a2 = await backend.open()
    assert not await a2.claim("job-2", "A", lease_s=60)


async def test_racing_claims_have_one_winner_each_round(backend: Backend) -> None:
    stores = [await backend.open(), await backend.open()]
    rounds, per_store = 25, 8

    async def contend(store: ResultStore, holder: str, key: str, wins: list[str]) -> None:
        if await store.claim(key, holder, lease_s=60):
            wins.append(holder)

    for r in range(rounds):
        wins: list[str] = []
        async with anyio.create_task_group() as tg:
            for i in range(per_store):
                for s, store in enumerate(stores):
                    tg.start_soon(contend, store, f"w{s}-{i}", f"race-{r}", wins)
        assert len(wins) == 1, (r, wins)


async def test_calls_after_close_raise_store_unavailable(backend: Backend) -> None:
    store = await backend.open()
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    with pytest.raises(StoreUnavailable):
        await store.claim("k", "A", lease_s=60)


async def test_nonpositive_ttl_or_lease_is_a_programming_error(backend: Backend) -> None:
    store = await backend.open()
    with pytest.raises(ValueError, match="ttl_s"):
        await store.put("k", b"v", ttl_s=0)
    with pytest.raises(ValueError, match="lease_s"):
        await store.claim("k", "A", lease_s=0)


# ---- SQLite -----------------------------------------------------------------------------


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "deep" / "dir" / "store.sqlite")
    first = SqliteStore(path, clock=ManualClock())
    await first.prepare()
    await first.put("forever", b"1", ttl_s=None)
    await first.put("ten-seconds", b"2", ttl_s=10)
    assert await first.claim("job", "A", lease_s=10)
    await first.aclose()

    # A new process: another clock, started elsewhere. Expiry was kept as wall time.
    clock = ManualClock(start=5.0)
    second = SqliteStore(path, clock=clock)
    await second.prepare()
    try:
        assert await second.get("forever") == b"1"
        assert await second.get("ten-seconds") == b"2"
        assert not await second.claim("job", "B", lease_s=10)
        clock.advance(11)
        assert await second.get("ten-seconds") is None
        assert await second.claim("job", "B", lease_s=10)
        assert await second.get("forever") == b"1"
    finally:
        await second.aclose()


async def test_sqlite_uses_wal_and_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.sqlite"
    store = SqliteStore(str(path))
    await store.prepare()
    await store.prepare()  # twice is harmless
    await store.put("k", b"v", ttl_s=None)
    try:
        with sqlite3.connect(path) as look:
            assert look.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert look.execute("SELECT value FROM store_values").fetchall() == [(b"v",)]
    finally:
        await store.aclose()


async def test_sqlite_expired_rows_are_purged(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "store.sqlite"
    store = SqliteStore(str(path), clock=clock)
    await store.prepare()
    await store.put("old", b"v", ttl_s=1)
    assert await store.claim("old-claim", "A", lease_s=1)
    clock.advance(sqlite_module.PURGE_INTERVAL_S + 1)
    await store.put("new", b"v", ttl_s=None)  # a write past the interval purges
    await store.aclose()
    with sqlite3.connect(path) as look:
        assert look.execute("SELECT key FROM store_values").fetchall() == [("new",)]
        assert look.execute("SELECT count(*) FROM store_claims").fetchone() == (0,)


@pytest.mark.parametrize("case", ["parent_is_a_file", "path_is_a_directory", "not_a_database"])
async def test_sqlite_unusable_path_is_a_config_error(tmp_path: Path, case: str) -> None:
    if case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "store.sqlite"
    elif case == "path_is_a_directory":
        path = tmp_path / "dir"
        path.mkdir()
    else:
        path = tmp_path / "junk.sqlite"
        path.write_bytes(b"this is not a database, just some bytes" * 100)
    store = open_store(f"sqlite:{path}", key="store.uri")
    assert store is not None
    with pytest.raises(ConfigError) as info:
        await store.prepare()
    assert info.value.key == "store.uri"
    assert str(path) in info.value.message
    with pytest.raises(StoreUnavailable):
        await store.get("k")  # never opened


async def test_sqlite_waits_for_a_locked_file_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.sqlite"
    store = SqliteStore(str(path))
    await store.prepare()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the file
        done = anyio.Event()

        async def put() -> None:
            await store.put("k", b"v", ttl_s=None)
            done.set()

        ticks = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(put)
            # The loop keeps running while the write waits for the lock.
            with anyio.fail_after(5):
                while ticks < 5:
                    await anyio.sleep(0.01)
                    ticks += 1
            assert not done.is_set()
            holder.execute("COMMIT")
        assert await store.get("k") == b"v"
    finally:
        holder.close()
        await store.aclose()

    # A lock held past the busy timeout is StoreUnavailable, not a hang.
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_S", 0.05)
    store = SqliteStore(str(path))
    await store.prepare()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.put("k", b"v2", ttl_s=None)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await store.aclose()


# ---- Redis ------------------------------------------------------------------------------


async def _timed(call: Awaitable[object]) -> float:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call
    return time.monotonic() - started


async def test_redis_keys_are_namespaced(server: RedisServer) -> None:
    store = RedisStore(server.url)
    await store.prepare()
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        await store.put("k", b"v", ttl_s=None)
        await store.put("t", b"v", ttl_s=30)
        assert await store.claim("k", "A", lease_s=30)
        assert sorted(await raw.keys("*")) == [b"idw:c:k", b"idw:v:k", b"idw:v:t"]
        assert await raw.get("idw:c:k") == b"A"
        assert await raw.ttl("idw:v:k") == -1
        assert 0 < await raw.pttl("idw:v:t") <= 30_000
        assert 0 < await raw.pttl("idw:c:k") <= 30_000
    finally:
        await raw.aclose()
        await store.aclose()


async def test_redis_many_calls_at_once_queue_for_a_bounded_pool(server: RedisServer) -> None:
    """Hundreds of jobs asking at once (a worker at high concurrency) all get answers over
    a bounded number of connections; none is refused for want of a connection (which the
    worker would take as an outage and stop reusing answers)."""
    store = RedisStore(server.url)
    await store.prepare()
    raw = redis.asyncio.Redis.from_url(server.url)
    answers: list[bytes | None] = []

    async def one(i: int) -> None:
        assert await store.claim(f"job{i}", "A", lease_s=30)
        await store.put(f"k{i}", b"v", ttl_s=None)
        answers.append(await store.get(f"k{i}"))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        assert answers == [b"v"] * 500
        clients = await raw.client_list()
        assert len(clients) <= MAX_CONNECTIONS + 1  # this test's own connection too
    finally:
        await raw.aclose()
        await store.aclose()


async def test_redis_outage_raises_fast_and_the_same_store_recovers(server: RedisServer) -> None:
    store = RedisStore(server.url)
    await store.prepare()
    try:
        await store.put("k", b"v", ttl_s=None)
        await server.stop()
        for call in (
            store.get("k"),
            store.put("k", b"v", ttl_s=None),
            store.claim("k", "A", lease_s=5),
            store.release("k", "A"),
        ):
            assert await _timed(call) < OUTAGE_BOUND_S
        await server.start()  # same port; the data is gone (nothing persisted)
        assert await store.get("k") is None
        await store.put("k", b"back", ttl_s=None)
        assert await store.get("k") == b"back"
        assert await store.claim("k", "A", lease_s=5)

        # A restart with no call in between leaves a dead connection in the pool: the
        # next call still succeeds (and the claim script is loaded again).
        await server.restart()
        assert await store.claim("k", "A", lease_s=5)
    finally:
        await store.aclose()


async def test_redis_hung_server_raises_within_the_bound(server: RedisServer) -> None:
    store = RedisStore(server.url)
    await store.prepare()
    try:
        assert await store.claim("k", "A", lease_s=30)
        server.pause()
        try:
            assert await _timed(store.get("k")) < OUTAGE_BOUND_S
            assert await _timed(store.claim("k", "A", lease_s=30)) < OUTAGE_BOUND_S
        finally:
            server.resume()
        assert await store.claim("k", "A", lease_s=30)
        await store.release("k", "A")
    finally:
        await store.aclose()


async def test_redis_unreachable_at_prepare_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(password=PASSWORD)  # not started yet
    store = RedisStore(server.url)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.store"):
            started = time.monotonic()
            await store.prepare()
        assert time.monotonic() - started < OUTAGE_BOUND_S
        [record] = [r for r in caplog.records if r.getMessage() == "store_unavailable"]
        assert record.store == f"redis://127.0.0.1:{server.port}/0"  # type: ignore[attr-defined]
        assert PASSWORD not in caplog.text
        with pytest.raises(StoreUnavailable) as info:
            await store.get("k")
        assert PASSWORD not in str(info.value)
        await server.start()
        await store.put("k", b"v", ttl_s=None)
        assert await store.get("k") == b"v"
    finally:
        await store.aclose()
        await server.aclose()


async def test_redis_password_is_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(password=PASSWORD)
    await server.start()
    good = RedisStore(server.url)
    wrong = RedisStore(server.url.replace(PASSWORD, "wrong-" + PASSWORD))
    missing = RedisStore(f"redis://127.0.0.1:{server.port}/0")
    try:
        assert PASSWORD not in good.name
        await good.prepare()
        await good.put("k", b"v", ttl_s=None)
        assert await good.get("k") == b"v"
        for store in (wrong, missing):
            with pytest.raises(ConfigError) as cfg:
                await store.prepare()
            assert cfg.value.key == "store.uri"
            assert PASSWORD not in str(cfg.value)
        await server.stop()
        with pytest.raises(StoreUnavailable) as gone:
            await good.claim("k", "A", lease_s=5)
        assert PASSWORD not in str(gone.value)
        assert PASSWORD not in caplog.text
    finally:
        for store in (good, wrong, missing):
            await store.aclose()
        await server.aclose()


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("redis://", "needs a host"),
        (f"redis://:{PASSWORD}@host:notaport/0", "bad port"),
        (f"redis://:{PASSWORD}@host:99999/0", "bad port"),
        (f"redis://:{PASSWORD}@host:6379/zero", "database number"),
        (f"redis://:{PASSWORD}@host:6379/0?socket_timeout=soon", "Invalid value"),
    ],
)
def test_redis_invalid_uri_is_a_config_error(uri: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(uri, key="store.uri")
    assert info.value.key == "store.uri"
    assert says in info.value.message
    assert PASSWORD not in str(info.value)


# ---- open_store -------------------------------------------------------------------------


def test_open_store_none_is_no_store() -> None:
    assert open_store("none") is None


def test_open_store_picks_the_backend_and_does_no_io(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "store.sqlite"
    store = open_store(f"sqlite:{path}")
    assert isinstance(store, SqliteStore)
    assert store.name == f"sqlite:{path}"
    assert store.path == path
    assert not (tmp_path / "not").exists()  # made by prepare, not before

    port = free_port()  # nothing listens there: construction must not care
    store = open_store(f"redis://:{PASSWORD}@127.0.0.1:{port}/3")
    assert isinstance(store, RedisStore)
    assert store.name == f"redis://127.0.0.1:{port}/3"
    tls = open_store("rediss://cache.internal")
    assert isinstance(tls, RedisStore)
    assert tls.name == "rediss://cache.internal:6379/0"


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("", "no scheme"),
        ("None", "no scheme"),
        ("sqlite:", "needs a path"),
        (f"memcached://user:{PASSWORD}@host:11211", "scheme 'memcached'"),
        (f"postgres://u:{PASSWORD}@db/x", "scheme 'postgres'"),
    ],
)
def test_open_store_refuses_other_uris_naming_the_key(uri: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(uri, key="store.uri_override")
    assert info.value.key == "store.uri_override"
    assert says in info.value.message
    if "scheme" in says:
        assert "none, sqlite:PATH or redis://HOST:PORT/DB" in info.value.message
    assert PASSWORD not in str(info.value)
