"""The joins between the parts: what each one may ask of another, declared here.

Data flows one way: a :class:`Source` yields :class:`Delivery` objects that carry their
own ``ack``/``nack``; the pipeline admits them, describes them and hands a record to a
:class:`Sink`, which returns only once it is durable; then the delivery is acked. Nothing
here knows about files or Pub/Sub.

Every capability a source, a sink or a token provider *may* offer is a member of its
protocol, and :class:`SourceBase` / :class:`SinkBase` give each one a do-nothing default.
So the pipeline, the app and the metrics call them unconditionally (no probing with
``getattr``), and a wrapper that implements the protocol forwards everything or fails
type-checking.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from .errors import ServiceError
from .settings import Tier

__all__ = [
    "Answer",
    "Delivery",
    "PipelineObserver",
    "Quota",
    "Record",
    "Rejection",
    "ResultStore",
    "Sink",
    "SinkBase",
    "Source",
    "SourceBase",
    "SourceCounters",
    "TokenProvider",
]

Record = dict[str, Any]


#: A backend's quota as its x-ratelimit-* headers tell it: (limit, remaining, reset_s).
Quota = tuple[float, float, float]


@dataclass(slots=True)
class Answer:
    """What the model said about one image: the pipeline turns it into a record."""

    text: str
    model: str
    usage: dict[str, int] | None
    finish_reason: str | None
    #: Which endpoint answered, at which consumption tier.
    endpoint: str = ""
    tier: Tier = "standard"
    #: What the answer cost (None: unknown), and the quota its headers reported.
    cost_usd: float | None = None
    quota: Quota | None = None


class Delivery(Protocol):
    """One job as a source handed it over. It must be acked or nacked exactly once."""

    #: The job's bytes as received (a line, a message's data).
    data: bytes
    #: An id the source already has for this job (e.g. Pub/Sub's messageId), or None.
    default_id: str | None
    #: Extra fields for the result record's ``source`` key, or None.
    source_info: dict[str, Any] | None
    #: True when ``nack`` hands the job back to a queue that will deliver it again.
    redeliverable: bool
    #: The publisher's W3C trace context (a Pub/Sub message's googclient_traceparent or
    #: traceparent attribute), or None.
    traceparent: str | None

    async def ack(self) -> None:
        """The job's record is durable; the source may forget the job."""

    async def nack(self) -> None:
        """The job was not finished; hand it back if the source can."""


@dataclass(slots=True)
class SourceCounters:
    """What a queue source counts, per message (exported as ``worker_source_*_total``)."""

    acked: int = 0
    nacked: int = 0
    extended: int = 0
    lease_expired: int = 0
    ack_failures: int = 0
    modack_failures: int = 0


class Source(Protocol):
    """Where jobs come from. A source owns its connection to upstream (leases, acks,
    flow control); it never decides what happens to a job."""

    #: Shown in logs and summaries.
    name: str
    #: Input from the operator's own machine (file, stdin): local image paths are allowed
    #: below the working directory by default. Remote input (queues) is not trusted.
    trusted: bool
    #: A queue that delivers again what it is handed back (Pub/Sub): a run that stops
    #: early (a spent budget) idles instead of exiting, or it would be restarted.
    redelivers: bool

    async def prepare(self) -> None:
        """Check, before anything runs, that the source can be read; raise
        :class:`~worker.errors.ConfigError` for what the operator must fix."""

    async def run_services(self, *, task_status: TaskStatus[None]) -> None:
        """Background work (pulls, lease extension, acks) until cancelled; call
        ``task_status.started()`` once deliveries may be asked for."""

    def deliveries(self) -> AsyncGenerator[Delivery, None]:
        """Yield jobs. The pipeline asks for the next one only when it has room."""
        ...

    def set_capacity(self, jobs: int) -> None:
        """The pipeline can take about ``jobs`` jobs now: hold no more than that."""

    @property
    def answered_at(self) -> float | None:
        """Monotonic time of upstream's latest answer, empty ones included (liveness
        tells "nothing to do" from "stuck" by it), or None if it never answered."""
        ...

    @property
    def counters(self) -> SourceCounters | None:
        """Per-message counters of a queue source, or None."""
        ...

    async def aclose(self) -> None:
        """Called once the pipeline is done: hand back whatever is still held."""


