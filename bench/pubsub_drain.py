"""2,000 jobs through Pub/Sub: ``worker run`` against the loopback Pub/Sub emulator
(tests/fakes) and the simulator (200 ms), at ``--concurrency 100``.

    .venv/bin/python bench/pubsub_drain.py [--jobs 2000] [--latency-ms 200] [--concurrency 100]

Prints jobs/s (first delivery to last ack, so process start-up is not counted), duplicates,
redeliveries, and how acks were batched. The ceiling is concurrency / latency.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes.pubsub_emulator import PubSubEmulator  # noqa: E402
from worker.simulator import SimConfig, Simulator  # noqa: E402


async def main(jobs: int, latency_ms: float, concurrency: int) -> None:
    async with PubSubEmulator() as emu, Simulator(SimConfig(latency_ms=latency_ms)) as sim:
        for topic in ("jobs", "results", "failed"):
            emu.create_topic("p", topic)
        emu.create_subscription(
            "p", "work", "jobs", dead_letter_topic="dlq", max_delivery_attempts=5
        )
        for i in range(jobs):
            job = {"id": f"j{i}", "image_uri": f"gs://bkt/{i}.jpg"}
            emu.publish("p", "jobs", json.dumps(job).encode())
        emu.reset_stats()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        env["PUBSUB_EMULATOR_HOST"] = emu.host_port
        cmd = [
            sys.executable, "-m", "worker", "run",
            "--source", "pubsub:projects/p/subscriptions/work",
            "--sink", "pubsub:projects/p/topics/results",
            "--dead-letter", "pubsub:projects/p/topics/failed",
            "--base-url", sim.vertex_base_url(), "--auth", "none",
            "--concurrency", str(concurrency), "--log-level", "warning", "--log-format", "text",
        ]  # fmt: skip
        print("worker", " ".join(cmd[3:]))
        async with await anyio.open_process(
            cmd, env=env, cwd=REPO, stdout=None, stderr=None
        ) as proc:
            while emu.stats["deliveries"] == 0:
                await anyio.sleep(0.005)
            started = time.monotonic()
            while emu.acked("p", "work") < jobs:
                await anyio.sleep(0.01)
            seconds = time.monotonic() - started
            proc.send_signal(signal.SIGTERM)
            rc = await proc.wait()
        ids = Counter(json.loads(m["data"])["id"] for m in emu.messages_on_topic("p", "results"))
        s = emu.stats
        ceiling = concurrency / (latency_ms / 1000.0)
        print(
            f"exit={rc} jobs={jobs} seconds={seconds:.2f} jobs_per_s={jobs / seconds:.0f} "
            f"({jobs / seconds / ceiling:.2f} of the {ceiling:.0f} jobs/s ceiling)"
        )
        print(
            f"results={sum(ids.values())} distinct={len(ids)} duplicates={sum(ids.values()) - len(ids)} "
            f"redeliveries={s['redeliveries']} expired={s['expired']} nacks={s['nacks']}"
        )
        print(
            f"pulls={s['pulls']} (empty {s['empty_pulls']}) ack_requests={s['ack_requests']} "
            f"acks={s['acks']} ids_per_ack_request={s['acks'] / max(1, s['ack_requests']):.1f} "
            f"max_ids_per_ack={s['max_ack_ids_per_request']} modack_requests={s['modack_requests']} "
            f"publish_requests={s['publish_requests']} outstanding={emu.outstanding('p', 'work')} "
            f"pending={emu.pending('p', 'work')}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=100)
    ns = ap.parse_args()
    anyio.run(main, ns.jobs, ns.latency_ms, ns.concurrency)
