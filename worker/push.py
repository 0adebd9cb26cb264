"""``worker serve``: a Pub/Sub push endpoint (Cloud Run) on the same pipeline as ``run``.

Each push request becomes a :class:`PushDelivery` of :class:`PushSource`; the pipeline
describes it, writes the record (or the dead-letter record) and then calls ``ack``, which
answers the request 204. ``nack`` (a transient failure, a sink that would not take the
record, a shutdown) answers 503 so Pub/Sub redelivers. Nothing is answered 2xx before the
record is durable.

Optional OIDC check (``pubsub.push_audience``): the ``Authorization: Bearer`` token must
be a Google-signed ID token for that audience, from a verified email, and, when
``pubsub.push_allowed_emails`` is set, from one of those service accounts. Missing: 401;
anything wrong with it: 403. Either way the job is not run.
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

from .auth import NoTokens
from .http import add_routes
from .metrics import Telemetry
from .pipeline import RunStats
from .settings import PubSubSettings, Settings
from .sources.pubsub import delivery_fields

__all__ = [
    "GOOGLE_CERTS_URL",
    "MAX_PUSH_BODY_BYTES",
    "OidcVerifier",
    "PushDelivery",
    "PushSource",
    "serve_push",
]

log = logging.getLogger("worker.push")

MAX_PUSH_BODY_BYTES = 10 * 1024 * 1024
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
DEFAULT_CERTS_TTL_S = 3600.0
# An unknown key id refetches the certificates, but not more often than this.
MIN_CERTS_REFETCH_S = 30.0
CLOCK_SKEW_S = 30


class OidcVerifier:
    """Checks Pub/Sub push ID tokens with google-auth against Google's (cached) certs."""

    def __init__(
        self, audience: str, allowed_emails: frozenset[str], certs_url: str = GOOGLE_CERTS_URL
    ) -> None:
        self.audience = audience
        self.allowed_emails = allowed_emails
        self.certs_url = certs_url or GOOGLE_CERTS_URL
        self._certs: dict[str, str] = {}
        self._fetched_at = 0.0
        self._expires_at = 0.0
        self._lock = anyio.Lock()

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.certs_url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            certs = await resp.json(content_type=None)
            max_age = DEFAULT_CERTS_TTL_S
            for part in resp.headers.get("Cache-Control", "").split(","):
                name, _, value = part.strip().partition("=")
                if name == "max-age" and value.isdigit():
                    max_age = float(value)
        if not isinstance(certs, dict):
            raise ValueError("certificates document is not a JSON object")
        now = time.monotonic()
        self._certs = {str(k): str(v) for k, v in certs.items()}
        self._fetched_at = now
        self._expires_at = now + max_age

    async def _certs_for(self, session: aiohttp.ClientSession, kid: str) -> dict[str, str]:
        async with self._lock:
            now = time.monotonic()
            stale = now >= self._expires_at
            unknown = kid not in self._certs and now - self._fetched_at >= MIN_CERTS_REFETCH_S
            if stale or unknown:
                await self._fetch(session)
        return self._certs

    async def check(
        self, session: aiohttp.ClientSession, authorization: str | None
    ) -> tuple[int, str] | None:
        """None when the request may be served; else (HTTP status, reason)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "missing bearer token"
        token = token.strip()
        kid = _unverified_kid(token)
        if kid is None:
            return 403, "malformed token"
        try:
            certs = await self._certs_for(session, kid)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("push_certs_unavailable", extra={"error_type": type(exc).__name__})
            return 503, "cannot fetch signing certificates"
        if kid not in certs:
            return 403, "unknown signing key"
        import google.auth.exceptions
        from google.auth import jwt

        try:
            claims = jwt.decode(  # type: ignore[no-untyped-call]
                token,
                certs={kid: certs[kid]},
                audience=self.audience,
                clock_skew_in_seconds=CLOCK_SKEW_S,
            )
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            return 403, f"invalid token ({type(exc).__name__})"
        if claims.get("iss") not in GOOGLE_ISSUERS:
            return 403, "token not issued by Google"
        if claims.get("email_verified") is not True:
            return 403, "email not verified"
        if self.allowed_emails and claims.get("email") not in self.allowed_emails:
            return 403, "service account not allowed"
        return None


def _unverified_kid(token: str) -> str | None:
    try:
        header_b64 = token.split(".")[0]
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    except (ValueError, binascii.Error, IndexError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) and kid else None


class PushDelivery:
    __slots__ = ("_answer", "data", "default_id", "source_info")
    redeliverable = True

    def __init__(
        self,
        data: bytes,
        default_id: str | None,
        source_info: dict[str, Any],
        answer: asyncio.Future[bool],
    ) -> None:
        self.data = data
        self.default_id = default_id
        self.source_info: dict[str, Any] | None = source_info
        self._answer = answer

    def _resolve(self, acked: bool) -> None:
        if not self._answer.done():  # the pusher may have hung up
            self._answer.set_result(acked)

    async def ack(self) -> None:
        self._resolve(True)

    async def nack(self) -> None:
        self._resolve(False)


class PushSource:
    """Jobs arriving as push requests; the HTTP server runs in :meth:`run_services`."""

    trusted = False

    def __init__(
        self,
        *,
        host: str,
        port: int,
        max_waiting: int,
        verifier: OidcVerifier | None = None,
        on_listening: Callable[[int], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry
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
        if self.telemetry is not None:
            add_routes(app, self.telemetry)  # /healthz, /readyz, /metrics on this port
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
                if self.telemetry is not None:
                    self.telemetry.mark_source_answered()
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
        data, default_id, info = parsed
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(PushDelivery(data, default_id, info, answer))
        self._wake.set()
        if await answer:
            return web.Response(status=204)
        return web.json_response({"error": "not processed; redeliver"}, status=503)


def _parse_push(raw: bytes) -> tuple[bytes, str | None, dict[str, Any]] | str:
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


def make_verifier(settings: PubSubSettings) -> OidcVerifier | None:
    if not settings.push_audience:
        return None
    return OidcVerifier(
        settings.push_audience, settings.allowed_emails, settings.push_certs_url or GOOGLE_CERTS_URL
    )


async def serve_push(
    settings: Settings,
    *,
    host: str = "0.0.0.0",  # Cloud Run sends traffic to the container's interfaces
    port: int = 8080,
    on_listening: Callable[[int], None] | None = None,
    handle_signals: bool = True,
) -> RunStats:
    """Serve push requests until SIGTERM/SIGINT (or cancellation)."""
    from .app import closing_pubsub, pubsub_client_for, run_pipeline, runtime
    from .sinks import default_dead_letter, open_sink

    w = settings.worker
    dl_spec = w.dead_letter or default_dead_letter(w.sink)
    pubsub = pubsub_client_for(settings, w.sink, dl_spec)
    sink = open_sink(w.sink, settings=settings, pubsub=pubsub)
    dead_letter = (
        sink
        if dl_spec == w.sink
        else open_sink(dl_spec, key="worker.dead_letter", settings=settings, pubsub=pubsub)
    )
    telemetry = Telemetry(max_loop_lag_s=settings.http.max_loop_lag_s, watch_progress=False)
    source = PushSource(
        host=host,
        port=port,
        max_waiting=w.jobs_in_flight_limit,
        verifier=make_verifier(settings.pubsub),
        on_listening=on_listening,
        telemetry=telemetry,
    )
    async with runtime(settings) as rt, closing_pubsub(pubsub, rt):
        telemetry.set_tokens(rt.tokens, auth_required=not isinstance(rt.tokens, NoTokens))
        stats = await run_pipeline(
            rt,
            source,
            sink,
            dead_letter,
            resume=False,
            handle_signals=handle_signals,
            shutdown_grace_s=w.shutdown_grace_s,
            telemetry=telemetry,
        )
    log.info("run_finished", extra=stats.summary())
    return stats
