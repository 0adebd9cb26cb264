"""Fetching images for jobs against real servers on loopback: a TLS server with trustme
certificates for https://, and the gcp-storage-emulator from PyPI for gs://.

The image server listens on 127.0.0.2 and the fetchers under test allow exactly that
address (``allowed_networks``), so the SSRF guard stays ON for everything else: a redirect
to 127.0.0.1 or 169.254.169.254 must be refused although the first host was allowed.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import pytest
import trustme
from aiohttp import web

from worker.errors import JobError
from worker.fetch import AddressGuard, ImageFetcher
from worker.images import ImagePolicy

from .helpers import EXAMPLES, gcs_emulator_server, gcs_upload, job_error

PNG = (EXAMPLES / "red-square.png").read_bytes()
JPEG = (EXAMPLES / "green-banner.jpg").read_bytes()
IMAGE_HOST = "127.0.0.2"


@dataclass
class ImageServer:
    port: int = 0
    host: str = IMAGE_HOST
    hits: Counter[str] = field(default_factory=Counter)
    streamed_bytes: int = 0
    stream_ended: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str | None = None) -> str:
        return f"https://{host or self.host}:{self.port}{path}"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _app(state: ImageServer) -> web.Application:
    async def image(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        return web.Response(body=PNG, content_type="image/png")

    async def mislabelled(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        return web.Response(body=JPEG, content_type="image/png")  # the bytes say JPEG

    async def text(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        return web.Response(text="<html>not an image</html>", content_type="image/png")

    async def forever(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        chunk = PNG + bytes(65_536)
        try:
            while True:  # never ends on its own: only the client hanging up stops it
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client hung up")
                await resp.write(chunk)
                state.streamed_bytes += len(chunk)
                await asyncio.sleep(0)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            state.stream_ended.set()
            raise
        return resp  # pragma: no cover

    async def declared_huge(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = 100 * 1024 * 1024
        await resp.prepare(request)
        await resp.write(PNG)
        await asyncio.sleep(30)
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        await resp.write(PNG[:8])
        await asyncio.sleep(30)  # then silence: the read timeout must fire
        return resp

    async def drip(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        for byte in PNG * 100:  # a byte every 50 ms: never silent long enough to time out
            await resp.write(bytes([byte]))
            await asyncio.sleep(0.05)
        return resp

    async def flaky(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        if state.hits[request.path] <= 2:
            return web.Response(status=503, text="try later")
        return web.Response(body=PNG, content_type="image/png")

    async def status(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        return web.Response(status=int(request.match_info["code"]))

    async def redirect(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        raise web.HTTPFound(request.query["to"])

    async def chain(request: web.Request) -> web.StreamResponse:
        state.hits[request.path] += 1
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        raise web.HTTPFound(f"/chain/{n - 1}")

    app = web.Application()
    app.router.add_get("/img.png", image)
    app.router.add_get("/mislabelled", mislabelled)
    app.router.add_get("/text", text)
    app.router.add_get("/forever", forever)
    app.router.add_get("/declared-huge", declared_huge)
    app.router.add_get("/slow", slow)
    app.router.add_get("/drip", drip)
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/chain/{n}", chain)
    return app


async def _serve(state: ImageServer, ca: trustme.CA) -> AsyncIterator[ImageServer]:
    cert = ca.issue_cert("127.0.0.1", "127.0.0.2", "localhost", "images.test")
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ssl)
    runner = web.AppRunner(_app(state), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, state.host, 0, ssl_context=server_ssl)
    await site.start()
    state.port = int(runner.addresses[0][1])
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def images(ca: trustme.CA) -> AsyncIterator[ImageServer]:
    async for state in _serve(ImageServer(), ca):
        yield state


@pytest.fixture
async def loopback_images(ca: trustme.CA) -> AsyncIterator[ImageServer]:
    """The same server on 127.0.0.1, which no fetcher under test allows."""
    async for state in _serve(ImageServer(host="127.0.0.1"), ca):
        yield state


@pytest.fixture
async def fetcher(client_ssl: ssl.SSLContext) -> AsyncIterator[ImageFetcher]:
    f = ImageFetcher(
        allowed_networks=[f"{IMAGE_HOST}/32"],
        ssl_context=client_ssl,
        max_image_bytes=256 * 1024,
        fetch_timeout_s=2.0,
        connect_timeout_s=1.0,
        read_timeout_s=0.3,
        fetch_attempts=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
    )
    try:
        yield f
    finally:
        await f.aclose()


def _policy(fetcher: ImageFetcher) -> ImagePolicy:
    return ImagePolicy(
        file_root=None, inline_images="always", fetcher=fetcher, max_image_bytes=256 * 1024
    )


# -- https:// mechanics -------------------------------------------------------------------


async def test_https_image_is_fetched_and_inlined(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    url = await _policy(fetcher).resolve(images.url("/img.png"))
    assert url == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert images.hits["/img.png"] == 1


async def test_sniffed_bytes_win_over_the_declared_content_type(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    url = await _policy(fetcher).resolve(images.url("/mislabelled"))
    assert url.startswith("data:image/jpeg;base64,")
    err = await job_error(_policy(fetcher).resolve(images.url("/text")))
    assert err.type == "unsupported_media_type"


async def test_oversized_body_is_cut_off_while_streaming(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    started = time.monotonic()
    err = await job_error(_policy(fetcher).resolve(images.url("/forever")))
    assert err.type == "image_too_large"
    assert "262144" in err.message
    assert time.monotonic() - started < 2.0
    # The server streams forever unless the client hangs up: it must see the hang-up.
    with anyio.fail_after(3):
        await images.stream_ended.wait()
    # Only socket buffers' worth beyond the cap ever left the server, not an unbounded body.
    assert images.streamed_bytes < 256 * 1024 + 16 * 1024 * 1024


async def test_declared_oversize_is_refused_before_the_body(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    started = time.monotonic()
    err = await job_error(_policy(fetcher).resolve(images.url("/declared-huge")))
    assert err.type == "image_too_large"
    assert time.monotonic() - started < 1.0


async def test_silent_body_times_out_and_fails_after_retries(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    started = time.monotonic()
    err = await job_error(_policy(fetcher).resolve(images.url("/slow")))
    assert err.type == "fetch_failed"
    assert "2 attempts" in err.message
    assert images.hits["/slow"] == 2  # retried once, then given up
    assert time.monotonic() - started < 2.0  # two read timeouts of 0.3 s, not 30 s


async def test_dripping_body_hits_the_whole_fetch_deadline(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    fetcher.fetch_timeout_s = 0.4
    started = time.monotonic()
    err = await job_error(_policy(fetcher).resolve(images.url("/drip")))
    assert err.type == "fetch_failed"
    assert "0.4 s" in err.message
    assert time.monotonic() - started < 2.0


async def test_transient_503_is_retried_to_success(
    client_ssl: ssl.SSLContext, images: ImageServer
) -> None:
    f = ImageFetcher(
        allowed_networks=[f"{IMAGE_HOST}/32"],
        ssl_context=client_ssl,
        fetch_attempts=3,
        backoff_initial_s=0.01,
    )
    try:
        url = await _policy(f).resolve(images.url("/flaky"))
    finally:
        await f.aclose()
    assert url.startswith("data:image/png;base64,")
    assert images.hits["/flaky"] == 3


@pytest.mark.parametrize(("code", "hits"), [(404, 1), (403, 1), (500, 2)])
async def test_http_errors_fail_the_job(
    fetcher: ImageFetcher, images: ImageServer, code: int, hits: int
) -> None:
    err = await job_error(_policy(fetcher).resolve(images.url(f"/status/{code}")))
    assert err.type == "fetch_failed"
    assert images.hits[f"/status/{code}"] == hits  # only 5xx is retried


async def test_untrusted_certificate_fails(images: ImageServer) -> None:
    f = ImageFetcher(allowed_networks=[f"{IMAGE_HOST}/32"], fetch_attempts=1)  # system CAs
    try:
        err = await job_error(_policy(f).resolve(images.url("/img.png")))
    finally:
        await f.aclose()
    assert err.type == "fetch_failed"
    assert images.hits["/img.png"] == 0


async def test_redirects_are_followed_up_to_the_limit(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    url = await _policy(fetcher).resolve(images.url("/chain/3"))
    assert url.startswith("data:image/png;base64,")
    err = await job_error(_policy(fetcher).resolve(images.url("/chain/4")))
    assert err.type == "fetch_failed"
    assert "more than 3 redirects" in err.message
    assert images.hits["/chain/0"] == 1  # the 4-hop chain never reached its end


# -- the SSRF guard -----------------------------------------------------------------------


async def test_guard_is_on_by_default(
    client_ssl: ssl.SSLContext, loopback_images: ImageServer
) -> None:
    """A default fetcher refuses a live loopback server, by address and by name; opting
    out with allow_private_networks reaches the very same server."""
    default = ImageFetcher(ssl_context=client_ssl)
    opened = ImageFetcher(ssl_context=client_ssl, allow_private_networks=True)
    try:
        for host in ("127.0.0.1", "localhost"):
            err = await job_error(_policy(default).resolve(loopback_images.url("/img.png", host)))
            assert err.type == "blocked_address", err.message
        assert loopback_images.hits["/img.png"] == 0  # refused before connecting
        url = await _policy(opened).resolve(loopback_images.url("/img.png"))
        assert url.startswith("data:image/png;base64,")
        assert loopback_images.hits["/img.png"] == 1
    finally:
        await default.aclose()
        await opened.aclose()


@pytest.mark.parametrize(
    "target",
    [
        "https://127.0.0.1:{loop_port}/img.png",
        "https://localhost:{loop_port}/img.png",
        "https://[::ffff:127.0.0.1]:{loop_port}/img.png",
        "https://0x7f.1:{loop_port}/img.png",
        "https://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://[fd00:ec2::254]/latest/meta-data/",
        "https://10.0.0.1/img.png",
        "https://0.0.0.0:{loop_port}/img.png",
    ],
)
async def test_redirect_to_internal_address_is_refused(
    fetcher: ImageFetcher, images: ImageServer, loopback_images: ImageServer, target: str
) -> None:
    to = target.format(loop_port=loopback_images.port)
    err = await job_error(_policy(fetcher).resolve(images.url("/redirect") + f"?to={to}"))
    assert err.type == "blocked_address", err.message
    assert images.hits["/redirect"] == 1  # the allowed first hop was fetched
    assert sum(loopback_images.hits.values()) == 0  # the redirect target never was


async def test_redirect_to_another_scheme_is_refused(
    fetcher: ImageFetcher, images: ImageServer
) -> None:
    for to, kind in [
        ("http://127.0.0.2/img.png", "unsupported_scheme"),
        ("file:///etc/passwd", "unsupported_scheme"),
        ("gs://bucket/object", "unsupported_scheme"),
    ]:
        err = await job_error(_policy(fetcher).resolve(images.url("/redirect") + f"?to={to}"))
        assert err.type == kind, (to, err.message)


async def test_resolved_address_is_the_one_connected_to(
    client_ssl: ssl.SSLContext, images: ImageServer
) -> None:
    """DNS rebinding: the connector connects to exactly the addresses the guard vetted, one
    lookup per connection, so a name cannot be re-pointed between check and connect."""
    answers = [IMAGE_HOST, "127.0.0.1"]  # a rebinding resolver: allowed first, loopback next
    calls: list[str] = []

    async def rebinding_lookup(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        address = answers[min(len(calls) - 1, len(answers) - 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    f = ImageFetcher(
        allowed_networks=[f"{IMAGE_HOST}/32"],
        ssl_context=client_ssl,
        lookup=rebinding_lookup,
        fetch_attempts=1,
    )
    try:
        first = await _policy(f).resolve(f"https://images.test:{images.port}/img.png")
        assert first.startswith("data:image/png;base64,")
        assert calls == ["images.test"]
        assert images.hits["/img.png"] == 1  # served by 127.0.0.2, the vetted address
        await f.aclose()
        f = ImageFetcher(
            allowed_networks=[f"{IMAGE_HOST}/32"],
            ssl_context=client_ssl,
            lookup=rebinding_lookup,
            fetch_attempts=1,
        )
        # A fresh connection resolves again and meets the rebound answer: refused.
        err = await job_error(_policy(f).resolve(f"https://images.test:{images.port}/img.png"))
        assert err.type == "blocked_address"
        assert "127.0.0.1" in err.message
    finally:
        await f.aclose()


async def test_a_name_with_any_internal_address_is_refused(
    client_ssl: ssl.SSLContext, images: ImageServer
) -> None:
    async def mixed_lookup(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (IMAGE_HOST, port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port)),
        ]

    f = ImageFetcher(
        allowed_networks=[f"{IMAGE_HOST}/32"], ssl_context=client_ssl, lookup=mixed_lookup
    )
    try:
        err = await job_error(_policy(f).resolve(f"https://images.test:{images.port}/img.png"))
    finally:
        await f.aclose()
    assert err.type == "blocked_address"
    assert images.hits["/img.png"] == 0


BLOCKED = [
    "127.0.0.1",
    "127.1",
    "0x7f.1",
    "0x7f000001",
    "2130706433",
    "017700000001",
    "0.0.0.0",
    "0",
    "::1",
    "[::1]",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "::127.0.0.1",
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "fe80::1",
    "fe80::1%eth0",
    "fd00:ec2::254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "metadata.google.internal",
    "METADATA.GOOGLE.INTERNAL.",
    "metadata",
]


@pytest.mark.parametrize("host", BLOCKED)
def test_guard_refuses_internal_hosts(host: str) -> None:
    with pytest.raises(JobError) as info:
        AddressGuard().check_host(host)
    assert info.value.type == "blocked_address"


@pytest.mark.parametrize("host", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "a.com"])
def test_guard_lets_public_hosts_through(host: str) -> None:
    AddressGuard().check_host(host)  # names are judged on their resolved addresses


@pytest.mark.parametrize(
    ("host", "blocked"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("fd12::1", False),
        ("169.254.169.254", True),
        ("metadata.google.internal", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
    ],
)
def test_allow_private_networks_keeps_metadata_and_odd_ranges_closed(
    host: str, blocked: bool
) -> None:
    guard = AddressGuard(allow_private_networks=True)
    if blocked:
        with pytest.raises(JobError):
            guard.check_host(host)
    else:
        guard.check_host(host)


# -- gs:// through the Cloud Storage JSON API, against gcp-storage-emulator ---------------


@pytest.fixture
def gcs_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with gcs_emulator_server("images") as (_, url):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        yield url


async def _upload(base: str, name: str, data: bytes, content_type: str) -> None:
    await gcs_upload(base, "images", name, data, content_type)


async def test_gs_objects_are_read_through_the_storage_emulator(gcs_emulator: str) -> None:
    await _upload(gcs_emulator, "dir/red square.png", PNG, "text/plain")  # declared wrong
    await _upload(gcs_emulator, "notes.txt", b"hello", "image/png")
    await _upload(gcs_emulator, "big.png", PNG + bytes(300_000), "image/png")
    # No storage_host given: STORAGE_EMULATOR_HOST is honoured, as Google's clients do,
    # and the guard does not apply to it although it is on loopback.
    f = ImageFetcher(max_image_bytes=256 * 1024, fetch_attempts=1)
    assert f.storage_is_emulator
    policy = _policy(f)
    try:
        url = await policy.resolve("gs://images/dir/red square.png")
        assert url == "data:image/png;base64," + base64.b64encode(PNG).decode()
        missing = await job_error(policy.resolve("gs://images/nope.png"))
        assert missing.type == "fetch_failed"
        assert "404" in missing.message
        not_image = await job_error(policy.resolve("gs://images/notes.txt"))
        assert not_image.type == "unsupported_media_type"
        too_big = await job_error(policy.resolve("gs://images/big.png"))
        assert too_big.type == "image_too_large"
        bad_bucket = await job_error(policy.resolve("gs://../o.png"))
        assert bad_bucket.type == "invalid_image_uri"
    finally:
        await f.aclose()


async def test_gs_passes_through_to_vertex_in_auto_mode(gcs_emulator: str) -> None:
    f = ImageFetcher()
    try:
        policy = ImagePolicy(file_root=None, inline_images="auto", fetcher=f)
        assert await policy.resolve("gs://images/absent.png") == "gs://images/absent.png"
        other = ImagePolicy(
            file_root=None, inline_images="auto", backend_reads_uris=False, fetcher=f
        )
        err = await job_error(other.resolve("gs://images/absent.png"))
        assert err.type == "fetch_failed"  # fetched (from the emulator), not passed on
    finally:
        await f.aclose()
