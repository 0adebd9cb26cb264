"""A real BigQuery REST emulator (PyPI ``bqemulator``) on 127.0.0.1, offline.

It runs in a venv of its own (``make bq-emulator`` builds ``.venv-bq`` from
``tests/fakes/bigquery-emulator.txt``): bqemulator registers a pytest plugin that breaks
this project's pytest, and it brings ~75 packages. This module needs only the standard
library; it finds the emulator's interpreter at ``$BQ_EMULATOR_PYTHON``, else at
``.venv-bq/bin/python`` in the repository.

Starting it offline takes three things:

* bqemulator runs ``INSTALL spatial; LOAD spatial`` at start-up and gives up if DuckDB
  cannot download the extension. ``duckdb-extension-spatial`` ships the binary; it is
  linked into ``$HOME/.duckdb/extensions/<version>/<platform>/`` (DuckDB's default
  extension directory; bqemulator passes DuckDB no config) of a temporary ``HOME``, so
  nothing is written to the real one.
* ``BQEMU_ENABLE_FORMAT_EXTENSIONS=false`` skips the best-effort ``INSTALL avro``, which
  would try the network (only Avro load and extract jobs are lost).
* ``numpy``, which duckdb 1.5.5 needs for bqemulator's UDFs and nobody declares.

The REST API is at ``base_url + "/bigquery/v2"``; point code at it with
``BIGQUERY_EMULATOR_HOST=127.0.0.1:PORT``. No authentication; ``/readyz`` says when it
is up (about 1 s). Where it differs from BigQuery, as far as a sink can tell:

* ``insertId`` is ignored: a row sent twice is stored twice.
* Without ``skipInvalidRows`` an invalid row fails the whole request with HTTP 500;
  with it, the row comes back in ``insertErrors`` as BigQuery does, but ``location`` and
  ``message`` name the row's first column rather than the bad one.
* A JSON column must be sent as JSON text (an object gives HTTP 500), a TIMESTAMP as an
  RFC 3339 string (a number is read as microseconds); tabledata.list returns
  TIMESTAMPs as microseconds since the epoch.
* REQUIRED is not enforced, unknown fields are dropped silently, STRING ``maxLength`` is
  neither kept nor enforced, tables.insert into a missing dataset answers 500 (BigQuery:
  404), and ``insertErrors: []`` is returned where BigQuery leaves the key out.
* After an unhandled 500 the next request on the same keep-alive connection may be reset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_PYTHON",
    "EmulatorStartError",
    "EmulatorUnavailable",
    "bigquery_emulator",
    "emulator_python",
    "start_bigquery_emulator",
]

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_PYTHON = REPO / ".venv-bq" / "bin" / "python"

# Run in the emulator's interpreter: DuckDB's version and platform, and where the packaged
# extension lives (so this process never imports duckdb).
_PROBE = r"""
import importlib.util, json, pathlib, duckdb
con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
version = con.execute("SELECT library_version FROM pragma_version()").fetchone()[0]
platform = con.execute("PRAGMA platform").fetchone()[0]
con.close()
found = None
spec = importlib.util.find_spec("duckdb_extension_spatial")
if spec is not None and spec.submodule_search_locations:
    pkg = pathlib.Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("extensions/*/spatial.duckdb_extension"))
    found = str(files[-1]) if files else None
print(json.dumps({"version": version, "platform": platform, "spatial": found}))
"""

# The emulator's entry point. A thread waits for EOF on stdin, a pipe only this process
# writes to: when it closes (stop(), or this process dies) the emulator stops itself and
# removes its temporary HOME, so no server outlives a crashed test run.
_LAUNCHER = r"""
import os, shutil, signal, sys, threading, time
orphaned = []
def cleanup():
    home = os.environ.get("BQ_EMULATOR_HOME", "")
    if os.path.basename(home).startswith("bqemu-"):
        shutil.rmtree(home, ignore_errors=True)
