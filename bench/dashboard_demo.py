"""A five-minute run that gives every panel of deploy/monitoring/grafana-dashboard.json
something to show, scraped by a real Prometheus, then rendered to a PNG by
deploy/monitoring/render_dashboard.py (matplotlib, not Grafana).

    .venv/bin/python bench/dashboard_demo.py [--out docs/dashboard.png] [--seconds 330]

What runs, all on loopback: the simulator standing in for Vertex AI in three locations
(us-central1 and europe-west4 with standard quotas, global for Flex PayGo), the Pub/Sub
emulator of tests/fakes, the fake GCE metadata server (3-minute tokens, so refreshes show;
a burst of failures at one refresh), two `worker run` processes (the second one joins
after a minute, as KEDA would add it) with --concurrency auto, a budget and a SQLite
result store, and `prometheus` (Debian's package) scraping them every 2 s.

The load: 25 jobs/s, then 110 jobs/s (more than the quota serves: backlog, queue lag,
429s, quota saturation), then 15 jobs/s while the backlog drains; 2% bad jobs
(dead-lettered), 10% flex jobs, 15% images seen before (answered from the store), 3% job
ids published twice; europe-west4 goes down for 40 s (its circuit opens).

The backlog panel reads the GCP metric pubsub_googleapis_com:subscription_num_undelivered_messages;
here a small exporter serves the emulator's count of unacked messages under that name,
standing in for what Managed Service for Prometheus would read from Cloud Monitoring.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes.metadata_server import MetadataServer  # noqa: E402
from tests.fakes.pubsub_emulator import PubSubEmulator  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from worker.simulator import RegionConfig, SimConfig, Simulator  # noqa: E402

P = "p"
SCRAPE_S = 2


def rate_at(t: float, seconds: float) -> float:
    """Jobs published per second, t seconds into the run."""
    if t < seconds * 0.18:
        return 25.0
    if t < seconds * 0.52:
        return 110.0
    return 15.0


def worker_config(tmp: Path, sim: Simulator) -> Path:
    path = tmp / "demo.toml"
    path.write_text(
        f"""
[model]
auth = "google"
timeout_s = 30.0

[[model.endpoints]]
url = "{sim.vertex_base_url(project="demo", location="us-central1")}"
name = "us-central1"

[[model.endpoints]]
url = "{sim.region_base_url("europe-west4", project="demo")}"
name = "europe-west4"

[[model.endpoints]]
url = "{sim.region_base_url("global", project="demo")}"
name = "global"
tier = "flex"

[worker]
source = "pubsub:projects/{P}/subscriptions/work"
sink = "pubsub:projects/{P}/topics/results"
dead_letter = "pubsub:projects/{P}/topics/dead"
concurrency = "auto"
min_concurrency = 2
max_concurrency = 64
budget_usd = 0.5

[retry]
deadline_s = 60.0

[store]
uri = "sqlite:{tmp / "store.db"}"
key = "uri"
"""
    )
    return path


async def backlog_exporter(emu: PubSubEmulator, port: int) -> web.AppRunner:
    name = "pubsub_googleapis_com:subscription_num_undelivered_messages"

    async def metrics(_: web.Request) -> web.Response:
        n = emu.pending(P, "work") + emu.outstanding(P, "work")
        text = f'# TYPE {name} gauge\n{name}{{subscription_id="work"}} {n}\n'
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def publish(emu: PubSubEmulator, seconds: float, started: float) -> int:
    rng = random.Random(7)
    sent: list[str] = []
    n = 0
    while (t := time.monotonic() - started) < seconds:
        for _ in range(max(1, round(rate_at(t, seconds) / 10))):
            n += 1
            roll = rng.random()
            job: dict[str, str] = {"id": f"j{n}", "image_uri": f"gs://demo-bucket/img-{n}.jpg"}
            if roll < 0.02:
                job["image_uri"] = f"ftp://example.invalid/{n}.png"  # dead-lettered
            elif roll < 0.12:
                job["tier"] = "flex"
            elif roll < 0.27 and sent:
                job["image_uri"] = rng.choice(sent)  # seen before: the store answers
            sent.append(job["image_uri"])
            data = json.dumps(job).encode()
            emu.publish(P, "jobs", data)
            if rng.random() < 0.03:
                emu.publish(P, "jobs", data)  # the same job twice
        await anyio.sleep(0.1)
    return n


def start_worker(
    config: Path, port: int, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "worker", "run", "--config", str(config),
        "--http-port", str(port), "--log-format", "json", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as err:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)


def start_prometheus(tmp: Path, targets: list[str], port: int) -> subprocess.Popen[bytes]:
    config = tmp / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: {SCRAPE_S}s
  evaluation_interval: {SCRAPE_S}s
scrape_configs:
  - job_name: image-describer-worker
    static_configs:
      - targets: {json.dumps(targets)}
"""
    )
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("needs prometheus on PATH (Debian: apt-get install prometheus)")
    cmd = [
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    with (tmp / "prometheus.log").open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log)


