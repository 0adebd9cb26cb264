"""Logging to stderr: Cloud Logging JSON or plain text, with secrets redacted.

Events have fixed names (``token_refreshed``, ``job_dead_lettered``...) and flat fields
passed through ``extra=``. Redaction runs on every line, whatever its origin: a library
that echoes a request header cannot leak a token through us.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["current_format", "redact", "setup_logging", "trace_fields"]

#: Set by worker.tracing when traces are on: the current span's Cloud Logging fields.
trace_fields: Callable[[], dict[str, Any]] | None = None

_SECRET_PATTERNS = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1<redacted>"),
    (re.compile(r"ya29\.[A-Za-z0-9._~+/=-]+"), "<redacted-token>"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "<redacted-key>"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"), "<redacted-key>"),
    (
        re.compile(
            r"(?i)((?:x-goog-signature|signature|sig|x-amz-signature|access_token|token|api_key|key)=)[^&\s\"']+"
        ),
        r"\1<redacted>",
    ),
]

# LogRecord attributes that are not "extra" fields.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_SEVERITY = {
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
}


# Every pattern above needs one of these; most text (a gs:// URI, a log line) has none, and
# one search is much cheaper than five substitutions (this runs for every result record).
_MAYBE_SECRET = re.compile(r"(?i)bearer|ya29\.|sk-|aiza|=")


def redact(text: str) -> str:
    if _MAYBE_SECRET.search(text) is None:
        return text
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object a line, in Google Cloud Logging's structured-logging shape."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        entry.update(_extras(record))
        if trace_fields is not None:
            entry.update(trace_fields())
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = entry.get("error_type") or record.exc_info[0].__name__
            entry["stack_trace"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}" + (
            f" {fields}" if fields else ""
        )
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


_format_in_force = "text"


def current_format() -> str:
    """``json`` or ``text``: what :func:`setup_logging` chose (``auto`` resolved)."""
    return _format_in_force


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    global _format_in_force
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    _format_in_force = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries speak only when something is wrong.
    for name in ("httpx2", "httpx", "openai", "aiohttp.access", "google", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
