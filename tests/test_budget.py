"""``--budget-usd``: a file run stops at the budget (exit 3) and a rerun with more finishes
the rest, no job done twice; a Pub/Sub run stops pulling, hands back what it holds, turns
not-ready and waits for SIGTERM (exit 0). ``worker run`` runs as a subprocess."""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path

import anyio

from worker.cost import Prices
from worker.settings import DEFAULT_MODEL, default_prices
from worker.simulator import Simulator

from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import (
    PROJECT,
    REPO,
    free_port,
    gs_jobs,
    http_get,
    jobs_file,
    publish_jobs,
    read_jsonl,
    wait_until,
    worker_env,
)

# What the simulator reports for a job of gs_jobs/publish_jobs with the default prompt
# ("Describe the following image:", 4 words): 4 + 258 prompt tokens for the image, and a
# 7-word description ("A simulated description of img-3.jpg (ref 1a2b3c).").
USAGE = {"prompt_tokens": 262, "completion_tokens": 7, "total_tokens": 269}
_JOB_USD = Prices(default_prices()).cost_usd(DEFAULT_MODEL, USAGE, "standard")
assert _JOB_USD is not None
JOB_USD: float = _JOB_USD


def _cmd(sim: Simulator, source: str, sink: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker", "run",
        "--source", source, "--sink", f"jsonl:{sink}",
        "--base-url", sim.vertex_base_url(), "--auth", "none", "--image-backend", "vertex",
        "--log-format", "text", *extra,
    ]  # fmt: skip


async def _run(cmd: list[str]) -> tuple[int, str]:
    with anyio.fail_after(30):
        done = await anyio.run_process(cmd, check=False, env=worker_env(), cwd=REPO)
    return done.returncode, done.stderr.decode()


async def test_a_file_run_stops_at_the_budget_and_a_rerun_finishes_the_rest(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.config.latency_ms = 20.0
    n = 30
    source = jobs_file(tmp_path, gs_jobs(n))
    results = tmp_path / "out" / "results.jsonl"
    # Enough for 10.5 jobs: the 11th answer spends it; with 2 requests in flight, at
    # most one more answer comes after that.
    budget = 10.5 * JOB_USD
    code, err = await _run(
        _cmd(sim, source, str(results), "--concurrency", "2", "--budget-usd", f"{budget:.12f}")
    )
    assert code == 3, err
    assert "budget reached" in err
    first = read_jsonl(results)
    assert all(r["usage"] == USAGE for r in first), "the simulator's usage changed"
    assert 11 <= len(first) <= 12, len(first)
    spent = sum(float(r["cost_usd"]) for r in first)
    assert budget <= spent <= budget + 2 * JOB_USD
    assert f"${spent:.4f} spent" in err
    assert not results.with_name("results.dead-letter.jsonl").read_text().strip()

    code, err = await _run(_cmd(sim, source, str(results), "--budget-usd", "1.0"))
    assert code == 0, err
    assert f"done: {n - len(first)} ok" in err
    assert f"{len(first)} skipped" in err
    assert "budget reached" not in err
    ids = Counter(str(r["id"]) for r in read_jsonl(results))
    assert ids == Counter(f"job-{i}" for i in range(n)), "every job exactly once"
    assert sim.stats().by_status == {200: n}, "no job was sent to the model twice"


async def _wait_for_body(url: str, text: str, timeout_s: float) -> tuple[int, str]:
    """GET ``url`` until its body holds ``text``; (status, body)."""
    with anyio.fail_after(timeout_s):
        while True:
            try:
                status, body = await http_get(url)
            except OSError:
                status, body = 0, ""
            if text in body:
                return status, body
            await anyio.sleep(0.05)


async def test_a_pubsub_run_idles_at_the_budget_until_sigterm(
    emu: PubSubEmulator, sim: Simulator, tmp_path: Path
) -> None:
    n = 40
    publish_jobs(emu, n)
    sim.config.latency_ms = 30.0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    results = tmp_path / "results.jsonl"
    cmd = _cmd(
        sim,
        f"pubsub:projects/{PROJECT}/subscriptions/work",
        str(results),
        "--concurrency", "2",
        "--budget-usd", f"{5.5 * JOB_USD:.12f}",
        "--http-port", str(port),
        "--log-format", "json",
    )  # fmt: skip
    err_path = tmp_path / "stderr"
    env = worker_env(PUBSUB_EMULATOR_HOST=emu.host_port)
    with err_path.open("wb") as stderr:
        proc = await anyio.open_process(cmd, env=env, stderr=stderr, cwd=REPO)
        try:
            status, body = await _wait_for_body(f"{base}/readyz", "budget_exhausted", 20)
            assert status == 503, body
            assert json.loads(body)["phase"] == "budget_exhausted"
            healthz = await http_get(f"{base}/healthz")
            assert healthz[0] == 200, healthz
            # What the worker held and had not started is handed back: none outstanding.
            await wait_until(lambda: emu.outstanding(PROJECT, "work") == 0, 10, "nacks")
            acked = emu.acked(PROJECT, "work")
            # 5.5 jobs' worth: the 6th answer spends it, one more may have been in flight.
            assert 6 <= acked <= 7
            assert len(read_jsonl(results)) == acked
            assert emu.pending(PROJECT, "work") == n - acked
            _, metrics = await http_get(f"{base}/metrics")
            assert "worker_budget_exhausted 1.0" in metrics
            assert 'worker_phase{phase="budget_exhausted"} 1.0' in metrics
            # Still not ready, and nothing more pulled or acked while it idles.
            assert (await http_get(f"{base}/readyz"))[0] == 503
            assert emu.outstanding(PROJECT, "work") == 0
            assert emu.acked(PROJECT, "work") == acked
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with anyio.move_on_after(5, shield=True):
                    await proc.wait()
            await proc.aclose()
    err = err_path.read_text()
    assert code == 0, err
    events = [json.loads(line)["message"] for line in err.splitlines() if line.startswith("{")]
    assert events.count("budget_exhausted") == 1
    assert "budget_exhausted_idle" in events
    assert "shutdown_requested" in events
    # None lost, none done twice: the rest wait on the subscription for a worker with
    # budget; nothing was delivered again to this one after it handed them back.
    assert emu.pending(PROJECT, "work") == n - acked
    assert emu.outstanding(PROJECT, "work") == 0
    done = Counter(str(r["id"]) for r in read_jsonl(results))
    assert len(done) == acked
    assert set(done.values()) == {1}
    assert max(emu.delivery_counts(PROJECT, "work").values()) == 1
