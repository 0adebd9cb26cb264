"""A cheap, in-process imitation of Vertex AI's OpenAI-compatible chat completions endpoint.

The simulator is an aiohttp server used by the test-suite, the local demo and the load
tests.  It answers ``POST /v1/chat/completions`` (and the Vertex-style
``/v1/projects/{project}/locations/{location}/endpoints/openapi/chat/completions`` path)
with OpenAI ``ChatCompletion`` objects whose text is derived deterministically from the
image, and it can inject the failure modes a real deployment shows: latency, rate limits
(429 ``RESOURCE_EXHAUSTED``), concurrency limits, 5xx errors, connection resets and
expired OAuth tokens.

It is built to be cheap per request because it shares the machine with the worker under
test during benchmarks: Pillow only runs for ``data:`` URLs, and decoded descriptions are
cached by a hash of the URL string.  Each feature below is off until configured or asked for
by a request, and then costs a couple of header and dict look-ups per request at most.

**Rate-limit headers** (``ratelimit_headers``).  With a token bucket (``rate_limit_rps``),
every chat answer, 200, 429 or error, carries OpenAI's ``x-ratelimit-limit-requests`` (the
rate per minute), ``x-ratelimit-remaining-requests`` (whole tokens left) and
``x-ratelimit-reset-requests`` (time until the bucket is full, in Go's format as OpenAI sends
it: ``20ms``, ``1.5s``, ``6m0s``).  They describe the standard bucket of the port that
answers, whichever tier served the request.  ``rate_initial`` starts buckets below full;
``retry_after_exact`` makes a bucket's 429 say in ``retry-after-ms`` when its next token is
due, instead of the fixed ``retry_after_s``.

**Regions** (``regions``).  Each :class:`RegionConfig` listens on a loopback port of its own
(``Simulator.region_base_url(name)``, a Vertex-shaped URL whose location is the region's
name) with its own token bucket, latency, tier buckets and counters; errors, resets, auth and
the recorded requests are shared with the main port, which stays the default region and
works as before.  ``stop_region`` makes a region dead: its port is closed (connections are
refused) and its open connections are reset; ``start_region`` brings it back on the same
port.  On the main port, ``POST /control/regions/{name}/down`` and ``/up`` do the same, and
``GET /stats`` holds each region's counters under ``regions``.

**Consumption tiers**, from Vertex's request headers (names and values case-insensitive):

* ``X-Vertex-AI-LLM-Shared-Request-Type: flex``: Flex PayGo, on the global endpoint only (a
  region named ``global``, or ``locations/global`` in the path), else 400 INVALID_ARGUMENT.
  Latency times ``flex_latency_factor``; its own bucket ``flex_rate_limit_rps`` (None:
  unlimited).
* ``X-Vertex-AI-LLM-Shared-Request-Type: priority``: Priority PayGo, served like standard
  but counted apart, from its own bucket ``priority_rate_limit_rps`` if set, else from the
  standard one.
* Provisioned Throughput (``provisioned_rps``, per region): without
  ``X-Vertex-AI-LLM-Request-Type`` PT serves first and spills over to pay-as-you-go (the
  standard bucket, or the flex or priority one the other header asks for); ``dedicated``
  means PT only, 429 RESOURCE_EXHAUSTED once it is spent, as Vertex documents; ``shared``
  bypasses PT.  ``dedicated`` when the project has no PT at all is not documented by Vertex:
  the simulator answers 400 FAILED_PRECONDITION (the google.rpc status for a request that
  cannot succeed until the system's state changes, here until PT is bought), so a client
  sees a permanent error, not a 429 it would retry for ever.
* Other header values get 400 INVALID_ARGUMENT naming the header.  ``SimStats.by_tier``
  counts answers by the tier that served them, ``by_header`` the header values seen.

**Structured output.**  A ``response_format`` of type ``json_schema`` is answered with JSON
built from the schema (the keywords honoured are listed on ``_SchemaFiller``): text-like
properties (``description``, ``caption``, ``summary``, ...) hold the image description,
others short deterministic values.  ``json_object`` is answered ``{"description": ...}``.
``schema_mismatch_rate`` breaks that share of json_schema answers on purpose (a required
property dropped, or one of the wrong type), deterministically under ``seed``.  A malformed
``response_format``, or a schema the simulator cannot honour, gets 400 INVALID_ARGUMENT.

**Generation settings.**  ``temperature`` (0 to 2), ``top_p`` (above 0, at most 1), ``seed``
(an integer), ``stop`` (a string or a list of up to 4) and ``max_tokens`` /
``max_completion_tokens`` are validated, with 400 INVALID_ARGUMENT naming the field; the
answer is cut before the first stop string.  ``SimStats.settings_seen`` counts them as
``name=value`` with the value in compact JSON (``temperature=0.2``, ``stop=["."]``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import colorsys
import contextlib
import hashlib
import io
import json
import math
import random
import re
import socket
import struct
import sys
import time
import uuid
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

__all__ = [
    "RegionConfig",
    "SimConfig",
    "SimStats",
    "Simulator",
    "add_simulator_arguments",
    "serve_simulator",
    "sim_config_from_args",
]

_LATENCY_DISTS: Final = ("fixed", "lognormal")
_ALLOWED_SCHEMES: Final = ("gs://", "https://", "http://", "data:")
_DECODABLE_MIMES: Final = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
)
_UNDECODED_MIMES: Final = frozenset({"image/heic", "image/heif"})
_PILLOW_FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF")
_TOKENS_PER_IMAGE: Final = 258
_IMAGE_CACHE_SIZE: Final = 4096
# data: URLs longer than this are decoded in a worker thread so the event loop stays live.
_INLINE_DECODE_LIMIT: Final = 256 * 1024
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024
_TOKEN_PRUNE_THRESHOLD: Final = 1024
_TOKEN_PRUNE_AGE_S: Final = 3600.0

_MSG_429: Final = (
    "Resource exhausted. Please try again later. Please refer to "
    "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details."
)
_MSG_401: Final = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_MSG_500: Final = "Internal error encountered."
_MSG_503: Final = "The service is currently unavailable."
_MSG_FLEX_GLOBAL: Final = (
    "Flex PayGo (X-Vertex-AI-LLM-Shared-Request-Type: flex) is only available on the global "
    "endpoint (locations/global); it does not support regional or multi-regional endpoints."
)
_MSG_NO_PT: Final = (
    "X-Vertex-AI-LLM-Request-Type: dedicated asks to be served by Provisioned Throughput "
    "only, but the project has no Provisioned Throughput for this model in this location."
)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _error_body(code: int, status: str, message: str) -> bytes:
    """Vertex wraps errors from the OpenAI-compatible endpoint in a JSON list."""
    return _dumps([{"error": {"code": code, "message": message, "status": status}}])


_BODY_429: Final = _error_body(429, "RESOURCE_EXHAUSTED", _MSG_429)
_BODY_401: Final = _error_body(401, "UNAUTHENTICATED", _MSG_401)
_BODY_500: Final = _error_body(500, "INTERNAL", _MSG_500)
_BODY_503: Final = _error_body(503, "UNAVAILABLE", _MSG_503)
_JSON: Final = "application/json"

# Vertex AI's consumption-tier request headers (names are case-insensitive).
_H_SHARED: Final = "X-Vertex-AI-LLM-Shared-Request-Type"  # flex | priority
_H_REQUEST: Final = "X-Vertex-AI-LLM-Request-Type"  # dedicated | shared
_SHARED_TYPES: Final = ("flex", "priority")
_REQUEST_TYPES: Final = ("dedicated", "shared")
_STANDARD: Final = "standard"
_PRIORITY: Final = "priority"
_FLEX: Final = "flex"
_PROVISIONED: Final = "provisioned"


def _json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def _bad_request(message: str) -> web.Response:
    return _json_response(400, _error_body(400, "INVALID_ARGUMENT", message))


# --------------------------------------------------------------------------- config


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_REGION_NAME: Final = re.compile(r"[a-z][a-z0-9-]{0,62}")


@dataclass
class RegionConfig:
    """One extra region of a :class:`Simulator`: its own port, token bucket and latency.

    Re-read by every request, like :class:`SimConfig` (``name`` and ``port`` only at start).
    """

    name: str  # the Vertex location it stands for, e.g. "europe-west4" or "global"
    rate_limit_rps: float | None = None  # None: unlimited
    latency_ms: float | None = None  # None: the main config's
    rate_burst: float | None = None  # None: max(1, rate)
    port: int = 0  # 0: a free port, kept across stop_region/start_region

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _REGION_NAME.fullmatch(self.name):
            raise ValueError(
                "RegionConfig.name must be a location name such as 'europe-west4' "
                f"(lower-case letters, digits and '-'), got {self.name!r}"
            )
        for name in ("rate_limit_rps", "latency_ms"):
            value = getattr(self, name)
            if value is not None and (
                not _is_number(value) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"RegionConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.rate_limit_rps is not None and self.rate_limit_rps <= 0:
            raise ValueError("RegionConfig.rate_limit_rps must be > 0 (None means unlimited)")
        if self.rate_burst is not None and (
            not _is_number(self.rate_burst)
            or not math.isfinite(self.rate_burst)
            or self.rate_burst < 1
        ):
            raise ValueError(
                f"RegionConfig.rate_burst must be a number >= 1, got {self.rate_burst!r}"
            )
        if (
            not isinstance(self.port, int)
            or isinstance(self.port, bool)
            or not 0 <= self.port <= 65535
        ):
            raise ValueError(f"RegionConfig.port must be within [0, 65535], got {self.port!r}")


def _parse_regions(spec: str) -> tuple[RegionConfig, ...]:
    """``us-central1:100,europe-west4:50:300``: NAME:RATE_RPS[:LATENCY_MS]; RATE 0 = unlimited."""
    regions: list[RegionConfig] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (2, 3):
            raise ValueError(f"region {item!r} must look like NAME:RATE_RPS[:LATENCY_MS]")
        try:
            rate = float(fields[1])
            latency = float(fields[2]) if len(fields) == 3 else None
        except ValueError:
            raise ValueError(f"region {item!r}: RATE_RPS and LATENCY_MS must be numbers") from None
        regions.append(
            RegionConfig(fields[0].strip(), rate_limit_rps=rate or None, latency_ms=latency)
        )
    return tuple(regions)


@dataclass
class SimConfig:
    """Behaviour of a :class:`Simulator`.  Mutable at runtime: every request re-reads it."""

    latency_ms: float = 0.0
    latency_dist: str = "fixed"
    latency_sigma: float = 0.5
    rate_limit_rps: float | None = None
    rate_burst: float | None = None
    #: Tokens in each port's standard bucket when it is first used (None: full), e.g. to
    #: start a minute-deep bucket nearly empty.
    rate_initial: float | None = None
    retry_after_s: float | None = None
    #: A 429 from a token bucket says exactly when the next token is due (``retry-after-ms``)
    #: instead of the fixed ``retry_after_s``.
    retry_after_exact: bool = False
    #: Every chat answer carries OpenAI's ``x-ratelimit-*-requests`` headers (needs
    #: ``rate_limit_rps``).
    ratelimit_headers: bool = False
    max_concurrency: int | None = None
    error_rate: float = 0.0
    reset_rate: float = 0.0
    require_token: bool = False
    static_token: str | None = None
    seed: int | None = None
    record_requests: int = 0
    #: Extra regions, each on its own port (fixed when the Simulator is created).
    regions: tuple[RegionConfig, ...] = ()
    #: Flex PayGo answers take this many times the latency.
    flex_latency_factor: float = 3.0
    #: Flex PayGo's own token bucket, per region (None: unlimited).
    flex_rate_limit_rps: float | None = None
    #: Priority PayGo's own token bucket, per region (None: it draws from the standard one).
    priority_rate_limit_rps: float | None = None
    #: Provisioned Throughput in requests per second, per region (None: the project has none).
    provisioned_rps: float | None = None
    #: Share of structured (json_schema) answers that deliberately do not match the schema.
    schema_mismatch_rate: float = 0.0

    def __post_init__(self) -> None:
        def finite_non_negative(name: str, value: object) -> None:
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"SimConfig.{name} must be a finite number >= 0, got {value!r}")

        finite_non_negative("latency_ms", self.latency_ms)
        if self.latency_dist not in _LATENCY_DISTS:
            raise ValueError(
                f"SimConfig.latency_dist must be one of {', '.join(_LATENCY_DISTS)}, "
                f"got {self.latency_dist!r}"
            )
        finite_non_negative("latency_sigma", self.latency_sigma)
        if self.rate_limit_rps is not None:
            finite_non_negative("rate_limit_rps", self.rate_limit_rps)
        if self.rate_burst is not None and (
            not _is_number(self.rate_burst)
            or not math.isfinite(self.rate_burst)
            or self.rate_burst < 1
        ):
            raise ValueError(f"SimConfig.rate_burst must be a number >= 1, got {self.rate_burst!r}")
        if self.rate_initial is not None:
            finite_non_negative("rate_initial", self.rate_initial)
        if self.retry_after_s is not None:
            finite_non_negative("retry_after_s", self.retry_after_s)
        for name in ("retry_after_exact", "ratelimit_headers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SimConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_concurrency is not None and (
            not isinstance(self.max_concurrency, int)
            or isinstance(self.max_concurrency, bool)
            or self.max_concurrency < 1
        ):
            raise ValueError(
                f"SimConfig.max_concurrency must be an integer >= 1, got {self.max_concurrency!r}"
            )
        for name in ("error_rate", "reset_rate", "schema_mismatch_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"SimConfig.{name} must be within [0, 1], got {value!r}")
        if self.static_token is not None and (
            not isinstance(self.static_token, str) or not self.static_token
        ):
            raise ValueError("SimConfig.static_token must be a non-empty string when given")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"SimConfig.seed must be an integer, got {self.seed!r}")
        if (
            not isinstance(self.record_requests, int)
            or isinstance(self.record_requests, bool)
            or self.record_requests < 0
        ):
            raise ValueError(
                f"SimConfig.record_requests must be an integer >= 0, got {self.record_requests!r}"
            )
        finite_non_negative("flex_latency_factor", self.flex_latency_factor)
        for name in ("flex_rate_limit_rps", "priority_rate_limit_rps"):
            if getattr(self, name) is not None:
                finite_non_negative(name, getattr(self, name))
        if self.provisioned_rps is not None:
            finite_non_negative("provisioned_rps", self.provisioned_rps)
            if self.provisioned_rps <= 0:
                raise ValueError("SimConfig.provisioned_rps must be > 0 (None: no PT)")
        if not isinstance(self.regions, tuple | list) or not all(
            isinstance(region, RegionConfig) for region in self.regions
        ):
            raise ValueError("SimConfig.regions must be a sequence of RegionConfig")
        self.regions = tuple(self.regions)
        names = [region.name for region in self.regions]
        if len(set(names)) != len(names):
            raise ValueError(f"SimConfig.regions has duplicate names: {', '.join(names)}")


@dataclass
class SimStats:
    """A snapshot of the simulator's counters."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)  # resets are counted under 0
    in_flight: int = 0
    in_flight_max: int = 0
    unique_images: int = 0  # distinct image_url strings answered with 200
    expired_token_401: int = 0  # known token, but expired
    missing_token_401: int = 0  # no ``Authorization: Bearer <token>`` header
    invalid_token_401: int = 0  # a bearer token that was never accepted (or was revoked)
    #: Answers (200) by the tier that served them: standard, priority, flex, provisioned.
    by_tier: dict[str, int] = field(default_factory=dict)
    #: Requests seen per tier header value, e.g. ``shared-request-type=flex``.
    by_header: dict[str, int] = field(default_factory=dict)
    structured: int = 0  # answers to response_format json_schema requests
    schema_mismatches_sent: int = 0  # of which deliberately did not match the schema
    #: Generation settings received in valid requests, as ``name=value`` with the value in
    #: compact JSON: ``temperature=0.2``, ``max_tokens=50``, ``stop=["."]``.
    settings_seen: dict[str, int] = field(default_factory=dict)
    #: Each extra region's own counters (the fields above are the main port's).
    regions: dict[str, SimStats] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; ``by_status`` keys become strings (as they must in JSON)."""
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
            "in_flight_max": self.in_flight_max,
            "unique_images": self.unique_images,
            "expired_token_401": self.expired_token_401,
            "missing_token_401": self.missing_token_401,
            "invalid_token_401": self.invalid_token_401,
            "by_tier": dict(sorted(self.by_tier.items())),
            "by_header": dict(sorted(self.by_header.items())),
            "structured": self.structured,
            "schema_mismatches_sent": self.schema_mismatches_sent,
            "settings_seen": dict(sorted(self.settings_seen.items())),
            "regions": {name: stats.to_json() for name, stats in sorted(self.regions.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimStats:
        """Inverse of :meth:`to_json` (e.g. for ``GET /stats`` answers)."""
        return cls(
            requests=int(data.get("requests", 0)),
            by_status={int(k): int(v) for k, v in dict(data.get("by_status", {})).items()},
            in_flight=int(data.get("in_flight", 0)),
            in_flight_max=int(data.get("in_flight_max", 0)),
            unique_images=int(data.get("unique_images", 0)),
            expired_token_401=int(data.get("expired_token_401", 0)),
            missing_token_401=int(data.get("missing_token_401", 0)),
            invalid_token_401=int(data.get("invalid_token_401", 0)),
            by_tier={str(k): int(v) for k, v in dict(data.get("by_tier", {})).items()},
            by_header={str(k): int(v) for k, v in dict(data.get("by_header", {})).items()},
            structured=int(data.get("structured", 0)),
            schema_mismatches_sent=int(data.get("schema_mismatches_sent", 0)),
            settings_seen={str(k): int(v) for k, v in dict(data.get("settings_seen", {})).items()},
            regions={
                str(name): cls.from_json(dict(stats))
                for name, stats in dict(data.get("regions", {})).items()
            },
        )


class _Headers(dict[str, str]):
    """A plain dict of header values keyed by lower-case name, looked up case-insensitively."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass
