"""Bearer tokens for the model and for Google APIs (Pub/Sub, Cloud Storage).

``GoogleTokens`` holds an Application Default Credentials token and refreshes it in the
background when 75% of its lifetime has passed (15 minutes before expiry for Google's
one-hour tokens). We read ``credentials.expiry`` ourselves rather than google-auth's
``valid``: its fixed 3m45s threshold would call a five-minute token stale for most of its
life. Refreshes run in a worker thread (google-auth is blocking), one at a time; requests
take the cached token and only wait when no usable token is held. A failed refresh is
retried by :mod:`worker.retry` like any other call: at start-up within
``STARTUP_POLICY``, in the background until it succeeds.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread

from .errors import ConfigError, Kind
from .protocols import TokenProvider
from .retry import RetryPolicy, RetryState, retry_call

__all__ = [
    "CLOUD_PLATFORM_SCOPE",
    "GoogleTokens",
    "LazyGoogleTokens",
    "NoTokens",
    "StaticToken",
    "TokenProvider",
    "make_token_provider",
]

log = logging.getLogger("worker.auth")

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# Share of a token's lifetime after which the background task refreshes it.
REFRESH_AT_FRACTION = 0.75
# The first token: a metadata server that is briefly unreachable (a pod starting) is
# waited for; one that stays away for this long is a start-up error.
STARTUP_POLICY = RetryPolicy(attempts=None, deadline_s=30.0, initial_backoff_s=0.2, max_backoff_s=5)
# The background refresher never gives up: requests need a token for as long as it runs.
REFRESHER_POLICY = RetryPolicy(
    attempts=None, deadline_s=None, initial_backoff_s=0.5, max_backoff_s=30.0
)


class _Unexpiring:
    """The token-provider fields of a provider whose token never changes."""

    refreshes = 0
    refresh_failures = 0
    google = False

    @property
    def expires_at(self) -> float | None:
        return None


class NoTokens(_Unexpiring):
    """``--auth none``: no Authorization header at all."""

    async def start(self) -> None:
        return None

    async def token(self) -> str:
        return ""

    async def refresh_after_rejection(self, rejected: str) -> None:
        return None

    async def run_refresher(self) -> None:
        return None


class StaticToken(_Unexpiring):
    """``--auth api-key``: a key read once from the environment."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:  # never show the key
        return "StaticToken(<redacted>)"

    async def start(self) -> None:
        return None

    async def token(self) -> str:
        return self._value

    async def refresh_after_rejection(self, rejected: str) -> None:
        return None

    async def run_refresher(self) -> None:
        return None


def _expiry_epoch(expiry: datetime | None) -> float | None:
    if expiry is None:
        return None
    # google-auth keeps naive UTC datetimes.
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=UTC)
    return expiry.timestamp()


def _refresh_kind(exc: BaseException) -> Kind:
    """A refresh that failed is worth another try, whatever google-auth raised: a metadata
    server or token endpoint that is down now may answer later, and nothing else will
    get the worker a token."""
    return "permanent" if isinstance(exc, anyio.get_cancelled_exc_class()) else "transient"


