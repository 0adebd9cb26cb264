"""A circuit breaker per endpoint: a region that keeps failing is taken out of rotation.

Closed (in rotation) until ``failures_to_open`` requests in a row fail the way a dead or
broken endpoint fails: the connection is refused or reset, the request times out, or it
answers 5xx. Then open: nothing is sent to it until a jittered backoff has passed (1 s,
doubling up to 30 s); then half-open: exactly one request (a real job's) probes it. The
probe's success closes the circuit; its failure opens it again for longer. A 429 or a 4xx
is an answer from a live endpoint: it ends a probe as a success and resets the streak.

A flaky but working endpoint (Vertex AI answers 5xx now and then) stays closed: failures
must come in an unbroken streak, and any success breaks it.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from .clock import SYSTEM_CLOCK, Clock

__all__ = ["Circuit", "CircuitState"]

CircuitState = Literal["closed", "open", "half_open"]


class Circuit:
    """Whether requests may go to one endpoint now (see the module docstring)."""

    __slots__ = (
        "_clock",
        "_open_s",
        "_probing",
        "_retry_at",
        "failures_to_open",
        "initial_open_s",
        "max_open_s",
        "opened",
        "state",
        "streak",
    )

    def __init__(
        self,
        *,
        failures_to_open: int = 5,
        initial_open_s: float = 1.0,
        max_open_s: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if failures_to_open < 1 or not 0 < initial_open_s <= max_open_s:
            raise ValueError("need failures_to_open >= 1 and 0 < initial_open_s <= max_open_s")
        self.failures_to_open = failures_to_open
        self.initial_open_s = initial_open_s
        self.max_open_s = max_open_s
        self._clock = clock
        self.state: CircuitState = "closed"
        #: Failures in a row (reset by any answer from a live endpoint).
        self.streak = 0
        #: Times the circuit opened.
        self.opened = 0
        self._open_s = initial_open_s
        self._retry_at = -math.inf
        self._probing = False

    def ready_in_s(self) -> float:
        """0 when a request may go now; the seconds until a probe may go when open; inf
        while a probe is out."""
        if self.state == "closed":
            return 0.0
        if self.state == "open":
            wait = self._retry_at - self._clock.now()
            if wait > 0:
                return wait
            self.state = "half_open"
        return math.inf if self._probing else 0.0

    def on_send(self) -> None:
        """A request goes out (after ``ready_in_s() == 0``)."""
        if self.state != "closed":
            self._probing = True

    def on_answer(self) -> None:
        """The endpoint answered (a success, a 429, a 4xx): it is alive."""
        self.streak = 0
        self._probing = False
        if self.state != "closed":
            self.state = "closed"
            self._open_s = self.initial_open_s

    def on_failure(self) -> None:
        """Refused, reset, timed out, or 5xx."""
        self.streak += 1
        probe_failed = self._probing
        self._probing = False
        if probe_failed or (self.state == "closed" and self.streak >= self.failures_to_open):
            self._open(longer=probe_failed)

    def on_abandoned(self) -> None:
        """A request went out and its outcome will never be known (the job was cancelled):
        a probe that is abandoned lets the next request probe instead."""
        self._probing = False

    def _open(self, *, longer: bool) -> None:
        if longer:
            self._open_s = min(self.max_open_s, self._open_s * 2)
        self.state = "open"
        self.opened += 1
        # Jittered, so replicas that lost the same region do not probe it in step.
        self._retry_at = self._clock.now() + self._open_s * random.uniform(0.5, 1.0)