async def main(out: Path, seconds: float, keep: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dashboard-demo-"))
    sim = Simulator(
        SimConfig(
            latency_ms=350.0,
            latency_dist="lognormal",
            latency_sigma=0.4,
            rate_limit_rps=35.0,
            error_rate=0.01,
            require_token=True,
            flex_rate_limit_rps=8.0,
            regions=(
                RegionConfig("europe-west4", rate_limit_rps=20.0),
                RegionConfig("global", rate_limit_rps=10.0),
            ),
        )
    )
    metadata = MetadataServer(token_ttl_s=180.0, on_issue=sim.accept_token)
    procs: list[subprocess.Popen[bytes]] = []
    async with PubSubEmulator() as emu, sim:
        await metadata.start()
        for topic in ("jobs", "results", "dead", "dlq"):
            emu.create_topic(P, topic)
        emu.create_subscription(P, "work", "jobs", dead_letter_topic="dlq", max_delivery_attempts=5)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        env.update(
            PUBSUB_EMULATOR_HOST=emu.host_port,
            GCE_METADATA_HOST=metadata.host_port,
            GCE_METADATA_IP=metadata.host_port,
            CLOUDSDK_CONFIG=str(tmp / "gcloud"),
            GOOGLE_CLOUD_PROJECT="demo",
            WORKER_HTTP__HOST="127.0.0.1",
        )
        config = worker_config(tmp, sim)
        ports = [free_port(), free_port()]
        exporter_port, prom_port = free_port(), free_port()
        exporter = await backlog_exporter(emu, exporter_port)
        targets = [f"127.0.0.1:{p}" for p in (*ports, exporter_port)]
        procs.append(start_prometheus(tmp, targets, prom_port))
        try:
            await anyio.sleep(6)  # Prometheus discovers its targets after ~5 s
            started = time.monotonic()
            t0 = time.time()
            procs.append(start_worker(config, ports[0], env, tmp / "worker-0.log"))
            print(f"run: {seconds:.0f} s", flush=True)
            async with anyio.create_task_group() as tg:

                async def scenario() -> None:
                    await anyio.sleep(seconds * 0.22)
                    procs.append(start_worker(config, ports[1], env, tmp / "worker-1.log"))
                    await anyio.sleep(seconds * 0.18)  # the first token's refresh (135 s)
                    metadata.fail_next = 15  # google-auth tries 5 times per refresh
                    await anyio.sleep(seconds * 0.2)
                    await sim.stop_region("europe-west4")
                    await anyio.sleep(40)
                    await sim.start_region("europe-west4")

                tg.start_soon(scenario)
                published = await publish(emu, seconds, started)
                await anyio.sleep(5)
                tg.cancel_scope.cancel()
            for proc in procs[1:]:
                proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(40):  # the workers drain: keep serving their acks
                while any(proc.poll() is None for proc in procs[1:]):
                    await anyio.sleep(0.1)
            t1 = time.time()
            await anyio.sleep(2 * SCRAPE_S)
            print(
                f"published {published}, acked {emu.acked(P, 'work')}, backlog "
                f"{emu.pending(P, 'work')}, token failures {metadata.failed_token_requests}",
                flush=True,
            )
            render = [
                sys.executable, str(REPO / "deploy" / "monitoring" / "render_dashboard.py"),
                "--prometheus", f"http://127.0.0.1:{prom_port}", "--out", str(out),
                "--start", f"{t0 - 10:.0f}", "--end", f"{t1:.0f}", "--var", "subscription=work",
                "--scrape-interval", f"{SCRAPE_S}s", "--rate-interval", "20s",
                "--subtitle",
                "The dashboard's PromQL rendered with matplotlib from a real Prometheus scraping "
                "two workers (bench/dashboard_demo.py: simulator, Pub/Sub emulator); not Grafana.",
            ]  # fmt: skip
            await anyio.run_process(render, stdout=None, stderr=None)
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=20)
            await exporter.cleanup()
            await metadata.stop()
            if keep:
                print(f"kept {tmp}", flush=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=330.0)
    parser.add_argument("--keep", action="store_true", help="keep the logs, TSDB and config")
    args = parser.parse_args()
    anyio.run(main, args.out.resolve(), args.seconds, args.keep)
