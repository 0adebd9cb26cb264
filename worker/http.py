"""The side server: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``.

``worker run --http-port PORT`` starts it next to the pipeline; ``worker serve`` adds the
same routes to its push server with :func:`add_routes`. The handlers only read
:class:`~worker.metrics.Telemetry`, so a probe costs the worker almost nothing, and a
probe that cannot get an answer at all (the loop is blocked) fails on the kubelet's
timeout, which is what liveness wants.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import ConfigError
from .metrics import Telemetry

__all__ = [
    "DEFAULT_PORT",
    "HEALTHZ_PATH",
    "METRICS_PATH",
    "READYZ_PATH",
    "HttpServer",
    "add_routes",
    "serve_http",
]

log = logging.getLogger("worker.http")

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
METRICS_PATH = "/metrics"
# The port config/pubsub.toml and the deploy manifests use.
DEFAULT_PORT = 8080

_TELEMETRY_KEY = web.AppKey("telemetry", Telemetry)


def _answer(ok: bool, detail: dict[str, Any]) -> web.Response:
    body = {"status": "ok" if ok else "unavailable", **detail}
    return web.Response(
        status=200 if ok else 503,
        text=json.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _healthz(request: web.Request) -> web.Response:
    return _answer(*request.app[_TELEMETRY_KEY].liveness())


async def _readyz(request: web.Request) -> web.Response:
    return _answer(*request.app[_TELEMETRY_KEY].readiness())


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_TELEMETRY_KEY].render()
    # CONTENT_TYPE_LATEST carries a charset parameter, which aiohttp wants set apart.
    response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
    return response


def add_routes(app: web.Application, telemetry: Telemetry) -> None:
    """Add the three routes to ``app`` (``worker serve`` shares its port with them)."""
    app[_TELEMETRY_KEY] = telemetry
    app.router.add_get(HEALTHZ_PATH, _healthz)
    app.router.add_get(READYZ_PATH, _readyz)
    app.router.add_get(METRICS_PATH, _metrics)


class HttpServer:
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        app = web.Application()
        add_routes(app, telemetry)
        # No access log: probes every few seconds would drown the job events.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        self._site: web.TCPSite | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: any free port). A port in use is a ConfigError."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError("http.port", f"cannot listen on {host}:{port}: {reason}") from None
        self._site = site
        addresses = self._runner.addresses
        self.host = host
        self.port = int(addresses[0][1]) if addresses else port
        log.info("http_server_started", extra={"host": host, "port": self.port})

    async def stop(self) -> None:
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"


@asynccontextmanager
async def serve_http(telemetry: Telemetry, host: str, port: int) -> AsyncIterator[HttpServer]:
    server = HttpServer(telemetry)
    await server.start(host, port)
    try:
        yield server
    finally:
        with anyio.move_on_after(5.0, shield=True):
            await server.stop()
