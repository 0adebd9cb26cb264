"""Error vocabulary shared by every stage.

A :class:`JobError` is a *permanent* failure of one job: retrying it cannot help, so the
job goes to the dead-letter sink with ``error.type`` set to one of :data:`ERROR_TYPES`.
Transient trouble (rate limits, 5xx, resets) is never a ``JobError``; it is retried, and
only when the retry budget is spent does it become ``retries_exhausted``.
"""

from __future__ import annotations

__all__ = ["ERROR_TYPES", "ConfigError", "JobError"]

# The documented `error.type` values of dead-letter records (README, "Error types").
ERROR_TYPES = frozenset(
    {
        "invalid_json",
        "invalid_job",
        "missing_image_uri",
        "invalid_image_uri",
        "unsupported_scheme",
        "job_too_large",
        "file_not_allowed",
        "file_not_found",
        "blocked_address",
        "fetch_failed",
        "unsupported_media_type",
        "image_too_large",
        "model_rejected",
        "retries_exhausted",
    }
)


class JobError(Exception):
    """A permanent, per-job failure with a documented type and an actionable message."""

    def __init__(self, type_: str, message: str, *, job_id: str | None = None) -> None:
        if type_ not in ERROR_TYPES:  # a programming error, not a job error
            raise ValueError(f"undocumented error type {type_!r}")
        super().__init__(message)
        self.type = type_
        self.message = message
        #: The job's own id when it could be read before the job was found wanting.
        self.job_id = job_id

    def as_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


class ConfigError(Exception):
    """A bad setting, found at start-up. The CLI prints it on one line and exits 2."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
