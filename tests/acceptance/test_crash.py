"""Order mode when a worker dies holding prefetched jobs (real workers, SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import pytest
import redis

from celery_unique.testing import RedisServer, wait_for

from .conftest import Worker

pytestmark = pytest.mark.acceptance


def rows(coord: redis.Redis, key: str) -> list[Any]:
    return [json.loads(x) for x in coord.lrange(key, 0, -1)]


def test_a_worker_killed_with_prefetched_jobs_blocks_the_line_one_lease_at_most(
    unique_redis_server: RedisServer, results: str
) -> None:
    """The issue's fault run: a worker's main process and pool SIGKILLed while it holds
    the lock and prefetched jobs of the same lock, a second worker alive. The jobs it never
    received run within about a lease (2 s) plus a sweep, in creation order; its
    prefetched jobs run when the broker gives their messages back; nothing overlaps."""
    os.environ.setdefault("CELERY_UNIQUE_TEST_REDIS", unique_redis_server.url)
    from tests.acceptance import tasks

    from .conftest import _use_store_db

    assert unique_redis_server.url == tasks.SERVER
    _use_store_db(2, unique_redis_server)
    run = uuid.uuid4().hex[:12]
    queue = f"pf-{run}"
    coord = redis.Redis.from_url(f"{unique_redis_server.url}/4")
    broker = redis.Redis.from_url(f"{unique_redis_server.url}/2")
    env = {"CELERY_UNIQUE_TEST_STORE_DB": "2", "CELERY_UNIQUE_TEST_VISIBILITY": "10",
           "CELERY_UNIQUE_TEST_RESULTS": results}
    first = Worker(unique_redis_server, concurrency=1, name=f"pf1-{run}", queues=queue,
                   env=env, args=("--prefetch-multiplier", "4"))
    second = None
    try:
        first.wait_ready()
        for n in range(9):
            tasks.prefetched.apply_async((run, n), queue=queue)
        wait_for(lambda: coord.llen(f"starts:{run}") == 1, timeout=30, what="job 0 to start")
        # Job 0 runs; the worker holds four more, received but not started.
        wait_for(lambda: broker.hlen("unacked") >= 4, timeout=30, what="4 prefetched jobs")
        second = Worker(unique_redis_server, concurrency=1, name=f"pf2-{run}", queues=queue,
                        env=env)
        second.wait_ready()
        os.killpg(first.process.pid, signal.SIGKILL)
        killed_at = time.time()
        first.process.wait(10)
        wait_for(lambda: coord.llen(f"intervals:{run}") == 8, timeout=120,
                 what="the 8 jobs that did not run in the killed worker")
        ended = rows(coord, f"intervals:{run}")
        never_delivered = [r for r in ended if r[0] >= 5]
        # The jobs the killed worker never received: in creation order, soon after (not
        # after the 10 s its prefetched messages stay invisible, nor an hour).
        assert [r[0] for r in sorted(never_delivered, key=lambda r: r[1])] == [5, 6, 7, 8]
        assert min(r[1] for r in never_delivered) - killed_at < 2 + 3
        # Its prefetched jobs came back from the broker and ran, each once.
        assert sorted(r[0] for r in ended) == [1, 2, 3, 4, 5, 6, 7, 8]
        spans = sorted((r[1], r[2]) for r in ended)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two jobs overlapped"
    finally:
        coord.set(f"go:{run}", 1)
        if second is not None:
            second.stop()
        if first.process.poll() is None:
            first.stop()


def test_a_busy_worker_keeps_the_places_of_its_prefetched_jobs(
    unique_redis_server: RedisServer, results: str
) -> None:
    """Nothing fails: a worker busy with the lock's holder for longer than a lease holds
    four jobs it prefetched, a second worker receives the later ones. The prefetched jobs
    keep their places (their worker renews them), so creation order holds."""
    os.environ.setdefault("CELERY_UNIQUE_TEST_REDIS", unique_redis_server.url)
    from tests.acceptance import tasks

    from .conftest import _use_store_db

    _use_store_db(2, unique_redis_server)
    run = uuid.uuid4().hex[:12]
    queue = f"pf-{run}"
    coord = redis.Redis.from_url(f"{unique_redis_server.url}/4")
    broker = redis.Redis.from_url(f"{unique_redis_server.url}/2")
    env = {"CELERY_UNIQUE_TEST_STORE_DB": "2", "CELERY_UNIQUE_TEST_RESULTS": results}
    first = Worker(unique_redis_server, concurrency=1, name=f"pb1-{run}", queues=queue,
                   env=env, args=("--prefetch-multiplier", "4"))
    second = None
    try:
        first.wait_ready()
        tasks.prefetched.apply_async((run, 0, 5.0), queue=queue)  # 2.5 leases
        for n in range(1, 9):
            tasks.prefetched.apply_async((run, n), queue=queue)
        wait_for(lambda: coord.llen(f"starts:{run}") == 1, timeout=30, what="job 0 to start")
        wait_for(lambda: broker.hlen("unacked") >= 4, timeout=30, what="4 prefetched jobs")
        second = Worker(unique_redis_server, concurrency=1, name=f"pb2-{run}", queues=queue,
                        env=env)
        second.wait_ready()
        wait_for(lambda: coord.llen(f"intervals:{run}") == 9, timeout=60, what="9 jobs")
        ended = sorted(rows(coord, f"intervals:{run}"), key=lambda r: r[1])
        assert [r[0] for r in ended] == list(range(9))
        assert all(a[2] <= b[1] for a, b in zip(ended, ended[1:])), "two jobs overlapped"
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
