"""Never pay twice: answers reused by content, model calls made once per job id.

Two things are kept in the result store (:mod:`worker.store`), both as JSON:

* ``ans:<key>``: an answer (text, parsed output, model, usage), under a key that is the
  SHA-256 of everything that changes the answer: the image's identity, the prompt, the
  model, the generation settings and the output schema. The image's identity is the
  hash of its bytes when the worker read or fetched them (a ``data:`` URL is its
  bytes), a ``gs://`` object's generation and checksum from one metadata GET when
  Vertex AI reads it itself, or, with ``store.key = "uri"``, the URI alone;
* ``rec:<job id>``: the record written for a job, so a second delivery of the same job
  (Pub/Sub redelivery, a duplicate message, another replica) re-emits the very same
  record instead of calling the model. It is stored without the job's ``image_uri``
  (a ``data:`` URI would put the image in the store); the re-emitted record gets it
  back from the job.

Claims (``claim``/``release``, atomic across replicas) make the model call happen once:
a job takes ``job:<id>`` before it starts and ``img:<key>`` before it calls the model;
a later job that finds either taken waits, bounded by ``store.wait_s``, for the holder's
record or answer, and calls the model itself if the holder fails or dies (its lease
lapses after ``store.lease_s``; the holder renews what it holds while it works).

A store that is down never loses or blocks a job: every operation that fails is logged
(``store_unavailable``, at most every 30 s) and treated as a miss, and work goes on
without reuse until the store answers again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from .clock import SYSTEM_CLOCK, Clock
from .errors import StoreUnavailable
from .protocols import Record, ResultStore
from .settings import StoreKey

__all__ = ["Reuse", "StoredAnswer", "content_key", "job_fingerprint"]

log = logging.getLogger("worker.reuse")

T = TypeVar("T")

# Log a store outage at most this often.
OUTAGE_LOG_INTERVAL_S = 30.0
# After a failed store call, jobs skip the store this long: a store that hangs (each call
# runs into its timeout) must not slow every job down by seconds.
OUTAGE_SKIP_S = 5.0
# gs:// identities (a metadata GET each) are remembered this long, this many. An object
# rewritten within this window may still be known by its old identity.
IDENTITY_TTL_S = 30.0
IDENTITY_CACHE_SIZE = 50_000
# Polling for another holder's result: from this, doubling, to that.
POLL_INITIAL_S = 0.05
POLL_MAX_S = 1.0


@dataclass(frozen=True)
class StoredAnswer:
    """What is kept of an answer (never image bytes, never a token)."""

    text: str
    output: Any
    model: str
    usage: dict[str, int] | None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"text": self.text, "output": self.output, "model": self.model, "usage": self.usage},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> StoredAnswer | None:
        try:
            data = json.loads(raw)
            return cls(data["text"], data.get("output"), data["model"], data.get("usage"))
        except (ValueError, KeyError, TypeError):
            return None


def content_key(identity: str, prompt: str, model: str, settings: Mapping[str, Any]) -> str:
    """SHA-256 over what changes an answer (the key of ``ans:``/``img:``)."""
    h = hashlib.sha256()
    for part in (identity, prompt, model, json.dumps(settings, sort_keys=True, default=str)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def job_fingerprint(image_uri: str, prompt: str | None, options: Mapping[str, Any]) -> str:
    """What a job asks for, hashed: a stored record is re-emitted only for the same."""
    h = hashlib.sha256()
    h.update(json.dumps([image_uri, prompt, options], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Reuse:
    """The pipeline's view of the result store (see the module docstring)."""

    def __init__(
        self,
        store: ResultStore,
        *,
        key_mode: StoreKey = "content",
        ttl_s: float = 0.0,
        lease_s: float = 60.0,
        wait_s: float = 120.0,
        gcs_identity: Callable[[str, str], Awaitable[str]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.key_mode = key_mode
        self.ttl_s = ttl_s or None
        self.lease_s = lease_s
        self.wait_s = wait_s
        self._gcs_identity = gcs_identity
        self._clock = clock
        self._holder = _replica()
        self._seq = itertools.count()
        # Claims held now (key -> holder), renewed by run_renewer.
        self._held: dict[str, str] = {}
        self._identities: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._outage_logged_at = -OUTAGE_LOG_INTERVAL_S
        self._down_until = -OUTAGE_SKIP_S
        #: Answers reused (no model call), and duplicate deliveries answered from a record.
        self.hits = 0
        self.duplicates_suppressed = 0
        #: Store operations that failed (each treated as a miss).
        self.errors = 0

    # -- store calls that never fail the job -------------------------------------------

    async def _safe(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        if self._clock.now() < self._down_until:
            return default  # the store failed a moment ago: do not wait on it again yet
        try:
            return await op()
        except StoreUnavailable as exc:
            self.errors += 1
            now = self._clock.now()
            self._down_until = now + OUTAGE_SKIP_S
            if now - self._outage_logged_at >= OUTAGE_LOG_INTERVAL_S:
                self._outage_logged_at = now
                log.warning(
                    "store_unavailable",
                    extra={"store": self.store.name, "error": str(exc)[:200]},
                )
            return default

    # -- image identity and keys ----------------------------------------------------------

    async def identity(self, uri: str, url: str) -> str:
        """What the image is: the hash of its bytes when they are in hand (``url`` is a
        data: URL), a gs:// object's generation and checksum, else the URI."""
        if self.key_mode == "uri":
            return uri
        if url.startswith("data:"):
            return "sha256:" + hashlib.sha256(url.encode()).hexdigest()
        if url.startswith("gs://") and self._gcs_identity is not None:
            return await self._gs_identity(url)
        return uri

    async def _gs_identity(self, url: str) -> str:
        now = self._clock.now()
        cached = self._identities.get(url)
        if cached is not None and now - cached[0] < IDENTITY_TTL_S:
            return cached[1]
        bucket, _, name = url[5:].partition("/")
        assert self._gcs_identity is not None
        ident = await self._gcs_identity(bucket, name)
        self._identities[url] = (now, ident)
        self._identities.move_to_end(url)
        while len(self._identities) > IDENTITY_CACHE_SIZE:
            self._identities.popitem(last=False)
        return ident

    # -- records by job id ----------------------------------------------------------------

    async def record(self, job_id: str, fingerprint: str) -> Record | None:
        """The record stored for this job, if it was for the same job: an id reused for
        another image (a second batch numbering its jobs from 1 again) is a new job."""
        raw = await self._safe(lambda: self.store.get(f"rec:{job_id}"), None)
        if raw is None:
            return None
        try:
            stored = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(stored, dict) or stored.get("job") != fingerprint:
            return None
        record = stored.get("record")
        return record if isinstance(record, dict) else None

    async def remember_record(self, job_id: str, fingerprint: str, record: Record) -> None:
        kept = {k: v for k, v in record.items() if k != "image_uri"}
        value = json.dumps(
            {"job": fingerprint, "record": kept}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        await self._safe(lambda: self.store.put(f"rec:{job_id}", value, ttl_s=self.ttl_s), None)

    # -- answers by content ---------------------------------------------------------------

    async def answer(self, key: str) -> StoredAnswer | None:
        raw = await self._safe(lambda: self.store.get(f"ans:{key}"), None)
        return StoredAnswer.from_bytes(raw) if raw is not None else None

    async def remember_answer(self, key: str, answer: StoredAnswer) -> None:
        value = answer.to_bytes()
        await self._safe(lambda: self.store.put(f"ans:{key}", value, ttl_s=self.ttl_s), None)

    # -- claims -----------------------------------------------------------------------

    async def claim(self, key: str) -> str | None:
        """Take ``key``: the holder name when taken (or the store is down: go ahead),
        None when someone else holds it."""
        holder = f"{self._holder}:{next(self._seq)}"
        taken = await self._safe(lambda: self.store.claim(key, holder, lease_s=self.lease_s), True)
        if not taken:
            return None
        self._held[key] = holder
        return holder

    async def release(self, key: str, holder: str | None) -> None:
        if holder is None or self._held.get(key) != holder:
            return
        del self._held[key]
        with anyio.CancelScope(shield=True):
            await self._safe(lambda: self.store.release(key, holder), None)

    async def find_or_claim(
        self, key: str, fetch: Callable[[], Awaitable[T | None]]
    ) -> tuple[T | None, str | None]:
        """The result ``fetch`` finds, or the claim on ``key`` to make it. While someone
        else holds the claim, wait (at most ``wait_s``) for their result or for the
        claim to come free (a failed or dead holder). Returns (result, None), or (None,
        our holder) once we hold the claim, or (None, None) when the wait ran out: then
        the caller goes ahead without a claim.

        The result is looked for again after the claim is taken: a holder that finished
        between our first look and our claim has stored its result and let go, and
        without the second look its work would be done twice."""
        deadline = self._clock.now() + self.wait_s
        pause = POLL_INITIAL_S
        while True:
            found = await fetch()
            if found is not None:
                return found, None
            holder = await self.claim(key)
            if holder is not None:
                # The holder let go without a result (it failed) or died: our turn. Its
                # result may have landed between the two calls.
                found = await fetch()
                if found is not None:
                    await self.release(key, holder)
                    return found, None
                return None, holder
            if self._clock.now() + pause > deadline:
                return None, None
            await self._clock.sleep(pause)
            pause = min(POLL_MAX_S, pause * 2)

    def _renewal(self, key: str, holder: str) -> Callable[[], Awaitable[bool]]:
        def renew() -> Awaitable[bool]:
            return self.store.claim(key, holder, lease_s=self.lease_s)

        return renew

    async def run_renewer(self) -> None:
        """Renew the claims this process holds, so a long model call keeps its claim and a
        dead process's claims lapse after ``lease_s``. Runs until cancelled."""
        while True:
            await self._clock.sleep(self.lease_s / 3)
            for key, holder in list(self._held.items()):
                still = await self._safe(self._renewal(key, holder), True)
                if not still and self._held.get(key) == holder:
                    # Lost it (the store forgot, or it lapsed while we were slow): carry on.
                    del self._held[key]
