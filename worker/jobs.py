"""Jobs and the records written for them.

A job arrives as bytes (a line of a file, a Pub/Sub message's data, a push body) and is
either a JSON object ``{"image_uri": ..., "id": ..., "prompt": ...}`` or a bare URI.
Parsing never raises anything but :class:`~worker.errors.JobError`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import ErrorType, JobError
from .logs import redact

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

_KNOWN_FIELDS = ("image_uri", "id", "prompt")
_JSON_SCALAR = re.compile(r"null|true|false|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(slots=True, frozen=True)
class Job:
    """One parsed job: what to describe, and under which id its record is written."""

    id: str
    image_uri: str
    prompt: str | None
    raw: bytes


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
    except JobError as exc:
        # Dead-letter records keep the job's own id, so the sender can match them up.
        exc.job_id = job_id or default_id
        raise
    return Job(
        id=job_id or default_id or _stable_id(uri, prompt or ""),
        image_uri=uri,
        prompt=prompt,
        raw=raw,
    )


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
    *,
    description: str,
    model: str,
    usage: dict[str, int] | None,
    attempts: int,
    started_at: float,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": job.id,
        # A signed URL's signature is a credential: records keep the URL, not the secret.
        "image_uri": redact(job.image_uri),
        "status": "ok",
        "description": description,
        "model": model,
        "usage": usage,
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
