"""Never pay twice: what the result store saves, measured against a run without one.

    .venv/bin/python bench/reuse.py [--jobs 10000] [--images 2000] [--only R1|R2]

Both runs use ``gs://`` images in gcp-storage-emulator (the worker knows each by its
generation and checksum, from one metadata GET) and ``worker simulate`` (200 ms) in its own
process; jobs are shuffled, so repeats of an image arrive while its first call is in flight.

* R1, one process: N jobs over M distinct images from a file into JSONL, once with
  ``--store none`` and once with ``--store sqlite:...``. Prints model calls (the
  simulator's count), records written and jobs/s side by side.
* R2, three replicas: the same N jobs through the loopback Pub/Sub emulator, every message
  published twice, three ``worker run`` processes on one subscription sharing one Redis
  (the ``redis-server`` the test extra installs). Prints model calls, distinct results, jobs
  lost, and whether every result published more than once was the identical record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import PY, _free_port, _get_json, simulator, stop, wait_serving  # noqa: E402

from tests.fakes.pubsub_emulator import PubSubEmulator  # noqa: E402
from tests.fakes.redis_server import RedisServer  # noqa: E402

LATENCY_MS = 200
CONCURRENCY = 100


@contextmanager
def storage_emulator(images: int) -> Iterator[str]:
    """gcp-storage-emulator in its own process, holding ``images`` objects in bucket
    ``images``; yields its URL (for STORAGE_EMULATOR_HOST)."""
    port = _free_port()
    code = (
        "import time\n"
        "from gcp_storage_emulator.server import create_server\n"
        f"s = create_server('127.0.0.1', {port}, in_memory=True, default_bucket='images')\n"
        "s.start()\n"
        "time.sleep(10**9)\n"
    )
    proc = subprocess.Popen(
        [PY, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    root = f"http://127.0.0.1:{port}"
    try:
        wait_serving(root + "/storage/v1/b/images", proc, "gcp-storage-emulator")
        for i in range(images):
            req = urllib.request.Request(
                f"{root}/upload/storage/v1/b/images/o?uploadType=media&name=img-{i}.png",
                data=f"image {i}".encode(),  # Vertex AI (here the simulator) never reads them
                headers={"Content-Type": "image/png"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10):
                pass
        yield root
    finally:
        stop(proc)


def job_lines(jobs: int, images: int) -> list[dict[str, str]]:
    out = [{"id": f"j{i}", "image_uri": f"gs://images/img-{i % images}.png"} for i in range(jobs)]
    random.Random(7).shuffle(out)
    return out


def worker_env(storage: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["STORAGE_EMULATOR_HOST"] = storage
    return env


def base_url(root: str) -> str:
    return root + "/v1/projects/bench/locations/us-central1/endpoints/openapi"


# -- R1: one process, file -> JSONL, with and without a store ------------------------------------


def r1_once(root: str, storage: str, jobs: list[dict[str, str]], store: str) -> dict[str, Any]:
    _get_json(root + "/stats/reset", post=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "jobs.jsonl"
        src.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        store_uri = store.replace("$TMP", tmp)
        cmd = [
            PY, "-m", "worker", "run",
            "--source", f"file:{src}", "--sink", f"jsonl:{tmp}/results.jsonl",
            "--base-url", base_url(root), "--auth", "none", "--store", store_uri,
            "--concurrency", str(CONCURRENCY), "--no-progress", "--log-format", "text",
        ]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=REPO, env=worker_env(storage), capture_output=True, text=True, check=False
        )
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"worker exited {proc.returncode}: {proc.stderr[-2000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "results.jsonl").open()]
    stats = _get_json(root + "/stats")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "store": store.split(":")[0],
        "model_calls": int(stats["requests"]),
        "records": len(records),
        "distinct_ids": len({r["id"] for r in records}),
        "cached": sum(1 for r in records if r.get("cached")),
        "ok": sum(1 for r in records if r.get("status") == "ok"),
        "seconds": wall,
        "jobs_per_s": len(jobs) / wall,
        "cpu_ms_per_job": cpu * 1000 / len(jobs),
    }


def r1(jobs_n: int, images: int) -> None:
    jobs = job_lines(jobs_n, images)
    print(f"R1  {jobs_n} jobs over {images} gs:// images, file -> JSONL, one process, "
          f"--concurrency {CONCURRENCY}, simulator {LATENCY_MS} ms")  # fmt: skip
    with (
        storage_emulator(images) as storage,
        simulator("--latency-ms", str(LATENCY_MS)) as root,
    ):
        rows = [r1_once(root, storage, jobs, s) for s in ("none", "sqlite:$TMP/store.sqlite")]
    print(f"    {'store':<8}{'model calls':>12}{'records':>9}{'cached':>8}{'ok':>7}"
          f"{'wall s':>8}{'jobs/s':>8}{'CPU ms/job':>11}")  # fmt: skip
    for r in rows:
        print(f"    {r['store']:<8}{r['model_calls']:>12}{r['records']:>9}{r['cached']:>8}"
              f"{r['ok']:>7}{r['seconds']:>8.1f}{r['jobs_per_s']:>8.0f}{r['cpu_ms_per_job']:>11.2f}")  # fmt: skip
    base, store = rows
    print(f"    sqlite store: {store['model_calls'] / base['model_calls']:.2f} of the model calls, "
          f"{store['jobs_per_s'] / base['jobs_per_s']:.2f}x the jobs/s of the run without a store; "
          f"lost {jobs_n - store['distinct_ids']}")  # fmt: skip


# -- R2: three replicas on one subscription and one Redis, every message twice --------------------


async def r2_once(
    jobs: list[dict[str, str]], root: str, storage: str, store: str
) -> dict[str, Any]:
    """Every job published twice; three replicas drain the subscription with ``store``."""
    async with PubSubEmulator() as emu:
        for topic in ("jobs", "results", "failed"):
            emu.create_topic("p", topic)
        emu.create_subscription(
            "p", "work", "jobs", dead_letter_topic="dlq", max_delivery_attempts=5
        )
        for job in jobs:
            data = json.dumps(job).encode()
            emu.publish("p", "jobs", data)
            emu.publish("p", "jobs", data)  # every message twice
        emu.reset_stats()
        _get_json(root + "/stats/reset", post=True)
        env = worker_env(storage)
        env["PUBSUB_EMULATOR_HOST"] = emu.host_port
        cmd = [
            PY, "-m", "worker", "run",
            "--source", "pubsub:projects/p/subscriptions/work",
            "--sink", "pubsub:projects/p/topics/results",
            "--dead-letter", "pubsub:projects/p/topics/failed",
            "--base-url", base_url(root), "--auth", "none", "--store", store,
            "--concurrency", str(CONCURRENCY), "--no-progress",
            "--log-level", "warning", "--log-format", "text",
        ]  # fmt: skip
        messages = 2 * len(jobs)
        procs = [
            await anyio.open_process(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=None)
            for _ in range(3)
        ]
        try:
            while emu.stats["deliveries"] == 0:
                check_running(procs)
                await anyio.sleep(0.01)
            started = time.monotonic()
            while emu.acked("p", "work") < messages:
                check_running(procs)
                await anyio.sleep(0.05)
            seconds = time.monotonic() - started
        finally:
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
            codes = [await p.wait() for p in procs]
        published = emu.messages_on_topic("p", "results")
        failed = emu.messages_on_topic("p", "failed")
        redeliveries = emu.stats["redeliveries"]
    stats = _get_json(root + "/stats")
    by_id: dict[str, set[str]] = defaultdict(set)
    count_by_id: dict[str, int] = defaultdict(int)
    for m in published:
        data = m["data"] if isinstance(m["data"], str) else m["data"].decode()
        rec = json.loads(data)
        by_id[rec["id"]].add(data)
        count_by_id[rec["id"]] += 1
    repeated = [i for i, n in count_by_id.items() if n > 1]
    differing = [i for i in repeated if len(by_id[i]) > 1]
    if differing and store != "none":
        print(f"    records published for {differing[0]}:")
        print(*sorted(by_id[differing[0]]), sep="\n")
    return {
        "store": store.split(":")[0],
        "exits": codes,
        "model_calls": int(stats["requests"]),
        "published": len(published),
        "distinct": len(by_id),
        "lost": len({j["id"] for j in jobs} - set(by_id)),
        "dead": len(failed),
        "repeated": len(repeated),
        "differing": len(differing),
        "redeliveries": redeliveries,
        "seconds": seconds,
        "jobs_per_s": len(jobs) / seconds,
    }


async def r2_async(jobs_n: int, images: int, root: str, storage: str) -> None:
    jobs = job_lines(jobs_n, images)
    rows = [await r2_once(jobs, root, storage, "none")]
    redis = RedisServer()
    await redis.start()
    try:
        rows.append(await r2_once(jobs, root, storage, redis.url))
    finally:
        await redis.aclose()
    print(f"    {'store':<7}{'model calls':>12}{'published':>10}{'distinct ids':>13}{'lost':>6}"
          f"{'dead':>6}{'ids twice':>10}{'differing':>10}{'wall s':>8}{'jobs/s':>8}  exits")  # fmt: skip
    for r in rows:
        print(f"    {r['store']:<7}{r['model_calls']:>12}{r['published']:>10}{r['distinct']:>13}"
              f"{r['lost']:>6}{r['dead']:>6}{r['repeated']:>10}{r['differing']:>10}"
              f"{r['seconds']:>8.1f}{r['jobs_per_s']:>8.0f}  {r['exits']}")  # fmt: skip
    base, store = rows
    print(f"    redis store: {store['model_calls'] / base['model_calls']:.2f} of the model calls, "
          f"{store['jobs_per_s'] / base['jobs_per_s']:.2f}x the jobs/s (jobs = distinct ids; "
          f"wall time from first delivery to last ack)")  # fmt: skip


def check_running(procs: list[anyio.abc.Process]) -> None:
    if any(p.returncode is not None for p in procs):
        raise RuntimeError("a replica exited before the subscription was drained")


def r2(jobs_n: int, images: int) -> None:
    print(f"R2  {jobs_n} jobs over {images} gs:// images, every message published twice, "
          f"3 replicas x --concurrency {CONCURRENCY} on one subscription; no store, then one "
          "Redis")  # fmt: skip
    with (
        storage_emulator(images) as storage,
        simulator("--latency-ms", str(LATENCY_MS)) as root,
    ):
        anyio.run(r2_async, jobs_n, images, root, storage)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=2_000)
    ap.add_argument("--only", choices=("R1", "R2"))
    ns = ap.parse_args()
    if ns.only in (None, "R1"):
        r1(ns.jobs, ns.images)
    if ns.only in (None, "R2"):
        r2(ns.jobs, ns.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
