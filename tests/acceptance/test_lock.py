"""The execution lock with real ``celery worker`` subprocesses (prefork, 4 processes)."""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Task

from celery_unique import AlreadyQueued
from celery_unique.testing import RedisServer, max_overlap, wait_for

from .conftest import ROOT, Worker

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def lock_worker(worker: Worker, unique_redis_server: RedisServer) -> Iterator[Worker]:
    w = Worker(unique_redis_server, concurrency=4, name="locks", queues="locks")
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture
def tasks(lock_worker: Worker) -> Any:
    from tests.acceptance import tasks

    return tasks


def run_id() -> str:
    return uuid.uuid4().hex[:12]


def intervals(coord: redis.Redis, run: str) -> list[list[Any]]:
    return [json.loads(x) for x in coord.lrange(f"intervals:{run}", 0, -1)]


def no_lock_keys(store: redis.Redis, part: str) -> bool:
    return not [k for k in store.keys(f"celery_unique:*{part}*")
                if not k.endswith((b":seq", b":ran"))]


def alphabet(tasks: Any) -> str:
    path = Path(tempfile.mkdtemp()) / "alphabet.txt"
    for letter in string.ascii_lowercase:
        tasks.write_alphabet.delay(str(path), letter)
    wait_for(lambda: path.exists() and len(path.read_text()) == 26, timeout=60,
             what="26 letters")
    return path.read_text()


def test_alphabet_in_order_with_four_processes(tasks: Any, store: Any) -> None:
    assert alphabet(tasks) == string.ascii_lowercase
    # The last letter is written before its job's lock is released: wait for the release.
    wait_for(lambda: no_lock_keys(store, "alphabet"), timeout=10, what="no lock left")


def test_alphabet_in_order_with_two_workers(
    tasks: Any, store: Any, unique_redis_server: RedisServer
) -> None:
    second = Worker(unique_redis_server, concurrency=2, name="locks2", queues="locks")
    try:
        second.wait_ready()
        assert alphabet(tasks) == string.ascii_lowercase
    finally:
        second.stop()


@pytest.mark.parametrize("limit", [1, 2])
def test_no_overlap_over_300_jobs(tasks: Any, coord: Any, store: Any, limit: int) -> None:
    run = run_id()
    for n in range(300):
        tasks.interval.apply_async((run, f"res-{run}-{n % 10}", n), lock_limit=limit)
    wait_for(lambda: coord.llen(f"intervals:{run}") == 300, timeout=120, what="300 jobs")
    rows = intervals(coord, run)
    assert sorted(r[3] for r in rows) == list(range(300))  # each ran exactly once
    for value in range(10):
        mine = [r for r in rows if r[0] == f"res-{run}-{value}"]
        assert max_overlap([(r[1], r[2]) for r in mine]) <= limit
        fences = [r[4] for r in sorted(mine, key=lambda r: r[3])]
        assert len(set(fences)) == len(fences)
        if limit == 1:
            # One at a time: creation order, and fences increasing in that order. (With two
            # places, the two jobs at the front take them in whichever order they ask.)
            by_start = sorted(mine, key=lambda r: r[1])
            assert [r[3] for r in by_start] == sorted(r[3] for r in mine)
            assert fences == sorted(fences)
    wait_for(lambda: no_lock_keys(store, f"res-{run}"), timeout=10, what="no lock left")


