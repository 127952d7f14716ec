"""The queueing lock with a real ``celery worker`` (prefork, 2 processes) on a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import kombu.serialization
import pytest
import redis
from celery import chain

from celery_unique import AlreadyQueued, UniqueTask
from celery_unique.testing import wait_for

from .conftest import ROOT

pytestmark = pytest.mark.acceptance


def token() -> str:
    return uuid.uuid4().hex[:12]


def key(task: str, value: str) -> str:
    return f"celery_unique:q:{{acceptance.{task}:{value}}}"


def gone(store: redis.Redis, k: str) -> Any:
    return lambda: not store.exists(k)


def ended(coord: redis.Redis, task_id: str, times: int) -> None:
    """Wait until the job has ended ``times`` times, its release tried each time (the
    result is stored before task_postrun, where the release happens)."""
    wait_for(lambda: int(coord.get(f"ended:{task_id}") or 0) >= times, timeout=10,
             what=f"{task_id} to end {times} time(s)")


def test_started_mode_releases_when_the_job_starts(tasks: Any, store: Any, coord: Any) -> None:
    t = token()
    k = key("hold", f"hold_{t}")
    # A second's countdown: the duplicate below is sent while the job is surely queued (an
    # idle worker may otherwise start it, and free its lock, before the second call).
    first = tasks.hold.apply_async((t,), countdown=1)
    with pytest.raises(AlreadyQueued) as info:
        tasks.hold.delay(t)
    assert info.value.task_id == first.id and info.value.key == k
    wait_for(lambda: coord.get(f"started:{t}"), what="the job to start")
    wait_for(gone(store, k), timeout=5, what="the lock to be released on start")
    second = tasks.hold.delay(t)  # one waiting job is allowed again while the first runs
    coord.set(f"go:{t}", 1)
    assert first.get(timeout=20) == t and second.get(timeout=20) == t
    assert not store.exists(k)


def test_finished_mode_holds_until_success(tasks: Any, store: Any, coord: Any) -> None:
    t = token()
    k = key("finished_job", f"job_{t}")
    result = tasks.finished_job.delay(t, "sleep")
    wait_for(lambda: coord.get(f"started:{t}"), what="the job to start")
    assert store.get(k) == result.id.encode()
    with pytest.raises(AlreadyQueued):
        tasks.finished_job.delay(t, "sleep")
    coord.set(f"go:{t}", 1)
    assert result.get(timeout=20) == t
    wait_for(gone(store, k), timeout=5, what="the lock to be released")


@pytest.mark.parametrize("outcome", ["fail", "reject", "ignore", "replace", "kill"])
def test_every_end_releases(tasks: Any, store: Any, coord: Any, outcome: str) -> None:
    t = token()
    k = key("finished_job", f"job_{t}")
    tasks.finished_job.delay(t, outcome)
    wait_for(lambda: coord.get(f"started:{t}"), timeout=20, what="the job to start")
    wait_for(gone(store, k), timeout=20, what=f"the lock to be released after {outcome}")
    tasks.finished_job.delay(t, "ok").get(timeout=20)


def test_a_caller_who_has_the_result_can_enqueue_again_at_once(
    tasks: Any, coord: Any,
) -> None:
    """``delay → get → delay``: the lock of a finished job (``queueing_lock_until=
    "finished"``) is released before its result is stored, on success and on failure, so
    the caller who has seen the result never meets it: 300 rounds, 0 refused, and the
    results backend found the lock free each time it stored a result."""
    t, refused = token(), 0
    for n in range(300):
        outcome = "fail" if n % 3 == 2 else "ok"
        try:
            result = tasks.finished_job.delay(t, outcome)
        except AlreadyQueued:
            refused += 1
            continue
        result.get(timeout=20, propagate=False, interval=0.005)  # a file backend: polled
    assert refused == 0
    at_store = coord.lrange(f"at-store:{key('finished_job', f'job_{t}')}", 0, -1)
    assert len(at_store) == 300 and set(at_store) == {b"free"}, at_store[:5]


def test_hard_time_limit_releases(tasks: Any, store: Any, coord: Any) -> None:
    t = token()
    tasks.slow.delay(t)
    wait_for(lambda: coord.get(f"started:{t}"), timeout=20, what="the job to start")
    wait_for(gone(store, key("slow", f"slow_{t}")), timeout=20,
             what="the lock to be released after the hard time limit")


@pytest.mark.parametrize("how", ["revoke", "expires"])
def test_discarded_before_running_releases(tasks: Any, store: Any, how: str) -> None:
    t = token()
    k = key("finished_job", f"job_{t}")
    if how == "revoke":
        result = tasks.finished_job.apply_async((t,), countdown=1)
        result.revoke()
    else:
        result = tasks.finished_job.apply_async((t,), countdown=1.5, expires=0.5)
    assert store.exists(k)
    wait_for(gone(store, k), timeout=20, what=f"the lock to be released ({how})")
    assert result.state == "REVOKED"


def test_a_throttle_keeps_its_queueing_lock_for_its_whole_timeout(
    tasks: Any, store: Any
) -> None:
    """``queueing_lock_until="expired"``: the job starts, retries and ends, and its lock is
    still held, not released by any of it, nor given a new lease by the retry; a revoked
    job keeps it too. Once the timeout has run out, the next job is taken."""
    t = token()
    k = key("throttled", f"throttle_{t}")
    assert tasks.throttled.delay(t, True).get(timeout=20) == 1  # ran, retried, ended
    # Two seconds of the retry's countdown have passed since the enqueue: with the lease
    # the retry would have renewed (4 s from then, plus its countdown), more would be left.
    assert 0 < store.pttl(k) <= 2000
    with pytest.raises(AlreadyQueued):
        tasks.throttled.delay(t)
    wait_for(gone(store, k), timeout=5, what="the throttle's timeout to run out")
    assert tasks.throttled.delay(t).get(timeout=20) == 0
    # Revoked: kept. A job of a lock released on revoke, due half a second later, tells
    # when the worker has discarded the throttled one (the same path, in ETA order).
    throttled, released = token(), token()
    tasks.throttled.apply_async((throttled,), countdown=1).revoke()
    tasks.finished_job.apply_async((released,), countdown=1.5).revoke()
    wait_for(gone(store, key("finished_job", f"job_{released}")), timeout=20,
             what="the later revoked job's lock to be released")
    assert store.exists(key("throttled", f"throttle_{throttled}"))


def _known_here_only(app: Any) -> Any:
    """A unique task the test process knows and the worker does not (a deploy where the
    publisher runs the new code first)."""
    name = "acceptance.deployed_later"
    if name not in app.tasks:
        @app.task(base=UniqueTask, queueing_lock="later_{token}", name=name, shared=False)
        def deployed_later(token: str) -> None: ...
    return app.tasks[name]


def _broken_json() -> str:
    """A serializer that labels a body that does not parse as JSON, as a buggy publisher
    would (the worker's JSON decoder is kept for what the test process reads)."""
    registry = kombu.serialization.registry
    json_decoder = registry._decoders["application/json"]
    registry.register("celery-unique-broken", lambda _: "{not json", json_decoder,
                      content_type="application/json", content_encoding="utf-8")
    return "celery-unique-broken"


@pytest.mark.parametrize("how", ["unregistered", "refused", "undecodable"])
def test_a_message_the_worker_drops_frees_its_locks(
    tasks: Any, store: Any, worker: Any, how: str,
) -> None:
    """The worker drops a message without running it: its task is not registered there
    (yet), its content type is not accepted (pickle), its body does not decode. Its
    queueing lock and its place in its lock's line are freed at once, not left for the
    queueing lock's timeout (an hour)."""
    t = token()
    base, queue = f"celery_unique:l:{{drop_{t}}}", f"drop-{t}"
    if how == "unregistered":
        task, k = _known_here_only(tasks.app), key("deployed_later", f"later_{t}")
        result = task.apply_async((t,), lock=f"drop_{t}", queue=queue)
    else:
        serializer = "pickle" if how == "refused" else _broken_json()
        task, k = tasks.finished_job, key("finished_job", f"job_{t}")
        result = task.apply_async((t,), lock=f"drop_{t}", serializer=serializer, queue=queue)
    # Queued where no worker looks yet: both locks are held.
    assert store.get(k) == result.id.encode()
    assert store.zscore(f"{base}:line", result.id) is not None
    tasks.app.control.add_consumer(queue, destination=[worker.hostname], reply=True)
    try:
        wait_for(gone(store, k), timeout=20, what=f"the queueing lock to be freed ({how})")
        wait_for(lambda: store.zscore(f"{base}:line", result.id) is None, timeout=5,
                 what="its place in line to be given up")
        assert not store.exists(f"{base}:holders", f"{base}:arrival", f"{base}:parked")
    finally:
        tasks.app.control.cancel_consumer(queue, destination=[worker.hostname], reply=True)


def test_retry_holds_the_lock_while_waiting(tasks: Any, store: Any, coord: Any) -> None:
    t = token()
    k = key("retry_once", f"retry_{t}")
    result = tasks.retry_once.delay(t, 3.0)
    wait_for(lambda: coord.llen(f"runs:{t}") == 1, timeout=20, what="the first run")
    # the retry is queued again under the same id: it holds the lock during its countdown
    wait_for(lambda: store.get(k) == result.id.encode(), timeout=5, what="the retry's lock")
    with pytest.raises(AlreadyQueued) as info:
        tasks.retry_once.delay(t)
    assert info.value.task_id == result.id
    assert result.get(timeout=20) == 1
    # Released at task_postrun, after the result is stored: wait for it.
    wait_for(gone(store, k), timeout=5, what="the lock to be released")


def test_retry_is_published_even_if_another_job_took_the_lock(
    tasks: Any, store: Any, coord: Any
) -> None:
    t = token()
    k = key("retry_once", f"retry_{t}")
    result = tasks.retry_once.delay(t, 2.0)
    wait_for(lambda: coord.llen(f"runs:{t}") == 1, timeout=20, what="the first run")
    store.set(k, "someone-else", px=60000)  # taken by another job meanwhile
    assert result.get(timeout=20) == 1  # the retry still ran
    ended(coord, result.id, 2)  # the first run and the retry, both released
    assert store.get(k) == b"someone-else"  # and never deleted the other job's lock


def test_retries_exhausted_release(tasks: Any, store: Any, coord: Any) -> None:
    t = token()
    result = tasks.retry_forever.delay(t)
    with pytest.raises(Exception, match="Retry|retry"):
        result.get(timeout=20)
    assert coord.lrange(f"runs:{t}", 0, -1) == [b"0", b"1"]
    wait_for(gone(store, key("retry_forever", f"retry_{t}")), timeout=5,
             what="the lock to be released")


def test_autoretry_keeps_then_releases(tasks: Any, store: Any, coord: Any) -> None:
    t = token()
    k = key("autoretry", f"auto_{t}")
    result = tasks.autoretry.delay(t)
    wait_for(lambda: coord.llen(f"runs:{t}") == 1, timeout=20, what="the first run")
    with pytest.raises(AlreadyQueued):
        tasks.autoretry.delay(t)
    with pytest.raises(RuntimeError):
        result.get(timeout=20)
    assert coord.llen(f"runs:{t}") == 2
    wait_for(gone(store, k), timeout=5, what="the lock to be released")


def test_duplicate_chain_step_is_skipped_and_parent_succeeds(
    tasks: Any, store: Any, worker: Any
) -> None:
    t = token()
    store.set(key("step", "step"), "queued-step", px=60000)  # a step job is queued
    result = chain(tasks.noop.si(t), tasks.step.si(t)).delay()
    parent = result.parent
    assert parent.get(timeout=20) == t
    assert parent.state == "SUCCESS"
    wait_for(lambda: "acceptance.step not queued" in worker.logs(), timeout=10,
             what="the skipped step to be logged")
    assert store.get(key("step", "step")) == b"queued-step"
    store.delete(key("step", "step"))


def test_send_task_never_deletes_a_lock_it_does_not_hold(
    tasks: Any, store: Any, coord: Any
) -> None:
    t = token()
    k = key("finished_job", f"job_{t}")
    store.set(k, "another-job", px=60000)
    result = tasks.app.send_task("acceptance.finished_job", (t,))
    assert result.get(timeout=20) == t
    ended(coord, result.id, 1)
    assert store.get(k) == b"another-job"


def test_the_listing_names_a_running_holders_worker(
    tasks: Any, coord: Any, worker: Any,
) -> None:
    """With ``task_track_started`` (here the task's ``track_started``), ``show`` and
    ``locks --json --states`` name the worker and the pool process running a holder."""
    t = token()
    result = tasks.tracked.delay(t)
    try:
        pid = int(wait_for(lambda: coord.get(f"started:{t}"), timeout=20,
                           what="the job to start"))
        wait_for(lambda: result.state == "STARTED", timeout=10, what="STARTED stored")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        shown = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.acceptance.tasks", "unique", "show",
             f"tracked_{t}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert "alive, lease" in shown.stdout, shown.stdout + shown.stderr
        assert f"STARTED on {worker.hostname} (pid {pid})" in shown.stdout, shown.stdout
        listed = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.acceptance.tasks", "unique", "locks",
             "--json", "--states", "--match", f"tracked_{t}"], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=60)
        [lock] = json.loads(listed.stdout)
        assert lock["status"] == ["alive"] and lock["states"] == ["STARTED"]
        assert lock["workers"] == [{"hostname": worker.hostname, "pid": pid}]
    finally:
        coord.set(f"go:{t}", 1)
    assert result.get(timeout=20) == t
