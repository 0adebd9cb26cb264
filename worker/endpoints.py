"""The model side as the pipeline sees it: endpoints, their limits, and a slot on one.

An :class:`Endpoint` is one OpenAI-compatible base URL (a :class:`~worker.model.ModelClient`,
e.g. one Vertex AI region) and what bounds the requests sent to it: its own concurrency
limit (fixed, or adaptive under ``--concurrency auto``), its optional ``--rpm``/``--tpm``
ceiling, the quota its answers' ``x-ratelimit-*`` headers report (when they do), and a
circuit breaker. The :class:`EndpointPool` hands out a :class:`Slot`: the right to send
one request to one endpoint now.

Routing. Requests wait in the pool, first come first served per tier; whenever capacity
may have appeared (a slot released, a limit raised, a pause or a circuit's backoff over,
a ceiling refilled) the pool gives the oldest waiter the endpoint that serves its tier
with the most room for its weight: ``(in_use + 1) / (limit x weight)`` lowest. So the
work spreads in proportion to what each endpoint currently carries, and an endpoint
whose limit a 429 cut gets less of it. Only that endpoint's limit is cut, and the job
that got the 429 is retried at once on another endpoint when one can take it (its
``retry_after_s`` becomes 0) instead of waiting out the pause. An endpoint whose circuit
is open gets nothing but single probes; when every endpoint is out, requests wait
(within their job's deadline) rather than fail.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .circuit import Circuit
from .clock import SYSTEM_CLOCK, Clock, Timer
from .cost import Budget, Prices
from .errors import DrainRequested, ModelError, ServiceError
from .limits import OUTCOMES, AdaptiveLimiter, HeaderQuota, Limiter, Outcome, RateCeiling
from .model import ModelCall, ModelClient
from .protocols import Answer, PipelineObserver
from .settings import TIERS, Tier
from .tracing import Tracing

__all__ = ["Endpoint", "EndpointPool", "Slot"]

# An answer that means the endpoint itself is failing (the circuit counts these).
_BROKEN_CODES = frozenset({"connection_error", "timeout"})


def _breaks_circuit(error: ServiceError) -> bool:
    return error.code in _BROKEN_CODES or error.status >= 500


@dataclass(eq=False)
class Endpoint:
    """One base URL and the limits of what is sent to it."""

    #: Shown in records, logs and metric labels: never a key or a token.
    name: str
    client: ModelClient
    limiter: Limiter
    ceiling: RateCeiling | None = None
    weight: float = 1.0
    tiers: frozenset[Tier] = frozenset(TIERS)
    circuit: Circuit = field(default_factory=Circuit)
    quota: HeaderQuota = field(default_factory=HeaderQuota)

    def ready_in_s(self) -> float:
        """Seconds until time alone would let a request go (0: now, room permitting)."""
        wait = max(self.circuit.ready_in_s(), self.limiter.paused_for_s, self.quota.ready_in_s())
        if self.ceiling is not None:
            wait = max(wait, self.ceiling.ready_in_s())
        return wait

    def available_for_retry(self) -> bool:
        """In rotation and not asked to pause: a retry sent here would not be refused."""
        return self.circuit.state != "open" and self.limiter.paused_for_s == 0

    def load(self) -> float:
        return (self.limiter.in_use + 1) / (self.limiter.limit * self.weight)


def _time_out(future: asyncio.Future[Slot]) -> None:
    """A waiter's timeout: it gives up (unless a slot was granted first)."""
    if not future.done():
        future.set_exception(TimeoutError())


@dataclass(eq=False, slots=True)
class _Waiter:
    tier: Tier
    seq: int
    future: asyncio.Future[Slot]