def test_jobs_enqueueing_jobs_on_a_pool_of_greenlets(
    tasks: Any, coord: Any, store: Any, unique_redis_server: RedisServer
) -> None:
    """200 jobs each enqueue a locked job from a gevent worker: all are published, each
    runs once, one at a time per lock. (Each job is a greenlet of its own, and each kept a
    connection of kombu's channel, which lends 10: the 11th on a channel failed. A pool
    of threads reuses its threads, so it cannot show this.)"""
    queue = f"spawn-{run_id()}"
    other = Worker(unique_redis_server, concurrency=8, name="spawn", queues=queue,
                   pool="gevent")
    try:
        other.wait_ready()
        run = run_id()
        for n in range(200):
            tasks.spawn.apply_async((run, n, queue), queue=queue)
        try:
            wait_for(lambda: coord.llen(f"intervals:{run}") == 200, timeout=60,
                     what="200 spawned jobs")
        finally:
            assert "Too many connections" not in other.logs()
        wait_for(lambda: no_lock_keys(store, f"spawned-{run}"), timeout=10,
                 what="no lock left")
    finally:
        other.stop()
    rows = intervals(coord, run)
    assert sorted(r[3] for r in rows) == list(range(200))
    for value in range(3):
        mine = [r for r in rows if r[0] == f"spawned-{run}-{value}"]
        assert max_overlap([(r[1], r[2]) for r in mine]) == 1


@pytest.mark.parametrize("pool", ["threads", "solo", "gevent"])
def test_no_overlap_and_in_order_on_other_pools(
    tasks: Any, coord: Any, store: Any, unique_redis_server: RedisServer, pool: str
) -> None:
    """A worker of threads or greenlets (4 jobs at once in one process) or solo: the same
    guarantees."""
    queue = f"pool-{pool}-{run_id()}"
    other = Worker(unique_redis_server, concurrency=4, name=f"pool-{pool}", queues=queue,
                   pool=pool)
    try:
        other.wait_ready()
        run = run_id()
        for n in range(60):
            tasks.interval.apply_async((run, f"res-{run}-{n % 3}", n), queue=queue)
        wait_for(lambda: coord.llen(f"intervals:{run}") == 60, timeout=60, what="60 jobs")
        wait_for(lambda: no_lock_keys(store, f"res-{run}"), timeout=10, what="no lock left")
    finally:
        other.stop()
    rows = intervals(coord, run)
    assert sorted(r[3] for r in rows) == list(range(60))  # each ran exactly once
    for value in range(3):
        mine = [r for r in rows if r[0] == f"res-{run}-{value}"]
        assert max_overlap([(r[1], r[2]) for r in mine]) == 1
        by_start = sorted(mine, key=lambda r: r[1])
        assert [r[3] for r in by_start] == sorted(r[3] for r in mine)  # creation order
        fences = [r[4] for r in by_start]
        assert fences == sorted(fences) and len(set(fences)) == len(fences)
    if pool != "solo":  # jobs of different locks did run at once
        assert max_overlap([(r[1], r[2]) for r in rows]) > 1


def test_long_job_keeps_its_lock_by_renewal(tasks: Any, coord: Any, store: Any) -> None:
    run = run_id()
    tasks.long_job.delay(run, 3.0, 0)  # 3x its 1 s lease
    tasks.long_job.delay(run, 0.0, 1)
    wait_for(lambda: coord.llen(f"intervals:{run}") == 2, timeout=30, what="both jobs")
    first, second = sorted(intervals(coord, run), key=lambda r: r[3])
    assert first[2] <= second[1], "the second job started while the first held the lock"
    assert first[5] is False  # lock_lost
    assert second[4] > first[4]  # fence
    wait_for(lambda: no_lock_keys(store, f"long_{run}"), timeout=10, what="no lock left")


def test_killed_pool_process_frees_the_lock(tasks: Any, coord: Any, store: Any) -> None:
    run = run_id()
    tasks.kill_holder.delay(run, 0, kill=True)
    tasks.kill_holder.delay(run, 1)
    tasks.kill_holder.delay(run, 2)
    wait_for(lambda: coord.llen(f"starts:{run}") == 3, timeout=30, what="three starts")
    starts = [json.loads(x) for x in coord.lrange(f"starts:{run}", 0, -1)]
    assert [n for n, _ in starts] == [0, 1, 2]  # no waiting job lost, order kept
    # The lease is 2 s and renewed every 2/3 s: the next job starts within that.
    assert starts[1][1] - starts[0][1] < 2 + 2 / 3
    wait_for(lambda: no_lock_keys(store, f"kill_{run}"), timeout=10, what="no lock left")