class RecordedRequest:
    """One request as seen by the simulator (kept when ``record_requests > 0``)."""

    path: str
    body: Any  # the parsed JSON body, or None when it was not valid JSON
    headers: dict[str, str]  # lower-case names; Authorization value replaced by "<redacted>"
    authorized: bool


# --------------------------------------------------------------------------- images


_COLOUR_HUES: Final = (
    (15.0, "red"),
    (45.0, "orange"),
    (70.0, "yellow"),
    (165.0, "green"),
    (195.0, "cyan"),
    (255.0, "blue"),
    (290.0, "purple"),
    (335.0, "magenta"),
    (360.0, "red"),
)


def _colour_name(rgb: tuple[int, int, int]) -> str:
    r, g, b = (c / 255.0 for c in rgb)
    hue, sat, val = colorsys.rgb_to_hsv(r, g, b)
    if val < 0.18:
        return "black"
    if sat < 0.18:
        if val > 0.88:
            return "white"
        return "grey"
    degrees = hue * 360.0
    for limit, name in _COLOUR_HUES:
        if degrees < limit:
            if name == "orange" and val < 0.6:
                return "brown"
            return name
    return "red"


def _describe_pixels(data: bytes, mime: str) -> tuple[bool, str]:
    """Decode image bytes with Pillow; return (ok, description-or-error-message)."""
    from PIL import Image  # imported lazily: only data: URLs need Pillow

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS) as img:
                fmt = str(img.format)
                width, height = img.size
                img.draft("RGB", (64, 64))  # cheap JPEG downscale on decode; no-op otherwise
                small = img.convert("RGB").resize((16, 16), Image.Resampling.NEAREST)
    except Exception as exc:
        return False, (
            f"Provided image is not valid: could not decode {mime} data as "
            f"PNG/JPEG/WEBP/GIF ({type(exc).__name__})."
        )
    counts: Counter[tuple[int, int, int]] = Counter()
    for count, colour in small.getcolors(16 * 16) or ():
        if isinstance(colour, tuple):
            counts[(int(colour[0]), int(colour[1]), int(colour[2]))] += count
    rgb = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else (0, 0, 0)
    hex_colour = "#{:02x}{:02x}{:02x}".format(*rgb)
    return True, f"A {width}x{height} {fmt} image, mostly {_colour_name(rgb)} ({hex_colour})."