class Slot:
    """The right to send one request to ``endpoint``; :meth:`describe` uses it up."""

    __slots__ = ("_pool", "_reserved", "endpoint", "tier")

    def __init__(self, pool: EndpointPool, endpoint: Endpoint, tier: Tier, reserved: float) -> None:
        self._pool = pool
        self.endpoint = endpoint
        self.tier = tier
        self._reserved = reserved

    def abandon(self) -> None:
        """Give the slot back unused (the job was cancelled before sending)."""
        ep = self.endpoint
        ep.circuit.on_abandoned()
        if ep.ceiling is not None:
            ep.ceiling.settle(self._reserved, None)
        ep.limiter.release()

    async def describe(self, call: ModelCall) -> Answer:
        """One attempt. Tells the endpoint's limiter, ceiling, quota and circuit how it
        went, then gives the slot back (a 429 keeps it a little longer: see
        :mod:`worker.limits`)."""
        ep, pool = self.endpoint, self._pool
        if pool.tracing is None:
            return await self._attempt(call, None)
        with pool.tracing.span("model.attempt", endpoint=ep.name, tier=self.tier) as span:
            return await self._attempt(call, span)

    async def _attempt(self, call: ModelCall, span: Any) -> Answer:
        ep, pool = self.endpoint, self._pool
        t0 = time.monotonic()
        try:
            answer = await ep.client.describe(call)
        except ModelError as exc:
            if span is not None:
                span.set_attribute("http.response.status_code", exc.status)
                span.set_attribute("error.type", exc.label)
            latency_s = time.monotonic() - t0
            outcome: Outcome = "timeout" if exc.code == "timeout" else exc.kind
            if exc.quota is not None:
                ep.quota.observe(*exc.quota)
            ep.limiter.observe(outcome, latency_s, exc.retry_after_s, paced=ep.quota.active)
            if _breaks_circuit(exc):
                ep.circuit.on_failure()
            else:
                ep.circuit.on_answer()
            if ep.ceiling is not None:
                ep.ceiling.settle(self._reserved, None)
            ep.limiter.release()
            if pool.observer is not None:
                pool.observer.model_answered(ep.name, exc, latency_s)
            if exc.kind in ("rate_limited", "transient") and pool.other_endpoint_for(ep, self.tier):
                # Another endpoint can take it now: do not wait out this one's pause.
                exc.retry_after_s = 0.0
            raise
        except BaseException:
            # Cancelled mid-request (a forced shutdown): the outcome will never be known.
            ep.circuit.on_abandoned()
            ep.limiter.release()
            raise
        latency_s = time.monotonic() - t0
        if span is not None:
            span.set_attribute("http.response.status_code", 200)
        # What the answer says goes in before the slot is handed on: the release grants
        # it to a waiting job at once, and by then a probe's success must have closed
        # the circuit (else the jobs queued behind the probe are not dispatched until
        # some other release or timer), the quota must be the one the answer reported,
        # and an answer that spends the budget must have closed the pool (else one more
        # request goes out after the budget is spent).
        ep.circuit.on_answer()
        if answer.quota is not None:
            ep.quota.observe(*answer.quota)
        if ep.ceiling is not None:
            ep.ceiling.settle(
                self._reserved, answer.usage["total_tokens"] if answer.usage else None
            )
        pool.account(answer)
        # The slot goes back first (to a waiting job), then the limiter hears the answer:
        # an adaptive limit grows only while it is in use, and this shows it is.
        ep.limiter.release()
        ep.limiter.observe("ok", latency_s)
        if pool.observer is not None:
            pool.observer.model_answered(ep.name, None, latency_s)
        return answer


