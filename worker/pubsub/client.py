"""A thin Pub/Sub REST (v1 JSON) client on one aiohttp session.

Only what the worker needs: pull, acknowledge, modifyAckDeadline, publish and get
subscription. With ``PUBSUB_EMULATOR_HOST`` set, calls go to ``http://$HOST/v1`` without
credentials, as Google's own clients do; otherwise to ``https://pubsub.googleapis.com/v1``
with a cloud-platform bearer token.

Transient answers (429, 5xx, UNAVAILABLE, connection resets, timeouts) are retried by
:mod:`worker.retry`, bounded by time (``retry_deadline_s``, or a caller's own policy: a
pull loop retries until it is stopped). Acks and modacks are split into
requests of at most 1,000 ids and well under the 512 KB request limit; a request refused
as invalid (400) is bisected, so one bad ackId cannot keep a thousand good ones from
being acked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from ..errors import Kind, PubSubError
from ..protocols import TokenProvider
from ..retry import OnRetry, RetryPolicy, RetryState, kind_for_status, retry_call
from .messages import uses_pubsub

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "MAX_ACK_IDS_PER_REQUEST",
    "MAX_PUBLISH_MESSAGES",
    "PUBSUB_URL",
    "PubSubClient",
    "chunk_ack_ids",
    "chunk_messages",
    "client_for",
]

log = logging.getLogger("worker.pubsub")

T = TypeVar("T")

PUBSUB_URL = "https://pubsub.googleapis.com/v1"
MAX_ACK_IDS_PER_REQUEST = 1000
# The service refuses ack/modack bodies over 512 KiB; stay well below it.
MAX_ACK_REQUEST_BYTES = 400_000
MAX_PUBLISH_MESSAGES = 1000
# The service refuses publish bodies over 10 MB; leave room for the JSON around the data.
MAX_PUBLISH_REQUEST_BYTES = 9_500_000


def _chunks(
    items: Sequence[T], cost: Callable[[T], int], *, max_items: int, max_bytes: int, overhead: int
) -> Iterator[list[T]]:
    """Split ``items`` into request-sized lists, bounded by count and by JSON size."""
    chunk: list[T] = []
    size = overhead
    for item in items:
        n = cost(item)
        if chunk and (len(chunk) >= max_items or size + n > max_bytes):
            yield chunk
            chunk, size = [], overhead
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


def chunk_ack_ids(
    ack_ids: Sequence[str],
    *,
    max_ids: int = MAX_ACK_IDS_PER_REQUEST,
    max_bytes: int = MAX_ACK_REQUEST_BYTES,
) -> Iterator[list[str]]:
    """Split ackIds into acknowledge/modifyAckDeadline request-sized lists."""
    # {"ackIds": [...], "ackDeadlineSeconds": 600} around ids that cost quotes and a comma.
    return _chunks(
        ack_ids, lambda a: len(a.encode()) + 4, max_items=max_ids, max_bytes=max_bytes, overhead=64
    )


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
    for message in messages:
        cost = _message_cost(message)
        if cost + 32 > max_bytes:
            raise PubSubError(
                400,
                "INVALID_ARGUMENT",
                f"a message of ~{cost} bytes is too large",
                kind="permanent",
            )
    return _chunks(
        messages, _message_cost, max_items=max_messages, max_bytes=max_bytes, overhead=32
    )


class PubSubClient:
    """The Pub/Sub REST calls the worker makes, on one aiohttp session.

    One per process (:func:`client_for`), shared by the pull source, the topic sinks and
    ``loadtest --publish-to``; it uses the process's Google token (never an API key).
    It retries transient failures itself and raises :class:`~worker.errors.PubSubError`
    when a call fails for good; it knows nothing of jobs or leases.
    """

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
        self.request_timeout_s = request_timeout_s
        self.retry_deadline_s = retry_deadline_s
        #: How each call is retried, unless its caller brings its own policy.
        self.retry = RetryPolicy(
            attempts=None,
            deadline_s=retry_deadline_s,
            initial_backoff_s=initial_backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
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
        """Use the process's token provider when it holds Google credentials (the
        model's cloud-platform token serves Pub/Sub too). The emulator gets none."""
        if not self.emulator and self._tokens is None and tokens.google:
            self._tokens = tokens

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

    async def _once(self, method: str, path: str, body: Any) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        token = ""
        if not self.emulator:
            if self._tokens is None:
                raise PubSubError(
                    0, "UNAUTHENTICATED", "no Google credentials for Pub/Sub", kind="permanent"
                )
            token = await self._tokens.token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        session = self._get_session()
        try:
            async with session.request(
                method, f"{self.base_url}/{path}", data=data, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise PubSubError(0, "timeout", "no answer in time", kind="transient") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise PubSubError(0, "connection_error", type(exc).__name__, kind="transient") from None
        if status == 200:
            return json.loads(raw) if raw.strip() else {}
        code, message = _error_of(raw)
        kind: Kind = kind_for_status(status)
        if kind == "unauthorized" and self._tokens is not None and token:
            # A fresh token for every caller that saw this one rejected; retried at once.
            await self._tokens.refresh_after_rejection(token)
        raise PubSubError(status, code, message, kind=kind)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        policy: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
    ) -> dict[str, Any]:
        """One API call, retried on transient failures within ``policy`` (default: this
        client's, bounded by ``retry_deadline_s``)."""
        verb = path.rpartition(":")[2] if ":" in path else method
        self.requests[verb] = self.requests.get(verb, 0) + 1

        def note(exc: BaseException, kind: Kind, delay: float, state: RetryState) -> None:
            self.retries += 1
            log.debug(
                "pubsub_retry_scheduled",
                extra={
                    "call": verb,
                    "error_type": type(exc).__name__,
                    "status": exc.status if isinstance(exc, PubSubError) else None,
                    "attempt": state.attempts,
                    "delay_s": round(delay, 3),
                },
            )
            if on_retry is not None:
                on_retry(exc, kind, delay, state)

        return await retry_call(
            lambda: self._once(method, path, body), policy or self.retry, on_retry=note
        )

    # -- the API ---------------------------------------------------------------------------

    async def get_subscription(
        self, subscription: str, *, policy: RetryPolicy | None = None
    ) -> dict[str, Any]:
        return await self.call("GET", subscription, policy=policy)

    async def get_topic(self, topic: str, *, policy: RetryPolicy | None = None) -> dict[str, Any]:
        return await self.call("GET", topic, policy=policy)

    async def pull(
        self,
        subscription: str,
        max_messages: int,
        *,
        policy: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
    ) -> list[dict[str, Any]]:
        body = {"maxMessages": max(1, min(max_messages, 1000))}
        answer = await self.call(
            "POST", f"{subscription}:pull", body, policy=policy, on_retry=on_retry
        )
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


def client_for(settings: Settings, *specs: str) -> PubSubClient | None:
    """The process's one Pub/Sub client when any spec is ``pubsub:``; else None. It
    gets its token from the runtime (``share_tokens``) once credentials are loaded."""
    if not uses_pubsub(*specs):
        return None
    p = settings.pubsub
    return PubSubClient.from_environment(
        request_timeout_s=p.request_timeout_s, retry_deadline_s=p.retry_deadline_s
    )


def unbounded(policy: RetryPolicy) -> RetryPolicy:
    """``policy`` without a deadline: for loops that retry until they are stopped."""
    return replace(policy, deadline_s=None)


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
