"""``on_duplicate="replace"`` with a real ``celery worker`` (prefork, 2 processes) on a
real Redis, on both enqueue paths."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis

from celery_unique import Replaced
from celery_unique.scripts import replaced_key
from celery_unique.testing import wait_for

pytestmark = pytest.mark.acceptance


def key(task: str, value: str) -> str:
    return f"celery_unique:q:{{acceptance.{task}:{value}}}"


def replaced_and_final(results: list[Any], by: set[str]) -> None:
    """Each result is final now: ``REVOKED`` with :class:`Replaced`, replaced by one of
    ``by``."""
    for result in results:
        assert result.state == "REVOKED", result.id
        assert isinstance(result.result, Replaced)
        assert result.result.task_id == result.id and result.result.replaced_by in by


def test_a_hundred_calls_from_eight_threads_run_once_with_the_last_arguments(
    tasks: Any, store: redis.Redis, coord: redis.Redis, worker: Any
) -> None:
    """100 calls with increasing arguments, from 8 threads, while no worker consumes
    their queue: every call is published, each replacing the one queued before it. Once
    the worker consumes the queue, exactly one job runs, with the last accepted call's
    arguments; every other result was final before the worker saw it; no lock is left."""
    run, queue = uuid.uuid4().hex[:12], f"replace-{uuid.uuid4().hex[:8]}"
    k = key("reindex", f"reindex_{run}")
    calls: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def caller(versions: range) -> None:
        for version in versions:
            result = tasks.reindex.apply_async((run, version), queue=queue)
            with lock:
                calls.append((version, result))

    threads = [threading.Thread(target=caller, args=(range(n, 100, 8),)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 100
    holder = store.get(k)
    assert holder is not None
    (last,) = [version for version, result in calls if result.id == holder.decode()]
    others = [result for version, result in calls if version != last]
    replaced_and_final(others, {result.id for _, result in calls})
    assert store.hlen(replaced_key(k)) == 99
    tasks.app.control.add_consumer(queue, destination=[worker.hostname], reply=True)
    try:
        wait_for(lambda: not store.exists(k, replaced_key(k)), timeout=30,
                 what="every job to have started (the replaced ones dropped)")
        wait_for(lambda: coord.llen(f"runs:{run}") >= 1, timeout=10, what="the last job")
        (result,) = [result for version, result in calls if version == last]
        assert result.get(timeout=10) == last
        assert [int(v) for v in coord.lrange(f"runs:{run}", 0, -1)] == [last]
        replaced_and_final(others, {result.id for _, result in calls})  # still, after
    finally:
        tasks.app.control.cancel_consumer(queue, destination=[worker.hostname], reply=True)


def test_one_running_and_one_waiting_with_the_newest_arguments(
    tasks: Any, store: redis.Redis, coord: redis.Redis
) -> None:
    """BullMQ's keepLastIfActive: ``replace`` with ``until="started"`` and a lock. A slow
    job runs (holding its lock, its queueing lock released); 20 calls arrive: each waits
    in line for the lock and replaces the one before it. When the slow job ends, exactly
    one more runs: the newest."""
    run = uuid.uuid4().hex[:12]
    first = tasks.latest.delay(run, 0, True)
    wait_for(lambda: coord.get(f"started:{run}"), timeout=20, what="the slow job to start")
    calls = [tasks.latest.delay(run, version) for version in range(1, 21)]
    replaced_and_final(calls[:-1], {call.id for call in calls})
    coord.set(f"go:{run}", 1)
    assert first.get(timeout=20) == 0
    assert calls[-1].get(timeout=30) == 20
    assert [int(v) for v in coord.lrange(f"runs:{run}", 0, -1)] == [0, 20]
    k, base = key("latest", f"latest_{run}"), f"celery_unique:l:{{latest_{run}}}"
    wait_for(lambda: not store.exists(k, replaced_key(k), f"{base}:holders"), timeout=10,
             what="every lock to be released")
    assert not store.exists(f"{base}:line", f"{base}:parked", f"{base}:arrival")


def test_debounce_runs_once_per_burst_with_its_last_arguments(
    tasks: Any, store: redis.Redis, coord: redis.Redis
) -> None:
    """``debounce=0.5, debounce_max=1.5``. A burst of 5 calls 0.1 s apart runs once, with
    the 5th call's arguments, no sooner than 0.5 s after it. A burst of 30 calls 0.1 s
    apart (3 s) runs every time it has lasted 1.5 s: the job starts then, and the calls
    after its start begin a new burst; runs come in call order, the last with the last
    call's arguments, none later than 1.5 s (and the worker's latency) after its
    burst's first call."""
    import json
    import time

    run, tolerance = uuid.uuid4().hex[:12], 1.0
    calls: list[float] = []  # when each call was made, by version

    def burst(versions: range) -> None:
        for version in versions:
            calls.append(time.time())
            tasks.debounced.delay(run, version)
            time.sleep(0.1)  # the callers' pace: the scenario itself, not a wait

    def runs() -> list[tuple[int, float]]:
        return [tuple(json.loads(r)) for r in coord.lrange(f"runs:{run}", 0, -1)]

    burst(range(5))
    wait_for(lambda: runs(), timeout=10, what="the first burst's run")
    (version, started), = runs()
    assert version == 4
    assert calls[4] + 0.5 <= started <= calls[0] + 1.5 + tolerance
    burst(range(5, 35))
    wait_for(lambda: runs()[-1][0] == 34, timeout=10, what="the second burst's last run")
    second = runs()[1:]
    assert [v for v, _ in second] == sorted({v for v, _ in second})
    assert 2 <= len(second) <= 4, second
    previous = started
    for version, started in second:
        # The burst began with the first call after the previous job started (the
        # job's own time is a little after its start: a call in between began it).
        began = min((t for t in calls[5:] if t > previous), default=previous)
        assert started <= began + 1.5 + tolerance, (version, started - began)
        previous = started
    k = key("debounced", f"debounce_{run}")
    wait_for(lambda: not store.exists(k, replaced_key(k)), timeout=10,
             what="every replaced job to be dropped")
    assert len(runs()) == 1 + len(second)
