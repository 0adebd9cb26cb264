"""Every exception the worker raises, under one base, and the job error types.

Three families, by who can fix the problem:

* :class:`ConfigError`: the operator (a bad setting, a missing file, a sink that cannot
  be written). Found at start-up; the CLI prints one line naming the key and exits 2.
* :class:`JobError`: the job's sender. A *permanent* failure of one job: retrying cannot
  help, so the job goes to the dead-letter sink with ``error.type`` one of
  :data:`ErrorType`.
* :class:`ServiceError`: nobody, for now. A service (the model, Pub/Sub, Cloud Storage,
  an image host) answered badly or not at all. Its :attr:`~ServiceError.kind` says what
  :mod:`worker.retry` does with it; when the retry budget is spent on a transient one,
  the job becomes ``retries_exhausted`` (or is handed back to a queue).

The rest mark one condition each; each docstring says when it is raised.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ERROR_TYPES",
    "BigQueryError",
    "BlockedAddressError",
    "ConfigError",
    "DrainRequested",
    "EmptyAnswer",
    "ErrorType",
    "FetchError",
    "JobError",
    "Kind",
    "ModelError",
    "PubSubError",
    "RecordRejected",
    "ServiceError",
    "SinkFailed",
    "SourceUnavailable",
    "StorageError",
    "StoreUnavailable",
    "WorkerError",
]

#: The documented ``error.type`` values of dead-letter records (README, "Error types").
ErrorType = Literal[
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
    "sink_rejected",
    "schema_mismatch",
]
ERROR_TYPES: frozenset[str] = frozenset(get_args(ErrorType))

#: What a failed call means for retrying it (see :mod:`worker.retry`).
Kind = Literal["rate_limited", "transient", "unauthorized", "permanent"]


class WorkerError(Exception):
    """The base of every exception this package raises on purpose."""


class ConfigError(WorkerError):
    """A bad setting or start-up condition the operator can fix; the CLI exits 2."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class JobError(WorkerError):
    """A permanent, per-job failure with a documented type and an actionable message."""

    def __init__(self, type_: ErrorType, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.type: ErrorType = type_
        self.message = message
        #: The job's own id when it could be read before the job was found wanting.
        self.job_id = job_id


class ServiceError(WorkerError):
    """A call to a service failed: an error answer, a timeout or a broken connection.

    ``status`` is the HTTP status, or 0 when no answer came (then ``code`` is
    ``timeout`` or ``connection_error``). ``message`` is short and secret-free.
    """

    #: Which service, for logs and messages ("model", "pubsub", "storage", "image").
    service = "service"

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        kind: Kind,
        retry_after_s: float | None = None,
    ) -> None:
        shown = f"HTTP {status} {code}" if status else code
        super().__init__(f"{self.service}: {shown}: {message}" if message else shown)
        self.status = status
        self.code = code
        self.message = message
        self.kind: Kind = kind
        #: The pause the service asked for (Retry-After / retry-after-ms), if any.
        self.retry_after_s = retry_after_s

    @property
    def label(self) -> str:
        """The HTTP status as text, else what went wrong on the wire (metrics label)."""
        return str(self.status) if self.status else self.code

    @property
    def transient(self) -> bool:
        return self.kind != "permanent"


class ModelError(ServiceError):
    """The model's endpoint answered with an error, or did not answer."""

    service = "model"
    #: The quota the error answer's x-ratelimit-* headers reported, if any (limit,
    #: remaining, reset_s).
    quota: tuple[float, float, float] | None = None


class EmptyAnswer(ModelError):
    """The model answered 200 with no text (e.g. a safety block): permanent for the job."""

    def __init__(self, reason: str) -> None:
        super().__init__(200, "empty_answer", reason, kind="permanent")


class PubSubError(ServiceError):
    """A Pub/Sub REST call failed (after the client's own retries, when transient)."""

    service = "pubsub"


class StorageError(ServiceError):
    """A Cloud Storage call failed."""

    service = "storage"


class BigQueryError(ServiceError):
    """A BigQuery REST call failed (a ``bq:`` sink's table or insertAll)."""

    service = "bigquery"


class FetchError(ServiceError):
    """Fetching a job's image failed in a way another attempt may fix (5xx, reset...)."""

    service = "image"


class BlockedAddressError(WorkerError, OSError):
    """The guarded resolver refused an address a job URL leads to (an OSError, so that
    aiohttp wraps it as a connection error and :mod:`worker.fetch` unwraps it)."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"{host} resolves to {address} ({reason})")
        self.host = host
        self.address = address
        self.reason = reason


class SourceUnavailable(WorkerError):
    """The source itself cannot be read any more (not one job's fault); the run stops."""


class SinkFailed(WorkerError):
    """A sink could not store a batch; the jobs in it are not done."""


class RecordRejected(WorkerError):
    """The result sink refused this one record for good (its reason is the message); the
    job is dead-lettered as ``sink_rejected``."""


class StoreUnavailable(WorkerError):
    """The result store cannot be reached or answered badly; jobs go on without it."""


class DrainRequested(WorkerError):
    """A job was still waiting for quota or a model slot when the worker began to drain;
    it is handed back rather than started."""