class GoogleTokens:
    """Application Default Credentials with ahead-of-expiry, single-flight refresh.

    Owns the process's one Google token: the model, Pub/Sub and Cloud Storage share it,
    so however many endpoints or clients there are, a refresh happens once. Never logs
    the token, and never blocks the event loop (google-auth runs in a thread).
    """

    google = True

    def __init__(self, scopes: tuple[str, ...] = (CLOUD_PLATFORM_SCOPE,)) -> None:
        self._scopes = scopes
        self._credentials: Any = None
        self._request: Any = None
        self._token: str | None = None
        self._obtained_at = 0.0
        self._expires_at: float | None = None
        self._lock = anyio.Lock()
        self._generation = 0
        self._wake = anyio.Event()
        self.project_id: str | None = None
        self.refreshes = 0
        self.refresh_failures = 0

    def __repr__(self) -> str:
        return f"GoogleTokens(expires_at={self._expires_at}, refreshes={self.refreshes})"

    @property
    def expires_at(self) -> float | None:
        return self._expires_at

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._load_credentials)
        try:
            await retry_call(
                lambda: self._refresh(self._generation), STARTUP_POLICY, classify=_refresh_kind
            )
        except Exception as exc:
            raise ConfigError(
                "model.auth",
                f"google: could not get an access token within {STARTUP_POLICY.deadline_s:g} s "
                f"({type(exc).__name__}); check the credentials and that their token "
                "endpoint or metadata server is reachable",
            ) from None

    def _load_credentials(self) -> None:
        import google.auth
        import google.auth.exceptions
        import google.auth.transport.requests

        try:
            credentials, project = google.auth.default(scopes=list(self._scopes))
        except (google.auth.exceptions.DefaultCredentialsError, ValueError) as exc:
            raise ConfigError("model.auth", _credentials_problem(exc)) from None
        self._credentials = credentials
        self.project_id = project
        self._request = google.auth.transport.requests.Request()

    def _usable(self, now: float) -> bool:
        if self._token is None:
            return False
        if self._expires_at is None:
            return True
        # Keep a small margin so a request is not sent with a token that dies in transit.
        lifetime = self._expires_at - self._obtained_at
        margin = min(10.0, 0.05 * lifetime)
        return now < self._expires_at - margin

    async def token(self) -> str:
        if self._token is not None and self._usable(time.time()):
            return self._token
        await self._refresh(self._generation)
        assert self._token is not None
        return self._token

    async def refresh_after_rejection(self, rejected: str) -> None:
        # Only the first request that saw this token rejected pays for a refresh.
        if rejected == self._token:
            await self._refresh(self._generation)

    async def _refresh(self, seen_generation: int) -> None:
        # Single flight: whoever holds the lock refreshes; those queued behind it find a
        # fresh token (a newer generation) and return without another round trip.
        async with self._lock:
            if self._generation != seen_generation and self._usable(time.time()):
                return  # somebody else refreshed while we queued
            started = time.time()
            try:
                await anyio.to_thread.run_sync(self._credentials.refresh, self._request)
            except Exception as exc:
                self.refresh_failures += 1
                # The exception text can echo a response body; never log it whole.
                log.warning("token_refresh_failed", extra={"error_type": type(exc).__name__})
                raise
            self._token = self._credentials.token
            self._obtained_at = started
            self._expires_at = _expiry_epoch(self._credentials.expiry)
            self._generation += 1
            self.refreshes += 1
            log.info(
                "token_refreshed",
                extra={
                    "expires_in_s": None
                    if self._expires_at is None
                    else round(self._expires_at - time.time(), 1)
                },
            )
            self._wake.set()
            self._wake = anyio.Event()

    def _next_refresh_at(self) -> float | None:
        if self._expires_at is None:
            return None
        lifetime = max(self._expires_at - self._obtained_at, 0.0)
        return self._obtained_at + REFRESH_AT_FRACTION * lifetime

    async def run_refresher(self) -> None:
        """Refresh ahead of expiry until cancelled; start it in the root task group."""
        while True:
            due = self._next_refresh_at()
            if due is None:
                await self._wake.wait()
                continue
            delay = due - time.time()
            if delay > 0:
                wake = self._wake
                with anyio.move_on_after(delay):
                    await wake.wait()  # a refresh elsewhere moves the schedule
                continue
            policy = REFRESHER_POLICY
            if self._expires_at is not None:
                # Retry often enough to get a new token before the one held expires.
                left_s = self._expires_at - time.time()
                policy = replace(policy, max_backoff_s=max(0.5, min(30.0, left_s / 4)))
            await retry_call(
                lambda: self._refresh(self._generation),
                policy,
                state=RetryState(started_at=time.monotonic()),
                classify=_refresh_kind,
            )


class LazyGoogleTokens:
    """Google credentials fetched on first use: for Google APIs (Pub/Sub, Cloud Storage,
    BigQuery) when the model uses an API key or no auth. Nothing is loaded unless a
    request needs a token (an emulator never does)."""

    google = True

    def __init__(self) -> None:
        self._inner = GoogleTokens()
        self._started = False
        self._lock = anyio.Lock()

    @property
    def refreshes(self) -> int:
        return self._inner.refreshes

    @property
    def refresh_failures(self) -> int:
        return self._inner.refresh_failures

    @property
    def expires_at(self) -> float | None:
        return self._inner.expires_at

    async def start(self) -> None:
        return None

    async def token(self) -> str:
        if not self._started:
            async with self._lock:
                if not self._started:
                    await self._inner.start()
                    self._started = True
        return await self._inner.token()

    async def refresh_after_rejection(self, rejected: str) -> None:
        await self._inner.refresh_after_rejection(rejected)

    async def run_refresher(self) -> None:
        # Refreshed when used: token() refreshes a token that is no longer usable.
        return None


def _credentials_problem(exc: BaseException) -> str:
    """One line saying which credentials could not be used, and what to do about it."""
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
    if path:
        return (
            f"GOOGLE_APPLICATION_CREDENTIALS={path} is not a usable credentials file "
            f"({_first_line(exc)}); point it at a service-account or ADC JSON file, or unset it"
        )
    return (
        f"google: no Application Default Credentials ({_first_line(exc)}); run "
        "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, "
        "or choose --auth api-key / none"
    )


def _first_line(exc: BaseException) -> str:
    # google-auth puts the readable part first in args (the rest is the cause's repr).
    first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    lines = first.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def make_token_provider(auth: str, api_key_env: str) -> TokenProvider:
    if auth == "google":
        return GoogleTokens()
    if auth == "api-key":
        value = os.environ.get(api_key_env, "")
        if not value:
            raise ConfigError(
                "model.api_key_env", f"environment variable {api_key_env} is empty or unset"
            )
        return StaticToken(value)
    if auth == "none":
        return NoTokens()
    raise ConfigError("model.auth", "must be one of google, api-key, none")
