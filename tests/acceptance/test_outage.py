"""The lock store killed (SIGKILL) under a real worker, and restarted with its AOF."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_unique.testing import RedisServer, wait_for

from .conftest import Worker

pytestmark = pytest.mark.acceptance


@pytest.fixture
def lock_store() -> Iterator[RedisServer]:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    yield server
    server.stop()


def test_a_job_starting_while_the_store_is_down_waits_for_it_or_runs_unlocked(
    unique_redis_server: RedisServer, lock_store: RedisServer, results: str
) -> None:
    """``on_store_error="raise"`` (the default): the job is neither run without its lock,
    nor failed, nor lost: it is published again with a backoff and runs, once, when the
    store is back. ``"allow"``: it runs at once without its lock, and the signal says so.
    The worker survives, and so does its sweep."""
    os.environ.setdefault("CELERY_UNIQUE_TEST_REDIS", unique_redis_server.url)
    from tests.acceptance import tasks

    run, queue = uuid.uuid4().hex[:12], f"outage-{uuid.uuid4().hex[:8]}"
    coord = redis.Redis.from_url(f"{unique_redis_server.url}/4")
    coord.delete("store_unavailable")
    worker = Worker(unique_redis_server, concurrency=2, name=f"outage-{run}", queues=queue,
                    env={"CELERY_UNIQUE_TEST_STORE_URL": f"{lock_store.url}/0",
                         "CELERY_UNIQUE_TEST_RESULTS": results})
    try:
        worker.wait_ready()
        lock_store.kill()
        # By name: the caller takes no lock, so only the worker meets the outage.
        waits = tasks.app.send_task("acceptance.outage", (run, "raise"), queue=queue)
        allowed = tasks.app.send_task("acceptance.outage_allow", (run, "allow"), queue=queue)
        assert allowed.get(timeout=30) == "allow"
        wait_for(lambda: "published again to run in" in worker.logs(), timeout=30,
                 what="the job to be published again")
        assert [json.loads(r)[0] for r in coord.lrange(f"runs:{run}", 0, -1)] == ["allow"]
        where, task_id, url = json.loads(coord.lrange("store_unavailable", 0, -1)[0])
        assert (where, task_id, url) == ("run", allowed.id, f"{lock_store.url}/0")
        lock_store.start()  # the same port, the same files
        assert waits.get(timeout=60) == "raise"
        ran = [json.loads(r) for r in coord.lrange(f"runs:{run}", 0, -1)]
        assert [(p, i) for p, i, _ in ran] == [("allow", allowed.id), ("raise", waits.id)]
        assert ran[0][2] is None and ran[1][2] is not None  # unlocked, then locked (a fence)
        assert waits.state == "SUCCESS"
        wait_for(lambda: "sweeping the locks works again" in worker.logs(), timeout=30,
                 what="the sweep to recover")
        assert worker.process.poll() is None
    finally:
        worker.stop()