def test_creation_order_beats_delivery_order(tasks: Any, store: Any) -> None:
    """b, c and d reach a worker before a: they wait for it, as they were created after."""
    path = Path(tempfile.mkdtemp()) / "alphabet.txt"
    later = f"later-{run_id()}"
    tasks.write_alphabet.apply_async((str(path), "a"), queue=later)
    for letter in "bcd":
        tasks.write_alphabet.delay(str(path), letter)

    def parked() -> int:
        return sum(store.hlen(k) for k in store.keys("*alphabet.txt*:parked")
                   if str(path.parent.name).encode() in k)

    wait_for(lambda: parked() == 3, timeout=30, what="b, c and d to wait for a")
    assert not path.exists()
    tasks.app.control.add_consumer(later, reply=True)
    wait_for(lambda: path.exists() and len(path.read_text()) == 4, timeout=30, what="abcd")
    assert path.read_text() == "abcd"


def test_a_job_that_never_arrives_gives_up_its_place(tasks: Any) -> None:
    path = Path(tempfile.mkdtemp()) / "alphabet.txt"
    # Its message goes to a queue nobody consumes: its place in line is given up after
    # its queueing_lock_timeout (the time a job may take to reach a worker).
    tasks.write_alphabet.apply_async((str(path), "x"), queue=f"nowhere-{run_id()}",
                                     queueing_lock_timeout=1)
    for letter in "ab":
        tasks.write_alphabet.delay(str(path), letter)
    wait_for(lambda: path.exists() and len(path.read_text()) == 2, timeout=30, what="ab")
    assert path.read_text() == "ab"


def test_skipped_job_has_a_final_readable_result(tasks: Any, coord: Any, store: Any) -> None:
    from celery_unique import LockHeld

    run = run_id()
    holder = tasks.skip_job.delay(run, hold=True)
    wait_for(lambda: coord.get(f"started:{run}"), what="the holder to start")
    skipped = tasks.skip_job.delay(run)
    wait_for(skipped.ready, timeout=30, what="the skipped job's result")
    assert skipped.state == "REVOKED"
    with pytest.raises(LockHeld, match=holder.id):
        skipped.get(timeout=5)
    coord.set(f"go:{run}", 1)
    assert holder.get(timeout=30) == "ran"
    wait_for(lambda: no_lock_keys(store, f"skip_{run}"), timeout=10, what="no lock left")


def rows(coord: redis.Redis, key: str) -> list[Any]:
    return [json.loads(x) for x in coord.lrange(key, 0, -1)]


def no_overlap(spans: list[list[Any]]) -> bool:
    """Whether the [.., .., start, end] rows, in start order, never overlap."""
    ordered = sorted(spans, key=lambda r: r[2])
    return all(a[3] <= b[2] for a, b in zip(ordered, ordered[1:]))


@pytest.mark.parametrize("outcome", ["raise", "retry", "stuck", "reject", "ignore", "replace"])
def test_every_end_of_a_locked_job_releases_it(
    tasks: Any, coord: Any, store: Any, outcome: str
) -> None:
    """A job that raises, retries, is killed by its hard time limit, raises Reject or
    Ignore, or replaces itself frees its lock at once (Celery skips after_return for most
    of these): the lease (60 s) is far longer than the wait, so only a release lets 1
    and 2 in.
    """
    run = run_id()
    first = tasks.locked_outcome.delay(run, 0, outcome)
    tasks.locked_outcome.delay(run, 1)
    tasks.locked_outcome.delay(run, 2)
    done = 3 if outcome == "retry" else 2  # a first run that retries records no end
    wait_for(lambda: coord.llen(f"intervals:{run}") == done, timeout=20,
             what=f"the jobs after one that ended with {outcome}")
    ended = rows(coord, f"intervals:{run}")
    assert no_overlap(ended)
    assert sorted((n, retries) for n, retries, *_ in ended) == (
        [(0, 1), (1, 0), (2, 0)] if outcome == "retry" else [(1, 0), (2, 0)])
    # 1 and 2 waited for 0 and started in creation order
    starts = rows(coord, f"starts:{run}")
    assert [n for n, retries, _ in starts if not retries][:3] == [0, 1, 2]
    if outcome in ("raise", "stuck"):
        wait_for(first.ready, timeout=10, what="the first job's result")
        assert first.state == "FAILURE"
    if outcome == "replace":
        assert first.get(timeout=10) == run  # the replacement's result
    wait_for(lambda: no_lock_keys(store, f"out_{run}"), timeout=10, what="no lock left")


