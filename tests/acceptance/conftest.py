from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique.testing import RedisServer, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(self, server: RedisServer, concurrency: int = 2, name: str = "accept",
                 queues: str = "celery", app: str = "tests.acceptance.tasks",
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 pool: str = "prefork") -> None:
        self.server = server
        #: Its node name, for control commands sent to it alone.
        self.hostname = f"{name}-{os.getpid()}@acceptance"
        self.log = Path(tempfile.mkstemp(prefix="celery-unique-worker-", suffix=".log")[1])
        env = {**os.environ, "CELERY_UNIQUE_TEST_REDIS": server.url,
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker",
             "-P", pool, "-c", str(concurrency), "-l", "INFO", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-n", self.hostname,
             "-Q", queues, f"--logfile={self.log}", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            # A group of its own: a test may kill the whole worker, main and pool at once.
            start_new_session=True,
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{self.logs()}")
            return "ready." in self.logs()

        wait_for(ready, timeout=60, what="the celery worker to be ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


#: The enqueue paths every acceptance test runs on: the lock store in the broker's
#: database (db 2, "atomic") or in another one (db 1, "separate").
STORE_DBS = {"atomic": 2, "separate": 1}


@pytest.fixture(scope="session", params=list(STORE_DBS))
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def results() -> Iterator[str]:
    """The results folder, one for the session: the tests' app reads it whichever path."""
    folder = tempfile.mkdtemp(prefix="celery-unique-results-")
    os.environ["CELERY_UNIQUE_TEST_RESULTS"] = folder
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def worker(unique_redis_server: RedisServer, path: str, results: str) -> Iterator[Worker]:
    os.environ["CELERY_UNIQUE_TEST_REDIS"] = unique_redis_server.url
    os.environ["CELERY_UNIQUE_TEST_STORE_DB"] = str(STORE_DBS[path])
    _use_store_db(STORE_DBS[path], unique_redis_server)
    w = Worker(unique_redis_server)
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture
def tasks(worker: Worker) -> Any:
    from tests.acceptance import tasks

    return tasks


def _use_store_db(db: int, server: RedisServer) -> None:
    """Point the test process's copy of the tasks' app at the worker's lock store."""
    from celery_unique import broker
    from celery_unique.store import get_store
    from tests.acceptance import tasks

    tasks.app.conf.unique_redis_url = f"{server.url}/{db}"
    assert broker.atomic(tasks.app, get_store(tasks.app)) is (db == 2)


@pytest.fixture
def store(unique_redis_server: RedisServer, path: str) -> redis.Redis:
    """The lock store of the running worker."""
    return redis.Redis.from_url(f"{unique_redis_server.url}/{STORE_DBS[path]}")


@pytest.fixture
def coord(unique_redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(f"{unique_redis_server.url}/4")
