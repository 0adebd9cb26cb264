"""Live progress of ``worker run`` and ``worker serve``.

On a terminal: one line on stderr, redrawn in place a few times a second (carriage
return, the line, clear to end of line), ended by a newline when the run ends::

    [##########..........] 1043/2000 52%  41.2 jobs/s (avg 39.8)  ETA 23s  in flight 8  limit 8  429s 0  dead 2  $0.0123

Done / total (a file's lines, counted on a thread; unknown for stdin, queues and push),
the rate over the last ~10 s and since the start, ETA, model requests in flight and the
limit in force, 429s, dead letters, and the spend when the model has a price. On a
narrow terminal the bar goes first, then the average rate. With JSON logs a machine
reads stderr, so instead a ``progress`` event is logged every :data:`EVENT_INTERVAL_S`
with the same figures as flat fields.

Nothing is done per job: a timer samples the counters the pipeline keeps anyway
(:class:`~worker.pipeline.RunStats`, the endpoint pool's limit, slots and spend).

Log lines and the line share stderr: while the line is shown, the root logger's stderr
handlers write through :class:`_ClearingStream`, which clears the line, writes the log
line and draws the line again below it, under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import anyio.to_thread

from .logs import current_format

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .settings import ProgressMode

__all__ = [
    "CLEAR_TO_EOL",
    "EVENT_INTERVAL_S",
    "REDRAW_INTERVAL_S",
    "Figures",
    "Progress",
    "count_lines",
    "event_fields",
    "fit_line",
    "format_eta",
    "format_line",
    "resolve_mode",
]

log = logging.getLogger("worker.progress")

#: How often the line is redrawn on a terminal.
REDRAW_INTERVAL_S = 0.25
#: How often a ``progress`` event is logged with JSON logs.
EVENT_INTERVAL_S = 30.0
#: The "now" rate is measured over at least this long (once the run is that old).
RATE_WINDOW_S = 10.0
BAR_WIDTH = 20
COUNT_CHUNK_BYTES = 1 << 20

CLEAR_TO_EOL = "\x1b[K"


@dataclass(frozen=True, slots=True)
class Figures:
    """One sample of a run's counters."""

    done: int
    #: Jobs in all; None when unknown (stdin, queues, push, or not counted yet).
    total: int | None
    elapsed_s: float
    #: Over the last :data:`RATE_WINDOW_S` (or since the previous sample, if longer ago).
    jobs_per_s: float
    #: Since the start of the run.
    jobs_per_s_avg: float
    #: Model requests in flight, and the limit in force (over every endpoint).
    in_flight: int
    limit: int
    rate_limited: int
    dead_lettered: int
    #: Spent so far at list price; None when the model has no price.
    cost_usd: float | None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent rate (the average one if nothing finished lately);
        None when the total is unknown or nothing has finished yet."""
        if self.total is None:
            return None
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        rate = self.jobs_per_s if self.jobs_per_s > 0 else self.jobs_per_s_avg
        return left / rate if rate > 0 else None


def format_eta(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_line(f: Figures, *, bar_width: int = BAR_WIDTH, compact: bool = False) -> str:
    """The progress line (no control characters). The bar is drawn only when the total
    is known and ``bar_width`` > 0; ``compact`` leaves out the average rate and puts the
    limit beside what is in flight (for a narrow terminal)."""
    parts: list[str] = []
    if f.total is not None:
        frac = min(1.0, f.done / f.total) if f.total > 0 else 1.0
        head = f"{f.done}/{f.total} {int(frac * 100)}%"
        if bar_width > 0:
            filled = int(frac * bar_width)
            head = "[" + "#" * filled + "." * (bar_width - filled) + "] " + head
        parts.append(head)
    else:
        parts.append(f"{f.done} done")
    rate = f"{f.jobs_per_s:.1f} jobs/s"
    parts.append(rate if compact else f"{rate} (avg {f.jobs_per_s_avg:.1f})")
    if f.total is not None:
        parts.append(f"ETA {format_eta(f.eta_s)}")
    if compact:
        parts.append(f"in flight {f.in_flight}/{f.limit}")
    else:
        parts.append(f"in flight {f.in_flight}")
        parts.append(f"limit {f.limit}")
    parts.append(f"429s {f.rate_limited}")
    parts.append(f"dead {f.dead_lettered}")
    if f.cost_usd is not None:
        parts.append(f"${f.cost_usd:.4f}")
    return "  ".join(parts)


def fit_line(f: Figures, width: int) -> str:
    """The line for a terminal ``width`` columns wide (0: unknown, never cut): a line
    wider than the terminal wraps, and a carriage return would redraw only its last row.
    Too wide, the bar goes first, then the average rate, then the end of the line."""
    line = format_line(f)
    if not width or len(line) < width:
        return line
    line = format_line(f, bar_width=0)
    if len(line) < width:
        return line
    return format_line(f, bar_width=0, compact=True)[: width - 1]


def event_fields(f: Figures) -> dict[str, Any]:
    """The flat fields of a ``progress`` log event."""
    eta = f.eta_s
    return {
        "done": f.done,
        "total": f.total,
        "elapsed_s": round(f.elapsed_s, 1),
        "jobs_per_s": round(f.jobs_per_s, 2),
        "jobs_per_s_avg": round(f.jobs_per_s_avg, 2),
        "eta_s": None if eta is None else round(eta, 1),
        "in_flight": f.in_flight,
        "limit": f.limit,
        "rate_limited": f.rate_limited,
        "dead_lettered": f.dead_lettered,
        "cost_usd": None if f.cost_usd is None else round(f.cost_usd, 6),
    }


def count_lines(path: str) -> int:
    """Lines of a file, counted by newlines in large chunks (blank lines, which a file
    source skips, count too). Blocking: run it on a thread."""
    n = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(COUNT_CHUNK_BYTES):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def resolve_mode(mode: ProgressMode, *, stream: TextIO, log_format: str) -> tuple[bool, bool]:
    """(the line, the JSON events) for ``log.progress``. auto: the line when ``stream`` is
    a terminal and logs are text (JSON logs mean a machine reads stderr); on: the line
    whatever stderr is; off: neither. The events come with JSON logs unless off."""
    if mode == "off":
        return False, False
    events = log_format == "json"
    if mode == "on":
        return True, events
    return log_format == "text" and _isatty(stream), events


def _done(pipeline: Pipeline) -> int:
    s = pipeline.stats
    return s.ok + s.dead_lettered + s.failed + s.nacked + s.skipped


class Progress:
    """The display of one run: :meth:`run` it in the run's task group; it stops (and ends
    the line with a newline) when cancelled."""

    def __init__(
        self,
        *,
        bar: bool,
        events: bool,
        total: int | None = None,
        count_path: str | None = None,
        stream: TextIO | None = None,
        redraw_interval_s: float = REDRAW_INTERVAL_S,
        event_interval_s: float = EVENT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bar = bar
        self.events = events
        self.total = total
        #: Count the total from this file's lines (on a thread, while the run goes on).
        self.count_path = count_path
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.redraw_interval_s = redraw_interval_s
        self.event_interval_s = event_interval_s
        self._clock = clock
        self._pipeline: Pipeline | None = None
        self._started = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        # What is on the screen: the line last drawn, and whether it is shown now.
        self._line = ""
        self._shown = False
        self._hooked: list[tuple[logging.StreamHandler[Any], Any]] = []

    @classmethod
    def for_run(cls, mode: ProgressMode, *, count_path: str | None = None) -> Progress | None:
        """The display ``log.progress`` asks for on this process's stderr; None for none."""
        bar, events = resolve_mode(mode, stream=sys.stderr, log_format=current_format())
        if not (bar or events):
            return None
        return cls(bar=bar, events=events, count_path=count_path)

    # -- sampling --------------------------------------------------------------------

    def sample(self) -> Figures:
        """The figures now (and one more point for the recent rate)."""
        p = self._pipeline
        assert p is not None, "sample() before attach()"
        now = self._clock()
        done = _done(p)
        samples = self._samples
        samples.append((now, done))
        # The window starts at the newest sample that is at least RATE_WINDOW_S old.
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        t0, d0 = samples[0]
        elapsed = max(0.0, now - self._started)
        models = p.models
        priced = models.priced
        total = self.total
        return Figures(
            done=done,
            # A file grown since it was counted must not show 105%.
            total=None if total is None else max(total, done),
            elapsed_s=elapsed,
            jobs_per_s=(done - d0) / (now - t0) if now > t0 else 0.0,
            jobs_per_s_avg=done / elapsed if elapsed > 0 else 0.0,
            in_flight=models.in_use,
            limit=models.limit,
            rate_limited=models.counts.get("rate_limited", 0),
            dead_lettered=p.stats.dead_lettered,
            cost_usd=sum(models.spent_usd.values()) if priced else None,
        )

    # -- the task --------------------------------------------------------------------

    def attach(self, pipeline: Pipeline) -> None:
        """Sample ``pipeline`` from now on (:meth:`run` does it)."""
        self._pipeline = pipeline
        self._started = self._clock()
        self._samples.clear()
        self._samples.append((self._started, _done(pipeline)))

    async def run(self, pipeline: Pipeline) -> None:
        self.attach(pipeline)
        if self.bar:
            self._hook_logging()
        try:
            async with anyio.create_task_group() as tg:
                if self.total is None and self.count_path is not None:
                    tg.start_soon(self._count_total, self.count_path)
                await self._tick()
        finally:
            if self.bar:
                self._finish()

    async def _count_total(self, path: str) -> None:
        # A file that cannot be read: the source says so; the total stays unknown.
        with contextlib.suppress(OSError):
            self.total = await anyio.to_thread.run_sync(count_lines, path, abandon_on_cancel=True)

    async def _tick(self) -> None:
        interval = self.redraw_interval_s if self.bar else self.event_interval_s
        last_event = self._started
        while True:
            await anyio.sleep(interval)
            figures = self.sample()
            if self.bar:
                self._draw(figures)
            now = self._clock()
            # Half a tick early rather than a whole tick late.
            if self.events and now - last_event >= self.event_interval_s - interval / 2:
                last_event = now
                log.info("progress", extra=event_fields(figures))

    # -- the line on the terminal ----------------------------------------------------

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return 0  # not a terminal (--progress on)

    def _draw(self, figures: Figures, *, final: bool = False) -> None:
        if not self.bar:
            return
        line = fit_line(figures, self._width())
        with self._lock:
            self._line = line
            self._write("\r" + line + CLEAR_TO_EOL + ("\n" if final else ""))
            self._shown = not final

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.bar = False  # stderr went away: stop drawing, keep running

    def _finish(self) -> None:
        """The last figures, then a newline: what follows starts on a line of its own."""
        self._unhook_logging()
        if self._pipeline is not None:
            self._draw(self.sample(), final=True)
        self.bar = False

    def write_through(self, inner: Any, text: str) -> int:
        """A log handler's write: clear the line, write ``text``, draw the line again."""
        with self._lock:
            if self._shown and self.bar:
                inner.write("\r" + CLEAR_TO_EOL)
                self._shown = False
            n: int = inner.write(text)
            if self.bar and self._line and text.endswith("\n"):
                inner.write(self._line + CLEAR_TO_EOL)
                self._shown = True
            inner.flush()
            return n

    def _hook_logging(self) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                with contextlib.suppress(Exception):
                    handler.setStream(_ClearingStream(self, handler.stream))
                    self._hooked.append((handler, self.stream))

    def _unhook_logging(self) -> None:
        for handler, stream in self._hooked:
            with contextlib.suppress(Exception):
                handler.setStream(stream)
        self._hooked.clear()


class _ClearingStream:
    """A log handler's stream while the line is shown (see :meth:`Progress.write_through`)."""

    def __init__(self, progress: Progress, inner: TextIO) -> None:
        self._progress = progress
        self._inner = inner

    def write(self, text: str) -> int:
        return self._progress.write_through(self._inner, text)

    def flush(self) -> None:
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