def _parse_data_url(url: str) -> tuple[str, str, bytes | None]:
    """Split ``data:<mime>;base64,<payload>``; return (error, mime, decoded bytes)."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        return "Provided image is not valid: data URL has no ',' separator.", "", None
    params = header.split(";")
    mime = params[0].strip().lower()
    if len(params) < 2 or params[-1].strip().lower() != "base64":
        return (
            "Provided image is not valid: data URL must have the form "
            "data:<mime>;base64,<payload>.",
            mime,
            None,
        )
    if mime not in _DECODABLE_MIMES and mime not in _UNDECODED_MIMES:
        return (
            f"Provided image is not valid: unsupported MIME type {mime!r} "
            "(expected image/png, image/jpeg, image/webp, image/gif, image/heic or image/heif).",
            mime,
            None,
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return "Provided image is not valid: the data URL payload is not valid base64.", mime, None
    if not data:
        return "Provided image is not valid: the data URL payload is empty.", mime, None
    return "", mime, data


def _describe_data_url(url: str) -> tuple[bool, str]:
    error, mime, data = _parse_data_url(url)
    if data is None:
        return False, error
    if mime in _UNDECODED_MIMES:
        kind = "HEIF" if mime == "image/heif" else "HEIC"
        ref = hashlib.blake2b(data, digest_size=3).hexdigest()
        return True, f"A {kind} image of {len(data)} bytes (ref {ref})."
    return _describe_pixels(data, mime)


def _describe_uri(url: str, ref: str) -> str:
    rest = url.split("://", 1)[-1]
    rest = rest.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    name = rest.rsplit("/", 1)[-1] or "image"
    return f"A simulated description of {name} (ref {ref})."


# --------------------------------------------------------------------------- structured output


class _SchemaError(ValueError):
    """The schema cannot be honoured: unsupported, contradictory or without a finite instance."""


_NOTHING: Final = object()
_SCHEMA_MAX_DEPTH: Final = 48
# Below this depth, optional properties and array items beyond minItems are left out and
# nullable types become null, so recursive schemas end.
_SCHEMA_SHALLOW: Final = 6
_SCHEMA_MAX_ITEMS: Final = 10_000  # minItems / minProperties beyond this are refused
_SCHEMA_MAX_LENGTH: Final = 100_000  # and minLength beyond this
# Values built per answer (a string counts one per 100 characters): nested minItems must not
# make the simulator build millions of values.
_SCHEMA_BUDGET: Final = 100_000
_DESCRIPTIVE_KEYS: Final = (
    "description", "caption", "summary", "alt", "text", "content", "narrative", "explanation",
)  # fmt: skip
_TITLE_KEYS: Final = ("title", "name", "headline", "subject")
_TAG_KEYS: Final = ("tag", "keyword", "label", "object", "topic", "categor", "colour", "color")
_SCORE_KEYS: Final = ("confidence", "score", "probability", "certainty")
_STOP_WORDS: Final = frozenset({"a", "an", "the", "of", "and", "image", "mostly", "ref", "with"})
_FORMAT_SAMPLES: Final = {
    "date-time": "2024-05-01T12:00:00Z",
    "date": "2024-05-01",
    "time": "12:00:00Z",
    "email": "sim@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "duration": "PT1S",
}
_TYPE_SAMPLES: Final[tuple[tuple[str, Any], ...]] = (
    ("string", "mismatch"),
    ("integer", 12345),
    ("boolean", True),
    ("null", None),
    ("array", []),
    ("object", {}),
)


def _schema_types(schema: dict[str, Any]) -> list[str]:
    """The schema's ``type`` as a list; inferred from its keywords when absent."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list) and declared and all(isinstance(t, str) for t in declared):
        return list(declared)
    if declared is not None:
        raise _SchemaError(f"'type' must be a string or a list of strings, got {declared!r}")
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return ["object"]
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return ["array"]
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return ["number"]
    return ["string"]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality (in Python ``True == 1``; in JSON Schema they differ)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _size(schema: dict[str, Any], key: str, limit: int) -> int | None:
    """A length keyword (minItems, maxLength, ...) as an int; None when absent."""
    value = schema.get(key)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise _SchemaError(f"'{key}' must be a number >= 0, got {value!r}")
    if key.startswith("min") and value > limit:
        raise _SchemaError(f"{key} {value} is more than the simulator builds")
    return int(math.ceil(value) if key.startswith("min") else math.floor(value))


def _merge_schemas(a: Any, b: Any) -> Any:
    """Both ``a`` and ``b`` (an ``allOf`` of two), as one schema, as far as generation needs."""
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise _SchemaError("a false schema has no instance")
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = _merge_schemas(props[name], sub) if name in props else sub
            out[key] = props
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = [*out[key], *(name for name in value if name not in out[key])]
        elif key == "type":
            mine, theirs = _schema_types(out), _schema_types(b)
            both = [t for t in mine if t in theirs]
            if ("integer" in mine and "number" in theirs) or (
                "number" in mine and "integer" in theirs
            ):
                both.append("integer")
            if not both:
                raise _SchemaError(f"allOf branches have no type in common ({mine} and {theirs})")
            out[key] = list(dict.fromkeys(both))
        elif key == "enum" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = [v for v in out[key] if any(_same_json(v, w) for w in value)]
        elif not (_is_number(value) and _is_number(out[key])):
            pass  # keep a's; the builder reports it if it is not a number
        elif key in ("minimum", "minLength", "minItems", "minProperties"):
            out[key] = max(out[key], value)
        elif key in ("maximum", "maxLength", "maxItems", "maxProperties"):
            out[key] = min(out[key], value)
        elif key == "additionalProperties" and value is False:
            out[key] = False
    return out


