"""``worker run`` on a file of N jobs against ``worker simulate`` in its own process: the
core pipeline's figure (file source -> model -> fsynced JSONL sink).

    .venv/bin/python bench/file_run.py [--jobs 2000] [--latency-ms 200] [--concurrency 100]

Prints the worker's own summary line, its CPU time and peak RSS, and jobs/s against the
concurrency / latency ceiling.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from run import simulator  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=100)
    ns = ap.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--latency-ms", str(ns.latency_ms)) as root,
    ):
        jobs = Path(tmp) / "jobs.jsonl"
        jobs.write_text(
            "".join(
                json.dumps({"id": f"j{i}", "image_uri": f"gs://bucket/img-{i}.jpg"}) + "\n"
                for i in range(ns.jobs)
            )
        )
        cmd = [
            sys.executable, "-m", "worker", "run",
            "--source", f"file:{jobs}", "--sink", f"jsonl:{tmp}/out/results.jsonl",
            "--base-url", f"{root}/v1/projects/bench/locations/us-central1/endpoints/openapi",
            "--auth", "none", "--concurrency", str(ns.concurrency), "--log-format", "text",
        ]  # fmt: skip
        print("worker", " ".join(cmd[3:]).replace(tmp, "$TMP"))
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = [line for line in proc.stderr.splitlines() if line.startswith("done:")]
        print(summary[0].split(";")[0] if summary else proc.stderr[-2000:])
        ceiling = ns.concurrency / (ns.latency_ms / 1000.0)
        results = (Path(tmp) / "out" / "results.jsonl").read_text().count("\n")
        print(
            f"exit={proc.returncode} results={results} wall_s={wall:.2f} (with start-up) "
            f"cpu_s={usage.ru_utime + usage.ru_stime:.2f} peak_rss_mb={usage.ru_maxrss / 1024:.0f} "
            f"ceiling={ceiling:.0f} jobs/s"
        )
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
