"""The model side as the pipeline sees it: endpoints, their limits, and a slot on one.

An :class:`Endpoint` is one OpenAI-compatible base URL (a :class:`~worker.model.ModelClient`)
and what bounds the requests sent to it: its concurrency limiter (fixed, or adaptive
under ``--concurrency auto``) and its optional ``--rpm``/``--tpm`` ceiling. An
:class:`EndpointPool` hands out a :class:`Slot`: the right to send one request to one
endpoint now. The pipeline waits for a slot (cancellable: a drain hands back jobs still
waiting) and then makes exactly one attempt through it; retrying is the pipeline's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ServiceError
from .limits import OUTCOMES, AdaptiveLimiter, Limiter, Outcome, RateCeiling
from .model import ModelClient
from .protocols import Answer, PipelineObserver

__all__ = ["Endpoint", "EndpointPool", "Slot"]


@dataclass(eq=False)
class Endpoint:
    """One base URL and the limits of what is sent to it."""

    #: Shown in records, logs and metric labels: never a key or a token.
    name: str
    client: ModelClient
    limiter: Limiter
    ceiling: RateCeiling | None = None


class Slot:
    """The right to send one request to ``endpoint``; :meth:`describe` uses it up."""

    __slots__ = ("_observer", "_reserved", "endpoint")

    def __init__(
        self, endpoint: Endpoint, reserved: float, observer: PipelineObserver | None
    ) -> None:
        self.endpoint = endpoint
        self._reserved = reserved
        self._observer = observer

    async def describe(self, image_url: str, prompt: str | None) -> Answer:
        """One attempt; tells the endpoint's limiter and ceiling how it went, then gives
        the slot back (a 429 keeps it a little longer: see :mod:`worker.limits`)."""
        ep = self.endpoint
        t0 = time.monotonic()
        try:
            answer = await ep.client.describe(image_url, prompt)
        except ServiceError as exc:
            latency_s = time.monotonic() - t0
            outcome: Outcome = "timeout" if exc.code == "timeout" else exc.kind
            ep.limiter.observe(outcome, latency_s, exc.retry_after_s)
            if ep.ceiling is not None:
                ep.ceiling.settle(self._reserved, None)
            if self._observer is not None:
                self._observer.model_answered(exc, latency_s)
            raise
        finally:
            ep.limiter.release()
        latency_s = time.monotonic() - t0
        ep.limiter.observe("ok", latency_s)
        if ep.ceiling is not None:
            ep.ceiling.settle(
                self._reserved, answer.usage["total_tokens"] if answer.usage else None
            )
        if self._observer is not None:
            self._observer.model_answered(None, latency_s)
        return answer


class EndpointPool:
    """Where a model request may go now, and how much may be in flight in all."""

    def __init__(
        self, endpoints: Sequence[Endpoint], *, observer: PipelineObserver | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.observer = observer

    @property
    def limit(self) -> int:
        """Requests allowed in flight now, over every endpoint."""
        return sum(ep.limiter.limit for ep in self.endpoints)

    @property
    def in_use(self) -> int:
        return sum(ep.limiter.in_use for ep in self.endpoints)

    @property
    def adaptive(self) -> bool:
        return any(isinstance(ep.limiter, AdaptiveLimiter) for ep in self.endpoints)

    @property
    def counts(self) -> dict[Outcome, int]:
        """Model requests by outcome, over every endpoint."""
        total = dict.fromkeys(OUTCOMES, 0)
        for ep in self.endpoints:
            for outcome, n in ep.limiter.counts.items():
                total[outcome] += n
        return total

    async def acquire(self) -> Slot:
        """Wait for quota, then for a free slot. A request waiting for its rate ceiling
        holds no slot: an adaptive limit would read the wait as demand and grow."""
        ep = self.endpoints[0]
        reserved = 0.0
        if ep.ceiling is not None:
            reserved = await ep.ceiling.acquire()
        try:
            await ep.limiter.acquire()
        except BaseException:
            if ep.ceiling is not None:
                ep.ceiling.settle(reserved, None)  # never sent: give its tokens back
            raise
        return Slot(ep, reserved, self.observer)
