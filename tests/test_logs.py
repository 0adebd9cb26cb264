"""Logs of a whole run: one Cloud Logging JSON object a line, stable event names, the
job fields where they apply, and never a token or an image's bytes.

Real google-auth in a worker subprocess gets short-lived ``ya29.fixture-`` tokens from
the fake metadata server; the simulator accepts only those, so tokens really travel
and are refreshed during the run.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import anyio

from worker.simulator import Simulator

from .fakes.metadata_server import TOKEN_PREFIX, MetadataServer
from .helpers import EXAMPLES, REPO, read_jsonl


async def test_json_logs_of_a_full_run_parse_and_hold_no_secret(
    metadata: MetadataServer, sim: Simulator, tmp_path: Path
) -> None:
    sim.config.require_token = True
    metadata.on_issue = sim.accept_token
    metadata.token_ttl_s = 2.0  # refreshed during the run
    sim.config.latency_ms = 80.0  # ~2.5 s at 2 in flight
    image = (EXAMPLES / "red-square.png").read_bytes()
    image_b64 = base64.b64encode(image).decode()
    jobs = [{"id": f"g{i}", "image_uri": f"gs://sample-bucket/{i}.jpg"} for i in range(60)]
    jobs.append({"id": "inline", "image_uri": "data:image/png;base64," + image_b64})
    jobs.append({"id": "local", "image_uri": str(EXAMPLES / "orange-disc.png")})
    jobs.append({"id": "bad", "image_uri": "ftp://example/x.png"})
    src = tmp_path / "jobs.jsonl"
    src.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    sink = tmp_path / "out" / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}

    cmd = [
        sys.executable, "-m", "worker", "run", "--source", f"file:{src}", "--sink", f"jsonl:{sink}",
        "--base-url", sim.vertex_base_url(), "--auth", "google", "--concurrency", "2",
        "--log-format", "json", "--log-level", "debug",
    ]  # fmt: skip

    proc = await anyio.run_process(cmd, env=env, cwd=REPO, check=False)

    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert proc.stdout == b""
    assert len(read_jsonl(sink)) == len(jobs) - 1
    assert len(metadata.issued) >= 2, "the run outlived a token"
    assert sim.stats().missing_token_401 == sim.stats().invalid_token_401 == 0
    # No secret and no image bytes, in any form.
    assert TOKEN_PREFIX not in stderr and "ya29." not in stderr
    for token, _, _ in metadata.issued:
        assert token not in stderr
        assert token.removeprefix(TOKEN_PREFIX)[:16] not in stderr
    assert image_b64[:32] not in stderr
    orange_b64 = base64.b64encode((EXAMPLES / "orange-disc.png").read_bytes()).decode()
    assert orange_b64[:32] not in stderr

    events = []
    for line in stderr.splitlines():
        entry = json.loads(line)  # every line is one JSON object
        assert {"severity", "message", "time"} <= set(entry), entry
        assert entry["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert entry["time"].endswith("Z")
        events.append(entry)
    by_name: dict[str, list[dict[str, object]]] = {}
    for e in events:
        by_name.setdefault(str(e["message"]), []).append(e)

    assert len(by_name["token_refreshed"]) >= 2
    (dead,) = by_name["job_dead_lettered"]
    assert dead["severity"] == "WARNING"
    assert dead["job_id"] == "bad" and dead["error_type"] == "unsupported_scheme"
    succeeded = by_name["job_succeeded"]
    assert len(succeeded) == len(jobs) - 1
    assert all({"job_id", "attempt", "latency_s"} <= set(e) for e in succeeded)
    assert isinstance(succeeded[0]["latency_s"], float)
    (finished,) = by_name["run_finished"]
    assert finished["ok"] == len(jobs) - 1 and finished["dead_lettered"] == 1
