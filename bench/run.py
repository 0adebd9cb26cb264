"""Throughput benchmark: this worker against a naive baseline and a minimal floor.

One run, one machine, the same simulator for every client. The simulator runs in its own
process (``worker simulate``) and so does each client, so the client under test has a
core to itself (on a 2-core machine) and its CPU time and peak RSS are its own.

    make bench                       # or: .venv/bin/python bench/run.py [--quick] [--json FILE]

Scenarios (targets from issue 5):

* P1: 200 ms fixed latency, no rate limit, concurrency 100, 2,000 jobs. jobs/s and CPU per
  job as ratios to two floors measured in the same run: the minimal raw-aiohttp client,
  and the SDK floor (the worker's own AsyncOpenAI client in a bare ``post`` loop). Targets:
  jobs/s >= 0.98 of the SDK floor, CPU per job <= 1.15x the SDK floor's.
* P2: 300 ms latency, a 100 requests/s token bucket the worker is not told about. The
  worker runs with ``--concurrency auto``; the naive baseline at a fixed, too-high 100.
  Target: >= 97 jobs/s, 0 jobs lost, <= 5% of requests answered 429.
* P3: worker CPU ms per job, source to sink to ack (from P1; target <= 0.5 ms).
* P4 (in P1's table): the worker with tracing on, every span exported with OTLP/HTTP to a
  loopback collector that accepts and drops them, against the worker row (tracing off,
  the default: its cost is an ``is None`` test per step).
* P5: peak RSS with 1,000 jobs in flight (target <= 200 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, *, post: bool = False) -> Any:
    req = urllib.request.Request(url, method="POST" if post else "GET", data=b"" if post else None)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_serving(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 20) -> None:
    """Return once ``url`` answers; RuntimeError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; a process already gone is fine."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@contextlib.contextmanager
def simulator_process(*flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``worker simulate`` in its own process (which the caller may kill); yields the
    root URL and the process."""
    port = _free_port()
    proc = subprocess.Popen(
        [PY, "-m", "worker", "simulate", "--port", str(port), *flags],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        wait_serving(root + "/healthz", proc, "the simulator")
        yield root, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def simulator(*flags: str) -> Iterator[str]:
    """``worker simulate`` in its own process; yields the root URL."""
    with simulator_process(*flags) as (root, _):
        yield root


def _sim_counts(root: str) -> tuple[int, int]:
    stats = _get_json(root + "/stats")
    return int(stats["requests"]), int(stats["by_status"].get("429", 0))


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that accepts every export and drops it."""

    exports = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).exports += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def trace_collector() -> Iterator[dict[str, str]]:
    """A loopback OTLP collector; yields the environment that sends a worker's traces
    to it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{server.server_port}/v1/traces",
        }
    finally:
        server.shutdown()
        server.server_close()


def run_client(
    root: str, client: str, jobs: int, concurrency: int | str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One client, one process; adds the simulator's view (requests, 429s). ``env``:
    extra environment for the worker."""
    _get_json(root + "/stats/reset", post=True)
    # Vertex-shaped, so the worker sends the gs:// URIs as they are (as to Vertex AI).
    base_url = root + "/v1/projects/bench/locations/us-central1/endpoints/openapi"
    if client == "worker":
        with tempfile.TemporaryDirectory() as tmp:
            report_path = Path(tmp) / "report.json"
            cmd = [
                PY, "-m", "worker", "loadtest",
                "--base-url", base_url, "--auth", "none",
                "--jobs", str(jobs), "--concurrency", str(concurrency),
                "--progress", "off", "--report", str(report_path),
            ]  # fmt: skip
            subprocess.run(
                cmd,
                cwd=REPO,
                check=False,
                capture_output=True,
                timeout=900,
                env={**os.environ, **(env or {})},
            )
            rep = json.loads(report_path.read_text())
        result = {
            "client": "worker",
            "jobs": rep["jobs_sent"],
            "ok": rep["ok"],
            "lost": rep["jobs_sent"] - rep["ok"],
            "seconds": rep["seconds"],
            "jobs_per_s": rep["ok"] / rep["seconds"],
            "cpu_ms_per_job": rep["worker_cpu_ms_per_job"],
            "peak_rss_mb": rep["peak_rss_mb"],
            "peak_in_flight": max((p["in_flight"] for p in rep["timeline"]), default=0),
            "final_limit": rep["concurrency"]["final_limit"],
        }
    else:
        cmd = [
            PY, str(REPO / "bench" / "clients.py"), client,
            "--base-url", base_url, "--jobs", str(jobs), "--concurrency", str(concurrency),
        ]  # fmt: skip
        if client in ("minimal", "sdk"):
            with contextlib.suppress(ImportError):
                import uvloop  # noqa: F401

                cmd.append("--uvloop")
        out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=900)
        result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    requests, r429 = _sim_counts(root)
    result["requests"] = requests
    result["share_429"] = r429 / requests if requests else 0.0
    return result


