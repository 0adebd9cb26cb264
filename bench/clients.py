"""The two reference clients the worker is measured against, each run in its own process.

* ``minimal``: the floor. Raw aiohttp, no SDK, a semaphore, the same request body; what
  this machine and simulator allow.
* ``sdk``: the SDK floor. The worker's own ``AsyncOpenAI`` client (aiohttp backend, retries
  off, the same default headers and options), a semaphore and a bare loop of
  ``client.post``: what the worker would cost if the pipeline around the call were free.
* ``naive``: what most people write first. ``AsyncOpenAI`` with default settings (its
  own retries and backoff, its own HTTP client), ``asyncio.Semaphore`` and ``gather``.

Each prints one JSON line: jobs, ok, lost, seconds, jobs_per_s, CPU ms per job and peak
RSS, all measured inside the process from the first request to the last answer.

    python bench/clients.py minimal --base-url http://127.0.0.1:8000/v1 --jobs 2000 --concurrency 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

MODEL = "google/gemini-2.0-flash-001"
PROMPT = "Describe the following image:"


def job_uri(i: int) -> str:
    return f"gs://bench/img-{i:07d}.jpg"


def messages(uri: str) -> list[dict[str, Any]]:
    # The worker's request (Google's sample): a text part, then the image_url as a string.
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image_url", "image_url": uri},
            ],
        }
    ]


async def run_minimal(base_url: str, jobs: int, concurrency: int) -> int:
    import aiohttp

    url = base_url.rstrip("/") + "/chat/completions"
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    ok = 0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            nonlocal ok
            async with sem:
                body = {"model": MODEL, "messages": messages(job_uri(i))}
                async with session.post(url, json=body) as resp:
                    data = await resp.read()
                    if resp.status == 200 and json.loads(data)["choices"][0]["message"]["content"]:
                        ok += 1

        await asyncio.gather(*(one(i) for i in range(jobs)))
    return ok


async def run_sdk(base_url: str, jobs: int, concurrency: int) -> int:
    import httpx2

    from worker.app import tune_gc
    from worker.auth import NoTokens
    from worker.model import ModelClient
    from worker.settings import ModelSettings

    model = ModelClient(
        ModelSettings(base_url=base_url, auth="none"), NoTokens(), max_connections=concurrency
    )
    client, options = model.client, model.request_options
    # The worker's own process tuning, so the floor differs from it only by the pipeline.
    tune_gc()
    next_job = iter(range(jobs))
    ok = 0

    async def loop() -> None:
        # A bare loop per slot: no task per job, no semaphore, nothing but the call.
        nonlocal ok
        for i in next_job:
            body = {"model": MODEL, "messages": messages(job_uri(i))}
            response = await client.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, options=options
            )
            if json.loads(response.content)["choices"][0]["message"]["content"]:
                ok += 1

    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        await model.aclose()
    return ok


async def run_naive(base_url: str, jobs: int, concurrency: int) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with sem:
            try:
                r = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages(job_uri(i)),  # type: ignore[arg-type]
                )
            except openai.APIError:
                return False
            return bool(r.choices and r.choices[0].message.content)

    try:
        results = await asyncio.gather(*(one(i) for i in range(jobs)))
    finally:
        await client.close()
    return sum(results)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("client", choices=("minimal", "sdk", "naive"))
    p.add_argument("--base-url", required=True)
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (minimal and sdk floors)")
    ns = p.parse_args()
    fn = {"minimal": run_minimal, "sdk": run_sdk, "naive": run_naive}[ns.client]
    if ns.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # Import what the client needs first: the figures are of requests, not of imports.
    if ns.client == "minimal":
        import aiohttp  # noqa: F401
    else:
        import httpx2  # noqa: F401
        import openai  # noqa: F401

        import worker.model  # noqa: F401
    cpu0 = time.process_time()
    t0 = time.monotonic()
    ok = asyncio.run(fn(ns.base_url, ns.jobs, ns.concurrency))
    secs = time.monotonic() - t0
    cpu_s = time.process_time() - cpu0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "client": ns.client,
                "jobs": ns.jobs,
                "ok": ok,
                "lost": ns.jobs - ok,
                "seconds": round(secs, 3),
                "jobs_per_s": round(ok / secs, 2),
                "cpu_ms_per_job": round(1000 * cpu_s / max(ok, 1), 4),
                "peak_rss_mb": round(peak_kib / 1024, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
