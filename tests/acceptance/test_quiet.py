"""A worker whose tasks use no lock costs nothing: no sweeper, no lock-store connection."""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_unique.runtime import SWEEP_INTERVAL
from celery_unique.testing import RedisServer, wait_for

from .conftest import Worker
from .test_amqp import BROKER as AMQP
from .test_amqp import delete_queue, reachable

pytestmark = pytest.mark.acceptance


@pytest.fixture
def lock_store() -> Iterator[RedisServer]:
    """The app's lock store: a server of its own, whose connections are counted."""
    with RedisServer() as server:
        yield server


def connections(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        # Our own INFO call is one more each time: counted and taken off.
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


@pytest.mark.parametrize("per_call", [{"lock": "per-call"}, {"global_rate_limit": "5/s"}],
                         ids=["lock", "rate-limit"])
@pytest.mark.parametrize("broker_kind", ["redis", "amqp"])
def test_a_worker_without_locks_never_connects_to_the_lock_store(
    unique_redis_server: RedisServer, lock_store: RedisServer, broker_kind: str,
    per_call: dict[str, str],
) -> None:
    queue = f"quiet-{uuid.uuid4().hex}"
    done_url = f"{unique_redis_server.url}/5"
    if broker_kind == "amqp" and not reachable(AMQP):
        pytest.skip(f"no RabbitMQ at {AMQP}: the non-Redis broker is not tested here")
    broker_url = done_url if broker_kind == "redis" else AMQP
    env = {"CELERY_UNIQUE_QUIET_BROKER": broker_url, "CELERY_UNIQUE_QUIET_STORE": lock_store.url,
           "CELERY_UNIQUE_QUIET_QUEUE": queue, "CELERY_UNIQUE_QUIET_DONE": done_url}
    os.environ.update(env)
    # A fresh app for each broker: the module reads the environment set above.
    sys.modules.pop("tests.acceptance.quiet_app", None)
    quiet_app = importlib.import_module("tests.acceptance.quiet_app")
    assert quiet_app.app.conf.broker_url == broker_url
    broker = redis.Redis.from_url(done_url)
    broker.delete("quiet:done")
    before = connections(lock_store)
    worker = Worker(unique_redis_server, concurrency=2, name="quiet", queues=queue,
                    app="tests.acceptance.quiet_app", env=env)
    try:
        worker.wait_ready()
        # The worker works for four sweep intervals (0.25 s each): a job of each task
        # at a time, each waited for, until a second has passed since it was ready.
        window = time.monotonic() + 4 * SWEEP_INTERVAL
        n = 0
        while time.monotonic() < window or n < 10:
            quiet_app.plain.delay(f"p{n}")
            quiet_app.unique.delay(f"u{n}")
            n += 1
            wait_for(lambda n=n: broker.llen("quiet:done") == 2 * n, timeout=30,
                     what=f"job pair {n}")
        # Not one connection (the +1 is the INFO call of the first count), no sweeper.
        assert connections(lock_store) == before + 1
        assert "sweeping the locks" not in worker.logs()
        # A job given a lock (or a rate limit) per call: now the worker sweeps, against
        # its own store.
        quiet_app.unique.apply_async(("locked",), **per_call)
        wait_for(lambda: broker.llen("quiet:done") == 2 * n + 1, timeout=30,
                 what="the locked job")
        wait_for(lambda: "sweeping the locks of dead holders" in worker.logs(), timeout=10,
                 what="the sweeper to start")
        assert "sweeping the locks failed" not in worker.logs()
    finally:
        worker.stop()
        if broker_kind == "amqp":
            delete_queue(AMQP, queue)
