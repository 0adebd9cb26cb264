"""Jobs held in memory: ``worker describe URI...``, tests and load tests."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

from ..protocols import SourceBase

__all__ = ["LocalDelivery", "MemorySource"]


@dataclass(slots=True)
class LocalDelivery:
    """A job from a local, non-redeliverable source: ack and nack have nothing to tell."""

    data: bytes
    default_id: str | None = None
    source_info: dict[str, Any] | None = None
    redeliverable: bool = False
    traceparent: str | None = None

    async def ack(self) -> None:
        return None

    async def nack(self) -> None:
        return None


class MemorySource(SourceBase):
    """Jobs from an iterable of bytes (read lazily, as the pipeline asks)."""

    def __init__(
        self, jobs: Iterable[bytes], *, name: str = "memory", trusted: bool = True
    ) -> None:
        self._jobs = jobs
        self.name = name
        self.trusted = trusted

    async def deliveries(self) -> AsyncGenerator[LocalDelivery, None]:
        for data in self._jobs:
            yield LocalDelivery(data)