class _SchemaFiller:
    """Builds an instance of a JSON Schema, with the image description where text is wanted.

    Supports the subset structured output uses: ``type`` (and lists of types), ``properties``,
    ``required``, ``additionalProperties``, ``enum``, ``const``, string lengths and common
    formats, numeric bounds, integer ``multipleOf``, array ``items``/``prefixItems`` and
    lengths, ``anyOf``/``oneOf`` (the first branch), ``allOf`` (merged) and local ``$ref``.
    ``pattern`` and ``uniqueItems`` are not enforced.
    """

    def __init__(self, root: dict[str, Any], description: str) -> None:
        self.root = root
        self.description = description
        self.budget = _SCHEMA_BUDGET
        self.ref = hashlib.blake2b(description.encode(), digest_size=3).hexdigest()
        words = [w.strip(".,;:()#").lower() for w in description.split()]
        self.words = [w for w in words if w.isalpha() and w not in _STOP_WORDS] or ["image"]

    # ---------------------------------------------------------------- schema shapes

    def _deref(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _SchemaError(
                f"unsupported $ref {ref!r}: only local references such as '#/$defs/Name' "
                "or '#/definitions/Name' are supported"
            )
        node: Any = self.root
        for raw in ref[1:].split("/")[1:]:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _SchemaError(f"$ref {ref!r} does not resolve")
        return node

    def normalize(self, schema: Any) -> Any:
        """Resolve ``$ref`` and fold ``allOf``/``anyOf``/``oneOf`` into one schema."""
        for _ in range(_SCHEMA_MAX_DEPTH):
            if not isinstance(schema, dict):
                if isinstance(schema, bool):
                    return schema
                raise _SchemaError(f"a schema must be an object or a boolean, got {schema!r}")
            if "$ref" in schema:
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = _merge_schemas(self._deref(schema["$ref"]), rest)
                continue
            if "allOf" in schema:
                parts = schema["allOf"]
                if not isinstance(parts, list):
                    raise _SchemaError("'allOf' must be a list of schemas")
                merged: Any = {k: v for k, v in schema.items() if k != "allOf"}
                for part in parts:
                    merged = _merge_schemas(merged, self.normalize(part))
                schema = merged
                continue
            for key in ("anyOf", "oneOf"):
                if key in schema:
                    branches = schema[key]
                    if not isinstance(branches, list) or not branches:
                        raise _SchemaError(f"'{key}' must be a non-empty list of schemas")
                    rest = {k: v for k, v in schema.items() if k != key}
                    schema = _merge_schemas(rest, self.normalize(branches[0]))
                    break
            else:
                return schema
        raise _SchemaError("$ref/allOf/anyOf nest too deeply")

    # ---------------------------------------------------------------- instances

    def build(self, schema: Any, key: str = "", depth: int = 0, index: int = 0) -> Any:
        if depth > _SCHEMA_MAX_DEPTH:
            raise _SchemaError("the schema nests too deeply (a required recursive $ref?)")
        self.budget -= 1
        if self.budget < 0:
            raise _SchemaError("the smallest instance is larger than the simulator builds")
        schema = self.normalize(schema)
        if schema is False:
            raise _SchemaError("a false schema has no instance")
        if schema is True:
            schema = {}
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            choices = schema["enum"]
            if not isinstance(choices, list) or not choices:
                raise _SchemaError("'enum' must be a non-empty list")
            return choices[index % len(choices)]
        types = _schema_types(schema)
        real = [t for t in types if t != "null"]
        if not real or ("null" in types and depth >= _SCHEMA_SHALLOW):
            return None
        kind = real[0]
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, key, depth)
        if kind == "string":
            return self._string(schema, key, index)
        if kind in ("number", "integer"):
            return self._number(schema, key, index, kind == "integer")
        if kind == "boolean":
            return True
        raise _SchemaError(f"unknown type {kind!r}")

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(props, dict) or not isinstance(required, list):
            raise _SchemaError("'properties' must be an object and 'required' a list")
        extra = schema.get("additionalProperties", True)
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if depth < _SCHEMA_SHALLOW or name in required:
                out[name] = self.build(sub, name, depth + 1)
        for name in required:
            if isinstance(name, str) and name not in out:
                if extra is False:
                    raise _SchemaError(f"{name!r} is required but not allowed")
                out[name] = self.build(extra, name, depth + 1)
        wanted = _size(schema, "minProperties", _SCHEMA_MAX_ITEMS) or 0
        while len(out) < wanted and extra is not False:
            name = f"extra_{len(out)}"
            out[name] = self.build(extra, name, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], key: str, depth: int) -> list[Any]:
        items = schema.get("items", True)
        prefix = schema.get("prefixItems")
        if prefix is None and isinstance(items, list):  # draft 4 tuples
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix if isinstance(prefix, list) else []
        low = _size(schema, "minItems", _SCHEMA_MAX_ITEMS) or 0
        high = _size(schema, "maxItems", _SCHEMA_MAX_ITEMS)
        count = len(prefix) or (2 if any(t in key.lower() for t in _TAG_KEYS) else 1)
        if depth >= _SCHEMA_SHALLOW:
            count = 0
        count = max(low, count)
        if high is not None:
            if high < low:
                raise _SchemaError(f"minItems {low} > maxItems {high}")
            count = min(count, high)
        if count > len(prefix) and items is False:
            if low > len(prefix):
                raise _SchemaError("more items are required than 'prefixItems' allows")
            count = len(prefix)
        return [
            self.build(prefix[i] if i < len(prefix) else items, key, depth + 1, i)
            for i in range(count)
        ]

    def _string(self, schema: dict[str, Any], key: str, index: int) -> str:
        fmt = schema.get("format")
        fmt = fmt if isinstance(fmt, str) else None
        lowered = key.lower()
        slug = re.sub(r"[^a-z0-9]+", "-", lowered).strip("-") or "value"
        low = _size(schema, "minLength", _SCHEMA_MAX_LENGTH) or 0
        high = _size(schema, "maxLength", _SCHEMA_MAX_LENGTH)
        if high is not None and high < low:
            raise _SchemaError(f"minLength {low} > maxLength {high}")
        formatted: tuple[str, ...] = ()
        if fmt == "date-time":  # longer and longer spellings of the same instant
            formatted = (
                "2024-05-01T12:00:00Z",
                "2024-05-01T12:00:00.000Z",
                "2024-05-01T12:00:00.000000Z",
                "2024-05-01T12:00:00.000000+00:00",
            )
        elif fmt in _FORMAT_SAMPLES:
            formatted = (_FORMAT_SAMPLES[fmt],)
        elif fmt in ("uri", "url", "iri", "uri-reference", "iri-reference"):
            uri = f"https://example.com/{slug}/{self.ref}"
            padded = "http://a.io/" + "x" * max(0, low - 12)
            formatted = (uri, "https://example.com", "http://a.io", padded)
        elif fmt == "uuid":
            digest = hashlib.blake2b(f"{self.ref}/{key}/{index}".encode(), digest_size=16)
            formatted = (str(uuid.UUID(bytes=digest.digest())),)
        if formatted:  # padding or cutting would break the format
            for text in formatted:
                if len(text) >= low and (high is None or len(text) <= high):
                    return text
            raise _SchemaError(f"no {fmt} string fits minLength {low} and maxLength {high}")
        if any(k in lowered for k in _DESCRIPTIVE_KEYS):
            text = self.description
        elif any(k in lowered for k in _TITLE_KEYS):
            text = " ".join(self.description.split()[:6]).rstrip(".,;:")
        elif any(k in lowered for k in _TAG_KEYS):
            text = self.words[index % len(self.words)]
        else:
            text = f"{slug}-{self.ref}" + (f"-{index + 1}" if index else "")
        self.budget -= low // 100
        if self.budget < 0:
            raise _SchemaError("the smallest instance is larger than the simulator builds")
        while len(text) < low:
            text = f"{text} {text}"
        if high is not None and len(text) > high:
            cut = text[:high]
            # Prefer a whole word when that still leaves minLength.
            word_cut = cut.rsplit(" ", 1)[0].rstrip(".,;:") if " " in cut else cut
            text = word_cut if len(word_cut) >= low else cut
        if len(text) < low:
            text = text.ljust(low, "x")
        return text

    def _number(self, schema: dict[str, Any], key: str, index: int, integer: bool) -> int | float:
        for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            bound = schema.get(name)
            if bound is None or (bound is True and name.startswith("exclusive")):
                continue
            if bound is False and name.startswith("exclusive"):
                continue
            if not _is_number(bound) or not math.isfinite(bound):
                raise _SchemaError(f"'{name}' must be a finite number, got {bound!r}")
        low, high = schema.get("minimum"), schema.get("maximum")
        low_ex = high_ex = False
        ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if ex_low is True:  # draft 4: a flag on minimum
            low_ex = low is not None
        elif _is_number(ex_low) and (low is None or ex_low >= low):
            low, low_ex = ex_low, True
        if ex_high is True:
            high_ex = high is not None
        elif _is_number(ex_high) and (high is None or ex_high <= high):
            high, high_ex = ex_high, True
        step = schema.get("multipleOf")
        if step is not None and step <= 0:
            raise _SchemaError("'multipleOf' must be a number > 0")
        lowered = key.lower()
        if integer:
            lo = None if low is None else (math.floor(low) + 1 if low_ex else math.ceil(low))
            hi = None if high is None else (math.ceil(high) - 1 if high_ex else math.floor(high))
            value = 1 + index
            if lo is not None:
                value = max(value, lo)
            if hi is not None:
                value = min(value, hi)
            if step is not None:
                value = self._multiple(value, step, lo, hi)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise _SchemaError(f"no integer within the bounds of {key or 'a value'!r}")
            return value
        target = 0.9 if any(k in lowered for k in _SCORE_KEYS) else 1.5 + index
        if step is not None:
            target = step * max(1, math.ceil(target / step))
        if low is not None and (target < low or (low_ex and target <= low)):
            target = low if not low_ex else (low + high) / 2 if high is not None else low + 1
        if high is not None and (target > high or (high_ex and target >= high)):
            target = high if not high_ex else (low + high) / 2 if low is not None else high - 1
        if (low is not None and (target < low or (low_ex and target <= low))) or (
            high is not None and (target > high or (high_ex and target >= high))
        ):
            raise _SchemaError(f"no number within the bounds of {key or 'a value'!r}")
        return target

    @staticmethod
    def _multiple(value: int, step: float, lo: int | None, hi: int | None) -> int:
        """An integer multiple of ``step`` near ``value`` within [lo, hi]."""
        if float(step).is_integer():
            size = int(step)
            up = -(-value // size) * size
            if hi is None or up <= hi:
                return up
            down = (hi // size) * size
            if lo is None or down >= lo:
                return down
            raise _SchemaError(f"no multiple of {step} within [{lo}, {hi}]")
        for candidate in range(value, value + 10_000):  # e.g. multipleOf 0.25: 1, 2, ...
            if hi is not None and candidate > hi:
                break
            if (candidate / step).is_integer():
                return candidate
        raise _SchemaError(f"no integer multiple of {step} found")

    # ---------------------------------------------------------------- mismatches

    def wrong_value(self, schema: Any) -> Any:
        """A value that certainly does not match ``schema``, or ``_NOTHING``."""
        try:
            if isinstance(schema, dict) and "$ref" in schema and len(schema) == 1:
                schema = self._deref(schema["$ref"])
        except _SchemaError:
            return _NOTHING
        if not isinstance(schema, dict) or any(k in schema for k in ("anyOf", "oneOf", "allOf")):
            return _NOTHING  # whether a value misses every branch is not worth working out
        if "const" in schema or "enum" in schema:
            choices = schema.get("enum")
            allowed = [schema["const"]] if "const" in schema else choices
            if not isinstance(allowed, list):
                return _NOTHING
            for _, sample in _TYPE_SAMPLES:
                if not any(_same_json(sample, a) for a in allowed):
                    return sample
            return _NOTHING
        if "type" not in schema:
            return _NOTHING
        types = _schema_types(schema)
        for kind, sample in _TYPE_SAMPLES:
            if kind not in types and not (kind == "integer" and "number" in types):
                return sample
        return _NOTHING

    def _offers_choice(self, schema: Any, depth: int = 0) -> bool:
        """Whether anyOf/oneOf shape this level: breaking the branch built proves nothing."""
        if depth > _SCHEMA_MAX_DEPTH or not isinstance(schema, dict):
            return False
        if "anyOf" in schema or "oneOf" in schema:
            return True
        if "$ref" in schema:
            try:
                if self._offers_choice(self._deref(schema["$ref"]), depth + 1):
                    return True
            except _SchemaError:
                return False
        parts = schema.get("allOf")
        return isinstance(parts, list) and any(self._offers_choice(p, depth + 1) for p in parts)

    def mismatch(self, schema: Any, value: Any, rng: random.Random) -> Any:
        """``value`` changed so it does not match ``schema``: a required property dropped or
        one of the wrong type; ``_NOTHING`` when no sure way is found."""
        if self._offers_choice(schema):
            return _NOTHING
        if isinstance(value, dict):
            shape = self.normalize(schema)
            shape = shape if isinstance(shape, dict) else {}
            props = shape.get("properties")
            props = props if isinstance(props, dict) else {}
            required = shape.get("required")
            required = (
                [n for n in required if isinstance(n, str) and n in value]
                if isinstance(required, list)
                else []
            )
            typed = [
                (name, wrong)
                for name in value
                if (wrong := self.wrong_value(props.get(name))) is not _NOTHING
            ]
            broken = dict(value)
            kinds = [k for k, ok in (("drop", required), ("type", typed)) if ok]
            if kinds and rng.choice(kinds) == "drop":
                del broken[rng.choice(required)]
            elif typed:
                name, wrong = rng.choice(typed)
                broken[name] = wrong
            elif (
                shape.get("additionalProperties") is False
                and "unexpected" not in props
                and "patternProperties" not in shape
            ):
                broken["unexpected"] = True
            else:
                return _NOTHING
            return broken
        return self.wrong_value(schema)


# --------------------------------------------------------------------------- request parsing


@dataclass(slots=True)
class _ParsedRequest:
    model: str
    image_urls: list[str]
    prompt_words: int
    max_tokens: int | None
    response_format: str | None = None  # "json_object" or "json_schema"; None: text
    schema: dict[str, Any] | None = None  # response_format.json_schema.schema
    stop: tuple[str, ...] = ()
    #: Generation settings as received, keyed for SimStats.settings_seen: (name, type, value).
    settings: tuple[tuple[str, type, Any], ...] = ()


_RESPONSE_FORMATS: Final = ("text", "json_object", "json_schema")


def _parse_response_format(value: Any) -> tuple[str | None, dict[str, Any] | None]:
    """Validate ``response_format``; return (kind, schema) with kind None for plain text."""
    if not isinstance(value, dict):
        raise ValueError(
            "'response_format' must be an object such as {'type': 'json_schema', "
            "'json_schema': {'name': ..., 'schema': {...}}}."
        )
    kind = value.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise ValueError(
            f"'response_format.type' must be one of {', '.join(_RESPONSE_FORMATS)}, got {kind!r}."
        )
    if kind != "json_schema":
        return (None if kind == "text" else kind), None
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError(
            "'response_format.json_schema' must be an object whose 'schema' is a JSON Schema "
            "object."
        )
    if "name" in spec and not isinstance(spec["name"], str):
        raise ValueError("'response_format.json_schema.name' must be a string.")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ValueError("'response_format.json_schema.strict' must be a boolean.")
    return kind, spec["schema"]


def _image_url_of(part: dict[str, Any], where: str) -> str:
    raw = part.get("image_url")
    if isinstance(raw, dict):
        raw = raw.get("url")
    if not isinstance(raw, str) or not raw:
        raise ValueError(
            f"{where}.image_url must be a URL string or an object with a non-empty string 'url'."
        )
    if not raw.startswith(_ALLOWED_SCHEMES):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise ValueError(
            f"{where}.image_url has an unsupported URL {shown!r}: "
            "expected a gs://, https://, http:// or data: URL."
        )
    return raw


_SETTINGS: Final = ("temperature", "top_p", "seed", "stop")
_MAX_STOP_STRINGS: Final = 4


def _check_setting(key: str, value: Any) -> tuple[str, ...]:
    """Validate one generation setting; return the stop strings when ``key`` is 'stop'."""
    if key == "temperature":
        if not _is_number(value) or not 0.0 <= value <= 2.0:
            raise ValueError(f"'temperature' must be a number between 0 and 2, got {value!r}.")
    elif key == "top_p":
        if not _is_number(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"'top_p' must be a number greater than 0 and at most 1, got {value!r}."
            )
    elif key == "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"'seed' must be an integer, got {value!r}.")
    elif key == "stop":
        strings = [value] if isinstance(value, str) else value
        if (
            not isinstance(strings, list)
            or not 1 <= len(strings) <= _MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in strings)
        ):
            raise ValueError(
                "'stop' must be a non-empty string or a list of 1 to "
                f"{_MAX_STOP_STRINGS} non-empty strings, got {value!r}."
            )
        return tuple(strings)
    return ()


def _parse_body(body: Any) -> _ParsedRequest:
    """Validate a chat completions request body; raise ValueError with the problem."""
    if not isinstance(body, dict):
        raise ValueError("Invalid JSON payload received: the request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("'model' is required and must be a non-empty string.")
    if body.get("stream"):
        raise ValueError("'stream': true is not supported by the simulator.")
    max_tokens: int | None = None
    settings: list[tuple[str, type, Any]] = []
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"'{key}' must be a positive integer, got {value!r}.")
        max_tokens = value if max_tokens is None else min(max_tokens, value)
        settings.append((key, int, value))
    stop: tuple[str, ...] = ()
    for key in _SETTINGS:
        value = body.get(key)
        if value is not None:
            stop = _check_setting(key, value) or stop
            hashable = tuple(value) if isinstance(value, list) else value
            settings.append((key, type(value), hashable))
    response_format: str | None = None
    schema: dict[str, Any] | None = None
    if body.get("response_format") is not None:
        response_format, schema = _parse_response_format(body["response_format"])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is required and must be a non-empty list.")

    image_urls: list[str] = []
    prompt_words = 0
    has_user_text_and_image = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object.")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}.role must be a non-empty string.")
        content = message.get("content")
        if isinstance(content, str):
            prompt_words += len(content.split())
            continue
        if content is None and role != "user":
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}.content must be a string or a list of content parts.")
        texts = images = 0
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"{pwhere} must be an object with a string 'type'.")
            kind = part["type"]
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{pwhere}.text must be a string.")
                prompt_words += len(text.split())
                texts += 1
            elif kind == "image_url":
                if role != "user":
                    raise ValueError(f"{pwhere}: image parts are only allowed in user messages.")
                image_urls.append(_image_url_of(part, pwhere))
                images += 1
        if role == "user" and texts and images:
            has_user_text_and_image = True
    if not has_user_text_and_image:
        raise ValueError(
            "A message with role 'user' whose content list has at least one "
            "{'type': 'text'} part and one {'type': 'image_url'} part is required."
        )
    return _ParsedRequest(
        model,
        image_urls,
        prompt_words,
        max_tokens,
        response_format,
        schema,
        stop,
        tuple(settings),
    )


