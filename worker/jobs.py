"""Jobs and the records written for them.

A job arrives as bytes (a line of a file, a Pub/Sub message's data, a push body) and is
either a JSON object ``{"image_uri": ..., "id": ..., "prompt": ...}`` or a bare URI. A
JSON job may also choose its consumption ``tier``, a named output ``schema`` and its own
generation settings (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``).
Parsing never raises anything but :class:`~worker.errors.JobError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import ErrorType, JobError
from .logs import redact
from .protocols import Answer
from .settings import Tier

__all__ = [
    "MAX_INPUT_ECHO_BYTES",
    "MAX_JOB_BYTES",
    "MAX_URI_BYTES",
    "Job",
    "error_record",
    "fallback_id",
    "parse_job",
    "result_record",
    "rfc3339_now",
]

MAX_JOB_BYTES = 65_536
MAX_URI_BYTES = 2_048
# Dead-letter records echo the raw job so a person can see what was sent, but not all of it.
MAX_INPUT_ECHO_BYTES = 4_096

#: Per-job generation settings, sent as they are in the request body.
GENERATION_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")
_TIERS = ("standard", "priority", "flex")
_JSON_SCALAR = re.compile(r"null|true|false|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(slots=True, frozen=True)
class Job:
    """One parsed job: what to describe, and under which id its record is written."""

    id: str
    image_uri: str
    prompt: str | None
    raw: bytes
    #: The consumption tier asked for (None: the worker's default).
    tier: Tier | None = None
    #: Generation settings for this job only (None: the worker's defaults).
    generation: dict[str, Any] | None = None
    #: The name of a configured output schema (None: the worker's default, if any).
    schema: str | None = None


def _stable_id(*parts: str | bytes) -> str:
    # Reruns must agree on the id of a job that carries none, or resume could not skip it.
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return "h-" + h.hexdigest()[:24]


def fallback_id(raw: bytes, default_id: str | None = None) -> str:
    """The id of a job that could not be parsed: the source's id, else a hash of the bytes."""
    return default_id if default_id else _stable_id(raw)


# One scan in C per job instead of a Python loop per character (this runs for every job).
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
# Lone surrogates ("\ud800" in JSON) are not text: they cannot be encoded as UTF-8.
_SURROGATES = re.compile("[\ud800-\udfff]")


def _has_surrogates(text: str) -> bool:
    return _SURROGATES.search(text) is not None


def _check_uri(uri: str) -> str:
    if not uri:
        raise JobError("invalid_image_uri", "image_uri is empty")
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_URI_BYTES:
        raise JobError("invalid_image_uri", f"image_uri is longer than {MAX_URI_BYTES} bytes")
    if _CONTROL_CHARS.search(uri):
        raise JobError("invalid_image_uri", "image_uri contains control characters")
    if _has_surrogates(uri):
        raise JobError("invalid_image_uri", "image_uri is not valid Unicode (lone surrogate)")
    if uri != uri.strip():
        raise JobError("invalid_image_uri", "image_uri has leading or trailing white space")
    return uri


