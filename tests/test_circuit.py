"""The circuit breaker of one endpoint, step by step on a clock the tests move by hand.

The open period is jittered (half to all of the current backoff), so the checks bound it
from both sides rather than name one instant: the circuit is certainly still open before
half the backoff has passed, and certainly ready once all of it has.
"""

from __future__ import annotations

import math

import pytest

from worker.circuit import Circuit, CircuitState
from worker.clock import ManualClock


def _circuit(clock: ManualClock, **kw: float) -> Circuit:
    return Circuit(
        failures_to_open=int(kw.pop("failures_to_open", 3)),
        initial_open_s=kw.pop("initial_open_s", 1.0),
        max_open_s=kw.pop("max_open_s", 8.0),
        clock=clock,
    )


def _state(circuit: Circuit) -> CircuitState:
    # Read through a function: mypy would narrow the attribute after one comparison.
    return circuit.state


def _send(circuit: Circuit) -> None:
    assert circuit.ready_in_s() == 0.0
    circuit.on_send()


def _open_it(circuit: Circuit) -> None:
    for _ in range(circuit.failures_to_open):
        _send(circuit)
        circuit.on_failure()
    assert _state(circuit) == "open"


def test_stays_closed_below_the_streak_and_opens_at_it() -> None:
    clock = ManualClock()
    circuit = _circuit(clock, failures_to_open=3)
    for expected_streak in (1, 2):
        _send(circuit)
        circuit.on_failure()
        assert _state(circuit) == "closed"
        assert circuit.streak == expected_streak
        assert circuit.ready_in_s() == 0.0
    _send(circuit)
    circuit.on_failure()
    assert _state(circuit) == "open"
    assert circuit.opened == 1
    # Open: nothing may go until (a jittered part of) the first backoff has passed.
    wait = circuit.ready_in_s()
    assert 0.5 <= wait <= 1.0


@pytest.mark.parametrize("answer", ["200", "429", "400"])
def test_any_answer_from_a_live_endpoint_resets_the_streak(answer: str) -> None:
    # A 200, a 429 and a 4xx all reach the pool as on_answer: the endpoint is alive.
    clock = ManualClock()
    circuit = _circuit(clock, failures_to_open=3)
    for _ in range(2):
        _send(circuit)
        circuit.on_failure()
    _send(circuit)
    circuit.on_answer()
    assert circuit.streak == 0
    # Two more failures are a new streak of two, not a streak of four.
    for _ in range(2):
        _send(circuit)
        circuit.on_failure()
    assert _state(circuit) == "closed"
    assert circuit.opened == 0


def test_open_turns_half_open_after_the_backoff_and_lets_exactly_one_probe_go() -> None:
    clock = ManualClock()
    circuit = _circuit(clock, initial_open_s=1.0)
    _open_it(circuit)
    clock.advance(0.49)
    assert circuit.ready_in_s() > 0
    assert _state(circuit) == "open"
    clock.advance(0.52)  # past the longest jittered backoff (1.0 s)
    assert circuit.ready_in_s() == 0.0
    assert _state(circuit) == "half_open"
    circuit.on_send()  # the probe
    # While it is out, nothing else may go, however long it takes.
    assert circuit.ready_in_s() == math.inf
    clock.advance(100.0)
    assert circuit.ready_in_s() == math.inf
    assert _state(circuit) == "half_open"


def test_a_successful_probe_closes_the_circuit_and_resets_the_backoff() -> None:
    clock = ManualClock()
    circuit = _circuit(clock, initial_open_s=1.0, max_open_s=8.0)
    _open_it(circuit)
    clock.advance(1.0)
    _send(circuit)
    circuit.on_failure()  # the probe failed: open for longer (2 s)
    clock.advance(2.0)
    _send(circuit)
    circuit.on_answer()  # this probe got an answer
    assert _state(circuit) == "closed"
    assert circuit.streak == 0
    assert circuit.ready_in_s() == 0.0
    # The next opening starts from the initial backoff again.
    _open_it(circuit)
    assert 0.5 <= circuit.ready_in_s() <= 1.0


def test_a_probe_answered_429_closes_the_circuit_too() -> None:
    clock = ManualClock()
    circuit = _circuit(clock)
    _open_it(circuit)
    clock.advance(1.0)
    _send(circuit)
    circuit.on_answer()  # a 429 is an answer: the region is alive, only busy
    assert _state(circuit) == "closed"


def test_each_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    clock = ManualClock()
    circuit = _circuit(clock, failures_to_open=2, initial_open_s=1.0, max_open_s=8.0)
    _open_it(circuit)
    assert 0.5 <= circuit.ready_in_s() <= 1.0
    backoffs = []
    for _ in range(6):
        clock.advance(circuit.ready_in_s())
        _send(circuit)  # half-open: a probe
        circuit.on_failure()  # a single failure is enough while probing
        assert _state(circuit) == "open"
        backoffs.append(circuit.ready_in_s())
    # Open for 2, 4, 8, then 8, 8, 8 s (jitter: between half and all of each).
    for wait, full in zip(backoffs, (2.0, 4.0, 8.0, 8.0, 8.0, 8.0), strict=True):
        assert full / 2 <= wait <= full
    assert circuit.opened == 7


def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    clock = ManualClock()
    circuit = _circuit(clock)
    _open_it(circuit)
    clock.advance(1.0)
    _send(circuit)
    assert circuit.ready_in_s() == math.inf
    circuit.on_abandoned()  # the probing job was cancelled: its outcome will never come
    assert _state(circuit) == "half_open"
    assert circuit.ready_in_s() == 0.0
    circuit.on_send()  # the next request probes instead
    assert circuit.ready_in_s() == math.inf
    circuit.on_answer()
    assert _state(circuit) == "closed"


def test_failures_of_requests_sent_before_it_opened_do_not_reopen_it() -> None:
    # Ten requests were in flight when the region died: the first three open the circuit,
    # the other seven fail while it is open and change nothing (no longer backoff).
    clock = ManualClock()
    circuit = _circuit(clock, failures_to_open=3, initial_open_s=1.0)
    for _ in range(10):
        _send(circuit)
    for _ in range(10):
        circuit.on_failure()
    assert circuit.opened == 1
    assert 0.5 <= circuit.ready_in_s() <= 1.0


@pytest.mark.parametrize(
    ("failures", "initial_s", "max_s"), [(0, 1.0, 30.0), (5, 0.0, 30.0), (5, 2.0, 1.0)]
)
def test_bad_parameters_are_refused(failures: int, initial_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="failures_to_open"):
        Circuit(failures_to_open=failures, initial_open_s=initial_s, max_open_s=max_s)
