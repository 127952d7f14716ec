"""The lock store killed (SIGKILL) under a real worker, and restarted with its AOF."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_unique.store import get_store
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


def test_the_store_killed_and_restarted_five_times_while_jobs_run_and_park(
    unique_redis_server: RedisServer, lock_store: RedisServer, results: str
) -> None:
    """The issue's fault run: while ten jobs of one lock run and wait (parked in the
    store), the store is SIGKILLed and restarted from its AOF (appendfsync always), five
    times. Every job runs once, none is reported FAILURE, none overlaps another, none is
    stuck beyond about a lease after the restart, and the worker lives through it all.

    The jobs whose own take of the lock the kill cut are published again; those handed
    the lock from the line have a parked copy too, woken once their handed lease runs
    out: the copy that comes second is dropped ("ran already"), so nothing runs twice."""
    os.environ.setdefault("CELERY_UNIQUE_TEST_REDIS", unique_redis_server.url)
    from tests.acceptance import tasks

    queue = f"ko-{uuid.uuid4().hex[:8]}"
    coord = redis.Redis.from_url(f"{unique_redis_server.url}/4")
    store_url = f"{lock_store.url}/0"
    tasks.app.conf.unique_redis_url = store_url
    get_store(tasks.app)  # the app's tasks use the store its settings name now
    worker = Worker(unique_redis_server, concurrency=4, name=f"ko-{queue}", queues=queue,
                    env={"CELERY_UNIQUE_TEST_STORE_URL": store_url,
                         "CELERY_UNIQUE_TEST_RESULTS": results})
    rounds = []
    try:
        worker.wait_ready()
        for _ in range(5):
            run = uuid.uuid4().hex[:12]
            jobs = [tasks.through_outage.apply_async((run, n), queue=queue) for n in range(10)]
            wait_for(lambda run=run: coord.llen(f"intervals:{run}") >= 2, timeout=30,
                     what="two jobs to run, the others waiting")
            lock_store.kill()
            time.sleep(1.0)  # the outage itself: a second without the store
            lock_store.start()
            restarted = time.time()
            assert sorted(job.get(timeout=60) for job in jobs) == list(range(10))
            assert {job.state for job in jobs} == {"SUCCESS"}
            rounds.append((run, jobs, restarted))

        def idle() -> bool:  # nothing running, received or waiting for its countdown
            inspect = tasks.app.control.inspect([worker.hostname], timeout=1)
            replies = [inspect.active(), inspect.reserved(), inspect.scheduled()]
            return all(r is not None and not any(r.values()) for r in replies)

        wait_for(idle, timeout=60, what="the worker to have no job left")
        assert worker.process.poll() is None
        cut = worker.logs()  # the copies dropped are named there
        recoveries, twice, dropped = [], [], []
        for run, jobs, restarted in rounds:
            rows = sorted((json.loads(r) for r in coord.lrange(f"intervals:{run}", 0, -1)),
                          key=lambda r: r[1])
            assert {r[0] for r in rows} == set(range(10))  # none lost
            assert all(a[2] <= b[1] for a, b in zip(rows, rows[1:])), "two jobs overlapped"
            twice.append(len(rows) - 10)
            dropped.append(sum(f"through_outage[{job.id}] ran already" in cut
                               for job in jobs))
            first_end = {}
            for r in rows:
                first_end.setdefault(r[0], r[2])
            recoveries.append(max(first_end.values()) - restarted)
        # The last job of a round ends within a lease (2 s), a sweep and the remaining
        # jobs' own run time after the restart.
        print("recoveries after restart (s):", [round(r, 2) for r in recoveries],
              "copies dropped per round:", dropped, "jobs run twice per round:", twice)
        assert twice == [0] * 5, twice  # each ran once: no late copy ran again
        assert max(recoveries) < 2 + 5, recoveries
    finally:
        worker.stop()
        tasks.app.conf.unique_redis_url = f"{unique_redis_server.url}/{tasks.STORE_DB}"
        get_store(tasks.app)
