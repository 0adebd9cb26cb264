"""Tests for the fake GCE metadata server, driven by the real google-auth in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from .fakes.metadata_server import TOKEN_PREFIX, MetadataServer
from .helpers import wait_until

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"

_GOOGLE_AUTH_SCRIPT = f"""
import datetime, json, sys
import google.auth
import google.auth.transport.requests
from google.auth import compute_engine

creds, project = google.auth.default(scopes=[{CLOUD_PLATFORM!r}])
assert isinstance(creds, compute_engine.Credentials), type(creds)
creds.refresh(google.auth.transport.requests.Request())
expiry = creds.expiry.replace(tzinfo=datetime.timezone.utc).timestamp()
print(json.dumps({{
    "token": creds.token,
    "expiry": expiry,
    "project": project,
    "email": creds.service_account_email,
}}))
"""

_SCRUB_ENV = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "NO_GCE_CHECK",
    "GCE_METADATA_ROOT",
    "GCE_METADATA_MTLS_MODE",
    "GAE_RUNTIME",
    "SERVER_SOFTWARE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
)


async def _run_google_auth(server: MetadataServer, sdk_dir: Path) -> dict[str, Any]:
    """Run google.auth.default() + refresh() in a fresh interpreter against ``server``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    env.update(
        GCE_METADATA_HOST=server.host_port,
        GCE_METADATA_IP=server.host_port,
        CLOUDSDK_CONFIG=str(sdk_dir),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _GOOGLE_AUTH_SCRIPT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


@pytest.fixture
def sdk_dir(tmp_path: Path) -> Path:
    """An empty gcloud config dir, so google-auth finds no user ADC."""
    path = tmp_path / "gcloud"
    path.mkdir()
    return path


async def test_google_auth_default_and_refresh(sdk_dir: Path) -> None:
    seen: list[tuple[str, float]] = []
    async with MetadataServer(
        project_id="fixture-proj", on_issue=lambda t, e: seen.append((t, e))
    ) as server:
        started = time.time()
        result = await _run_google_auth(server, sdk_dir)

    assert len(server.issued) == 1
    token, issued_at, expires_at = server.issued[0]
    assert result["token"] == token
    assert token.startswith(TOKEN_PREFIX)
    assert seen == [(token, expires_at)]
    assert result["project"] == "fixture-proj"
    assert result["email"] == server.email
    assert started - 1 <= issued_at <= time.time()
    assert expires_at == pytest.approx(issued_at + 3600.0)
    # google-auth computes expiry = utcnow() + expires_in on its side.
    assert abs(result["expiry"] - expires_at) < 5
    # Detection ping hit "/", then the documented metadata paths were used.
    paths = [p for _, p in server.requests]
    assert "/" in paths
    assert "/computeMetadata/v1/project/project-id" in paths
    assert "/computeMetadata/v1/instance/service-accounts/default/?recursive=true" in paths
    assert server.token_scopes == [CLOUD_PLATFORM]
    assert server.rejected_requests == 0


async def test_google_auth_retries_503_and_short_ttl(sdk_dir: Path) -> None:
    async with MetadataServer(token_ttl_s=2.5, delay_s=0.2) as server:
        server.fail_next = 1
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        hb = asyncio.create_task(heartbeat())
        try:
            result = await _run_google_auth(server, sdk_dir)
        finally:
            hb.cancel()
            await asyncio.gather(hb, return_exceptions=True)

    assert server.failed_token_requests == 1
    assert server.token_requests == 2
    assert [t for t, _, _ in server.issued] == [result["token"]]
    _, issued_at, expires_at = server.issued[0]
    assert expires_at == pytest.approx(issued_at + 2.5)
    # expires_in was ceil(2.5) == 3 seconds.
    assert abs(result["expiry"] - (issued_at + 3)) < 2
    # The server (and this loop) kept running while answers were delayed.
    assert ticks > 10


async def _get(
    session: aiohttp.ClientSession, server: MetadataServer, path: str, **headers: str
) -> tuple[int, str, CIMultiDictProxy[str]]:
    async with session.get(server.url + path, headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers


async def test_headers_and_errors() -> None:
    flavor = {"Metadata-Flavor": "Google"}
    async with MetadataServer(token_ttl_s=7.2) as server, aiohttp.ClientSession() as session:
        status, body, headers = await _get(session, server, "/")
        assert (status, headers["Metadata-Flavor"]) == (200, "Google")

        status, body, headers = await _get(
            session, server, "/computeMetadata/v1/project/project-id"
        )
        assert status == 403
        assert headers["Metadata-Flavor"] == "Google"

        status, body, _ = await _get(
            session, server, "/computeMetadata/v1/project/project-id", **flavor
        )
        assert (status, body) == (200, "test-project")

        status, _, _ = await _get(
            session,
            server,
            "/computeMetadata/v1/project/project-id",
            **flavor,
            **{"X-Forwarded-For": "1.2.3.4"},
        )
        assert status == 403

        status, _, headers = await _get(session, server, "/computeMetadata/v1/nope", **flavor)
        assert (status, headers["Metadata-Flavor"]) == (404, "Google")
        status, _, _ = await _get(
            session, server, "/computeMetadata/v1/instance/service-accounts/other/token", **flavor
        )
        assert status == 404

        status, body, _ = await _get(
            session,
            server,
            "/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
            **flavor,
        )
        info = json.loads(body)
        assert info["email"] == server.email
        assert info["aliases"] == ["default"]
        assert CLOUD_PLATFORM in info["scopes"]

        token_path = "/computeMetadata/v1/instance/service-accounts/default/token"
        status, _, _ = await _get(session, server, token_path)
        assert status == 403
        assert server.issued == []

        server.fail_next = 2
        for _ in range(2):
            status, _, _ = await _get(session, server, token_path, **flavor)
            assert status == 503
        status, body, headers = await _get(session, server, token_path, **flavor)
        assert status == 200
        assert headers["Content-Type"].startswith("application/json")
        payload = json.loads(body)
        assert payload["token_type"] == "Bearer"
        assert payload["expires_in"] == 8
        assert payload["access_token"] == server.issued[0][0]

        server.token_ttl_s = 1.0
        _, body, _ = await _get(session, server, token_path + "?scopes=a,b", **flavor)
        assert json.loads(body)["expires_in"] == 1
        assert server.token_scopes[-1] == "a,b"
        assert len(set(server.tokens)) == 2


async def test_revoke_and_delay_does_not_block_other_requests() -> None:
    revoked: list[str] = []
    flavor = {"Metadata-Flavor": "Google"}
    token_path = "/computeMetadata/v1/instance/service-accounts/default/token"
    async with (
        MetadataServer(delay_s=0.5, on_revoke=revoked.extend) as server,
        aiohttp.ClientSession() as session,
    ):
        slow = asyncio.create_task(_get(session, server, token_path, **flavor))
        # Counted on arrival, then held for delay_s.
        await wait_until(lambda: server.token_requests == 1, 5, "the token request")
        t0 = time.monotonic()
        status, body, _ = await _get(
            session, server, "/computeMetadata/v1/project/project-id", **flavor
        )
        assert status == 200
        assert time.monotonic() - t0 < 0.3
        assert not slow.done()
        status, body, _ = await slow
        assert status == 200
        token = json.loads(body)["access_token"]
        assert server.is_valid(token)
        server.revoke_all()
        assert revoked == [token]
        assert not server.is_valid(token)
        assert not server.is_valid("ya29.fixture-unknown")
        server.revoke_all()
        assert revoked == [token]