# --------------------------------------------------------------------------- the server


def _go_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers show it (Go's format, to the ms).

    ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3.5s``; rounded up, so a client that waits
    this long finds the bucket full.
    """
    ms = max(0, math.ceil(seconds * 1000.0 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # wildcard binds are reached via loopback
        return "127.0.0.1"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _abort_transport(transport: asyncio.Transport) -> None:
    """Close a connection abruptly: SO_LINGER 0 makes the kernel send RST, not FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Bucket:
    """A token bucket's state; the rate and size are passed in, so config edits apply at once."""

    __slots__ = ("tokens", "ts")

    def __init__(self) -> None:
        self.tokens: float | None = None  # None: full (or ``initial``) on next use
        self.ts = 0.0

    def level(self, rate: float, burst: float, initial: float | None, now: float) -> float:
        """The tokens in the bucket at ``now`` (``time.monotonic()``), refilled since last use."""
        if self.tokens is None:
            return burst if initial is None else min(burst, initial)
        return min(burst, self.tokens + (now - self.ts) * rate)

    def take(self, rate: float, burst: float, initial: float | None = None) -> bool:
        now = time.monotonic()
        tokens = self.level(rate, burst, initial, now)
        self.ts = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


_SETTINGS_SEEN_LIMIT: Final = 1000


class _Overflow:
    """The type in settings_seen keys of values beyond _SETTINGS_SEEN_LIMIT: ``name=<other>``."""


class _Region:
    """One listening port with its own buckets and counters (the main port is one too)."""

    def __init__(self, config: RegionConfig | None = None) -> None:
        self.config = config  # None: the main port, configured by SimConfig itself
        self.name = config.name if config is not None else None
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None  # None while stopped
        self.port: int | None = (config.port or None) if config is not None else None
        self.bucket = _Bucket()  # standard pay-as-you-go
        self.flex_bucket = _Bucket()
        self.priority_bucket = _Bucket()
        self.pt_bucket = _Bucket()  # Provisioned Throughput
        self.reset()

    def reset(self) -> None:
        """Zero the counters (requests still in flight stay counted in ``in_flight``)."""
        in_flight = getattr(self, "in_flight", 0)
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.in_flight = in_flight
        self.in_flight_max = in_flight
        self.unique_images: set[bytes] = set()
        self.expired_401 = 0
        self.missing_401 = 0
        self.invalid_401 = 0
        self.by_tier: Counter[str] = Counter()
        self.by_header: Counter[str] = Counter()
        self.structured = 0
        self.schema_mismatches = 0
        # Keyed by (name, type, value) and formatted only by snapshot(): the hot path only
        # hashes.  The type keeps 1 and 1.0 apart (equal, and equally hashed, in Python).
        self.settings_seen: Counter[tuple[str, type, Any]] = Counter()

    def count_settings(self, settings: tuple[tuple[str, type, Any], ...]) -> None:
        seen = self.settings_seen
        for key in settings:
            if key not in seen and len(seen) >= _SETTINGS_SEEN_LIMIT:  # e.g. a seed per request
                key = (key[0], _Overflow, None)
            seen[key] += 1

    def settings_json(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (name, kind, value), count in self.settings_seen.items():
            if kind is _Overflow:
                shown = "<other>"
            else:
                shown = _dumps(list(value) if isinstance(value, tuple) else value).decode()
            out[f"{name}={shown}"] += count
        return dict(out)

    def snapshot(self, regions: dict[str, SimStats] | None = None) -> SimStats:
        return SimStats(
            requests=self.requests,
            by_status=dict(self.by_status),
            in_flight=self.in_flight,
            in_flight_max=self.in_flight_max,
            unique_images=len(self.unique_images),
            expired_token_401=self.expired_401,
            missing_token_401=self.missing_401,
            invalid_token_401=self.invalid_401,
            by_tier=dict(self.by_tier),
            by_header=dict(self.by_header),
            structured=self.structured,
            schema_mismatches_sent=self.schema_mismatches,
            settings_seen=self.settings_json(),
            regions=regions if regions is not None else {},
        )


_REGION_KEY: Final = web.AppKey("region", _Region)


class Simulator:
    """An aiohttp server imitating Vertex AI's OpenAI-compatible chat completions API."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config: SimConfig = config if config is not None else SimConfig()
        self.requests: deque[RecordedRequest] = deque(maxlen=self.config.record_requests)
        self._rng = random.Random(self.config.seed)
        self._host = "127.0.0.1"
        self._bind_host = "127.0.0.1"
        self._tokens: dict[str, float] = {}
        self._image_cache: dict[bytes, tuple[bool, str]] = {}
        self._completion_id = 0
        self._error_flip = 0
        self._main = _Region()
        self._regions = {region.name: _Region(region) for region in self.config.regions}

    # ---------------------------------------------------------------- lifecycle

    def _make_app(self, region: _Region) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app[_REGION_KEY] = region
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post(
            "/v1/projects/{project}/locations/{location}/endpoints/openapi/chat/completions",
            self._handle_chat,
        )
        app.router.add_get("/healthz", self._handle_healthz)
        if region is self._main:
            app.router.add_get("/stats", self._handle_stats)
            app.router.add_post("/stats/reset", self._handle_stats_reset)
            app.router.add_post(
                "/control/regions/{name}/{action:down|up}", self._handle_region_control
            )
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start serving; ``port=0`` picks a free port (see :attr:`port`).

        Each region of ``config.regions`` gets a port of its own on the same host.
        """
        main = self._main
        if main.runner is not None:
            raise RuntimeError("Simulator is already started")
        self._bind_host = host
        self._host = _url_host(host)
        try:
            for region in (main, *self._regions.values()):
                # A region's connections are aborted when it goes down; cancelling their
                # handlers then keeps its counters (in_flight, 499s) true.
                region.runner = web.AppRunner(
                    self._make_app(region),
                    access_log=None,
                    handle_signals=False,
                    shutdown_timeout=1.0,
                    handler_cancellation=region is not main,
                )
                await region.runner.setup()
                await self._listen(region, port if region is main else region.port or 0)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, region: _Region, port: int) -> None:
        assert region.runner is not None
        site = web.TCPSite(region.runner, self._bind_host, port)
        await site.start()
        addresses = region.runner.addresses
        region.port = int(addresses[0][1]) if addresses else port
        region.site = site

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        for region in (self._main, *self._regions.values()):
            runner, region.runner, region.site = region.runner, None, None
            if runner is not None:
                await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._main.port is None:
            raise RuntimeError("Simulator is not started")
        return self._main.port

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` without a path (for /stats and /healthz)."""
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    def vertex_base_url(self, project: str = "sim-project", location: str = "us-central1") -> str:
        """The Vertex-style base URL ending in ``/endpoints/openapi``."""
        return f"{self.base_url}/projects/{project}/locations/{location}/endpoints/openapi"

    # ---------------------------------------------------------------- regions

    @property
    def region_names(self) -> tuple[str, ...]:
        """The names of ``config.regions``, in order."""
        return tuple(self._regions)

    def _region(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise KeyError(f"no region named {name!r} (regions: {', '.join(self._regions)})")
        return region

    def region_port(self, name: str) -> int:
        """The port of region ``name`` (the same while it is down)."""
        port = self._region(name).port
        if port is None or self._main.runner is None:
            raise RuntimeError("Simulator is not started")
        return port

    def region_base_url(self, name: str, project: str = "sim-project") -> str:
        """The Vertex-style base URL of region ``name``: its port, its name as the location."""
        return (
            f"http://{self._host}:{self.region_port(name)}/v1/projects/{project}"
            f"/locations/{name}/endpoints/openapi"
        )

    def region_up(self, name: str) -> bool:
        """Whether region ``name`` is listening."""
        return self._region(name).site is not None

    def region_stats(self, name: str) -> SimStats:
        """Region ``name``'s own counters."""
        return self._region(name).snapshot()

    async def stop_region(self, name: str) -> None:
        """Take region ``name`` down like a dead region: close its port, reset its connections.

        New connections are refused; open ones (idle keep-alive ones and those with a request
        in flight, counted as 499) are aborted with a TCP RST.  Idempotent.
        """
        region = self._region(name)
        site, region.site = region.site, None
        if site is None:
            return
        await site.stop()  # closes the listening socket at once
        server = region.runner.server if region.runner is not None else None
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                _abort_transport(handler.transport)

    async def start_region(self, name: str) -> None:
        """Bring region ``name`` back up on the same port.  Idempotent."""
        region = self._region(name)
        self.region_port(name)  # raises unless started
        if region.site is None:
            await self._listen(region, region.port or 0)

    # ---------------------------------------------------------------- tokens & stats

    def accept_token(self, token: str, expires_at: float) -> None:
        """Accept ``token`` until ``expires_at`` (``time.time()`` epoch seconds)."""
        if len(self._tokens) >= _TOKEN_PRUNE_THRESHOLD:
            horizon = time.time() - _TOKEN_PRUNE_AGE_S
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > horizon}
        self._tokens[token] = float(expires_at)

    def revoke_token(self, token: str) -> None:
        self._tokens.pop(token, None)

    def stats(self) -> SimStats:
        """The main port's counters, with each region's under ``regions``."""
        return self._main.snapshot({name: r.snapshot() for name, r in self._regions.items()})

    def reset_stats(self) -> None:
        """Zero the counters (requests still in flight stay counted in ``in_flight``)."""
        for region in (self._main, *self._regions.values()):
            region.reset()

    # ---------------------------------------------------------------- helpers

    def _check_auth(self, request: web.Request, cfg: SimConfig, region: _Region) -> bool:
        """True when authorised; counts the reason otherwise."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            region.missing_401 += 1
            return False
        if cfg.static_token is not None and token == cfg.static_token:
            return True
        expires_at = self._tokens.get(token)
        if expires_at is None:
            region.invalid_401 += 1
            return False
        if time.time() >= expires_at:
            region.expired_401 += 1
            return False
        return True

    @staticmethod
    def _std_limit(cfg: SimConfig, region: _Region) -> tuple[float, float] | None:
        """(rate, burst) of the port's standard bucket, or None when unlimited."""
        rc = region.config
        if rc is None:
            rate, burst = cfg.rate_limit_rps, cfg.rate_burst
        else:
            rate, burst = rc.rate_limit_rps, rc.rate_burst
        if rate is None:
            return None
        return rate, burst if burst is not None else max(1.0, rate)

    def _take_rate_token(self, cfg: SimConfig, region: _Region) -> bool:
        limit = self._std_limit(cfg, region)
        if limit is None:
            region.bucket.tokens = None  # full (or rate_initial) again when a limit is set later
            return True
        return region.bucket.take(limit[0], limit[1], cfg.rate_initial)

    def _ratelimit_headers(
        self, response: web.StreamResponse, cfg: SimConfig, region: _Region
    ) -> None:
        """OpenAI's request-count headers, describing the port's standard bucket right now."""
        limit = self._std_limit(cfg, region)
        if limit is None:
            return
        rate, burst = limit
        level = region.bucket.level(rate, burst, cfg.rate_initial, time.monotonic())
        headers = response.headers
        headers["x-ratelimit-limit-requests"] = str(round(rate * 60))
        # The epsilon keeps a bucket refilled to exactly n tokens from showing n - 1.
        headers["x-ratelimit-remaining-requests"] = str(math.floor(level + 1e-9))
        if rate > 0:
            headers["x-ratelimit-reset-requests"] = _go_duration((burst - level) / rate)

    def _limited(self, cfg: SimConfig, *empty: tuple[_Bucket, float, float]) -> web.Response:
        """A 429 for empty buckets, given as (bucket, rate, burst)."""
        headers = self._retry_headers(cfg)
        if cfg.retry_after_exact:
            now = time.monotonic()
            waits = [
                (1.0 - bucket.level(rate, burst, None, now)) / rate
                for bucket, rate, burst in empty
                if rate > 0
            ]
            if waits:
                # Rounded up: a client that waits this long finds a token.
                ms = max(1, math.ceil(min(waits) * 1000.0))
                headers = {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}
        return _json_response(429, _BODY_429, headers)

    @staticmethod
    def _tier_headers(
        request: web.Request, region: _Region, cfg: SimConfig, shared: str | None, kind: str | None
    ) -> tuple[str, str] | web.Response:
        """Validate Vertex's tier headers; (shared-request-type, request-type), "" if absent."""
        if shared is not None:
            shared = shared.strip().lower()
            region.by_header[f"shared-request-type={shared[:32]}"] += 1
        if kind is not None:
            kind = kind.strip().lower()
            region.by_header[f"request-type={kind[:32]}"] += 1
        if shared is not None and shared not in _SHARED_TYPES:
            return _bad_request(
                f"Invalid value {shared[:32]!r} for header {_H_SHARED}: expected flex or priority."
            )
        if kind is not None and kind not in _REQUEST_TYPES:
            return _bad_request(
                f"Invalid value {kind[:32]!r} for header {_H_REQUEST}: expected dedicated or shared."
            )
        if (
            shared == _FLEX
            and region.name != "global"
            and request.match_info.get("location") != "global"
        ):
            return _bad_request(_MSG_FLEX_GLOBAL)
        if kind == "dedicated" and cfg.provisioned_rps is None:
            return _json_response(400, _error_body(400, "FAILED_PRECONDITION", _MSG_NO_PT))
        return shared or "", kind or ""

    def _take_quota(
        self, cfg: SimConfig, region: _Region, shared: str, kind: str
    ) -> str | web.Response:
        """Take a token for a tiered request: the tier that serves it, or a 429."""
        empty: list[tuple[_Bucket, float, float]] = []
        pt_rate = cfg.provisioned_rps
        if pt_rate is not None and kind != "shared":  # PT first, unless bypassed
            pt_burst = max(1.0, pt_rate)
            if region.pt_bucket.take(pt_rate, pt_burst):
                return _PROVISIONED
            empty.append((region.pt_bucket, pt_rate, pt_burst))
            if kind == "dedicated":  # no spill-over to pay-as-you-go
                return self._limited(cfg, *empty)
        if shared == _FLEX:
            tier, bucket, rate = _FLEX, region.flex_bucket, cfg.flex_rate_limit_rps
            burst = max(1.0, rate) if rate is not None else 1.0
        elif shared == _PRIORITY and cfg.priority_rate_limit_rps is not None:
            rate = cfg.priority_rate_limit_rps
            tier, bucket, burst = _PRIORITY, region.priority_bucket, max(1.0, rate)
        else:  # standard, and priority without a bucket of its own
            if self._take_rate_token(cfg, region):
                return _PRIORITY if shared == _PRIORITY else _STANDARD
            rate, burst = self._std_limit(cfg, region) or (0.0, 1.0)
            return self._limited(cfg, *empty, (region.bucket, rate, burst))
        if rate is None or bucket.take(rate, burst):
            return tier
        return self._limited(cfg, *empty, (bucket, rate, burst))

    def _latency_s(self, cfg: SimConfig, mean_ms: float | None = None) -> float:
        if mean_ms is None:
            mean_ms = cfg.latency_ms
        if mean_ms <= 0:
            return 0.0
        if cfg.latency_dist == "lognormal" and cfg.latency_sigma > 0:
            sigma = cfg.latency_sigma
            mu = math.log(mean_ms) - sigma * sigma / 2.0
            return self._rng.lognormvariate(mu, sigma) / 1000.0
        return mean_ms / 1000.0

    def _record(self, request: web.Request, body: Any, cfg: SimConfig, authorized: bool) -> None:
        if self.requests.maxlen != cfg.record_requests:
            self.requests = deque(self.requests, maxlen=cfg.record_requests)
        headers = _Headers()
        for name, value in request.headers.items():
            lower = name.lower()
            headers[lower] = "<redacted>" if lower == "authorization" else value
        self.requests.append(RecordedRequest(request.path, body, headers, authorized))

    async def _describe_image(self, url: str, key: bytes) -> tuple[bool, str]:
        if not url.startswith("data:"):
            return True, _describe_uri(url, key.hex()[:6])
        cached = self._image_cache.get(key)
        if cached is not None:
            return cached
        if len(url) > _INLINE_DECODE_LIMIT:
            result = await asyncio.to_thread(_describe_data_url, url)
        else:
            result = _describe_data_url(url)
        while len(self._image_cache) >= _IMAGE_CACHE_SIZE:  # evict the oldest entries
            del self._image_cache[next(iter(self._image_cache))]
        self._image_cache[key] = result
        return result

    def _retry_headers(self, cfg: SimConfig) -> dict[str, str] | None:
        if cfg.retry_after_s is None:
            return None
        return {
            "Retry-After": str(math.ceil(cfg.retry_after_s)),
            "retry-after-ms": str(round(cfg.retry_after_s * 1000)),
        }

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Close the connection abruptly (RST) without writing a response."""
        if request.transport is not None:
            _abort_transport(request.transport)

    # ---------------------------------------------------------------- handlers

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        region = request.app[_REGION_KEY]
        region.requests += 1
        region.in_flight += 1
        if region.in_flight > region.in_flight_max:
            region.in_flight_max = region.in_flight
        status = 500
        try:
            response = await self._answer_chat(request, cfg, region)
            if response is None:
                status = 0
                # The transport is already aborted: aiohttp's attempt to write this is
                # treated as a client disconnect and dropped quietly.
                return web.Response(status=204)
            status = response.status
            if cfg.ratelimit_headers:
                self._ratelimit_headers(response, cfg, region)
            return response
        except asyncio.CancelledError:
            status = 499  # server shut down mid-request
            raise
        finally:
            region.in_flight -= 1
            region.by_status[status] += 1

    async def _answer_chat(
        self, request: web.Request, cfg: SimConfig, region: _Region
    ) -> web.Response | None:
        # 2. authentication
        authorized = True if not cfg.require_token else self._check_auth(request, cfg, region)
        body: Any = None
        body_read = False
        if cfg.record_requests > 0:
            body, body_read = await self._read_json(request), True
            self._record(request, body, cfg, authorized)
        if not authorized:
            return _json_response(401, _BODY_401)

        # 3. connection resets
        if cfg.reset_rate > 0 and self._rng.random() < cfg.reset_rate:
            self._abort(request)
            return None

        # 4. consumption tier headers, concurrency and quotas, answered at once
        headers = request.headers
        shared, kind = headers.get(_H_SHARED), headers.get(_H_REQUEST)
        tiered: tuple[str, str] | web.Response | None = None
        if shared is not None or kind is not None:
            tiered = self._tier_headers(request, region, cfg, shared, kind)
            if isinstance(tiered, web.Response):
                return tiered
        if cfg.max_concurrency is not None and region.in_flight > cfg.max_concurrency:
            return _json_response(429, _BODY_429, self._retry_headers(cfg))
        tier = _STANDARD
        if tiered is None and cfg.provisioned_rps is None:  # plain standard pay-as-you-go
            if not self._take_rate_token(cfg, region):
                rate, burst = self._std_limit(cfg, region) or (0.0, 1.0)
                return self._limited(cfg, (region.bucket, rate, burst))
        else:
            taken = self._take_quota(cfg, region, *(tiered or ("", "")))
            if isinstance(taken, web.Response):
                return taken
            tier = taken
        factor = cfg.flex_latency_factor if tier == _FLEX else 1.0

        # 5. injected server errors (after the latency)
        if cfg.error_rate > 0 and self._rng.random() < cfg.error_rate:
            await self._sleep(cfg, region, factor)
            self._error_flip ^= 1
            if self._error_flip:
                return _json_response(500, _BODY_500)
            return _json_response(503, _BODY_503)

        # 6. validation
        if not body_read:
            body = await self._read_json(request)
        if body is None:
            return _bad_request("Invalid JSON payload received: the body is not valid JSON.")
        try:
            parsed = _parse_body(body)
        except ValueError as exc:
            return _bad_request(str(exc))
        if parsed.settings:
            region.count_settings(parsed.settings)
        descriptions: list[str] = []
        keys: list[bytes] = []
        for url in parsed.image_urls:
            key = hashlib.blake2b(url.encode(), digest_size=16).digest()
            ok, text = await self._describe_image(url, key)
            if not ok:
                return _bad_request(text)
            descriptions.append(text)
            keys.append(key)

        answer = " ".join(descriptions)
        mismatched = False
        if parsed.response_format is not None:
            try:
                answer, mismatched = self._structured(parsed, answer, cfg)
            except _SchemaError as exc:
                return _bad_request(f"'response_format.json_schema.schema': {exc}.")

        # 7. latency
        await self._sleep(cfg, region, factor)

        # 8. the completion
        region.unique_images.update(keys)
        region.by_tier[tier] += 1
        if parsed.schema is not None:
            region.structured += 1
            region.schema_mismatches += mismatched
        if parsed.stop:
            # The model stops before the first stop string; finish_reason stays "stop".
            cut = min((i for i in map(answer.find, parsed.stop) if i >= 0), default=-1)
            if cut >= 0:
                answer = answer[:cut]
        words = answer.split()
        finish_reason = "stop"
        if parsed.max_tokens is not None and parsed.max_tokens < len(words):
            words = words[: parsed.max_tokens]
            answer = " ".join(words)
            finish_reason = "length"
        prompt_tokens = parsed.prompt_words + _TOKENS_PER_IMAGE * len(parsed.image_urls)
        self._completion_id += 1
        completion = {
            "id": f"chatcmpl-sim-{self._completion_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            },
        }
        return _json_response(200, _dumps(completion))

    def _structured(self, parsed: _ParsedRequest, text: str, cfg: SimConfig) -> tuple[str, bool]:
        """The JSON answer to a structured request, and whether it deliberately mismatches."""
        if parsed.schema is None:  # json_object
            return json.dumps({"description": text}, ensure_ascii=False), False
        filler = _SchemaFiller(parsed.schema, text)
        value = filler.build(parsed.schema)
        mismatched = False
        if cfg.schema_mismatch_rate > 0 and self._rng.random() < cfg.schema_mismatch_rate:
            broken = filler.mismatch(parsed.schema, value, self._rng)
            if broken is not _NOTHING:
                value, mismatched = broken, True
        return json.dumps(value, ensure_ascii=False), mismatched

    def _delay_s(self, cfg: SimConfig, region: _Region, factor: float) -> float:
        """This answer's latency: the port's own (else the main config's), times ``factor``."""
        rc = region.config
        if rc is None or rc.latency_ms is None:
            return self._latency_s(cfg) * factor
        return self._latency_s(cfg, rc.latency_ms) * factor

    async def _sleep(self, cfg: SimConfig, region: _Region, factor: float = 1.0) -> None:
        delay = self._delay_s(cfg, region, factor)
        if delay > 0:
            await asyncio.sleep(delay)

    @staticmethod
    async def _read_json(request: web.Request) -> Any:
        """The parsed JSON body, or None when it is missing or malformed."""
        try:
            raw = await request.read()
            return json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            return None

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return _json_response(200, _dumps(self.stats().to_json()))

    async def _handle_stats_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return _json_response(200, _dumps(self.stats().to_json()))

    async def _handle_region_control(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._regions:
            return _json_response(
                404, _error_body(404, "NOT_FOUND", f"The simulator has no region {name!r}.")
            )
        if request.match_info["action"] == "down":
            await self.stop_region(name)
        else:
            await self.start_region(name)
        state = {"region": name, "up": self.region_up(name), "base_url": self.region_base_url(name)}
        return _json_response(200, _dumps(state))

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


# --------------------------------------------------------------------------- CLI helpers


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags; every ``dest`` is prefixed ``sim_``."""
    group = parser.add_argument_group("simulator")
    group.add_argument(
        "--latency-ms",
        dest="sim_latency_ms",
        type=float,
        default=0.0,
        help="mean latency added before answering, in milliseconds (default 0)",
    )
    group.add_argument(
        "--latency-dist",
        dest="sim_latency_dist",
        choices=_LATENCY_DISTS,
        default="fixed",
        help="latency distribution (default fixed)",
    )
    group.add_argument(
        "--latency-sigma",
        dest="sim_latency_sigma",
        type=float,
        default=0.5,
        help="shape of the lognormal latency distribution (default 0.5)",
    )
    group.add_argument(
        "--rate-limit-rps",
        dest="sim_rate_limit_rps",
        type=float,
        default=None,
        help="token-bucket rate limit in requests per second; excess requests get 429",
    )
    group.add_argument(
        "--rate-burst",
        dest="sim_rate_burst",
        type=float,
        default=None,
        help="token-bucket size (default max(1, rate))",
    )
    group.add_argument(
        "--rate-initial",
        dest="sim_rate_initial",
        type=float,
        default=None,
        help="tokens in the bucket at start (default: full)",
    )
    group.add_argument(
        "--ratelimit-headers",
        dest="sim_ratelimit_headers",
        action="store_true",
        default=None,
        help="send OpenAI's x-ratelimit-{limit,remaining,reset}-requests headers on every answer",
    )
    group.add_argument(
        "--retry-after-s",
        dest="sim_retry_after_s",
        type=float,
        default=None,
        help="send Retry-After and retry-after-ms headers with 429 answers",
    )
    group.add_argument(
        "--retry-after-exact",
        dest="sim_retry_after_exact",
        action="store_true",
        default=None,
        help="a 429 from the token bucket says when the next token is due (retry-after-ms)",
    )
    group.add_argument(
        "--max-concurrency",
        dest="sim_max_concurrency",
        type=int,
        default=None,
        help="requests in flight above this get 429 RESOURCE_EXHAUSTED",
    )
    group.add_argument(
        "--error-rate",
        dest="sim_error_rate",
        type=float,
        default=0.0,
        help="share of requests answered 500/503 (0..1)",
    )
    group.add_argument(
        "--reset-rate",
        dest="sim_reset_rate",
        type=float,
        default=0.0,
        help="share of requests whose connection is reset without an answer (0..1)",
    )
    group.add_argument(
        "--require-token",
        dest="sim_require_token",
        metavar="TOKEN",
        default=None,
        help="require 'Authorization: Bearer TOKEN'",
    )
    group.add_argument(
        "--regions",
        dest="sim_regions",
        metavar="NAME:RPS[:MS],...",
        default=None,
        help="extra regions, each on its own port with its own token bucket (RPS 0: unlimited) "
        "and latency, e.g. us-central1:100,europe-west4:50:300",
    )
    group.add_argument(
        "--provisioned-rps",
        dest="sim_provisioned_rps",
        type=float,
        default=None,
        help="Provisioned Throughput in requests per second per region (default: none); "
        "used first, spilling over to pay-as-you-go",
    )
    group.add_argument(
        "--flex-rate-limit-rps",
        dest="sim_flex_rate_limit_rps",
        type=float,
        default=None,
        help="token bucket for Flex PayGo requests (default: unlimited)",
    )
    group.add_argument(
        "--priority-rate-limit-rps",
        dest="sim_priority_rate_limit_rps",
        type=float,
        default=None,
        help="token bucket for Priority PayGo requests (default: the standard bucket)",
    )
    group.add_argument(
        "--flex-latency-factor",
        dest="sim_flex_latency_factor",
        type=float,
        default=None,
        help="Flex PayGo answers take this many times the latency (default 3)",
    )
    group.add_argument(
        "--schema-mismatch-rate",
        dest="sim_schema_mismatch_rate",
        type=float,
        default=None,
        help="share of json_schema answers that deliberately do not match the schema (0..1)",
    )
    group.add_argument(
        "--seed",
        dest="sim_seed",
        type=int,
        default=None,
        help="seed for the simulator's random choices",
    )


def sim_config_from_args(ns: argparse.Namespace) -> SimConfig:
    """Build a :class:`SimConfig` from flags added by :func:`add_simulator_arguments`."""

    def arg(name: str, default: Any) -> Any:
        value = getattr(ns, f"sim_{name}", None)
        return default if value is None else value

    token = getattr(ns, "sim_require_token", None)
    regions = getattr(ns, "sim_regions", None)
    return SimConfig(
        latency_ms=arg("latency_ms", 0.0),
        latency_dist=arg("latency_dist", "fixed"),
        latency_sigma=arg("latency_sigma", 0.5),
        rate_limit_rps=getattr(ns, "sim_rate_limit_rps", None),
        rate_burst=getattr(ns, "sim_rate_burst", None),
        rate_initial=getattr(ns, "sim_rate_initial", None),
        retry_after_s=getattr(ns, "sim_retry_after_s", None),
        retry_after_exact=bool(arg("retry_after_exact", False)),
        ratelimit_headers=bool(arg("ratelimit_headers", False)),
        max_concurrency=getattr(ns, "sim_max_concurrency", None),
        error_rate=arg("error_rate", 0.0),
        reset_rate=arg("reset_rate", 0.0),
        require_token=token is not None,
        static_token=token,
        seed=getattr(ns, "sim_seed", None),
        regions=_parse_regions(regions) if isinstance(regions, str) else tuple(regions or ()),
        flex_latency_factor=arg("flex_latency_factor", 3.0),
        flex_rate_limit_rps=getattr(ns, "sim_flex_rate_limit_rps", None),
        priority_rate_limit_rps=getattr(ns, "sim_priority_rate_limit_rps", None),
        provisioned_rps=getattr(ns, "sim_provisioned_rps", None),
        schema_mismatch_rate=arg("schema_mismatch_rate", 0.0),
    )


async def serve_simulator(config: SimConfig, host: str, port: int) -> None:
    """Run a simulator until cancelled, announcing its address on stderr."""
    sim = Simulator(config)
    await sim.start(host, port)
    try:
        print(f"simulator listening on http://{host}:{sim.port}/v1", file=sys.stderr, flush=True)
        for name in sim.region_names:
            print(
                f"simulator region {name} listening on {sim.region_base_url(name)}",
                file=sys.stderr,
                flush=True,
            )
        await asyncio.Event().wait()
    finally:
        await sim.stop()
