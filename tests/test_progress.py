"""The live progress display: the line's format, when it is shown, the JSON events, and
what a terminal receives from a real ``worker run`` on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

from worker.errors import ConfigError
from worker.pipeline import RunStats
from worker.progress import (
    CLEAR_TO_EOL,
    Figures,
    Progress,
    count_lines,
    event_fields,
    fit_line,
    format_eta,
    format_line,
    resolve_mode,
)
from worker.settings import DEFAULT_MODEL, load_settings

from .helpers import REPO, gs_jobs, jobs_file, worker_env

if TYPE_CHECKING:
    from worker.pipeline import Pipeline
    from worker.settings import Settings
    from worker.simulator import Simulator


def _figures(**kw: Any) -> Figures:
    base: dict[str, Any] = {
        "done": 150,
        "total": 200,
        "elapsed_s": 10.0,
        "jobs_per_s": 10.0,
        "jobs_per_s_avg": 15.0,
        "in_flight": 8,
        "limit": 16,
        "rate_limited": 3,
        "dead_lettered": 2,
        "cost_usd": 0.0123,
    }
    base.update(kw)
    return Figures(**base)


# -- the line ----------------------------------------------------------------------------


def test_line_with_total_and_cost() -> None:
    line = format_line(_figures())
    assert line == (
        "[###############.....] 150/200 75%  10.0 jobs/s (avg 15.0)  ETA 5s  in flight 8"
        "  limit 16  429s 3  dead 2  $0.0123"
    )


def test_line_without_total_or_cost() -> None:
    line = format_line(_figures(total=None, cost_usd=None))
    assert line == "150 done  10.0 jobs/s (avg 15.0)  in flight 8  limit 16  429s 3  dead 2"
    assert "ETA" not in line and "$" not in line


def test_line_without_bar_and_cut_to_the_terminal() -> None:
    f = _figures()
    assert format_line(f, bar_width=0).startswith("150/200 75%  10.0 jobs/s")
    assert fit_line(f, 0) == format_line(f)  # width unknown: never cut
    assert fit_line(f, 120) == format_line(f)
    assert fit_line(f, 100) == format_line(f, bar_width=0)  # the bar goes first
    # Then the average; the limit goes beside what is in flight.
    assert fit_line(f, 80) == (
        "150/200 75%  10.0 jobs/s  ETA 5s  in flight 8/16  429s 3  dead 2  $0.0123"
    )
    narrow = fit_line(f, 40)
    assert len(narrow) == 39  # never the last column: the cursor would wrap
    assert narrow.startswith("150/200 75%  10.0 jobs/s  ETA 5s")


@pytest.mark.parametrize(
    ("kw", "eta"),
    [
        ({}, 5.0),  # 50 left at 10/s (the recent rate)
        ({"jobs_per_s": 0.0}, 50 / 15),  # nothing lately: the average rate
        ({"jobs_per_s": 0.0, "jobs_per_s_avg": 0.0}, None),  # nothing yet: unknown
        ({"done": 200}, 0.0),
        ({"total": None}, None),
    ],
)
def test_eta_arithmetic(kw: dict[str, Any], eta: float | None) -> None:
    assert _figures(**kw).eta_s == eta


def test_eta_format() -> None:
    assert [format_eta(s) for s in (None, 0, 42.4, 59.6, 185, 3600, 7620)] == [
        "?",
        "0s",
        "42s",
        "1m00s",
        "3m05s",
        "1h00m",
        "2h07m",
    ]
    assert "ETA ?" in format_line(_figures(done=0, jobs_per_s=0.0, jobs_per_s_avg=0.0))


def test_event_fields_are_the_line_s_figures() -> None:
    assert event_fields(_figures()) == {
        "done": 150,
        "total": 200,
        "elapsed_s": 10.0,
        "jobs_per_s": 10.0,
        "jobs_per_s_avg": 15.0,
        "eta_s": 5.0,
        "in_flight": 8,
        "limit": 16,
        "rate_limited": 3,
        "dead_lettered": 2,
        "cost_usd": 0.0123,
    }
    assert event_fields(_figures(total=None, cost_usd=None))["eta_s"] is None


# -- sampling ----------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _fake_pipeline(*, priced: bool = True) -> Any:
    """What Progress reads: the run's counters and the endpoint pool's."""
    return SimpleNamespace(
        stats=RunStats(),
        models=SimpleNamespace(
            priced=priced,
            in_use=0,
            limit=8,
            counts={"ok": 0, "rate_limited": 0},
            spent_usd={},
        ),
    )


def test_sample_reads_the_counters_and_measures_the_recent_rate() -> None:
    clock = _Clock()
    progress = Progress(bar=False, events=False, total=1000, clock=clock)
    pipe = _fake_pipeline()
    progress.attach(cast("Pipeline", pipe))
    # 20 s at 10 jobs/s, then 10 s at 50 jobs/s, sampled each second.
    for second in range(30):
        clock.t += 1
        pipe.stats.ok += 10 if second < 20 else 50
        f = progress.sample()
    pipe.stats.dead_lettered += 5
    pipe.stats.skipped += 5
    pipe.models.in_use = 7
    pipe.models.counts["rate_limited"] = 4
    pipe.models.spent_usd[(DEFAULT_MODEL, "standard")] = 0.5
    clock.t += 1
    f = progress.sample()
    assert f.done == 200 + 500 + 10
    assert f.elapsed_s == 31.0
    assert f.jobs_per_s_avg == pytest.approx(710 / 31)
    # Over the last 10 s (from the sample at 21 s, 250 done): the recent pace.
    assert f.jobs_per_s == pytest.approx((710 - 250) / 10)
    assert f.eta_s == pytest.approx(290 / 46)
    assert (f.in_flight, f.limit, f.rate_limited, f.dead_lettered) == (7, 8, 4, 5)
    assert f.cost_usd == 0.5
    assert f.total == 1000


def test_no_cost_without_a_price_and_no_total_below_done() -> None:
    progress = Progress(bar=False, events=False, total=5, clock=_Clock())
    pipe = _fake_pipeline(priced=False)
    progress.attach(cast("Pipeline", pipe))
    pipe.stats.ok = 7  # the file grew after it was counted
    f = progress.sample()
    assert f.cost_usd is None
    assert f.total == 7


# -- when it is shown --------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_off_when_stderr_is_not_a_terminal() -> None:
    assert resolve_mode("auto", stream=io.StringIO(), log_format="text") == (False, False)


def test_modes() -> None:
    tty = _Tty()
    assert resolve_mode("auto", stream=tty, log_format="text") == (True, False)
    # JSON logs: a machine reads stderr; it gets events, not a redrawn line.
    assert resolve_mode("auto", stream=tty, log_format="json") == (False, True)
    assert resolve_mode("auto", stream=io.StringIO(), log_format="json") == (False, True)
    assert resolve_mode("on", stream=io.StringIO(), log_format="text") == (True, False)
    assert resolve_mode("off", stream=tty, log_format="text") == (False, False)
    assert resolve_mode("off", stream=tty, log_format="json") == (False, False)


def test_setting_is_validated() -> None:
    assert load_settings(env={}).log.progress == "auto"
    assert load_settings(env={"WORKER_LOG__PROGRESS": "OFF"}).log.progress == "off"
    with pytest.raises(ConfigError, match=r"log\.progress"):
        load_settings(env={"WORKER_LOG__PROGRESS": "sometimes"})


def test_count_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "jobs.jsonl"
    for text, n in [("", 0), ("a\n", 1), ("a\nb", 2), ("a\nb\n", 2), ("a\n\nb\n", 3)]:
        path.write_text(text)
        assert count_lines(str(path)) == n, text
    monkeypatch.setattr("worker.progress.COUNT_CHUNK_BYTES", 7)  # lines across chunks
    path.write_text("".join(f"line {i}\n" for i in range(1000)) + "last")
    assert count_lines(str(path)) == 1001


# -- log lines and the line --------------------------------------------------------------


async def test_a_log_line_clears_the_line_and_the_line_comes_back() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    progress = Progress(bar=True, events=False, total=10, stream=out, redraw_interval_s=0.01)
    pipe = _fake_pipeline()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress.run, cast("Pipeline", pipe))
            with anyio.fail_after(5):
                while CLEAR_TO_EOL not in out.getvalue():
                    await anyio.sleep(0.005)
            pipe.stats.ok = 3
            logging.getLogger("worker.test").warning("something_happened")
            pipe.stats.ok = 10
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        root.removeHandler(handler)
    text = out.getvalue()
    # Cleared, the log line on a line of its own, the progress line drawn again below it.
    assert re.search(r"\r\x1b\[K" + "something_happened\n" + r"\[[#.]{20}\] \d+/10 ", text)
    # The last frame is the final count, and the display ends with a newline.
    last = text.rsplit("\r", 1)[1]
    assert last.startswith("[" + "#" * 20 + "] 10/10 100%")
    assert last.endswith(CLEAR_TO_EOL + "\n")
    assert handler.stream is out  # unhooked


# -- JSON events -------------------------------------------------------------------------


async def test_json_mode_logs_progress_events_on_the_interval(
    fast_settings: Settings,
    sim: Simulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from worker.app import run_pipeline, runtime
    from worker.sinks import JsonlSink
    from worker.sources import FileSource

    sim.config.latency_ms = 40.0
    fast_settings.worker.concurrency = 4
    lines = gs_jobs(60)
    lines[7] = '{"id": "bad"}'  # no image: dead-lettered
    source = FileSource(jobs_file(tmp_path, lines).removeprefix("file:"))
    sink = JsonlSink(str(tmp_path / "r.jsonl"))
    dead = JsonlSink(str(tmp_path / "d.jsonl"))
    progress = Progress(bar=False, events=True, count_path=source.path, event_interval_s=0.1)
    caplog.set_level(logging.INFO, logger="worker.progress")
    async with runtime(fast_settings) as rt:
        stats = await run_pipeline(
            rt, source, sink, dead, resume=False, handle_signals=False, progress=progress
        )
    assert stats.ok == 59 and stats.dead_lettered == 1
    events = [r for r in caplog.records if r.name == "worker.progress"]
    # 60 jobs, 4 at a time, 40 ms each: ~0.6 s, so several events 0.1 s apart.
    assert len(events) >= 3
    fields = [r.__dict__ for r in events]
    assert all(r.getMessage() == "progress" for r in events)
    assert all(f["total"] == 60 for f in fields[1:])  # counted from the file at once
    done = [f["done"] for f in fields]
    assert done == sorted(done) and done[-1] <= 60
    assert any(0 < d < 60 for d in done)
    for f in fields:
        assert f["limit"] == 4
        assert 0 <= f["in_flight"] <= 4
        assert f["rate_limited"] == 0
        assert f["dead_lettered"] in (0, 1)
        assert isinstance(f["cost_usd"], float)  # the default model has a price
        assert f["jobs_per_s"] >= 0 and f["jobs_per_s_avg"] >= 0
        if f["eta_s"] is not None:
            assert f["eta_s"] >= 0
    mid = next(f for f in fields if 0 < f["done"] < 60)
    assert mid["eta_s"] is not None and mid["eta_s"] > 0
    # One per interval, not one per job.
    assert len(events) <= stats.seconds / 0.1 + 1


# -- on a real pseudo-terminal -----------------------------------------------------------


def _run_on_pty(args: list[str], *, columns: int = 200, timeout_s: float = 60, **env: str) -> str:
    """``python -m worker ARGS`` with stderr on a pseudo-terminal; what the terminal got."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            cwd=REPO,
            env=worker_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side is gone
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=10) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return b"".join(chunks).decode()


