"""A thin Pub/Sub REST (v1 JSON) client on one aiohttp session.

Only what the worker needs: pull, acknowledge, modifyAckDeadline, publish and get
subscription. With ``PUBSUB_EMULATOR_HOST`` set, calls go to ``http://$HOST/v1`` without
credentials, as Google's own clients do; otherwise to ``https://pubsub.googleapis.com/v1``
with a cloud-platform bearer token.

Transient answers (429, 5xx, UNAVAILABLE, connection resets, timeouts) are retried with
capped, jittered exponential backoff, bounded by time. Acks and modacks are split into
requests of at most 1,000 ids and well under the 512 KB request limit; a request refused
as invalid (400) is bisected, so one bad ackId cannot keep a thousand good ones from
being acked.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import aiohttp
import anyio

from .auth import GoogleTokens, TokenProvider

__all__ = [
    "MAX_ACK_IDS_PER_REQUEST",
    "MAX_PUBLISH_MESSAGES",
    "PubSubClient",
    "PubSubError",
    "chunk_ack_ids",
    "chunk_messages",
    "encode_data",
    "uses_pubsub",
]

log = logging.getLogger("worker.pubsub")

PUBSUB_URL = "https://pubsub.googleapis.com/v1"
MAX_ACK_IDS_PER_REQUEST = 1000
# The service refuses ack/modack bodies over 512 KiB; stay well below it.
MAX_ACK_REQUEST_BYTES = 400_000
MAX_PUBLISH_MESSAGES = 1000
# The service refuses publish bodies over 10 MB; leave room for the JSON around the data.
MAX_PUBLISH_REQUEST_BYTES = 9_500_000

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class PubSubError(Exception):
    """A Pub/Sub call failed; ``transient`` says whether trying again later may help."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status in _TRANSIENT_STATUS or self.status >= 500 or self.status == 0


def uses_pubsub(*specs: str) -> bool:
    return any(spec.startswith("pubsub:") for spec in specs)


def encode_data(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def chunk_ack_ids(
    ack_ids: Sequence[str],
    *,
    max_ids: int = MAX_ACK_IDS_PER_REQUEST,
    max_bytes: int = MAX_ACK_REQUEST_BYTES,
) -> Iterator[list[str]]:
    """Split ackIds into request-sized lists (count and JSON size both bounded)."""
    chunk: list[str] = []
    size = 64  # {"ackIds": [...], "ackDeadlineSeconds": 600}
    for ack_id in ack_ids:
        cost = len(ack_id.encode()) + 4  # quotes, comma, space
        if chunk and (len(chunk) >= max_ids or size + cost > max_bytes):
            yield chunk
            chunk, size = [], 64
        chunk.append(ack_id)
        size += cost
    if chunk:
        yield chunk


def _message_cost(message: Mapping[str, Any]) -> int:
    cost = len(message.get("data", "")) + 64
    for key, value in (message.get("attributes") or {}).items():
        cost += len(key.encode()) + len(str(value).encode()) + 8
    return cost


def chunk_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    max_messages: int = MAX_PUBLISH_MESSAGES,
    max_bytes: int = MAX_PUBLISH_REQUEST_BYTES,
) -> Iterator[list[Mapping[str, Any]]]:
    """Split publish messages (data already base64) into request-sized lists."""
    chunk: list[Mapping[str, Any]] = []
    size = 32
    for message in messages:
        cost = _message_cost(message)
        if cost + 32 > max_bytes:
            raise PubSubError(400, "INVALID_ARGUMENT", f"a message of ~{cost} bytes is too large")
        if chunk and (len(chunk) >= max_messages or size + cost > max_bytes):
            yield chunk
            chunk, size = [], 32
        chunk.append(message)
        size += cost
    if chunk:
        yield chunk


