"""Fetching image bytes on behalf of jobs: ``https://`` (``http://`` when allowed) and ``gs://``.

Job URLs come from other teams' systems, so every fetch of one is treated as hostile:

* **SSRF guard.** Every address a job URL leads to is checked before we connect: loopback,
  private, shared (CGNAT), link-local (169.254.169.254 is the cloud metadata server),
  multicast, unspecified and reserved addresses are refused, also when hidden in an
  IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address or in a legacy numeric form
  (``0x7f.1``). ``allow_private_networks`` opens loopback and private ranges only.
* **No DNS rebinding.** The check runs inside the connector's resolver: the addresses that
  were vetted are the very ones aiohttp connects to (TLS still verifies the host name), so
  no second lookup can swap in another address between check and connect.
* **Redirects** are followed by hand, at most ``max_redirects``, each hop checked again.
* **Size cap** enforced while streaming: an oversized body is cut off, never buffered.
* **Timeouts**: connect, read (longest silence) and a whole-attempt deadline, so a server
  that drips a byte a second cannot hold a job forever.
* Transient failures (5xx, 408, 429, resets, timeouts) are retried by :mod:`worker.retry`
  within ``fetch_attempts`` (a 429 counts: an image host that keeps refusing is failing);
  when the attempts are spent the job fails with ``fetch_failed``.

The guard is for URLs from jobs. Endpoints the operator configured (the Cloud Storage API
or ``STORAGE_EMULATOR_HOST``) are reached through a separate, unguarded session.
Messages never carry a URL's query string (signed URLs keep their signatures there).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .errors import BlockedAddressError, FetchError, JobError, ServiceError, StorageError
from .protocols import TokenProvider
from .retry import RetryPolicy, kind_for_status, retry_after_s, retry_call
from .settings import ImageSettings

__all__ = [
    "AddressGuard",
    "ImageFetcher",
    "display_url",
    "storage_endpoint",
]

log = logging.getLogger("worker.fetch")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[..., Awaitable[list[tuple[Any, ...]]]]

# Names that reach the metadata server without DNS telling us so (GCE's resolver answers
# them with 169.254.169.254, which is refused anyway; refusing the names is belt and braces).
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog"})
_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_LEGACY_NUMERIC = re.compile(r"[0-9a-fA-FxX.]+")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "image-describer-worker/0.1"
CHUNK_BYTES = 65_536
DEFAULT_STORAGE_ENDPOINT = "https://storage.googleapis.com"


def display_url(url: URL | str) -> str:
    """A URL fit for messages and logs: no user info, no query, no fragment, bounded."""
    try:
        u = URL(str(url))
        shown = f"{u.scheme}://{u.raw_host or ''}"
        if u.explicit_port:
            shown += f":{u.port}"
        shown += u.raw_path
    except (ValueError, TypeError):
        shown = "<unparsable URL>"
    return shown if len(shown) <= 200 else shown[:197] + "..."


def storage_endpoint(env: dict[str, str] | None = None) -> tuple[str, bool]:
    """The Cloud Storage JSON API root and whether it is an emulator.

    Like Google's clients, ``STORAGE_EMULATOR_HOST`` may be ``host:port`` (http assumed) or
    a full URL.
    """
    value = (os.environ if env is None else env).get("STORAGE_EMULATOR_HOST", "").strip()
    if not value:
        return DEFAULT_STORAGE_ENDPOINT, False
    if "://" not in value:
        value = "http://" + value
    return value.rstrip("/"), True


class AddressGuard:
    """Decides which addresses a job URL may reach."""

    def __init__(
        self,
        *,
        allow_private_networks: bool = False,
        allowed_networks: Iterable[str] = (),
    ) -> None:
        self.allow_private_networks = allow_private_networks
        # Exact exceptions an operator (or a test) vouches for, e.g. one internal image host.
        self.allowed_networks = tuple(ipaddress.ip_network(n) for n in allowed_networks)

    def blocked_reason(self, address: str | IPAddress) -> str | None:
        """Why ``address`` may not be reached, or None when it may."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return "not an IP address"
        if any(ip.version == n.version and ip in n for n in self.allowed_networks):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(ip)
            if embedded is not None:
                inner = self.blocked_reason(embedded)
                if inner is not None:
                    return f"{inner}, inside an IPv6 address"
                if ip.ipv4_mapped is not None or int(ip) < 2**32:
                    return None  # the same host as its IPv4 form, which is allowed
        if ip.is_unspecified:
            return "unspecified address"
        if ip.is_multicast:
            return "multicast address"
        if ip.is_link_local:
            return "link-local address (cloud metadata server range)"
        if isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved:
            return "reserved address"
        private = (
            ip.is_loopback
            or ip.is_private
            or not ip.is_global
            or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_V4)
        )
        if private:
            if self.allow_private_networks:
                return None
            return "loopback address" if ip.is_loopback else "private or non-global address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.is_reserved:
            return "reserved address"
        return None

    def check_host(self, host: str) -> None:
        """Refuse a URL host that needs no DNS to be judged (IP literals, metadata names).

        Names are judged later, on the addresses they resolve to (see :class:`GuardedResolver`).
        """
        name = host.strip("[]").rstrip(".").lower()
        if not name:
            raise JobError("invalid_image_uri", "the image URL has no host")
        if name in _METADATA_NAMES or name.endswith(".metadata.google.internal"):
            raise JobError("blocked_address", f"{name} is the cloud metadata server")
        try:
            ip: IPAddress | None = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        if ip is None and _LEGACY_NUMERIC.fullmatch(name) and any(c.isdigit() for c in name):
            # 0x7f.1, 017700000001, 127.1: inet_aton reads these as IPv4, so will a resolver.
            try:
                ip = ipaddress.IPv4Address(socket.inet_aton(name))
            except OSError:
                ip = None
        if ip is not None:
            reason = self.blocked_reason(ip)
            if reason is not None:
                raise JobError("blocked_address", f"{name} is a {reason}; refused")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in n for n in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if 1 < int(ip) < 2**32:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


