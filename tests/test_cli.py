"""The fixed command-line interface, driven as a user would: in a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from worker.simulator import Simulator

from .helpers import REPO, gs_jobs, jobs_file, read_jsonl, worker_env

SEED_URI = "gs://cloud-samples-data/generative-ai/image/scones.jpg"


def _env() -> dict[str, str]:
    # The simulator stands in for Vertex AI, which reads gs:// and data: itself.
    return worker_env(WORKER_IMAGES__BACKEND="vertex")


async def _worker(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m worker ARGS`` from the repository root, without a developer's WORKER_*."""
    return await anyio.run_process(
        [sys.executable, "-m", "worker", *args], cwd=REPO, env=env or _env(), check=False
    )


async def test_describe_sends_exactly_the_seed_request(sim: Simulator) -> None:
    proc = await _worker(
        "describe",
        SEED_URI,
        "--base-url",
        sim.vertex_base_url("p", "us-central1"),
        "--auth",
        "none",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(sim.requests) == 1
    req = sim.requests[0]
    assert req.path == "/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions"
    assert req.body == {
        "model": "google/gemini-2.0-flash-001",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the following image:"},
                    {"type": "image_url", "image_url": SEED_URI},
                ],
            }
        ],
    }
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1  # stdout carries results only
    record = json.loads(lines[0])
    assert record["status"] == "ok"
    assert record["image_uri"] == SEED_URI
    assert "scones.jpg" in record["description"]


async def test_describe_exits_1_when_an_image_fails(sim: Simulator) -> None:
    proc = await _worker(
        "describe",
        SEED_URI,
        "ftp://x/y.png",
        "--base-url",
        sim.base_url,
        "--auth",
        "none",
        "--prompt",
        "What is this?",
    )
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert sorted(r["status"] for r in records) == ["error", "ok"]
    assert sim.requests[0].body["messages"][0]["content"][0]["text"] == "What is this?"


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--concurrency", "lots"], "worker.concurrency"),
        (["--timeout-s", "-1"], "model.timeout_s"),
        (["--sink", "s3:bucket"], "worker.sink"),
        (["--source", "nowhere"], "worker.source"),
        (["--base-url", "ftp://x"], "model.base_url"),
    ],
)
async def test_bad_settings_exit_2_with_one_line_naming_the_key(args: list[str], key: str) -> None:
    proc = await _worker("run", "--auth", "none", "--base-url", "http://127.0.0.1:9/v1", *args)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and key in err[0], err


async def test_bad_env_value_exits_2() -> None:
    env = _env() | {"WORKER_RETRY__MAX_ATTEMPTS": "zero"}
    proc = await _worker("run", "--base-url", "http://127.0.0.1:9/v1", env=env)
    assert proc.returncode == 2
    assert "retry.max_attempts" in proc.stderr.decode()


def _start_up_errors(tmp_path: Path) -> list[tuple[list[str], dict[str, str], str, str]]:
    """(args, extra env, key, what the line must name) for each start-up failure a user
    can cause."""
    source = jobs_file(tmp_path, ['{"image_uri": "gs://b/o.jpg"}'])
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    creds = tmp_path / "creds.json"
    creds.write_text("this is not a credentials file")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[worker\n")
    ok_sink = f"jsonl:{tmp_path / 'out.jsonl'}"
    return [
        (["--source", "file:/does/not/exist.jsonl"], {}, "worker.source", "/does/not/exist.jsonl"),
        (["--source", f"file:{tmp_path}"], {}, "worker.source", "is a directory"),
        (
            ["--source", source, "--sink", f"jsonl:{blocker}/r.jsonl"],
            {},
            "worker.sink",
            "a-file",
        ),
        (
            ["--source", source, "--sink", ok_sink, "--dead-letter", f"jsonl:{blocker}/d"],
            {},
            "worker.dead_letter",
            "a-file",
        ),
        (
            ["--source", source, "--sink", ok_sink, "--auth", "google"],
            {"GOOGLE_APPLICATION_CREDENTIALS": str(creds)},
            "model.auth",
            "creds.json",
        ),
        (["--config", str(bad_toml)], {}, "--config", "bad.toml"),
    ]


@pytest.mark.parametrize("case", range(6))
async def test_start_up_failures_are_one_line_naming_what_to_fix(case: int, tmp_path: Path) -> None:
    args, env, key, names = _start_up_errors(tmp_path)[case]
    if "--auth" not in args:
        args = [*args, "--auth", "none"]
    proc = await _worker("run", "--base-url", "http://127.0.0.1:9/v1", *args, env=_env() | env)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, err
    assert len(err) == 1, err  # never a traceback
    assert err[0].startswith(f"worker: config error: {key}: ")
    assert names in err[0]


async def test_make_run_configuration_describes_every_bundled_job(tmp_path: Path) -> None:
    sink = tmp_path / "results.jsonl"
    proc = await _worker(
        "run",
        "--config",
        "config/local.toml",
        "--sink",
        f"jsonl:{sink}",
        # The result store too, or the test would write out/store.sqlite in the checkout
        # (and a later `make run` would find every answer stored).
        "--store",
        f"sqlite:{tmp_path / 'store.sqlite'}",
        # What `make run` shows at a terminal (JSON, the default off a TTY, has no
        # human summary line).
        "--log-format",
        "text",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    jobs = (REPO / "examples" / "jobs.jsonl").read_text().splitlines()
    results = read_jsonl(sink)
    assert len(results) == len(jobs)
    assert all(r["status"] == "ok" and " image, mostly " in r["description"] for r in results)
    assert proc.stdout == b""
    assert "done: 9 ok, 0 dead-lettered" in proc.stderr.decode()


async def test_sigkill_mid_run_then_rerun_finishes_every_job_exactly_once(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.config.latency_ms = 20.0
    n = 400
    source = jobs_file(tmp_path, gs_jobs(n, "k"))
    sink = tmp_path / "out" / "results.jsonl"
    cmd = [
        sys.executable, "-m", "worker", "run", "--source", source, "--sink", f"jsonl:{sink}",
        "--base-url", sim.base_url, "--auth", "none", "--concurrency", "4",
    ]  # fmt: skip

    async with await anyio.open_process(cmd, env=_env()) as proc:
        with anyio.fail_after(20):
            while (sink.read_bytes().count(b"\n") if sink.exists() else 0) < n // 4:
                await anyio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    partial = len(read_jsonl(sink))
    assert 0 < partial < n

    again = await anyio.run_process(cmd, env=_env(), check=False)

    assert again.returncode == 0, again.stderr.decode()
    ids = [r["id"] for r in read_jsonl(sink)]
    assert sorted(ids) == sorted(f"k{i}" for i in range(n))  # all there, none twice
    assert "skipped" in again.stderr.decode()