class PubSubClient:
    def __init__(
        self,
        *,
        base_url: str = PUBSUB_URL,
        tokens: TokenProvider | None = None,
        emulator: bool = False,
        request_timeout_s: float = 60.0,
        retry_deadline_s: float = 60.0,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.emulator = emulator
        self._tokens = tokens
        self._own_tokens = False
        self.request_timeout_s = request_timeout_s
        self.retry_deadline_s = retry_deadline_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._token_lock = anyio.Lock()
        self._tokens_started = tokens is not None
        #: Calls made, by method, and retries; for tests and summaries.
        self.requests: dict[str, int] = {}
        self.retries = 0

    def __repr__(self) -> str:
        return f"PubSubClient(base_url={self.base_url!r}, emulator={self.emulator})"

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> PubSubClient:
        environ = os.environ if env is None else env
        host = environ.get("PUBSUB_EMULATOR_HOST", "").strip()
        if host:
            return cls(base_url=f"http://{host}/v1", emulator=True, **kwargs)
        return cls(base_url=PUBSUB_URL, **kwargs)

    def share_tokens(self, tokens: TokenProvider) -> None:
        """Use the model's Google token provider (same cloud-platform scope) if it has one."""
        if not self.emulator and self._tokens is None and isinstance(tokens, GoogleTokens):
            self._tokens = tokens
            self._tokens_started = True

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- plumbing ------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                raise_for_status=False,
            )
        return self._session

    async def _token(self) -> str:
        if self.emulator:
            return ""
        if not self._tokens_started:
            async with self._token_lock:
                if self._tokens is None:
                    self._tokens = GoogleTokens()
                    self._own_tokens = True
                if not self._tokens_started:
                    await self._tokens.start()
                    self._tokens_started = True
        assert self._tokens is not None
        return await self._tokens.token()

    async def _once(self, method: str, path: str, body: Any) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        token = await self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        session = self._get_session()
        async with session.request(
            method, f"{self.base_url}/{path}", data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            if resp.status == 200:
                return json.loads(raw) if raw.strip() else {}
            code, message = _error_of(raw)
            if resp.status == 401 and token and self._tokens is not None:
                await self._tokens.refresh_after_rejection(token)
            raise PubSubError(resp.status, code, message)

    async def call(
        self, method: str, path: str, body: Any = None, *, deadline_s: float | None = None
    ) -> dict[str, Any]:
        """One API call, retried on transient failures until ``deadline_s`` has passed."""
        verb = path.rpartition(":")[2] if ":" in path else method
        self.requests[verb] = self.requests.get(verb, 0) + 1
        give_up_at = time.monotonic() + (
            self.retry_deadline_s if deadline_s is None else deadline_s
        )
        failures = 0
        unauthorized = 0
        while True:
            try:
                return await self._once(method, path, body)
            except PubSubError as exc:
                if exc.status == 401 and unauthorized == 0:
                    unauthorized += 1  # fresh token, at once
                    continue
                if not exc.transient:
                    raise
                error: Exception = exc
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                error = exc
            failures += 1
            cap = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (failures - 1))
            delay = random.uniform(cap / 2, cap)
            if time.monotonic() + delay >= give_up_at:
                if isinstance(error, PubSubError):
                    raise error
                raise PubSubError(0, "UNAVAILABLE", f"{type(error).__name__}: {error}") from error
            self.retries += 1
            log.debug(
                "pubsub_retry_scheduled",
                extra={
                    "call": verb,
                    "error_type": type(error).__name__,
                    "status": getattr(error, "status", None),
                    "attempt": failures,
                    "delay_s": round(delay, 3),
                },
            )
            await anyio.sleep(delay)

    # -- the API ---------------------------------------------------------------------------

    async def get_subscription(self, subscription: str) -> dict[str, Any]:
        return await self.call("GET", subscription)

    async def pull(
        self, subscription: str, max_messages: int, *, deadline_s: float | None = None
    ) -> list[dict[str, Any]]:
        body = {"maxMessages": max(1, min(max_messages, 1000))}
        answer = await self.call("POST", f"{subscription}:pull", body, deadline_s=deadline_s)
        received = answer.get("receivedMessages") or []
        return [m for m in received if isinstance(m, dict) and "ackId" in m]

    async def acknowledge(self, subscription: str, ack_ids: Sequence[str]) -> list[str]:
        """Ack every id; returns the ids the service refused as invalid (not retried)."""
        refused: list[str] = []
        for chunk in chunk_ack_ids(ack_ids):
            refused += await self._bisecting(
                f"{subscription}:acknowledge", chunk, lambda ids: {"ackIds": ids}
            )
        return refused

    async def modify_ack_deadline(
        self, subscription: str, ack_ids: Sequence[str], seconds: int
    ) -> list[str]:
        """Set the deadline of every id (0 = nack); returns the ids refused as invalid."""
        refused: list[str] = []
        for chunk in chunk_ack_ids(ack_ids):
            refused += await self._bisecting(
                f"{subscription}:modifyAckDeadline",
                chunk,
                lambda ids: {"ackIds": ids, "ackDeadlineSeconds": seconds},
            )
        return refused

    async def _bisecting(self, path: str, ids: list[str], body: Any) -> list[str]:
        try:
            await self.call("POST", path, body(ids))
            return []
        except PubSubError as exc:
            if exc.status != 400:
                raise
            if len(ids) == 1:
                log.warning("pubsub_ack_id_refused", extra={"call": path.rpartition(":")[2]})
                return list(ids)
        half = len(ids) // 2
        return await self._bisecting(path, ids[:half], body) + await self._bisecting(
            path, ids[half:], body
        )

    async def publish(self, topic: str, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """Publish messages (``data`` already base64) in request-sized batches; message ids."""
        ids: list[str] = []
        for chunk in chunk_messages(messages):
            answer = await self.call("POST", f"{topic}:publish", {"messages": chunk})
            ids += [str(i) for i in answer.get("messageIds", [])]
        return ids


def _error_of(raw: bytes) -> tuple[str, str]:
    """Google's ``{"error": {"status", "message"}}``; short and secret-free."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "UNKNOWN", raw[:200].decode("utf-8", "replace")
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("status") or "UNKNOWN"), str(err.get("message") or "")[:500]
    return "UNKNOWN", raw[:200].decode("utf-8", "replace")