class SourceBase:
    """Defaults for every optional capability of :class:`Source`."""

    name = "source"
    trusted = False
    redelivers = False

    async def prepare(self) -> None:
        return None

    async def run_services(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()

    def set_capacity(self, jobs: int) -> None:
        return None

    @property
    def answered_at(self) -> float | None:
        return None

    @property
    def counters(self) -> SourceCounters | None:
        return None

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record the sink refused for good (a row a table will not take): the job goes to
    the dead-letter sink with this reason instead."""

    #: Position of the record in the batch handed to ``write``.
    index: int
    reason: str


class Sink(Protocol):
    """Where records go. ``write`` returns only when every record is durable."""

    name: str
    #: Batches that may be written at once. 1 for a file (one fsync after another); more
    #: for a sink whose write waits on something slow that batches share (an object
    #: that is finalised when it is full or old enough).
    max_concurrent_writes: int

    @property
    def max_pending_records(self) -> int:
        """Records that may wait on such a shared thing before they are durable. The
        pipeline lets that many jobs wait for durability without holding an admission
        slot (they hold only their record), so a sink that batches for seconds does not
        starve the model of work. 0 for sinks whose writes are durable when they return
        on their own."""
        ...

    def set_tokens(self, tokens: TokenProvider) -> None:
        """The process's Google token provider, for sinks that write to Google APIs
        (called before ``prepare``). Its token is fetched only if the sink needs one."""

    async def prepare(self) -> None:
        """Check, before anything runs, that records can be written; raise
        :class:`~worker.errors.ConfigError` for what the operator must fix."""

    async def write(self, records: Sequence[Record]) -> Sequence[Rejection] | None:
        """Return only when every record is durably stored, or refused for good (then
        return the refusals); raise if the batch could not be stored (it may be tried
        again: the jobs are handed back)."""

    async def existing_ids(self) -> set[str]:
        """Ids already stored (for resuming a batch); empty when the sink cannot tell."""
        ...

    async def aclose(self) -> None: ...


class SinkBase:
    """Defaults for the optional parts of :class:`Sink`."""

    name = "sink"
    max_concurrent_writes = 1

    @property
    def max_pending_records(self) -> int:
        return 0

    def set_tokens(self, tokens: TokenProvider) -> None:
        return None

    async def prepare(self) -> None:
        return None

    async def existing_ids(self) -> set[str]:
        return set()

    async def aclose(self) -> None:
        return None


class ResultStore(Protocol):
    """Shared memory of answers and claims (``worker.store``): what lets a repeated image
    or a redelivered job be answered without paying for a model call twice.

    Values are opaque bytes under string keys. ``claim`` is atomic across every worker
    sharing the store (``SET NX PX`` on Redis): the first caller holds ``key`` for
    ``lease_s`` and the others see False until it is released or lapses. A store never
    holds image bytes or tokens. Any operation may raise
    :class:`~worker.errors.StoreUnavailable`; callers carry on without the store.
    """

    name: str

    async def prepare(self) -> None:
        """Open or connect; ConfigError for what the operator must fix (a bad URI)."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        """Store ``value`` (overwriting); it lapses after ``ttl_s`` (None: never)."""

    async def claim(self, key: str, holder: str, *, lease_s: float) -> bool:
        """Take ``key`` for ``holder`` unless someone holds it; True when taken (or
        already held by ``holder``, whose lease is then renewed)."""

    async def release(self, key: str, holder: str) -> None:
        """Give ``key`` up, if ``holder`` still holds it."""

    async def aclose(self) -> None: ...


class TokenProvider(Protocol):
    """Where bearer tokens come from (``worker.auth``). ``run_refresher`` runs for the
    life of the process; the counters and expiry feed ``/metrics`` and ``/readyz``."""

    @property
    def refreshes(self) -> int:
        """Token refreshes so far."""
        ...

    @property
    def refresh_failures(self) -> int:
        """Refreshes that failed."""
        ...

    @property
    def expires_at(self) -> float | None:
        """Wall-clock expiry of the token held (None: it does not expire, or none)."""
        ...

    @property
    def google(self) -> bool:
        """True for Google credentials, which may also be sent to Google APIs (Pub/Sub,
        Cloud Storage); a third-party API key never is."""
        ...

    async def start(self) -> None: ...

    async def token(self) -> str: ...

    async def refresh_after_rejection(self, rejected: str) -> None:
        """``rejected`` got a 401: refresh once, however many requests saw it rejected."""

    async def run_refresher(self) -> None: ...


class PipelineObserver(Protocol):
    """Told of each job's milestones (metrics, liveness); every call must be cheap."""

    def received(self, delivery: Delivery) -> None: ...

    def model_answered(
        self, endpoint: str, error: ServiceError | None, latency_s: float
    ) -> None: ...

    def finished(self, latency_s: float) -> None: ...