class GuardedResolver(AbstractResolver):
    """Resolves without blocking the loop, and refuses if any answer is not allowed.

    aiohttp connects to exactly the addresses returned here, so the check pins them.
    """

    def __init__(self, guard: AddressGuard, lookup: Lookup | None = None) -> None:
        self.guard = guard
        self._lookup = lookup
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._lookup is not None:
            lookup = self._lookup
        else:
            import asyncio

            lookup = asyncio.get_running_loop().getaddrinfo
        self.lookups += 1
        infos = await lookup(host, port, type=socket.SOCK_STREAM, family=family)
        results: list[ResolveResult] = []
        for fam, _type, proto, _canon, sockaddr in infos:
            address = str(sockaddr[0])
            if fam == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
                address = address.split("%", 1)[0]
            reason = self.guard.blocked_reason(address)
            if reason is not None:
                # One bad answer spoils the name: a host that mixes public and internal
                # addresses is either misconfigured or an attack on the connect order.
                raise BlockedAddressError(host, address, reason)
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=int(sockaddr[1]) or port,
                    family=fam,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise OSError(f"{host} has no addresses")
        return results

    async def close(self) -> None:
        return None


def _blocked_cause(exc: BaseException) -> BlockedAddressError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BlockedAddressError):
            return current
        if isinstance(current, aiohttp.ClientConnectorError) and isinstance(
            current.os_error, BlockedAddressError
        ):
            return current.os_error
        current = current.__cause__ or current.__context__
    return None


def _host_not_found(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror) and cause.errno in (
            socket.EAI_NONAME,
            getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
        ):
            return True
        cause = cause.__cause__
    return False