def test_a_retry_goes_to_the_back_of_the_line(tasks: Any, coord: Any, store: Any) -> None:
    run = run_id()
    tasks.locked_outcome.delay(run, 0, "retry")
    for n in (1, 2):
        tasks.locked_outcome.delay(run, n)
    wait_for(lambda: coord.llen(f"intervals:{run}") == 3, timeout=20, what="three jobs")
    ended = sorted(rows(coord, f"intervals:{run}"), key=lambda r: r[2])
    # The retry waited 0.3 s and took a place after 1 and 2, which ran meanwhile.
    assert [(n, retries) for n, retries, *_ in ended] == [(1, 0), (2, 0), (0, 1)]
    assert no_overlap(ended)


def test_redelivered_job_runs_again_without_overlap(
    tasks: Any, coord: Any, store: Any
) -> None:
    """acks_late + reject_on_worker_lost: a killed job's message comes back (same id)."""
    run = run_id()
    killed = tasks.redelivered.delay(run, 0, kill=True)
    for n in (1, 2):
        tasks.redelivered.delay(run, n)
    wait_for(lambda: coord.llen(f"intervals:{run}") == 3, timeout=30, what="three jobs")
    starts = rows(coord, f"starts:{run}")
    assert [task_id for n, task_id, _ in starts].count(killed.id) == 2  # ran again
    ended = rows(coord, f"intervals:{run}")
    assert sorted(n for n, *_ in ended) == [0, 1, 2]  # each completed once
    # No job overlapped another, the killed run included (it died 0.1 s after starting).
    killed_run = [[0, killed.id, starts[0][2], starts[0][2] + 0.1]]
    assert starts[0][1] == killed.id
    assert no_overlap(ended + killed_run)
    wait_for(lambda: no_lock_keys(store, f"lost_{run}"), timeout=10, what="no lock left")


def test_revoked_waiting_job_leaves_the_line(
    tasks: Any, coord: Any, store: Any, lock_worker: Worker
) -> None:
    run = run_id()
    tasks.gated.delay(run, 0, hold=True)
    wait_for(lambda: coord.llen(f"starts:{run}") == 1, what="the holder to start")
    waiting = [tasks.gated.delay(run, n) for n in (1, 2, 3)]
    wait_for(lambda: sum(store.hlen(k) for k in store.keys(f"*gate_{run}*:parked")) == 3,
             timeout=20, what="three parked jobs")
    replies = tasks.app.control.revoke(waiting[0].id, destination=[lock_worker.hostname],
                                       reply=True, limit=1, timeout=10)
    assert replies, "the worker did not acknowledge the revoke"
    coord.set(f"go:{run}", 1)
    wait_for(lambda: coord.llen(f"starts:{run}") == 3, timeout=20, what="2 and 3 to run")
    assert [int(n) for n in coord.lrange(f"starts:{run}", 0, -1)] == [0, 2, 3]
    wait_for(waiting[0].ready, timeout=10, what="the revoked job's result")
    assert waiting[0].state == "REVOKED"
    wait_for(lambda: no_lock_keys(store, f"gate_{run}"), timeout=10, what="no lock left")


