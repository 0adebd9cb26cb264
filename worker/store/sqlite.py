"""The result store in one SQLite file (``sqlite:PATH``): answers and claims that one
worker process shares among its tasks and keeps across restarts.

SQLite is a blocking library, so every call runs in a worker thread
(``anyio.to_thread``) behind a limiter of one: the event loop never waits on the disk,
and tasks queue for the one connection without each holding a thread. WAL mode lets a
reader (another store on the same file, ``sqlite3`` in a shell) look while we write.

Expiry times are stored as wall-clock seconds, so they mean the same after a restart.
"Now" is the wall time taken when the store was made, moved on by the injected
:class:`~worker.clock.Clock`: a test drives expiry with a ManualClock instead of
sleeping, and a step of the system clock during a run does not expire everything at
once.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError, StoreUnavailable

__all__ = ["SqliteStore"]

T = TypeVar("T")

# How long a write waits for another connection's write to finish (SQLite's busy
# handler). Writes here are single short statements, so this is only reached when
# something else holds the file for long.
BUSY_TIMEOUT_S = 5.0
# Expired rows are deleted at most this often (on a write); reads skip them meanwhile.
PURGE_INTERVAL_S = 300.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_values (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL  -- wall-clock seconds; NULL: never
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_claims (
    key TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL  -- wall-clock seconds
) WITHOUT ROWID;
"""

# One statement, so one transaction: insert when nobody holds the key; otherwise the
# update takes it only when the lease lapsed or the caller already holds it (renewal).
# A refused update changes no row, which is how the caller learns it was refused.
_CLAIM = """
INSERT INTO store_claims (key, holder, expires_at) VALUES (?1, ?2, ?3)
ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE store_claims.holder = excluded.holder OR store_claims.expires_at <= ?4
"""


class SqliteStore:
    """``sqlite:PATH``: a :class:`~worker.protocols.ResultStore` in one local file.

    Safe for many tasks of one process; two processes on one file also stay correct
    (every claim is one atomic statement), though they then wait on each other's writes.
    Nothing is opened until :meth:`prepare`.
    """

    def __init__(self, path: str, *, key: str = "store.uri", clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = Path(path)
        self.name = f"sqlite:{path}"
        self._key = key
        self._clock = clock
        self._wall0_s = time.time()
        self._clock0_s = clock.now()
        self._conn: sqlite3.Connection | None = None
        # One thread at a time uses the connection; waiting tasks wait on the loop.
        self._limiter = anyio.CapacityLimiter(1)
        self._purged_at_s = -math.inf

    def _now_s(self) -> float:
        """Wall-clock seconds, moved on by the injected clock since the store was made."""
        return self._wall0_s + (self._clock.now() - self._clock0_s)

    async def prepare(self) -> None:
        if self._conn is not None:
            return
        try:
            self._conn = await anyio.to_thread.run_sync(self._open, limiter=self._limiter)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise ConfigError(
                self._key,
                f"cannot use {self.path} as the store: {exc.strerror or exc}{where}; "
                "choose a writable file path for sqlite:PATH",
            ) from None
        except sqlite3.Error as exc:
            raise ConfigError(
                self._key,
                f"cannot use {self.path} as the store: {exc}; "
                "choose a writable file path for sqlite:PATH",
            ) from None

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit BEGIN; each statement is its own transaction.
        # check_same_thread=False: the limiter, not the thread, makes use exclusive.
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"WAL mode refused (journal mode {mode})")
            # A cache of answers: losing the last writes to a power cut is acceptable,
            # an fsync on every put is not. A process crash loses nothing in WAL mode.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._purge(conn, self._now_s())
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, call: Callable[[sqlite3.Connection], T]) -> T:
        def in_thread() -> T:
            # Read here, under the limiter: aclose may have run while this call queued.
            conn = self._conn
            if conn is None:
                raise StoreUnavailable(f"{self.name}: the store is not open")
            return call(conn)

        try:
            return await anyio.to_thread.run_sync(in_thread, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from None

    def _purge(self, conn: sqlite3.Connection, now_s: float) -> None:
        conn.execute("DELETE FROM store_values WHERE expires_at <= ?", (now_s,))
        conn.execute("DELETE FROM store_claims WHERE expires_at <= ?", (now_s,))
        self._purged_at_s = now_s

    def _maybe_purge(self, conn: sqlite3.Connection, now_s: float) -> None:
        if now_s - self._purged_at_s >= PURGE_INTERVAL_S:
            self._purge(conn, now_s)

    async def get(self, key: str) -> bytes | None:
        now_s = self._now_s()

        def select(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM store_values"
                " WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (key, now_s),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(select)

    async def put(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None (never), not {ttl_s}")
        now_s = self._now_s()
        expires_at = None if ttl_s is None else now_s + ttl_s

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO store_values (key, value, expires_at) VALUES (?, ?, ?)",
                (key, bytes(value), expires_at),
            )
            self._maybe_purge(conn, now_s)

        await self._run(upsert)

    async def claim(self, key: str, holder: str, *, lease_s: float) -> bool:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, not {lease_s}")
        now_s = self._now_s()

        def take(conn: sqlite3.Connection) -> bool:
            taken = conn.execute(_CLAIM, (key, holder, now_s + lease_s, now_s)).rowcount == 1
            self._maybe_purge(conn, now_s)
            return taken

        return await self._run(take)

    async def release(self, key: str, holder: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM store_claims WHERE key = ? AND holder = ?", (key, holder))

        await self._run(delete)

    async def aclose(self) -> None:
        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        try:
            # Shielded: a cancelled shutdown must still close the file.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from None
