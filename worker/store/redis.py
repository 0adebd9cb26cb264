"""The result store on a Redis server (``redis://HOST:PORT/DB``, ``rediss://`` for TLS):
answers and claims shared by every worker that points at the same server.

The store is an optimisation, never a dependency: a job must not wait long on it. So the
client's socket and connect timeouts are short, every call has a deadline, and every
failure (refused, timed out, an error answer) becomes
:class:`~worker.errors.StoreUnavailable`, which callers take as "carry on without it".
The client's pool reconnects by itself, so once the server is back the same store
works again. A server that cannot be reached at start is not fatal either: the worker
starts and the store serves as soon as the server does.

A ``redis://:PASSWORD@HOST`` URI carries a secret: the store's ``name`` and every
message it writes or raises leave the user name, the password and the query out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ConnectionError, RedisError, ResponseError

from ..errors import ConfigError, StoreUnavailable

__all__ = ["DEFAULT_PREFIX", "RedisStore"]

log = logging.getLogger("worker.store")

T = TypeVar("T")

#: Every key this worker writes starts with this, so the store can share a database.
DEFAULT_PREFIX = "idw:"
# Socket connect and read timeouts: on loopback or in a region an answer takes a
# millisecond, so a second of silence means the server is gone.
DEFAULT_TIMEOUT_S = 1.0
# Connections one worker keeps open at most. A call holds one for a round trip (well
# under a millisecond on loopback, a few in a region), so a few dozen serve thousands of
# calls a second; more calls than that wait their turn within their deadline.
MAX_CONNECTIONS = 32

# Take the key when it is free (SET NX PX); renew it when the caller already holds it.
# One script, so no other client can slip between the test and the renewal.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# Compare and delete: a holder whose lease lapsed must not free someone else's claim.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _millis(seconds: float) -> int:
    """Whole milliseconds for PX, at least 1 (Redis refuses 0)."""
    return max(1, math.ceil(seconds * 1000))


class RedisStore:
    """``redis://`` or ``rediss://``: a :class:`~worker.protocols.ResultStore` on Redis.

    Values live under ``PREFIX v:KEY`` and claims under ``PREFIX c:KEY``, so a key can
    have both. The URI is checked when the store is made (a :class:`ConfigError` names
    what is wrong); nothing is sent until :meth:`prepare`.
    """

    def __init__(
        self,
        uri: str,
        *,
        key: str = "store.uri",
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._key = key
        self._secrets = _secrets_of(uri)
        self.name = _describe_uri(uri, key)
        self._prefix = prefix
        # Connect, then read: the longest a call can take before it gives up.
        self._deadline_s = 2 * timeout_s
        self._closed = False
        try:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                uri,
                # A pool that queues for a free connection rather than failing: the
                # default pool raises "Too many connections" past 100, which a worker
                # at --concurrency 100 (its claims, lookups and renewals together)
                # reaches, and every such error would count as an outage.
                max_connections=MAX_CONNECTIONS,
                timeout=self._deadline_s,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                # One immediate retry, on a broken connection only: the pool may hold a
                # connection the server closed when it restarted, and a new one will
                # do. A timeout is not retried: the server is slow or gone.
                retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
                # Older clients (5.x) retry only the errors listed here as well.
                retry_on_error=[ConnectionError],
            )
            self._client = redis.asyncio.Redis(connection_pool=pool)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                key, f"{self.name}: {self._scrub(str(exc))}; use redis://HOST:PORT/DB"
            ) from None
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        detail = self._scrub(str(exc))[:200] or f"no answer within {self._deadline_s:g} s"
        return StoreUnavailable(f"{self.name}: {type(exc).__name__}: {detail}")

    async def prepare(self) -> None:
        """Check the server once. Wrong credentials or database are the operator's to fix
        (ConfigError); a server that does not answer is only logged: later calls raise
        StoreUnavailable until it does."""
        try:
            with anyio.fail_after(self._deadline_s):
                await self._client.ping()
        except (AuthenticationError, ResponseError) as exc:
            # Before ConnectionError: a refused password is one (AuthenticationError).
            raise ConfigError(
                self._key, f"{self.name} refused the connection: {self._scrub(str(exc))[:200]}"
            ) from None
        except (RedisError, OSError) as exc:
            log.warning(
                "store_unavailable",
                extra={"store": self.name, "error": str(self._unavailable(exc))},
            )

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StoreUnavailable(f"{self.name}: the store is closed")
        try:
            # The client's own timeouts bound each step; this bounds the whole call.
            with anyio.fail_after(self._deadline_s):
                return await op()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def get(self, key: str) -> bytes | None:
        value = await self._call(lambda: self._client.get(self._prefix + "v:" + key))
        # str only if responses were decoded, which this client never asks for.
        return value.encode() if isinstance(value, str) else value

    async def put(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None (never), not {ttl_s}")
        px = None if ttl_s is None else _millis(ttl_s)
        await self._call(lambda: self._client.set(self._prefix + "v:" + key, value, px=px))

    async def claim(self, key: str, holder: str, *, lease_s: float) -> bool:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, not {lease_s}")
        keys = [self._prefix + "c:" + key]
        taken = await self._call(lambda: self._claim(keys=keys, args=[holder, _millis(lease_s)]))
        return bool(taken)

    async def release(self, key: str, holder: str) -> None:
        keys = [self._prefix + "c:" + key]
        await self._call(lambda: self._release(keys=keys, args=[holder]))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing only drops sockets; a server that is gone cannot make it fail.
        with anyio.CancelScope(shield=True):
            await self._client.aclose(close_connection_pool=True)


def _secrets_of(uri: str) -> list[str]:
    """What of ``uri`` must never be shown: the user info and query values, as written
    and decoded (longest first, so a secret that contains another is hidden whole)."""
    try:
        parts = urlsplit(uri)
        found = [parts.password or "", parts.username or ""]
        found += [value for _, value in parse_qsl(parts.query)]
    except ValueError:
        return []
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _describe_uri(uri: str, key: str) -> str:
    """``scheme://host:port/db``, with no user info or query; ConfigError when ``uri``
    is not a Redis URI this store can use."""
    usage = "use redis://[:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS)"
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        # urlsplit's message can quote the network location, password included.
        raise ConfigError(key, f"not a valid Redis URI (bad port or host); {usage}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(key, f"scheme must be redis or rediss, not {parts.scheme!r}; {usage}")
    if not parts.hostname:
        raise ConfigError(key, f"{parts.scheme}:// needs a host; {usage}")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(key, f"the path must be a database number such as /0; {usage}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or 6379}/{int(db)}"