def watch():
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except Exception:
        pass
    orphaned.append(True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    cleanup()
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
from bqemulator.cli import main
sys.argv = ["bqemulator", *sys.argv[1:]]
try:
    main()
finally:
    if orphaned:
        cleanup()
"""


class EmulatorUnavailable(RuntimeError):
    """The emulator's interpreter is missing or lacks the pinned packages."""


class EmulatorStartError(RuntimeError):
    """The emulator exited or did not become ready in time (its log is in the message)."""


def emulator_python() -> Path:
    """The interpreter of the emulator's venv; raises if there is none."""
    named = os.environ.get("BQ_EMULATOR_PYTHON", "").strip()
    python = Path(named) if named else DEFAULT_PYTHON
    if not python.exists():
        where = f"BQ_EMULATOR_PYTHON={named}" if named else f"{DEFAULT_PYTHON.relative_to(REPO)}"
        raise EmulatorUnavailable(
            f"no BigQuery emulator interpreter at {where}: run `make bq-emulator` (a venv "
            "with tests/fakes/bigquery-emulator.txt), or set BQ_EMULATOR_PYTHON to one"
        )
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare_home(python: Path, home: Path) -> None:
    """Link the packaged spatial extension where DuckDB looks for it under ``home``."""
    out = subprocess.run(
        [str(python), "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    if out.returncode != 0:
        raise EmulatorUnavailable(
            f"{python} cannot run the DuckDB probe; install tests/fakes/bigquery-emulator.txt "
            f"there (make bq-emulator):\n{out.stderr[-2000:]}"
        )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    source = info["spatial"]
    if not source:
        raise EmulatorUnavailable(f"duckdb-extension-spatial is not installed for {python}")
    if f"/{info['version']}/" not in Path(source).as_posix():
        raise EmulatorUnavailable(
            f"{source} is not built for DuckDB {info['version']}; pin "
            "duckdb-extension-spatial to the duckdb version"
        )
    target = home / ".duckdb" / "extensions" / info["version"] / info["platform"]
    target.mkdir(parents=True)
    link = target / "spatial.duckdb_extension"
    try:
        link.symlink_to(source)
    except OSError:
        shutil.copyfile(source, link)


def _ready(base_url: str) -> bool:
    # Loopback only: no HTTP(S)_PROXY may divert the probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base_url + "/readyz", timeout=1.0) as resp:
            body = json.loads(resp.read() or b"{}")
    except (OSError, ValueError):
        return False
    return bool(resp.status == 200 and body.get("status") == "ok" and "checks" in body)


def start_bigquery_emulator(
    project: str, *, startup_timeout_s: float = 60.0, log_level: str = "warning"
) -> tuple[str, Callable[[], None]]:
    """Start the emulator on a free loopback port: ``(base_url, stop)``. ``stop`` ends it
    (SIGTERM, SIGKILL after 10 s) and removes its temporary HOME; it is idempotent."""
    python = emulator_python()
    home = Path(tempfile.mkdtemp(prefix="bqemu-"))
    log_path = home / "emulator.log"
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def stop() -> None:
        nonlocal proc, log
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                # The launcher's watchdog sends one SIGTERM; a second makes uvicorn skip
                # its graceful drain (0.4 s instead of 1.4 s).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            proc = None
        if log is not None:
            log.close()
            log = None
        shutil.rmtree(home, ignore_errors=True)

    def read_log() -> str:
        try:
            return log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    try:
        _prepare_home(python, home)
        for attempt in range(3):
            port = _free_port()  # someone may take it before bqemulator binds it: retried
            env = {
                **os.environ,
                "HOME": str(home),
                "BQ_EMULATOR_HOME": str(home),
                "NO_PROXY": "127.0.0.1,localhost",
                "OTEL_SDK_DISABLED": "true",
                "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false",
                "BQEMU_UPLOAD_STAGING_DIR": str(home / "uploads"),
                "PYTHONUNBUFFERED": "1",
            }
            command = [
                str(python), "-c", _LAUNCHER, "start",
                "--rest-host", "127.0.0.1", "--rest-port", str(port),
                "--grpc-host", "127.0.0.1", "--grpc-port", "0",
                "--ephemeral", "--project", project,
                "--log-level", log_level, "--log-format", "console", "--no-admin",
            ]  # fmt: skip
            log = log_path.open("wb")
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                env=env,
                cwd=home,
                start_new_session=True,
            )
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout_s
            while proc.poll() is None and not _ready(base_url):
                if time.monotonic() > deadline:
                    raise EmulatorStartError(
                        f"bqemulator not ready after {startup_timeout_s:g} s:\n{read_log()}"
                    )
                time.sleep(0.1)
            if proc.poll() is None:
                break
            text = read_log()
            if attempt == 2 or not ("Errno 98" in text or "address already in use" in text):
                raise EmulatorStartError(f"bqemulator exited with {proc.returncode}:\n{text}")
            log.close()
            log = None
    except BaseException:
        stop()
        raise
    return base_url, stop


@contextlib.contextmanager
def bigquery_emulator(project: str, **kwargs: Any) -> Iterator[str]:
    """:func:`start_bigquery_emulator` as a context manager: yields ``base_url``."""
    base_url, stop = start_bigquery_emulator(project, **kwargs)
    try:
        yield base_url
    finally:
        stop()