class EndpointPool:
    """Where a model request may go now (see the module docstring).

    Owns the queue of requests waiting for a slot, the cost of what was answered and the
    budget. Never sends anything itself and never retries: a :class:`Slot` is one
    attempt, and the pipeline's retry loop decides about the next.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        observer: PipelineObserver | None = None,
        prices: Prices | None = None,
        model: str = "",
        budget: Budget | None = None,
        clock: Clock = SYSTEM_CLOCK,
        tracing: Tracing | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.observer = observer
        self.prices = prices
        self.model = model
        #: Whether answers get a cost (the model has a price): else cost is unknown, None.
        self.priced = prices is not None and prices.knows(model)
        self.budget = budget
        #: A span per attempt when tracing is on.
        self.tracing = tracing
        self._clock = clock
        self._queues: dict[Tier, deque[_Waiter]] = {tier: deque() for tier in TIERS}
        self._seq = 0
        self._timer: Timer | None = None
        self._timer_at = math.inf
        self._dispatching = False
        self._again = False
        self._closed = False
        #: Spend so far, USD, by (model, tier) (only answers whose cost is known).
        self.spent_usd: dict[tuple[str, str], float] = {}
        #: Tokens the answers used, by (model, tier, "prompt" | "completion"): what the
        #: bill is made of, counted whether or not a price is known.
        self.tokens_used: dict[tuple[str, str, str], int] = {}
        for ep in self.endpoints:
            ep.limiter.listener = self._dispatch
            ep.limiter.demand = self._demand_counter(ep)

    # -- what the pipeline and the metrics read --------------------------------------

    @property
    def limit(self) -> int:
        """Requests allowed in flight now, over every endpoint."""
        return sum(ep.limiter.limit for ep in self.endpoints)

    @property
    def in_use(self) -> int:
        return sum(ep.limiter.in_use for ep in self.endpoints)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

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

    def serves(self, tier: Tier) -> bool:
        return any(tier in ep.tiers for ep in self.endpoints)

    def quota_bound(self, window_s: float) -> bool:
        """Requests are waiting and every endpoint that could take them is held back by
        its quota (a 429 within ``window_s``, a pause) or out of rotation: more replicas
        would only add 429s."""
        waiting_tiers = [tier for tier, q in self._queues.items() if q]
        if not waiting_tiers:
            return False
        now = self._clock.now()
        for ep in self.endpoints:
            if not any(t in ep.tiers for t in waiting_tiers):
                continue
            held = (
                now - ep.limiter.rate_limited_at <= window_s
                or ep.limiter.paused_for_s > 0
                or ep.circuit.state == "open"
            )
            if not held:
                return False
        return True

    # -- control ---------------------------------------------------------------------

    def close(self) -> None:
        """Hand out nothing more: waiting and later requests get DrainRequested (a
        shutdown, a spent budget). Requests already sent carry on."""
        self._closed = True
        for queue in self._queues.values():
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(DrainRequested())

    @property
    def closed(self) -> bool:
        return self._closed

    # -- handing out slots -----------------------------------------------------------

    async def acquire(self, tier: Tier, *, timeout_s: float | None = None) -> Slot:
        """Wait for a slot on an endpoint that serves ``tier``. Raises DrainRequested
        once the pool is closed, and a transient ModelError when no endpoint could take
        the request within ``timeout_s`` (the job's remaining deadline)."""
        if self._closed:
            raise DrainRequested
        queue = self._queues[tier]
        ready_in_s = math.inf
        if not queue:
            ep, ready_in_s = self._pick(tier)
            if ep is not None:
                return self._grant(ep, tier)
        # (With others queued ahead, the timer for this tier is armed already.)
        self._seq += 1
        loop = asyncio.get_running_loop()
        waiter = _Waiter(tier, self._seq, loop.create_future())
        queue.append(waiter)
        self._arm_timer(ready_in_s)
        # The timeout is a timer that fails the waiter's own future, not a cancel scope
        # (anyio.fail_after): nearly every request waits here under load, and entering
        # and leaving a cancel scope with a deadline cost ~5 us more per request.
        expiry: asyncio.TimerHandle | None = None
        if timeout_s is not None:
            if timeout_s > 0:
                expiry = loop.call_later(timeout_s, _time_out, waiter.future)
            else:
                _time_out(waiter.future)  # no time left: it gives up now, as it would
        try:
            return await waiter.future
        except BaseException as exc:
            # Timed out or cancelled: leave the queue. A waiter left behind would later be
            # granted a slot that nobody uses or releases (the endpoint's capacity shrinks
            # for good), and would count as demand meanwhile.
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().abandon()  # granted as it gave up: give it back
            elif waiter in queue:
                queue.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise ModelError(
                    0,
                    "no_endpoint",
                    f"no endpoint could take the request within {timeout_s:.1f} s",
                    kind="transient",
                ) from None
            raise
        finally:
            if expiry is not None:
                expiry.cancel()

    def _pick(self, tier: Tier) -> tuple[Endpoint | None, float]:
        """The endpoint for a ``tier`` request now, or None and the seconds until time
        alone may give one (inf: only a release can).

        The wait comes from the same reading of each endpoint that turned it down, and
        the timer is armed from it. Read twice, the clock moves in between: a pause a
        microsecond from its end turned an endpoint down here and read as over when the
        timer was armed, so no timer was armed, and with nothing in flight no release
        came either; the waiting jobs stalled until their deadlines (found by a CI run:
        60 jobs against a 429-answering quota, 38 dead-lettered after 30 s)."""
        best: Endpoint | None = None
        best_load = math.inf
        wait = math.inf
        for ep in self.endpoints:
            if tier not in ep.tiers or not ep.limiter.has_room:
                continue
            ready_in_s = ep.ready_in_s()
            if ready_in_s > 0:
                wait = min(wait, ready_in_s)
                continue
            load = ep.load()
            if load < best_load:
                best, best_load = ep, load
        return best, wait

    def _grant(self, ep: Endpoint, tier: Tier) -> Slot:
        ep.limiter.try_acquire()
        ep.circuit.on_send()
        ep.quota.take()
        reserved = ep.ceiling.take() if ep.ceiling is not None else 0.0
        return Slot(self, ep, tier, reserved)

    def _dispatch(self) -> None:
        """Give free slots to waiters, oldest first within each tier."""
        if self._dispatching:
            self._again = True  # a release from inside a grant: go round once more
            return
        self._dispatching = True
        try:
            while True:
                self._again = False
                granted = False
                # The last pass grants nothing: its waits cover every tier still waiting.
                wait = math.inf
                for tier, queue in self._queues.items():
                    while queue and queue[0].future.done():
                        queue.popleft()  # cancelled while waiting
                    if not queue:
                        continue
                    ep, ready_in_s = self._pick(tier)
                    if ep is None:
                        wait = min(wait, ready_in_s)
                        continue
                    waiter = queue.popleft()
                    waiter.future.set_result(self._grant(ep, tier))
                    granted = True
                if not (granted or self._again):
                    break
        finally:
            self._dispatching = False
        self._arm_timer(wait)

    def _arm_timer(self, wait: float) -> None:
        """Dispatch again in ``wait`` seconds, when time alone (a pause, a backoff, a
        refill) may free a slot: the wait :meth:`_pick` read when it found none."""
        if wait == math.inf:
            return
        at = self._clock.now() + wait
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._clock.call_later(wait, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._dispatch()

    def _demand_counter(self, ep: Endpoint) -> Callable[[], int]:
        def demand() -> int:
            # Requests held back by time (a pause, the pacing of a quota) are not evidence
            # that the concurrency limit binds: they do not make it grow.
            if ep.ready_in_s() > 0:
                return 0
            return sum(len(q) for tier, q in self._queues.items() if tier in ep.tiers)

        return demand

    def other_endpoint_for(self, failed: Endpoint, tier: Tier) -> bool:
        """Whether a retry could go somewhere other than ``failed`` now."""
        return any(
            ep is not failed and tier in ep.tiers and ep.available_for_retry()
            for ep in self.endpoints
        )

    # -- cost ------------------------------------------------------------------------

    def account(self, answer: Answer) -> None:
        """Count one answer's tokens, price it and charge the budget."""
        tier = answer.tier
        if answer.usage:
            for kind in ("prompt", "completion"):
                key3 = (self.model, tier, kind)
                used = answer.usage.get(f"{kind}_tokens", 0)
                self.tokens_used[key3] = self.tokens_used.get(key3, 0) + used
        if self.prices is None:
            return
        cost = self.prices.cost_usd(self.model, answer.usage, tier)
        answer.cost_usd = cost
        if cost is None:
            return
        key = (self.model, tier)
        self.spent_usd[key] = self.spent_usd.get(key, 0.0) + cost
        if self.budget is not None:
            self.budget.charge(cost)