def test_an_operators_release_hands_the_lock_to_the_first_in_line_which_runs(
    tasks: Any, coord: Any, store: Any
) -> None:
    """``celery unique release`` on a held lock with jobs waiting: the first in line is
    handed the lock and runs at once (its holder still running), the second still waits
    its turn behind it, and the old holder's own end later frees nothing of theirs."""
    run = run_id()
    tasks.gated.delay(run, 0, hold=True)
    wait_for(lambda: coord.llen(f"starts:{run}") == 1, what="the holder to start")
    waiting = [tasks.gated.apply_async((run, n), {"hold": n == 1}) for n in (1, 2)]
    wait_for(lambda: sum(store.hlen(k) for k in store.keys(f"*gate_{run}*:parked")) == 2,
             timeout=20, what="two parked jobs")
    key = f"celery_unique:l:{{gate_{run}}}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.acceptance.tasks", "unique", "release",
         key, "--yes"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Job 1 runs although job 0 has not ended (the operator chose so); job 2 waits for 1.
    wait_for(lambda: coord.llen(f"starts:{run}") == 2, timeout=20, what="job 1 to run")
    assert [int(n) for n in coord.lrange(f"starts:{run}", 0, -1)] == [0, 1]
    assert store.zrange(key + ":holders", 0, -1) == [waiting[0].id.encode()]
    coord.set(f"go:{run}", 1)  # 0 and 1 end: 0's release must not free 1's hand-over
    wait_for(lambda: coord.llen(f"starts:{run}") == 3, timeout=20, what="job 2 to run")
    assert [int(n) for n in coord.lrange(f"starts:{run}", 0, -1)] == [0, 1, 2]
    wait_for(lambda: no_lock_keys(store, f"gate_{run}"), timeout=10, what="no lock left")


def test_retry_mode_runs_every_job_exactly_once(tasks: Any, coord: Any, store: Any) -> None:
    run = run_id()
    for n in range(30):
        tasks.retry_mode.delay(run, n)
    wait_for(lambda: coord.llen(f"intervals:{run}") >= 30, timeout=90, what="30 jobs")
    ended = rows(coord, f"intervals:{run}")
    assert sorted(n for n, *_ in ended) == list(range(30))
    assert no_overlap(ended)
    # Waiting for the lock is not a retry: max_retries=0 and every run is the first.
    assert {retries for _, retries, *_ in ended} == {0}
    wait_for(lambda: no_lock_keys(store, f"rm_{run}"), timeout=10, what="no lock left")


@pytest.mark.skipif(not hasattr(Task, "retry_on_worker_lost"),
                    reason="retry_on_worker_lost is new in Celery 5.7")
def test_retry_on_worker_lost_keeps_the_queueing_lock(
    tasks: Any, coord: Any, store: Any
) -> None:
    run = run_id()
    first = tasks.lost_retry.delay(run)
    wait_for(lambda: first.state == "RETRY", timeout=20, what="Celery to retry the lost job")
    # The retry, published by the worker's main process, holds the queueing lock.
    with pytest.raises(AlreadyQueued, match=first.id):
        tasks.lost_retry.delay(run)
    wait_for(lambda: coord.llen(f"runs:{run}") == 2, timeout=20, what="the retry to run")
    coord.set(f"go:{run}", 1)
    assert first.get(timeout=20) == 1
    assert [int(x) for x in coord.lrange(f"runs:{run}", 0, -1)] == [0, 1]
    wait_for(lambda: no_lock_keys(store, f"lr_{run}"), timeout=10, what="no lock left")


