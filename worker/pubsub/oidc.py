"""OIDC check of Pub/Sub push requests (``pubsub.push_audience``).

The ``Authorization: Bearer`` token must be a Google-signed ID token for the audience,
from a verified email, and, when ``pubsub.push_allowed_emails`` is set, from one of those
service accounts. Signatures are checked by google-auth against Google's signing
certificates, fetched once and cached for as long as their Cache-Control allows.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time

import aiohttp
import anyio

from ..settings import PubSubSettings

__all__ = ["GOOGLE_CERTS_URL", "OidcVerifier", "make_verifier"]

log = logging.getLogger("worker.pubsub.oidc")

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


def make_verifier(settings: PubSubSettings) -> OidcVerifier | None:
    if not settings.push_audience:
        return None
    return OidcVerifier(
        settings.push_audience, settings.allowed_emails, settings.push_certs_url or GOOGLE_CERTS_URL
    )
