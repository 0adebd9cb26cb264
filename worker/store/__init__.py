"""Result stores, chosen by ``store.uri``: where answers and claims are shared so that a
repeated image or a redelivered job costs one model call, not two.

``none`` turns the store off; ``sqlite:PATH`` keeps it in one local file (one process);
``redis://`` / ``rediss://`` shares it between every worker pointed at the same server.
Each backend implements :class:`~worker.protocols.ResultStore`; callers treat
:class:`~worker.errors.StoreUnavailable` from any call as "carry on without it".
"""

from __future__ import annotations

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError
from ..protocols import ResultStore
from .redis import RedisStore
from .sqlite import SqliteStore

__all__ = ["STORE_URIS", "RedisStore", "SqliteStore", "open_store"]

STORE_URIS = "none, sqlite:PATH or redis://HOST:PORT/DB (rediss:// for TLS)"


def open_store(
    uri: str, *, key: str = "store.uri", clock: Clock = SYSTEM_CLOCK
) -> ResultStore | None:
    """The store ``uri`` names, or None for ``none``. Nothing is opened or sent yet (see
    ``ResultStore.prepare``); a URI that cannot work is a ConfigError naming ``key``."""
    if uri == "none":
        return None
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "sqlite":
        if not rest:
            raise ConfigError(key, "sqlite: needs a path (sqlite:state/store.sqlite)")
        return SqliteStore(rest, key=key, clock=clock)
    if sep and scheme in ("redis", "rediss"):
        return RedisStore(uri, key=key)
    # Only the scheme is quoted: the rest of a mistyped URI may hold a password.
    shown = f"scheme {scheme!r}" if sep else "no scheme"
    raise ConfigError(key, f"{shown} is not a store; use {STORE_URIS}")