def test_a_frozen_holder_loses_its_lock_and_is_told(
    tasks: Any, coord: Any, store: Any, lock_worker: Worker
) -> None:
    """A process stopped longer than its lease (a paused VM): the next job takes the lock
    with a larger fence, and the frozen one learns it lost the lock when it resumes."""
    run = run_id()
    frozen = tasks.frozen.delay(run, 0)
    pid = int(wait_for(lambda: coord.get(f"started:{run}:0"), what="job 0 to start"))
    os.kill(pid, signal.SIGSTOP)
    try:
        tasks.frozen.delay(run, 1)
        wait_for(lambda: coord.llen(f"intervals:{run}") == 1, timeout=20,
                 what="job 1 to run once job 0's lease (1 s) ran out")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: coord.get(f"lost:{frozen.id}"), timeout=10,
                    what="the lock_lost signal").decode().endswith(f"{{frozen_{run}}}")
    coord.set(f"go:{run}", 1)
    wait_for(lambda: coord.llen(f"intervals:{run}") == 2, timeout=20, what="job 0 to end")
    (n1, fence1, lost1), (n0, fence0, lost0) = rows(coord, f"intervals:{run}")
    assert (n1, lost1, n0, lost0) == (1, False, 0, True)  # request.lock_lost
    assert fence1 > fence0  # what a fenced write checks
    assert f"{frozen.id}] lost its lock" in lock_worker.logs()
    wait_for(lambda: no_lock_keys(store, f"frozen_{run}"), timeout=10, what="no lock left")


def test_a_releasing_process_killed_after_its_script_still_hands_over(
    tasks: Any, coord: Any, store: Any, path: str
) -> None:
    """On the atomic path the woken job's message is pushed by the release script: the
    next job starts at once although the releasing process died right after it. With
    the locks in another database it is published by that process, which died: the
    next job waits for its handed lease (4 s) to run out and a sweep to wake it again.
    Either way it runs once."""
    run = run_id()
    tasks.handover.delay(run, 0, kill=True)
    wait_for(lambda: coord.llen(f"starts:{run}") == 1, what="job 0 to start")
    tasks.handover.delay(run, 1)
    wait_for(lambda: sum(store.hlen(k) for k in store.keys(f"*handover_{run}*:parked")) == 1,
             timeout=20, what="job 1 to park")
    coord.set(f"go:{run}", 1)
    released = float(wait_for(lambda: coord.get(f"released:{run}"), timeout=20,
                              what="job 0's release"))
    wait_for(lambda: coord.llen(f"ends:{run}") == 1, timeout=30, what="job 1 to run")
    started = rows(coord, f"starts:{run}")[1][1]
    if path == "atomic":
        assert started - released < 2.0
    else:
        assert started - released >= 3.0
    wait_for(lambda: no_lock_keys(store, f"handover_{run}"), timeout=10, what="no lock left")
    assert [n for n, _ in rows(coord, f"starts:{run}")] == [0, 1]  # job 1 ran once
    assert [int(n) for n in coord.lrange(f"ends:{run}", 0, -1)] == [1]


def test_a_worker_in_order_mode_warns_of_a_volatile_store_once(lock_worker: Worker) -> None:
    """The tests' server keeps nothing across a restart: the worker says so, once."""
    assert lock_worker.logs().count("keeps no data across a restart") == 1


def test_a_copy_of_a_running_job_waits_for_it_then_is_dropped(
    tasks: Any, coord: Any, store: Any, worker: Worker
) -> None:
    """The same job published again under its id while it runs (as the broker gives a
    message back, or as a job is published again during an outage): the copy is sent
    back to wait, never runs beside the job, and is dropped once the job has ended."""
    run = run_id()
    first = tasks.prefetched.delay(run, 0)  # holds its lock until told to go
    wait_for(lambda: coord.llen(f"starts:{run}") == 1, timeout=20, what="the job to start")
    tasks.prefetched.apply_async((run, 0), task_id=first.id)
    received = f"acceptance.prefetched[{first.id}] received"
    # The job, its copy, and the copy again: it asked, and was published again to wait.
    wait_for(lambda: worker.logs().count(received) >= 3, timeout=20,
             what="the copy to be sent back to wait")
    assert coord.llen(f"starts:{run}") == 1
    coord.set(f"go:{run}", 1)
    wait_for(lambda: f"acceptance.prefetched[{first.id}] ran already" in worker.logs(),
             timeout=30, what="the copy to be dropped")
    assert coord.llen(f"intervals:{run}") == 1 and coord.llen(f"starts:{run}") == 1
    wait_for(lambda: no_lock_keys(store, f"pf_{run}"), timeout=10, what="no lock left")
