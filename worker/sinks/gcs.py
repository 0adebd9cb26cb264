"""Sink ``gs://BUCKET/PREFIX/``: records as JSON-lines objects in Cloud Storage.

Records are appended (encoded once) to an open object held in memory. The object is
finalised, that is uploaded in one request, when it holds ``roll_records`` records or
``roll_bytes`` bytes, ``roll_age_s`` after its first record, or ``roll_idle_s`` after its
latest one, whichever comes first; :meth:`GcsSink.aclose` finalises what is left. Every
``write`` returns only once the object that holds its records has been stored, and
raises if that upload finally failed (every write waiting on that object fails with it).
There are no background tasks: the first write that finds its object finalised uploads
it, shielded from cancellation, and the others wait for that upload.

Objects are named (UTC)::

    PREFIX/YYYY/MM/DD/HH/<YYYYMMDDTHHMMSS.ffffffZ>-<replica>-<run>-<seq>.jsonl

from the time the object was opened, so a listing sorts by time; ``replica`` is
``sinks.gcs.replica`` (default: host name and process id), ``run`` is random per sink
instance, so a restarted process with the same replica name (a pod keeps its name and
its pid) cannot pick an old name, and ``seq`` counts objects within the run.

Uploads are single media uploads (``uploadType=media``) with ``ifGenerationMatch=0``:
an object is all there or not there, and nothing is ever overwritten. Failures are
retried by :mod:`worker.retry` within ``retry_deadline_s``, under the same name. When an
attempt meets 412 (the name exists), an earlier attempt whose answer was lost may have
stored the object: its metadata is read, and an object of the size and MD5 we sent is
ours (success); anything else is another writer's (a collision): the object is given a
new name and uploaded again. An answer whose size or MD5 differs from what was sent
(corruption on the way) deletes that generation and tries again.

Content type: ``application/x-ndjson``. Neither it nor ``application/jsonl`` is
registered, but x-ndjson is the one tools recognise for newline-delimited JSON, and
``application/jsonl`` begins with ``application/json``, so code that matches content
types by prefix (the storage emulator among it) takes the object for one JSON document.

Credentials: only a Google token provider's tokens are sent, and none to an emulator
(``STORAGE_EMULATOR_HOST``, as Google's clients do). A 401 refreshes the token once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import anyio.to_thread
from yarl import URL

from ..clock import SYSTEM_CLOCK, Clock, Timer
from ..errors import ConfigError, Kind, StorageError
from ..fetch import storage_endpoint
from ..protocols import Record, SinkBase, TokenProvider
from ..retry import RetryPolicy, RetryState, kind_for_status, retry_after_s, retry_call
from ..settings import GcsSinkSettings
from .jsonl import add_ids, encode_records

__all__ = [
    "CONTENT_TYPE",
    "GcsSink",
    "default_replica",
    "object_name",
    "parse_gcs_url",
]

log = logging.getLogger("worker.sinks.gcs")

CONTENT_TYPE = "application/x-ndjson"
MAX_OBJECT_NAME_BYTES = 1024
# Renames after collisions before an upload gives up (one is already a surprise).
MAX_RENAMES = 5
# Objects read at once by existing_ids.
READ_CONCURRENCY = 8
# Bodies larger than this are hashed off the event loop.
HASH_IN_THREAD_BYTES = 1 << 20
# The part of an object name after PREFIX, but for the replica: "YYYY/MM/DD/HH/" (14),
# the time (23), three dashes, the run (8), the sequence (at least 6) and ".jsonl" (6).
_NAME_OVERHEAD = 14 + 23 + 3 + 8 + 6 + 6
_USER_AGENT = "image-describer-worker/0.1"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters Cloud Storage advises against in names: they are wildcards to gcloud and
# gsutil, or mean something else in a URL.
_AVOIDED = frozenset("#?*[]")
_REPLICA_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_NEEDED_PERMISSIONS = ("storage.objects.create", "storage.objects.get", "storage.objects.list")


def parse_gcs_url(url: str, key: str = "worker.sink") -> tuple[str, str]:
    """``gs://BUCKET/PREFIX/`` -> (bucket, prefix); the prefix is empty or ends in "/".

    Bucket names follow Cloud Storage's rules; a prefix may not hold empty, "." or ".."
    segments, control characters or the characters ``# ? * [ ]``.
    """
    if not url.startswith("gs://"):
        raise ConfigError(key, f"{url!r} is not a gs://BUCKET/PREFIX/ URL")
    bucket, _, prefix = url[len("gs://") :].partition("/")
    _check_bucket(bucket, url, key)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if prefix:
        _check_prefix(prefix, url, key)
    return bucket, prefix


def _check_bucket(bucket: str, url: str, key: str) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(key, f"{url!r}: bucket name {bucket!r} {why}")

    if not bucket:
        raise ConfigError(key, f"{url!r} names no bucket; use gs://BUCKET/PREFIX/")
    if bucket != bucket.lower():
        raise bad("has capital letters; bucket names are lowercase")
    if not _BUCKET.fullmatch(bucket):
        raise bad(
            "is not valid: use 3-63 lowercase letters, digits, '-', '_' and '.', "
            "beginning and ending with a letter or digit"
        )
    parts = bucket.split(".")
    if not 3 <= len(bucket) <= (222 if len(parts) > 1 else 63):
        raise bad("must be 3-63 characters (up to 222 with dots)")
    if any(not 1 <= len(p) <= 63 for p in parts):
        raise bad("has an empty or over-long (> 63) dot-separated part")
    if _IPV4.fullmatch(bucket):
        raise bad("looks like an IP address")
    if bucket.startswith("goog") or "google" in bucket:
        raise bad("may not begin with 'goog' or contain 'google'")


def _check_prefix(prefix: str, url: str, key: str) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(key, f"{url!r}: the object prefix {prefix!r} {why}")

    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("is not valid UTF-8") from None
    if _CONTROL.search(prefix):
        raise bad("has control characters")
    avoided = sorted(_AVOIDED.intersection(prefix))
    if avoided:
        raise bad(f"has {' '.join(avoided)}; leave these out of object names")
    if any(seg in ("", ".", "..") for seg in prefix[:-1].split("/")):
        raise bad("has an empty, '.' or '..' segment")
    if prefix.startswith(".well-known/acme-challenge/"):
        raise bad("is reserved by Cloud Storage")


def default_replica() -> str:
    """The host name and process id, as letters, digits, '-' and '_'."""
    host = _REPLICA_UNSAFE.sub("_", socket.gethostname()).strip("_") or "host"
    return f"{host[:60]}-{os.getpid()}"


def object_name(prefix: str, wall_ns: int, replica: str, run: str, seq: int) -> str:
    """``PREFIX/YYYY/MM/DD/HH/YYYYMMDDTHHMMSS.ffffffZ-<replica>-<run>-<seq>.jsonl`` for an
    object opened at ``wall_ns`` (ns since the epoch, UTC)."""
    seconds, rest_ns = divmod(wall_ns, 1_000_000_000)
    t = datetime.fromtimestamp(seconds, tz=UTC)
    return (
        f"{prefix}{t:%Y/%m/%d/%H}/{t:%Y%m%dT%H%M%S}.{rest_ns // 1000:06d}Z"
        f"-{replica}-{run}-{seq:06d}.jsonl"
    )


@dataclass(eq=False, slots=True)
class _Part:
    """One object: open (taking records), then sealed, then uploaded (done)."""

    seq: int
    opened_ns: int
    opened_at: float
    last_at: float
    sealed: anyio.Event
    done: anyio.Event
    chunks: list[bytes] = field(default_factory=list)
    records: int = 0
    size: int = 0
    timer: Timer | None = None
    claimed: bool = False
    name: str = ""
    error: BaseException | None = None


class _NameTaken(Exception):
    """An upload met an object of another content under its name (not retried)."""


class GcsSink(SinkBase):
    """``gs://BUCKET/PREFIX/``: records in JSON-lines objects, rolled by count, size and
    age (see the module's docstring). Construction does no I/O; :meth:`prepare` checks
    the bucket. Dead letters use another instance with another URL."""

    #: Batches wait on an object that is finalised by size or time: let many wait at once,
    #: so that batches are not serialised behind the age timer.
    max_concurrent_writes = 1024

    @property
    def max_pending_records(self) -> int:
        # The open object and the one being uploaded: what waits for a finalisation.
        return 2 * self._settings.roll_records

    def __init__(
        self,
        url: str,
        *,
        settings: GcsSinkSettings,
        tokens: TokenProvider | None = None,
        key: str = "worker.sink",
        clock: Clock = SYSTEM_CLOCK,
        storage_host: str | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_gcs_url(url, key)
        self.name = f"gs://{self.bucket}/{self.prefix}"
        self._key = key
        self._settings = settings
        self._clock = clock
        self.replica = settings.replica or default_replica()
        if _REPLICA_UNSAFE.search(self.replica):
            raise ConfigError("sinks.gcs.replica", "must be letters, digits, - and _ only")
        overhead = len(self.replica) + _NAME_OVERHEAD
        if len(self.prefix.encode()) + overhead > MAX_OBJECT_NAME_BYTES:
            raise ConfigError(
                key,
                f"{url!r}: the prefix is too long; object names (prefix and "
                f"{overhead} more bytes) must fit in {MAX_OBJECT_NAME_BYTES} bytes",
            )
        self.run = secrets.token_hex(4)
        if storage_host is None:
            self.base_url, self.emulator = storage_endpoint()
        else:
            self.base_url, self.emulator = storage_endpoint({"STORAGE_EMULATOR_HOST": storage_host})
        self._tokens: TokenProvider | None = None
        self.set_tokens(tokens)
        self._retry = RetryPolicy(
            attempts=None,
            deadline_s=settings.retry_deadline_s,
            initial_backoff_s=0.2,
            max_backoff_s=10.0,
        )
        self._seq = itertools.count()
        self._current: _Part | None = None
        self._unfinished: set[_Part] = set()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        #: Objects stored, and the records and bytes in them.
        self.objects = 0
        self.records = 0
        self.bytes = 0
        #: Upload attempts retried; 412s that found our own object (an earlier attempt
        #: landed though its answer was lost); names found taken by someone else.
        self.retries = 0
        self.landed_earlier = 0
        self.collisions = 0

    def __repr__(self) -> str:
        return f"GcsSink({self.name!r}, emulator={self.emulator})"

    @property
    def open_records(self) -> int:
        """Records in the object still taking records (not yet finalised)."""
        return self._current.records if self._current is not None else 0

    def set_tokens(self, tokens: TokenProvider | None) -> None:
        """Use ``tokens`` for Cloud Storage if they are Google credentials (the process's
        provider starts after sinks are built). Nothing is ever sent to an emulator."""
        self._tokens = tokens if tokens is not None and tokens.google else None

    # -- the Sink protocol -------------------------------------------------------------

    async def prepare(self) -> None:
        """The bucket must exist and the credentials must be able to list, read and
        create objects in it; transient failures are retried within retry_deadline_s."""
        if not self.emulator and self._tokens is None:
            raise ConfigError(
                self._key,
                f"{self.name}: no Google credentials to write to Cloud Storage with "
                "(Application Default Credentials are used; an API key is never sent)",
            )
        try:
            await self._call_json(self._list_url("", page_size=1))
            answer = await self._call_json(self._permissions_url())
        except StorageError as exc:
            raise self._config_error(exc) from None
        granted = answer.get("permissions") or []
        missing = [p for p in _NEEDED_PERMISSIONS if p not in granted]
        if missing:
            raise ConfigError(
                self._key,
                f"{self.name}: the worker's credentials lack {', '.join(missing)} on bucket "
                f"{self.bucket}; grant e.g. roles/storage.objectUser (or objectCreator and "
                "objectViewer) on it",
            )

    async def write(self, records: Sequence[Record]) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        if not records:
            return
        parts = self._append(records)
        error: BaseException | None = None
        for part in parts:
            failure = await self._wait_stored(part)
            error = error or failure
        if error is not None:
            raise error

    async def existing_ids(self) -> set[str]:
        """The ids of every record in every object under the prefix (lines that are not
        JSON objects with a string ``id`` are skipped)."""
        names = [n async for n in self._names()]
        ids: set[str] = set()
        limiter = anyio.CapacityLimiter(READ_CONCURRENCY)

        async def read(name: str) -> None:
            async with limiter:
                found = await retry_call(
                    functools.partial(self._read_ids_once, name), self._retry, clock=self._clock
                )
            ids.update(found)

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(read, name)
        return ids

    async def aclose(self) -> None:
        """Finalise the open object and wait for every upload under way; then close."""
        self._closed = True
        if self._current is not None:
            self._seal(self._current)
        try:
            for part in list(self._unfinished):
                if not part.claimed:
                    # Its writers are gone (cancelled): store it anyway, it was promised
                    # to nobody but costs nothing to keep.
                    part.claimed = True
                    await self._upload(part)
                else:
                    await part.done.wait()
        finally:
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    # -- records into objects -----------------------------------------------------------

    def _append(self, records: Sequence[Record]) -> list[_Part]:
        """Add ``records`` to the open object(s), sealing what is full; no await, so
        concurrent writes never see a half-updated object."""
        s = self._settings
        now = self._clock.now()
        parts: list[_Part] = []
        i, n = 0, len(records)
        while i < n:
            part = self._current or self._open(now)
            take = min(n - i, s.roll_records - part.records)
            data = encode_records(records if take == n else records[i : i + take])
            if part.records and part.size + len(data) > s.roll_bytes:
                # Would overflow: this slice starts the next object. (An object is larger
                # than roll_bytes only when one batch alone is.)
                self._seal(part)
                part = self._open(now)
            part.chunks.append(data)
            part.records += take
            part.size += len(data)
            part.last_at = now
            if not parts or parts[-1] is not part:
                parts.append(part)
            if part.records >= s.roll_records or part.size >= s.roll_bytes:
                self._seal(part)
            elif part.timer is None:
                self._arm(part)
            i += take
        return parts

    def _open(self, now: float) -> _Part:
        part = _Part(
            seq=next(self._seq),
            opened_ns=time.time_ns(),
            opened_at=now,
            last_at=now,
            sealed=anyio.Event(),
            done=anyio.Event(),
        )
        self._current = part
        self._unfinished.add(part)
        return part

    def _due(self, part: _Part) -> float:
        s = self._settings
        due = part.opened_at + s.roll_age_s
        if s.roll_idle_s > 0:
            due = min(due, part.last_at + s.roll_idle_s)
        return due

    def _arm(self, part: _Part) -> None:
        delay = self._due(part) - self._clock.now()
        part.timer = self._clock.call_later(max(0.0, delay), functools.partial(self._tick, part))

    def _tick(self, part: _Part) -> None:
        """The object's timer: seal it if it is old or idle enough, else look again when
        it will be (records that came since moved the idle deadline)."""
        part.timer = None
        if part.sealed.is_set():
            return
        if self._clock.now() + 1e-6 >= self._due(part):
            self._seal(part)
        else:
            self._arm(part)

    def _seal(self, part: _Part) -> None:
        if part is self._current:
            self._current = None
        if part.timer is not None:
            part.timer.cancel()
            part.timer = None
        part.sealed.set()

    async def _wait_stored(self, part: _Part) -> BaseException | None:
        """Wait until ``part`` is stored (uploading it if nobody is): its failure, if any."""
        await part.sealed.wait()
        if not part.claimed:
            part.claimed = True
            # The other writers of this object wait on this upload: finish it.
            with anyio.CancelScope(shield=True):
                await self._upload(part)
        else:
            await part.done.wait()
        exc = part.error
        if exc is None:
            return None
        if isinstance(exc, StorageError):
            # A fresh exception per waiter (one object is raised in many tasks otherwise).
            return StorageError(exc.status, exc.code, exc.message, kind=exc.kind)
        return exc

    async def _upload(self, part: _Part) -> None:
        stored = False
        try:
            body = b"".join(part.chunks)
            part.chunks = []
            if len(body) > HASH_IN_THREAD_BYTES:
                md5 = await anyio.to_thread.run_sync(_md5, body)
            else:
                md5 = _md5(body)
            started = time.perf_counter()
            part.name = await self._store(part, body, md5)
            stored = True
            self.objects += 1
            self.records += part.records
            self.bytes += len(body)
            log.debug(
                "gcs_object_stored",
                extra={
                    "object": part.name,
                    "records": part.records,
                    "bytes": len(body),
                    "upload_s": round(time.perf_counter() - started, 3),
                },
            )
        except Exception as exc:
            part.error = exc
            log.error(
                "gcs_object_not_stored",
                extra={
                    "sink": self.name,
                    "records": part.records,
                    "error_type": type(exc).__name__,
                    "error": str(exc),
                },
            )
        finally:
            if not stored and part.error is None:
                part.error = StorageError(
                    0, "cancelled", "the upload was cancelled", kind="transient"
                )
            part.chunks = []
            self._unfinished.discard(part)
            part.done.set()

    async def _store(self, part: _Part, body: bytes, md5: str) -> str:
        """Upload ``body`` under the part's name (a new one after a collision); return
        the name it is stored under. One retry deadline covers every attempt."""
        state = RetryState(started_at=self._clock.now())
        for _ in range(MAX_RENAMES + 1):
            name = object_name(self.prefix, part.opened_ns, self.replica, self.run, part.seq)
            try:
                await retry_call(
                    functools.partial(self._put_once, name, body, md5),
                    self._retry,
                    state=state,
                    clock=self._clock,
                    on_retry=self._note_retry,
                )
                return name
            except _NameTaken:
                self.collisions += 1
                log.warning("gcs_object_name_taken", extra={"object": name})
                part.seq = next(self._seq)
        raise StorageError(
            412,
            "conditionNotMet",
            f"{MAX_RENAMES + 1} object names in a row were taken",
            kind="permanent",
        )

    def _note_retry(self, exc: BaseException, kind: Kind, delay: float, state: RetryState) -> None:
        self.retries += 1
        log.info(
            "gcs_upload_retry",
            extra={
                "sink": self.name,
                "error": str(exc),
                "attempt": state.attempts,
                "delay_s": round(delay, 3),
            },
        )

    async def _put_once(self, name: str, body: bytes, md5: str) -> None:
        url = self._url(
            f"/upload/storage/v1/b/{_q(self.bucket)}/o",
            uploadType="media",
            name=name,
            ifGenerationMatch="0",
            fields="name,generation,size,md5Hash",
        )
        status, raw, headers, token = await self._send(
            "POST", url, body=body, content_type=CONTENT_TYPE
        )
        if status == 200:
            meta = _json_object(raw)
            if _same(meta, len(body), md5, md5_optional=True):
                return
            # Stored, but not what we sent: remove that generation and send it again.
            await self._delete_quietly(name, meta.get("generation"))
            raise StorageError(
                200,
                "checksum_mismatch",
                f"{name} was stored with another size or MD5",
                kind="transient",
            )
        if status == 412:
            found = await self._metadata(name)
            if found is None:
                raise StorageError(
                    412, "conditionNotMet", "name taken, then freed", kind="transient"
                )
            if _same(found, len(body), md5):
                # An earlier attempt stored it; its answer was lost.
                self.landed_earlier += 1
                log.info("gcs_upload_found_stored", extra={"object": name})
                return
            raise _NameTaken(name)
        raise await self._error(status, raw, headers, token, "upload")

    async def _metadata(self, name: str) -> dict[str, Any] | None:
        url = self._url(
            f"/storage/v1/b/{_q(self.bucket)}/o/{_q(name)}", fields="name,generation,size,md5Hash"
        )
        status, raw, headers, token = await self._send("GET", url)
        if status == 200:
            return _json_object(raw)
        if status == 404:
            return None
        raise await self._error(status, raw, headers, token, "metadata")

    async def _delete_quietly(self, name: str, generation: object) -> None:
        if not isinstance(generation, str | int):
            return
        url = self._url(
            f"/storage/v1/b/{_q(self.bucket)}/o/{_q(name)}", ifGenerationMatch=str(generation)
        )
        try:
            await self._send("DELETE", url)
        except StorageError as exc:
            log.warning("gcs_delete_failed", extra={"object": name, "error": str(exc)})

    # -- reading back ------------------------------------------------------------------

    async def _names(self) -> AsyncIterator[str]:
        token = ""
        while True:
            answer = await self._call_json(self._list_url(token, page_size=1000))
            for item in answer.get("items") or []:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    yield item["name"]
            token = answer.get("nextPageToken") or ""
            if not token:
                return

    async def _read_ids_once(self, name: str) -> set[str]:
        url = self._url(f"/storage/v1/b/{_q(self.bucket)}/o/{_q(name)}", alt="media")
        ids: set[str] = set()

        async def consume(resp: aiohttp.ClientResponse) -> None:
            carry = b""
            async for chunk in resp.content.iter_chunked(1 << 16):
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                add_ids(lines, ids)
            add_ids([carry], ids)

        status, raw, headers, token = await self._send("GET", url, consume=consume)
        if status == 404:
            return set()  # deleted since it was listed
        if status != 200:
            raise await self._error(status, raw, headers, token, "read")
        return ids

    # -- HTTP --------------------------------------------------------------------------

    def _url(self, path: str, **params: str) -> URL:
        query = "&".join(f"{k}={_q(v)}" for k, v in params.items())
        return URL(f"{self.base_url}{path}{'?' + query if query else ''}", encoded=True)

    def _list_url(self, page_token: str, *, page_size: int) -> URL:
        params = {"maxResults": str(page_size), "fields": "items(name),nextPageToken"}
        if self.prefix:
            params["prefix"] = self.prefix
        if page_token:
            params["pageToken"] = page_token
        return self._url(f"/storage/v1/b/{_q(self.bucket)}/o", **params)

    def _permissions_url(self) -> URL:
        query = "&".join(f"permissions={p}" for p in _NEEDED_PERMISSIONS)
        path = f"/storage/v1/b/{_q(self.bucket)}/iam/testPermissions?{query}"
        return URL(self.base_url + path, encoded=True)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32),
                timeout=aiohttp.ClientTimeout(total=self._settings.request_timeout_s),
                headers={"User-Agent": _USER_AGENT},
            )
        return self._session

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[None]] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str], str]:
        """One request: (status, body unless consumed, headers, the token sent)."""
        headers: dict[str, str] = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        token = ""
        # Google's clients send no credentials to an emulator; neither do we.
        if not self.emulator:
            if self._tokens is None:
                raise StorageError(
                    0,
                    "unauthenticated",
                    "no Google credentials for Cloud Storage",
                    kind="permanent",
                )
            token = await self._tokens.token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._get_session().request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if resp.status == 200 and consume is not None:
                    await consume(resp)
                    raw = b""
                else:
                    raw = await resp.read()
                # The headers as they are (case-insensitive: Retry-After is looked up).
                return resp.status, raw, resp.headers, token
        except TimeoutError:
            raise StorageError(
                0, "timeout", "no complete answer in time", kind="transient"
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise StorageError(
                0, "connection_error", type(exc).__name__, kind="transient"
            ) from None

    async def _call_json(self, url: URL) -> dict[str, Any]:
        """A GET answered with JSON, retried on transient failures."""

        async def once() -> dict[str, Any]:
            status, raw, headers, token = await self._send("GET", url)
            if status == 200:
                return _json_object(raw)
            raise await self._error(status, raw, headers, token, "request")

        return await retry_call(once, self._retry, clock=self._clock)

    async def _error(
        self, status: int, raw: bytes, headers: Mapping[str, str], token: str, what: str
    ) -> StorageError:
        code, message = _error_of(raw)
        kind = kind_for_status(status)
        if status == 401:
            if token and self._tokens is not None:
                # Retried at once with a fresh token (the refresh is shared by every
                # request that saw this one rejected); a second 401 counts as transient.
                await self._tokens.refresh_after_rejection(token)
            else:
                kind = "permanent"  # nothing to refresh: another try cannot help
        if status == 403:
            message = (
                f"{what} in gs://{self.bucket} refused: the worker's credentials need "
                "storage.objects.create, .get and .list on the bucket"
                + (f" ({message})" if message else "")
            )
        return StorageError(status, code, message, kind=kind, retry_after_s=retry_after_s(headers))

    def _config_error(self, exc: StorageError) -> ConfigError:
        if exc.status == 404:
            return ConfigError(
                self._key,
                f"bucket {self.bucket} does not exist (HTTP 404); create it or fix the URL",
            )
        if exc.status == 403:
            return ConfigError(
                self._key,
                f"{self.name}: access denied (HTTP 403); grant the worker's credentials "
                f"storage.objects.list, storage.objects.get and storage.objects.create on "
                f"bucket {self.bucket} (e.g. roles/storage.objectUser)",
            )
        if exc.status == 401:
            return ConfigError(
                self._key, f"{self.name}: Cloud Storage rejected the credentials (HTTP 401)"
            )
        return ConfigError(self._key, f"{self.name}: cannot use the bucket: {exc}")


def _q(value: str) -> str:
    return quote(value, safe="")


def _md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _same(meta: Mapping[str, Any], size: int, md5: str, *, md5_optional: bool = False) -> bool:
    """Whether object metadata describes exactly the bytes we sent. ``md5_optional``: an
    answer without md5Hash is judged by its size (an upload's own answer; an object met
    under our name must prove to be ours)."""
    try:
        stored_size = int(meta.get("size", -1))
    except (TypeError, ValueError):
        return False
    stored_md5 = meta.get("md5Hash")
    if stored_md5 is None and md5_optional:
        return stored_size == size
    return stored_size == size and stored_md5 == md5


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise StorageError(
            200, "invalid_json", "the answer is not JSON", kind="transient"
        ) from None
    return value if isinstance(value, dict) else {}


def _error_of(raw: bytes) -> tuple[str, str]:
    """(reason, message) from a JSON API error body, short and secret-free."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return "", ""
    if not isinstance(error, dict):
        return "", ""
    reason = ""
    errors = error.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        reason = str(errors[0].get("reason") or "")
    return reason, str(error.get("message") or "")[:200]
