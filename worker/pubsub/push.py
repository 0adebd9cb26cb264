"""Source for ``worker serve``: Pub/Sub push requests (Cloud Run) as jobs.

Each push request becomes a :class:`PushDelivery` of :class:`PushSource`; the pipeline
describes it, writes the record (or the dead-letter record) and then calls ``ack``, which
answers the request 204. ``nack`` (a transient failure, a sink that would not take the
record, a shutdown) answers 503 so Pub/Sub redelivers. Nothing is answered 2xx before the
record is durable. Pushes are checked with :class:`~worker.pubsub.oidc.OidcVerifier`
when one is given (missing token: 401; anything wrong with it: 403; the job never runs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp
import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from ..protocols import SourceBase
from .messages import delivery_fields
from .oidc import OidcVerifier

__all__ = ["MAX_PUSH_BODY_BYTES", "PushDelivery", "PushSource"]

log = logging.getLogger("worker.pubsub.push")

MAX_PUSH_BODY_BYTES = 10 * 1024 * 1024


class PushDelivery:
    """One push request waiting for its answer: ``ack`` answers 204, ``nack`` 503."""

    __slots__ = ("_answer", "data", "default_id", "source_info", "traceparent")
    redeliverable = True

    def __init__(
        self,
        data: bytes,
        default_id: str | None,
        source_info: dict[str, Any],
        answer: asyncio.Future[bool],
        traceparent: str | None = None,
    ) -> None:
        self.data = data
        self.default_id = default_id
        self.source_info: dict[str, Any] | None = source_info
        self.traceparent = traceparent
        self._answer = answer

    def _resolve(self, acked: bool) -> None:
        if not self._answer.done():  # the pusher may have hung up
            self._answer.set_result(acked)

    async def ack(self) -> None:
        self._resolve(True)

    async def nack(self) -> None:
        self._resolve(False)


class PushSource(SourceBase):
    """Jobs arriving as push requests; the HTTP server runs in :meth:`run_services`.

    Owns the listening port (which may also serve the probes: ``add_routes``). Never
    answers 2xx before the pipeline acked the job; refuses (429) rather than queue more
    than ``max_waiting`` pushes, and refuses everything (503) once draining.
    """

    trusted = False
    redelivers = True

    def __init__(
        self,
        *,
        host: str,
        port: int,
        max_waiting: int,
        verifier: OidcVerifier | None = None,
        on_listening: Callable[[int], None] | None = None,
        add_routes: Callable[[web.Application], None] | None = None,
    ) -> None:
        self._add_routes = add_routes
        self._answered_at: float | None = None
        self.host = host
        self.port = port
        self.name = f"push:{host}:{port}"
        self.max_waiting = max(1, max_waiting)
        self.verifier = verifier
        self._on_listening = on_listening
        self._queue: deque[PushDelivery] = deque()
        self._wake = anyio.Event()
        self._closing = False
        self._session: aiohttp.ClientSession | None = None
        self.refused: dict[int, int] = {}

    @property
    def answered_at(self) -> float | None:
        """When the server started listening, or took its latest push."""
        return self._answered_at

    # -- pipeline side -------------------------------------------------------------------

    async def deliveries(self) -> AsyncGenerator[PushDelivery, None]:
        try:
            while True:
                if self._queue:
                    yield self._queue.popleft()
                    continue
                self._wake = anyio.Event()
                await self._wake.wait()
        finally:
            # Reading stopped (shutdown): refuse new pushes, hand back those waiting.
            self._closing = True
            self._give_back_waiting()

    def _give_back_waiting(self) -> None:
        while self._queue:
            self._queue.popleft()._resolve(False)

    async def aclose(self) -> None:
        self._closing = True
        self._give_back_waiting()

    # -- HTTP side -----------------------------------------------------------------------

    async def run_services(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        app = web.Application(client_max_size=MAX_PUSH_BODY_BYTES)
        if self._add_routes is not None:
            self._add_routes(app)  # /healthz, /readyz, /metrics on this port
        else:
            app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            async with aiohttp.ClientSession() as session:
                self._session = session
                site = web.TCPSite(runner, self.host, self.port)
                await site.start()
                self.port = int(runner.addresses[0][1])
                self.name = f"push:{self.host}:{self.port}"
                log.info("push_listening", extra={"host": self.host, "port": self.port})
                self._answered_at = time.monotonic()
                if self._on_listening is not None:
                    self._on_listening(self.port)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._closing = True
            self._give_back_waiting()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self._closing else 200, text="ok\n")

    def _refuse(self, status: int, reason: str) -> web.Response:
        self.refused[status] = self.refused.get(status, 0) + 1
        log.info("push_refused", extra={"status": status, "reason": reason})
        return web.json_response({"error": reason}, status=status)

    async def _handle(self, request: web.Request) -> web.Response:
        if self._closing:
            return self._refuse(503, "shutting down")
        if self.verifier is not None:
            assert self._session is not None
            problem = await self.verifier.check(self._session, request.headers.get("Authorization"))
            if problem is not None:
                return self._refuse(*problem)
        too_big = (request.content_length or 0) > MAX_PUSH_BODY_BYTES
        if not too_big:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                too_big = True
        if too_big:
            refusal = self._refuse(400, f"body over {MAX_PUSH_BODY_BYTES} bytes")
            refusal.force_close()  # do not read (or keep) a connection full of unread body
            return refusal
        parsed = _parse_push(raw)
        if isinstance(parsed, str):
            return self._refuse(400, parsed)
        if len(self._queue) >= self.max_waiting:
            # Pub/Sub slows its push rate on 429 (and retries later).
            return self._refuse(429, "too many pushes waiting")
        data, default_id, info, traceparent = parsed
        self._answered_at = time.monotonic()
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(PushDelivery(data, default_id, info, answer, traceparent))
        self._wake.set()
        if await answer:
            return web.Response(status=204)
        return web.json_response({"error": "not processed; redeliver"}, status=503)


def _parse_push(raw: bytes) -> tuple[bytes, str | None, dict[str, Any], str | None] | str:
    """The wrapped push body -> delivery fields, or the reason it is not one."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "body is not JSON"
    if not isinstance(body, dict):
        return "body is not a JSON object"
    message = body.get("message")
    if not isinstance(message, dict):
        return "not a push body: no message object"
    message_id = message.get("messageId") or message.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        return "not a push body: message has no messageId"
    data = message.get("data")
    attributes = message.get("attributes")
    if data is not None:
        if not isinstance(data, str):
            return "message.data is not a string"
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return "message.data is not base64"
    if attributes is not None and not isinstance(attributes, dict):
        return "message.attributes is not an object"
    if not data and not attributes:
        return "message has neither data nor attributes"
    subscription = body.get("subscription")
    return delivery_fields(
        message, subscription if isinstance(subscription, str) else "", body.get("deliveryAttempt")
    )
