"""``worker serve``: the push endpoint, in-process, with real OIDC tokens.

A test RSA key signs ID tokens with google-auth; its certificate is served on loopback
the way https://www.googleapis.com/oauth2/v1/certs serves Google's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from worker.app import serve_push
from worker.settings import Settings
from worker.simulator import Simulator

from .helpers import read_jsonl

AUDIENCE = "https://worker.example.run.app/push"
PUSHER = "pusher@proj.iam.gserviceaccount.com"
SUB = "projects/proj/subscriptions/push-sub"


def _key_and_cert() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, cert.public_bytes(serialization.Encoding.PEM).decode()


KEY_PEM, CERT_PEM = _key_and_cert()
OTHER_KEY_PEM, _ = _key_and_cert()


def token(
    *,
    audience: str = AUDIENCE,
    email: str = PUSHER,
    key: bytes = KEY_PEM,
    kid: str = "k1",
    **extra: Any,
) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": audience,
        "sub": "1234",
        "email": email,
        "email_verified": True,
        "iat": now,
        "exp": now + 600,
        **extra,
    }
    # google-auth leaves these two unannotated.
    signer = crypt.RSASigner.from_string(key, key_id=kid)  # type: ignore[no-untyped-call]
    signed: bytes = jwt.encode(signer, claims)  # type: ignore[no-untyped-call]
    return signed.decode()


def push_body(job: dict[str, Any] | bytes, message_id: str = "m-1") -> dict[str, Any]:
    data = job if isinstance(job, bytes) else json.dumps(job).encode()
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": {"origin": "test"},
            "messageId": message_id,
            "message_id": message_id,
            "publishTime": "2025-01-01T00:00:00.000Z",
        },
        "subscription": SUB,
        "deliveryAttempt": 1,
    }


@dataclass
class Server:
    url: str
    http: aiohttp.ClientSession
    results: Path
    dead: Path

    async def push(
        self, body: Any, bearer: str | None = None, raw: bytes | None = None
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        payload = raw if raw is not None else json.dumps(body).encode()
        async with self.http.post(self.url, data=io.BytesIO(payload), headers=headers) as resp:
            return resp.status, await resp.read()


@pytest.fixture
async def certs_url() -> AsyncIterator[str]:
    async def certs(request: web.Request) -> web.Response:
        return web.json_response({"k1": CERT_PEM}, headers={"Cache-Control": "max-age=600"})

    app = web.Application()
    app.router.add_get("/oauth2/v1/certs", certs)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/oauth2/v1/certs"
    finally:
        await runner.cleanup()


@pytest.fixture
async def server(
    fast_settings: Settings, sim: Simulator, certs_url: str, tmp_path: Path
) -> AsyncIterator[Server]:
    s = fast_settings
    s.model.base_url = sim.vertex_base_url()
    s.pubsub.push_audience = AUDIENCE
    s.pubsub.push_allowed_emails = f"{PUSHER}, other@proj.iam.gserviceaccount.com"
    s.pubsub.push_certs_url = certs_url
    s.validate()
    results = Path(s.worker.sink.removeprefix("jsonl:"))
    listening = anyio.Event()
    port = 0

    def ready(p: int) -> None:
        nonlocal port
        port = p
        listening.set()

    # A fixture's setup and teardown run in different tasks, so no task group spans the
    # yield: the server is a plain task, cancelled and awaited at teardown.
    task = asyncio.create_task(
        serve_push(s, host="127.0.0.1", port=0, on_listening=ready, handle_signals=False)
    )
    try:
        async with aiohttp.ClientSession() as http:
            with anyio.fail_after(10):
                await listening.wait()
            yield Server(
                f"http://127.0.0.1:{port}/",
                http,
                results,
                results.with_name("results.dead-letter.jsonl"),
            )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_signed_push_is_answered_2xx_only_after_the_record_is_written(
    server: Server, sim: Simulator
) -> None:
    status, _ = await server.push(
        push_body({"id": "p1", "image_uri": "gs://bkt/a.jpg"}), bearer=token()
    )
    assert status == 204
    records = read_jsonl(server.results)  # already there when the answer came
    assert [r["id"] for r in records] == ["p1"]
    assert records[0]["status"] == "ok"
    assert records[0]["source"] == {
        "subscription": SUB,
        "message_id": "m-1",
        "publish_time": "2025-01-01T00:00:00.000Z",
        "delivery_attempt": 1,
    }
    assert sim.stats().requests == 1


@pytest.mark.parametrize(
    ("bearer", "expected"),
    [
        (None, 401),
        ("not-a-jwt", 403),
        (token(audience="https://someone-else.example/"), 403),
        (token(key=OTHER_KEY_PEM), 403),  # forged: right kid, wrong key
        (token(kid="unknown"), 403),
        (token(email="intruder@evil.iam.gserviceaccount.com"), 403),
        (token(email_verified=False), 403),
        (token(iss="https://evil.example"), 403),
        (token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), 403),
    ],
)
async def test_bad_tokens_are_refused_and_nothing_runs(
    server: Server, sim: Simulator, bearer: str | None, expected: int
) -> None:
    status, _ = await server.push(
        push_body({"id": "p1", "image_uri": "gs://bkt/a.jpg"}), bearer=bearer
    )
    assert status == expected
    assert sim.stats().requests == 0
    assert read_jsonl(server.results) == []
    assert read_jsonl(server.dead) == []


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"subscription": SUB}).encode(),
        json.dumps({"message": {"data": "eA=="}}).encode(),  # no messageId
        json.dumps({"message": {"messageId": "m", "data": "%%%"}}).encode(),
        json.dumps({"message": {"messageId": "m"}}).encode(),
        b"{" + b" " * (10 * 1024 * 1024 + 10) + b"}",
    ],
)
async def test_malformed_pushes_are_refused_with_400(
    server: Server, sim: Simulator, raw: bytes
) -> None:
    status, _ = await server.push(None, bearer=token(), raw=raw)
    assert status == 400
    assert sim.stats().requests == 0
    assert read_jsonl(server.results) == []


async def test_transient_failure_answers_non_2xx_so_pubsub_redelivers(
    server: Server, sim: Simulator, fast_settings: Settings
) -> None:
    sim.config.error_rate = 1.0
    fast_settings.retry.max_attempts = 2
    body = push_body({"id": "p2", "image_uri": "gs://bkt/b.jpg"})
    status, _ = await server.push(body, bearer=token())
    assert status == 503
    assert read_jsonl(server.results) == [] and read_jsonl(server.dead) == []
    sim.config.error_rate = 0.0  # the redelivery succeeds
    status, _ = await server.push(body, bearer=token())
    assert status == 204
    assert [r["id"] for r in read_jsonl(server.results)] == ["p2"]


async def test_permanent_failure_is_dead_lettered_then_acked(server: Server) -> None:
    status, _ = await server.push(push_body(b"{broken", message_id="m-9"), bearer=token())
    assert status == 204
    dead = read_jsonl(server.dead)
    assert [d["id"] for d in dead] == ["m-9"]  # no id of its own: the messageId
    assert dead[0]["error"]["type"] == "invalid_json"