class ImageFetcher:
    """Process-wide: owns the HTTP sessions used to fetch images (close with ``aclose``)."""

    def __init__(
        self,
        *,
        max_image_bytes: int = 7 * 1024 * 1024,
        allow_http: bool = False,
        allow_private_networks: bool = False,
        allowed_networks: Iterable[str] = (),
        fetch_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        max_redirects: int = 3,
        fetch_attempts: int = 3,
        ssl_context: ssl.SSLContext | None = None,
        gcs_tokens: TokenProvider | None = None,
        storage_host: str | None = None,
        lookup: Lookup | None = None,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 2.0,
    ) -> None:
        self.max_image_bytes = max_image_bytes
        self.allow_http = allow_http
        self.guard = AddressGuard(
            allow_private_networks=allow_private_networks, allowed_networks=allowed_networks
        )
        self.fetch_timeout_s = fetch_timeout_s
        self.max_redirects = max_redirects
        self.fetch_attempts = fetch_attempts
        self.ssl_context = ssl_context
        self.gcs_tokens = gcs_tokens
        if storage_host is None:
            self.storage_base, self.storage_is_emulator = storage_endpoint()
        else:
            self.storage_base, self.storage_is_emulator = storage_endpoint(
                {"STORAGE_EMULATOR_HOST": storage_host}
            )
        self.resolver = GuardedResolver(self.guard, lookup)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self.retry = RetryPolicy(
            attempts=fetch_attempts,
            deadline_s=None,  # each attempt has its own deadline (fetch_timeout_s)
            initial_backoff_s=backoff_initial_s,
            max_backoff_s=backoff_max_s,
            rate_limited_counts=True,
        )
        self._web: aiohttp.ClientSession | None = None
        self._storage: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: ImageSettings, *, gcs_tokens: TokenProvider | None
    ) -> ImageFetcher:
        """From an ``ImageSettings`` section."""
        context = ssl.create_default_context(cafile=settings.ca_bundle or None)
        return cls(
            max_image_bytes=settings.max_image_bytes,
            allow_http=settings.allow_http,
            allow_private_networks=settings.allow_private_networks,
            fetch_timeout_s=settings.fetch_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            max_redirects=settings.max_redirects,
            fetch_attempts=settings.fetch_attempts,
            ssl_context=context,
            gcs_tokens=gcs_tokens,
        )

    # -- sessions ------------------------------------------------------------------------

    def _web_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise JobError("fetch_failed", "the worker is shutting down")
        if self._web is None:
            connector = aiohttp.TCPConnector(
                resolver=self.resolver,
                # Every connection resolves (and so is checked) afresh.
                use_dns_cache=False,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                limit=64,
            )
            # trust_env=False: a proxy from the environment would connect for us to
            # addresses we never checked.
            self._web = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                trust_env=False,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
            )
        return self._web

    def _storage_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise JobError("fetch_failed", "the worker is shutting down")
        if self._storage is None:
            self._storage = aiohttp.ClientSession(
                timeout=self._timeout,
                auto_decompress=False,
                headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
            )
        return self._storage

    async def aclose(self) -> None:
        self._closed = True
        for session in (self._web, self._storage):
            if session is not None:
                await session.close()
        self._web = self._storage = None

    # -- public --------------------------------------------------------------------------

    async def fetch_url(self, url: str) -> bytes:
        """The body of an ``https://`` (or allowed ``http://``) URL from a job."""
        try:
            start = URL(url)
        except (ValueError, TypeError):
            raise JobError("invalid_image_uri", "the image URL cannot be parsed") from None
        self._check_target(start, redirected=False)
        return await self._with_retries(lambda: self._fetch_web_once(start), display_url(start))

    async def fetch_gcs(self, bucket: str, name: str) -> bytes:
        """An object's bytes through the Cloud Storage JSON API (or its emulator)."""
        return await self._with_retries(
            lambda: self._fetch_storage_once(
                self._object_url(bucket, name, media=True), bucket, name
            ),
            f"gs://{bucket}/{name}",
        )

    async def gcs_identity(self, bucket: str, name: str) -> str:
        """What the object is, not where: its generation and checksum, from one metadata
        GET. An object overwritten in place gets a new generation, hence a new identity."""
        raw = await self._with_retries(
            lambda: self._fetch_storage_once(
                self._object_url(bucket, name, media=False), bucket, name
            ),
            f"gs://{bucket}/{name}",
        )
        try:
            meta = json.loads(raw)
        except ValueError:
            raise JobError("fetch_failed", f"gs://{bucket}/{name}: unreadable metadata") from None
        if not isinstance(meta, dict):
            raise JobError("fetch_failed", f"gs://{bucket}/{name}: unreadable metadata")
        checksum = meta.get("crc32c") or meta.get("md5Hash") or meta.get("etag") or ""
        return f"gs://{bucket}/{name}#{meta.get('generation', '')}:{checksum}"

    def _object_url(self, bucket: str, name: str, *, media: bool) -> URL:
        path = f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        # encoded=True: keep %2F in object names, and let no ".." segment be normalised away.
        return URL(self.storage_base + path + ("?alt=media" if media else ""), encoded=True)

    # -- internals -----------------------------------------------------------------------

    async def _with_retries(self, attempt: Callable[[], Awaitable[bytes]], what: str) -> bytes:
        async def bounded() -> bytes:
            try:
                with anyio.fail_after(self.fetch_timeout_s):
                    return await attempt()
            except TimeoutError:
                raise FetchError(
                    0,
                    "timeout",
                    f"no complete answer within {self.fetch_timeout_s:g} s",
                    kind="transient",
                ) from None

        try:
            return await retry_call(bounded, self.retry)
        except ServiceError as exc:
            n = self.fetch_attempts
            raise JobError(
                "fetch_failed",
                f"{what}: {_reason(exc)} (gave up after {n} attempt{'s' if n != 1 else ''})",
            ) from None

    def _check_target(self, url: URL, *, redirected: bool) -> None:
        scheme = (url.scheme or "").lower()
        hop = "redirected to " if redirected else ""
        if scheme == "http" and not self.allow_http:
            raise JobError(
                "unsupported_scheme",
                f"{hop}plain http:// is refused; use https:// (or allow_http)",
            )
        if scheme not in ("http", "https"):
            raise JobError("unsupported_scheme", f"{hop}scheme {scheme!r} cannot be fetched")
        if url.user is not None or url.password is not None:
            raise JobError("invalid_image_uri", "image URLs may not carry user:password@")
        self.guard.check_host(url.raw_host or "")

    async def _fetch_web_once(self, start: URL) -> bytes:
        session = self._web_session()
        current = start
        for hop in range(self.max_redirects + 1):
            if hop:
                self._check_target(current, redirected=True)
            try:
                async with session.get(current, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        location = resp.headers.get("Location", "")
                        if not location:
                            raise JobError(
                                "fetch_failed",
                                f"{display_url(current)}: HTTP {resp.status} without Location",
                            )
                        try:
                            current = current.join(URL(location)).with_fragment(None)
                        except (ValueError, TypeError):
                            raise JobError(
                                "fetch_failed",
                                f"{display_url(current)}: unparsable redirect Location",
                            ) from None
                        continue
                    _check_status(resp, display_url(current), FetchError)
                    return await self._read_capped(resp, display_url(current))
            except (JobError, ServiceError):
                raise
            except Exception as exc:
                raise self._translate(exc, display_url(current)) from None
        raise JobError(
            "fetch_failed",
            f"{display_url(start)}: more than {self.max_redirects} redirects; refused",
        )

    async def _fetch_storage_once(self, target: URL, bucket: str, name: str) -> bytes:
        session = self._storage_session()
        what = f"gs://{bucket}/{name}"
        headers: dict[str, str] = {}
        token = ""
        # Google's clients send no credentials to an emulator; neither do we. A token is
        # sent only when the provider is Google's (never a third-party API key).
        if not self.storage_is_emulator and self.gcs_tokens is not None:
            token = await self.gcs_tokens.token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
        try:
            async with session.get(target, headers=headers, allow_redirects=False) as resp:
                if resp.status == 401 and token and self.gcs_tokens is not None:
                    await self.gcs_tokens.refresh_after_rejection(token)
                    raise StorageError(401, "UNAUTHENTICATED", "", kind="unauthorized")
                if resp.status == 404:
                    raise JobError("fetch_failed", f"{what}: no such object (HTTP 404)")
                if resp.status in (401, 403):
                    raise JobError(
                        "fetch_failed",
                        f"{what}: access denied (HTTP {resp.status}); the worker's "
                        "credentials need storage.objects.get on the bucket",
                    )
                _check_status(resp, what, StorageError)
                return await self._read_capped(resp, what)
        except (JobError, ServiceError):
            raise
        except Exception as exc:
            raise self._translate(exc, what) from None

    async def _read_capped(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        cap = self.max_image_bytes
        declared = resp.content_length
        if declared is not None and declared > cap:
            resp.close()
            raise JobError(
                "image_too_large", f"{what} is {declared} bytes; the limit is {cap} bytes"
            )
        body = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > cap:
                # Drop the connection rather than drain a body we will never use.
                resp.close()
                raise JobError("image_too_large", f"{what} is larger than the limit of {cap} bytes")
        return bytes(body)

    def _translate(self, exc: BaseException, what: str) -> BaseException:
        blocked = _blocked_cause(exc)
        if blocked is not None:
            return JobError(
                "blocked_address",
                f"{blocked.host} resolves to {blocked.address}, a {blocked.reason}; refused",
            )
        if _host_not_found(exc):
            return JobError("fetch_failed", f"{what}: host not found")
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
            return JobError("fetch_failed", f"{what}: TLS failed ({type(exc).__name__})")
        if isinstance(exc, aiohttp.InvalidURL):
            return JobError("invalid_image_uri", f"{what}: not a valid URL")
        if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
            return FetchError(0, "connection_error", type(exc).__name__, kind="transient")
        # Anything else is still this one URL's failure, not the worker's.
        log.warning("fetch_unexpected_error", extra={"error_type": type(exc).__name__})
        return JobError("fetch_failed", f"{what}: {type(exc).__name__}")


def _check_status(
    resp: aiohttp.ClientResponse, what: str, error: type[FetchError] | type[StorageError]
) -> None:
    """Raise for anything but 200: a retryable service error for 408, 425, 429 and 5xx
    (with the answer's Retry-After), else the job's ``fetch_failed``."""
    status = resp.status
    if status == 200:
        return
    kind = kind_for_status(status)
    if kind in ("transient", "rate_limited"):
        raise error(status, "", "", kind=kind, retry_after_s=retry_after_s(resp.headers))
    raise JobError("fetch_failed", f"{what}: answered HTTP {status}")


def _reason(exc: ServiceError) -> str:
    """The last failure, as a fetch_failed message ends it (no URL, no secret)."""
    if exc.status:
        return f"HTTP {exc.status}"
    return exc.message or exc.code
