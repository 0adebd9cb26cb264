"""The two small interfaces the pipeline knows: where jobs come from, where records go.

A source yields :class:`Delivery` objects that carry their own ``ack``/``nack``; a sink
takes a batch of records and returns only once they are durable. Nothing here knows about
files or Pub/Sub.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

__all__ = ["Delivery", "Record", "Sink", "Source"]

Record = dict[str, Any]


class Delivery(Protocol):
    #: The job's bytes as received (a line, a message's data).
    data: bytes
    #: An id the source already has for this job (e.g. Pub/Sub's messageId), or None.
    default_id: str | None
    #: Extra fields for the result record's ``source`` key, or None.
    source_info: dict[str, Any] | None
    #: True when ``nack`` hands the job back to a queue that will deliver it again.
    redeliverable: bool

    async def ack(self) -> None:
        """The job's record is durable; the source may forget the job."""

    async def nack(self) -> None:
        """The job was not finished; hand it back if the source can."""


class Source(Protocol):
    #: Shown in logs and summaries.
    name: str
    #: Input from the operator's own machine (file, stdin): local image paths are allowed
    #: below the working directory by default. Remote input (queues) is not trusted.
    trusted: bool

    def deliveries(self) -> AsyncGenerator[Delivery, None]:
        """Yield jobs. The pipeline asks for the next one only when it has room."""
        ...

    async def aclose(self) -> None: ...


class Sink(Protocol):
    name: str

    async def write(self, records: Sequence[Record]) -> None:
        """Return only when every record is durably stored; raise if they are not."""

    async def existing_ids(self) -> set[str]:
        """Ids already stored (for resuming a batch); empty when the sink cannot tell."""
        ...

    async def aclose(self) -> None: ...
