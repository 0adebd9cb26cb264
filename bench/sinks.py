"""Sink throughput in one run: the fsynced JSONL file (the reference), ``gs://`` against
gcp-storage-emulator and ``bq:`` against bqemulator, each on 127.0.0.1.

    .venv/bin/python bench/sinks.py [--records 50000] [--bq-records 5000] [--writers 50]

Each sink gets result records of the usual shape (~420 bytes), written by ``--writers``
concurrent tasks in batches of 100, as the pipeline's group commit hands them over (a
``write`` returns once its records are durable: fsynced, in a finalised object, or
inserted). Prints records/s and the ratio to JSONL, and checks that every record is
there afterwards. The emulators are not the services: the GCS figure is bounded by a
single-threaded Python server, the BigQuery one by bqemulator's DuckDB inserts. What the
figures show is that the sink is not what limits a worker (a worker makes a few hundred
to a few thousand model calls a second).

Needs the test extra and ``make .venv-bq/.installed`` (``make test`` builds both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from reuse import storage_emulator  # noqa: E402

from tests.fakes.bigquery_emulator import bigquery_emulator  # noqa: E402
from worker.protocols import Record, Sink  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.sinks import open_sink  # noqa: E402

BATCH = 100
PROJECT = "bench-project"


def record(i: int) -> Record:
    return {
        "id": f"job-{i:08d}",
        "image_uri": f"gs://catalogue/images/{i:08d}.jpg",
        "status": "ok",
        "description": "A product photo of a red cotton T-shirt on a white background, "
        "folded, with a small logo on the chest.",
        "model": "google/gemini-2.0-flash-001",
        "endpoint": "us-central1",
        "tier": "standard",
        "usage": {"prompt_tokens": 262, "completion_tokens": 31, "total_tokens": 293},
        "cost_usd": 5.79e-05,
        "cached": False,
        "attempts": 1,
        "latency_s": 0.8123,
        "finished_at": "2026-11-30T23:56:51.773Z",
    }


async def drive(sink: Sink, n: int, writers: int) -> float:
    """Write records 0..n-1 with ``writers`` concurrent tasks; seconds taken."""
    batches = iter(range(0, n, BATCH))
    await sink.prepare()
    started = time.monotonic()

    async def writer() -> None:
        for start in batches:  # shared iterator: each batch is taken once
            rejected: Sequence[Any] | None = await sink.write(
                [record(i) for i in range(start, min(n, start + BATCH))]
            )
            if rejected:
                raise RuntimeError(f"{len(rejected)} records refused: {rejected[0]}")

    async with anyio.create_task_group() as tg:
        for _ in range(writers):
            tg.start_soon(writer)
    seconds = time.monotonic() - started
    await sink.aclose()
    return seconds


async def bq_rows(base_url: str, table: str) -> int:
    url = f"{base_url}/bigquery/v2/projects/{PROJECT}/datasets/bench/tables/{table}/data"
    async with aiohttp.ClientSession() as http, http.get(url, params={"maxResults": "1"}) as resp:
        return int((await resp.json()).get("totalRows", 0))


async def main(records: int, bq_records: int, writers: int) -> None:
    rows: list[tuple[str, int, float, int]] = []
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        seconds = await drive(open_sink(f"jsonl:{path}"), records, writers)
        stored = sum(1 for _ in path.open("rb"))
        rows.append(("jsonl (fsynced file)", records, seconds, stored))

    with storage_emulator(0) as storage:
        os.environ["STORAGE_EMULATOR_HOST"] = storage
        seconds = await drive(
            open_sink("gs://images/results/", settings=settings), records, writers
        )
        check = open_sink("gs://images/results/", settings=settings)
        await check.prepare()
        stored = len(await check.existing_ids())
        await check.aclose()
        rows.append(("gs:// (gcp-storage-emulator)", records, seconds, stored))

    with bigquery_emulator(PROJECT) as bq:
        os.environ["BIGQUERY_EMULATOR_HOST"] = bq
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{bq}/bigquery/v2/projects/{PROJECT}/datasets",
                json={"datasetReference": {"projectId": PROJECT, "datasetId": "bench"}},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        settings.sinks.bigquery.create_table = True
        sink = open_sink(f"bq:{PROJECT}.bench.results", settings=settings)
        seconds = await drive(sink, bq_records, writers)
        rows.append(("bq: (bqemulator)", bq_records, seconds, await bq_rows(bq, "results")))

    reference = rows[0][1] / rows[0][2]
    print(f"{writers} concurrent writers, batches of {BATCH} records of ~"
          f"{len(json.dumps(record(0)))} bytes")  # fmt: skip
    print()
    print("| sink | records | seconds | records/s | ÷ jsonl | stored |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, seconds, stored in rows:
        rate = n / seconds
        print(f"| {name} | {n} | {seconds:.2f} | {rate:,.0f} | {rate / reference:.2f} | {stored} |")
    lost = [name for name, n, _, stored in rows if stored != n]
    if lost:
        print(f"records missing from: {', '.join(lost)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--bq-records", type=int, default=5_000)
    ap.add_argument("--writers", type=int, default=50)
    ns = ap.parse_args()
    anyio.run(main, ns.records, ns.bq_records, ns.writers)