def test_run_on_a_terminal_redraws_one_progress_line(tmp_path: Path) -> None:
    source = jobs_file(tmp_path, gs_jobs(200))
    # The bundled simulator, 50 ms a call, 8 at a time: 200 jobs last ~1.3 s.
    sink = f"jsonl:{tmp_path / 'out' / 'r.jsonl'}"
    store = f"sqlite:{tmp_path / 'store.sqlite'}"  # not out/store.sqlite in the checkout
    args = ["run", "--config", "config/local.toml", "--source", source, "--sink", sink]
    out = _run_on_pty([*args, "--store", store])
    frames = re.findall(r"\r\[[#.]{20}\] (\d+)/200 \d+%  [^\r\n]*?\x1b\[K", out)
    assert len(frames) >= 2, out  # redrawn in place, carriage return first
    counts = [int(n) for n in frames]
    assert counts == sorted(counts) and counts[-1] == 200
    final = re.search(r"\r\[#{20}\] 200/200 100%  ([^\r\n]*)\x1b\[K\r?\n", out)
    assert final is not None, out  # the last frame is kept, ended by a newline
    assert "in flight 0  limit 8  429s 0  dead 0  $0." in final.group(1)
    # The summary is intact, on a line of its own.
    lines = out.replace("\r\n", "\n").split("\n")
    summary = [line for line in lines if "done: 200 ok" in line]
    assert len(summary) == 1 and summary[0].startswith("done: 200 ok, 0 dead-lettered")
    assert "\r" not in summary[0] and "\x1b" not in summary[0]


def test_no_progress_on_a_terminal_shows_no_line(tmp_path: Path) -> None:
    source = jobs_file(tmp_path, gs_jobs(200))
    sink = f"jsonl:{tmp_path / 'out' / 'r.jsonl'}"
    args = ["run", "--config", "config/local.toml", "--source", source, "--sink", sink]
    out = _run_on_pty([*args, "--store", "none", "--no-progress"], WORKER_SIMULATOR__LATENCY_MS="5")
    assert "done: 200 ok" in out
    assert "/200" not in out and "jobs/s (avg" not in out and "\x1b[K" not in out