# The raw floor, the SDK floor (the worker's own client, a bare post loop), the naive
# baseline and the worker, in that order: each ratio is to a floor measured in this run.
P1_CLIENTS = ("minimal", "sdk", "naive", "worker")
#: P4: the worker with every span exported (OTLP/HTTP to a loopback collector).
TRACED = "worker, traced (P4)"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs, to check the scripts")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--only", help="comma-separated scenarios to run (P1,P2,P5)")
    ns = ap.parse_args()
    scale = 0.25 if ns.quick else 1.0
    only = set((ns.only or "P1,P2,P5").upper().split(","))
    results: dict[str, Any] = {"cpus": os.cpu_count(), "quick": ns.quick}
    lines: list[str] = []

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if "P1" in only:
        n = int(2000 * scale)
        p1: dict[str, Any] = {}
        with simulator("--latency-ms", "200") as root:
            for client in P1_CLIENTS:
                say(f"P1: {client} ({n} jobs, concurrency 100, 200 ms) ...")
                p1[client] = run_client(root, client, n, 100)
            say(f"P4: worker with tracing on ({n} jobs, concurrency 100, 200 ms) ...")
            with trace_collector() as otel_env:
                p1[TRACED] = run_client(root, "worker", n, 100, env=otel_env)
            p1[TRACED]["client"] = TRACED
            p1[TRACED]["exports"] = _Collector.exports
        results["P1"] = p1
        floor, sdk = p1["minimal"], p1["sdk"]
        lines += [
            "",
            f"P1: 200 ms latency, concurrency 100, {n} jobs (ideal 500 jobs/s)",
            f"machine: the raw floor spent {floor['cpu_ms_per_job']:.3f} ms CPU per request",
            "",
            _row(
                "client",
                "jobs/s",
                "jobs/s ÷ minimal",
                "jobs/s ÷ sdk",
                "ok",
                "CPU ms/job (P3)",
                "CPU ÷ sdk",
                "peak RSS MB",
            ),
            _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"),
        ]
        for client in (*P1_CLIENTS, TRACED):
            r = p1[client]
            lines.append(
                _row(
                    client,
                    f"{r['jobs_per_s']:.1f}",
                    f"{r['jobs_per_s'] / floor['jobs_per_s']:.3f}",
                    f"{r['jobs_per_s'] / sdk['jobs_per_s']:.3f}",
                    f"{r['ok']}/{r['jobs']}",
                    f"{r['cpu_ms_per_job']:.3f}",
                    f"{r['cpu_ms_per_job'] / sdk['cpu_ms_per_job']:.2f}",
                    f"{r['peak_rss_mb']:.0f}",
                )
            )

        lines.append(
            f"P4: tracing on exported spans in {p1[TRACED]['exports']} OTLP requests to a "
            "loopback collector; the worker row above runs with tracing off (the default)"
        )

    if "P2" in only:
        n = int(1500 * scale)
        p2: dict[str, Any] = {}
        with simulator("--latency-ms", "300", "--rate-limit-rps", "100") as root:
            for client, conc in (("worker", "auto"), ("naive", 100)):
                say(f"P2: {client} ({n} jobs, concurrency {conc}, 100 req/s quota) ...")
                p2[client] = run_client(root, client, n, conc)
        results["P2"] = p2
        lines += [
            "",
            f"P2: 300 ms latency, 100 requests/s token bucket (not told), {n} jobs",
            "",
            _row("client", "concurrency", "jobs/s", "jobs lost", "429 share", "requests"),
            _row("---", "---", "---:", "---:", "---:", "---:"),
        ]
        for client, conc in (("worker", "auto"), ("naive", "100 (fixed)")):
            r = p2[client]
            extra = f" (final limit {r['final_limit']})" if client == "worker" else ""
            lines.append(
                _row(
                    client,
                    f"{conc}{extra}",
                    f"{r['jobs_per_s']:.1f}",
                    r["lost"],
                    f"{r['share_429']:.1%}",
                    r["requests"],
                )
            )

    if "P5" in only:
        n = int(3000 * scale)
        conc = int(1000 * scale) if ns.quick else 1000
        p5: dict[str, Any] = {}
        with simulator("--latency-ms", "2000") as root:
            for client in ("worker", "naive", "minimal"):
                say(f"P5: {client} ({n} jobs, {conc} in flight, 2 s latency) ...")
                p5[client] = run_client(root, client, n, conc)
        results["P5"] = p5
        lines += [
            "",
            f"P5: {conc} jobs in flight (2 s latency, {n} jobs)",
            "",
            _row("client", "peak RSS MB", "jobs/s", "ok", "peak in flight (sampled)"),
            _row("---", "---:", "---:", "---:", "---:"),
        ]
        for client in ("worker", "naive", "minimal"):
            r = p5[client]
            lines.append(
                _row(
                    client,
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['jobs_per_s']:.1f}",
                    f"{r['ok']}/{n}",
                    r.get("peak_in_flight", "n/a"),
                )
            )

    print("\n".join(lines).lstrip("\n"))
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
