"""Loopback fixture servers that imitate Google services (GCE metadata server, Pub/Sub REST)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["start_app"]


async def start_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: a free port); return the runner and the port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    # reuse_address: the metadata server is restarted on the port reserved in conftest.
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