def parse_job(raw: bytes, *, default_id: str | None = None) -> Job:
    """Parse one job. ``default_id`` (e.g. a Pub/Sub messageId) wins over the hash fallback."""
    if len(raw) > MAX_JOB_BYTES:
        raise JobError("job_too_large", f"job is {len(raw)} bytes; the limit is {MAX_JOB_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError("invalid_job", f"job is not UTF-8 text (byte {exc.start})") from None
    text = text.removeprefix("\ufeff").strip()
    if not text:
        raise JobError("missing_image_uri", "job is empty")
    if text[0] in '{["':
        return _parse_json_job(text, raw, default_id)
    if _JSON_SCALAR.fullmatch(text):
        raise JobError("invalid_job", "job must be a JSON object or a bare URI, not a JSON scalar")
    uri = _check_uri(text)
    if any(c.isspace() for c in uri):
        raise JobError("invalid_image_uri", "a bare-URI job must be one URI without spaces")
    return Job(id=default_id or _stable_id(uri, ""), image_uri=uri, prompt=None, raw=raw)


def _parse_json_job(text: str, raw: bytes, default_id: str | None) -> Job:
    try:
        obj: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise JobError("invalid_json", f"job is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise JobError("invalid_job", f"job must be a JSON object, not {type(obj).__name__}")
    job_id = obj.get("id")
    if job_id is not None:
        if isinstance(job_id, bool) or not isinstance(job_id, str | int):
            raise JobError("invalid_job", "id must be a string or an integer")
        job_id = str(job_id)
        if not job_id or len(job_id) > 512 or not job_id.isprintable():
            raise JobError("invalid_job", "id must be 1 to 512 printable characters")
    try:
        uri = obj.get("image_uri")
        if uri is None:
            raise JobError("missing_image_uri", "job has no image_uri")
        if not isinstance(uri, str):
            raise JobError("invalid_job", "image_uri must be a string")
        _check_uri(uri)
        prompt = obj.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise JobError("invalid_job", "prompt must be a string")
        if prompt is not None and not prompt.strip():
            raise JobError("invalid_job", "prompt must not be blank")
        if prompt is not None and _has_surrogates(prompt):
            raise JobError("invalid_job", "prompt is not valid Unicode (lone surrogate)")
        tier = _tier(obj.get("tier"))
        generation = _generation(obj)
        schema = _schema_name(obj.get("schema"))
    except JobError as exc:
        # Dead-letter records keep the job's own id, so the sender can match them up.
        exc.job_id = job_id or default_id
        raise
    if job_id or default_id:
        stable = job_id or default_id
    elif tier is None and generation is None and schema is None:
        stable = _stable_id(uri, prompt or "")
    else:
        # What changes the answer changes the job: the same image with another schema or
        # temperature is another job, and resume must not skip it.
        options = {"tier": tier, "generation": generation, "schema": schema}
        stable = _stable_id(uri, prompt or "", json.dumps(options, sort_keys=True))
    return Job(
        id=stable or "",
        image_uri=uri,
        prompt=prompt,
        raw=raw,
        tier=tier,
        generation=generation,
        schema=schema,
    )


def _tier(value: Any) -> Tier | None:
    if value is None:
        return None
    if value not in _TIERS:
        raise JobError("invalid_job", f"tier must be one of {', '.join(_TIERS)}")
    tier: Tier = value
    return tier


def _schema_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 128 or not value.isprintable():
        raise JobError("invalid_job", "schema must be the name of a configured schema")
    return value


def _number(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise JobError("invalid_job", f"{name} must be a number")
    try:
        return float(value)
    except OverflowError:
        # JSON integers have no size limit: one too large for a float is beyond any range
        # (the caller's range check then names the field). parse_job must raise nothing
        # but JobError, or the job crashes instead of being dead-lettered.
        return math.inf if value > 0 else -math.inf


def _generation(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The job's own generation settings, checked (types and ranges)."""
    if not any(name in obj for name in GENERATION_FIELDS):
        return None
    out: dict[str, Any] = {}
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise JobError("invalid_job", "max_tokens must be an integer")
        if not 1 <= max_tokens <= 1_000_000:
            raise JobError("invalid_job", "max_tokens must be 1..1000000")
        out["max_tokens"] = max_tokens
    temperature = _number(obj, "temperature")
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise JobError("invalid_job", "temperature must be 0..2")
        out["temperature"] = temperature
    top_p = _number(obj, "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise JobError("invalid_job", "top_p must be > 0 and <= 1")
        out["top_p"] = top_p
    seed = obj.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise JobError("invalid_job", "seed must be a 64-bit integer")
        out["seed"] = seed
    stop = obj.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= 4
            or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in stops)
        ):
            raise JobError("invalid_job", "stop must be a string or a list of 1 to 4 strings")
        if any(_has_surrogates(x) for x in stops):
            raise JobError("invalid_job", "stop is not valid Unicode (lone surrogate)")
        out["stop"] = stop
    return out


_second_cache: tuple[int, str] = (-1, "")


def rfc3339_now() -> str:
    """UTC now as ``2026-11-26T03:29:30.213Z``. Every record carries one, so the
    date-and-time part is formatted once per second and reused."""
    global _second_cache
    now = time.time()
    second = int(now)
    cached_second, prefix = _second_cache
    if second != cached_second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (second, prefix)
    return f"{prefix}.{int((now - second) * 1000):03d}Z"


def result_record(
    job: Job,
    answer: Answer,
    *,
    attempts: int,
    started_at: float,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a described job (README, "Records")."""
    rec: dict[str, Any] = {
        "id": job.id,
        # A signed URL's signature is a credential: records keep the URL, not the secret.
        "image_uri": redact(job.image_uri),
        "status": "ok",
        "description": answer.text,
        "model": answer.model,
        "endpoint": answer.endpoint,
        "tier": answer.tier,
        "usage": answer.usage,
        "cost_usd": answer.cost_usd,
        # True when the answer came from the result store, not from a model call.
        "cached": False,
        "attempts": attempts,
        "latency_s": round(time.monotonic() - started_at, 4),
        "finished_at": rfc3339_now(),
    }
    if source is not None:
        rec["source"] = source
    return rec


def error_record(
    *,
    job_id: str,
    image_uri: str | None,
    error_type: ErrorType,
    message: str,
    attempts: int,
    raw: bytes,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": job_id}
    # Records outlive logs and travel further: tokens, keys and signed URLs' signatures are
    # redacted from everything that echoes the job or an exception.
    if image_uri is not None:
        rec["image_uri"] = redact(image_uri)
    rec["status"] = "error"
    rec["error"] = {"type": error_type, "message": redact(message)}
    rec["attempts"] = attempts
    rec["input"] = redact(raw[:MAX_INPUT_ECHO_BYTES].decode("utf-8", "replace"))
    rec["finished_at"] = rfc3339_now()
    if source is not None:
        rec["source"] = source
    return rec
