"""The Celery app run by the acceptance tests' worker subprocess.

Jobs coordinate with the tests through keys in Redis (db 4): ``started:<token>`` is set
when a job runs, ``go:<token>`` lets a holding job finish.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from typing import Any

import redis
from celery import Celery, signals
from celery.backends.filesystem import FilesystemBackend
from celery.exceptions import Ignore, Reject
from celery.states import READY_STATES

from celery_unique import UniqueTask
from celery_unique import signals as unique_signals
from celery_unique.compat import QueueOnce, Singleton
from celery_unique.wire import JobHeader

# The tests' private server, never a Redis the machine runs: set by the tests' fixtures.
SERVER = os.environ["CELERY_UNIQUE_TEST_REDIS"]
# The lock store: the broker's own database (2: the atomic path, locks taken by the push
# script) or another one (1: locks taken before the push).
STORE_DB = os.environ.get("CELERY_UNIQUE_TEST_STORE_DB", "1")
# Results go through Celery's filesystem backend, not Redis: Celery < 5.6's Redis result
# backend can deadlock the caller when AsyncResult.__del__ re-enters redis-py 5's pub/sub
# lock (celery/celery#10477). Polling files keeps the tests about our locks.
RESULTS = os.environ.get("CELERY_UNIQUE_TEST_RESULTS", "/tmp/celery-unique-results")
os.makedirs(RESULTS, exist_ok=True)


class WatchingBackend(FilesystemBackend):  # type: ignore[misc]
    """Celery's filesystem backend, noting for each job that holds a queueing lock until it
    finishes whether that lock was still held when its result was stored
    (``at-store:<key>``: ``held`` or ``free``): a caller who has the result must see it
    free."""

    def store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                     request: Any = None, **kwargs: Any) -> Any:
        header = JobHeader.of_request(request) if state in READY_STATES else None
        if header is not None and header.queueing_key and header.until == "finished":
            held = _store().get(header.queueing_key) == task_id.encode()
            coord.rpush(f"at-store:{header.queueing_key}", "held" if held else "free")
        return super().store_result(task_id, result, state, traceback=traceback,
                                    request=request, **kwargs)


def _store() -> redis.Redis:
    return redis.Redis.from_url(app.conf.unique_redis_url)


app = Celery("acceptance", broker=f"{SERVER}/2",
             backend=f"tests.acceptance.tasks:WatchingBackend+file://{RESULTS}")
app.conf.update(
    unique_redis_url=os.environ.get("CELERY_UNIQUE_TEST_STORE_URL") or f"{SERVER}/{STORE_DB}",
    unique_redis_cluster=bool(os.environ.get("CELERY_UNIQUE_TEST_STORE_CLUSTER")),
    task_publish_retry=False,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    # How long a message received by a worker that died stays invisible (tests of that
    # shorten it; Redis' default is an hour), and how often kombu >= 5.6 looks for such
    # messages (older kombu looks whenever a poll finds the queues empty). Every worker
    # looks under kombu's mutex: one SIGKILLed while holding it stops every restore for
    # unacked_mutex_expire (300 s by default), so the tests that kill workers shorten it.
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("CELERY_UNIQUE_TEST_VISIBILITY", "3600")),
        "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 5},
)
coord = redis.Redis.from_url(f"{SERVER}/4")


def wait_go(token: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not coord.get(f"go:{token}"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go for {token}")
        time.sleep(0.02)


def end_as(task: Any, outcome: str, token: str) -> None:
    """End the running job as ``outcome`` says: raise (``fail``), Reject, Ignore, replace."""
    if outcome in ("fail", "raise"):
        raise RuntimeError("boom")
    if outcome == "reject":
        raise Reject("rejected", requeue=False)
    if outcome == "ignore":
        raise Ignore()
    if outcome == "replace":
        raise task.replace(noop.si(token))


@app.task(base=UniqueTask, queueing_lock="hold_{token}", name="acceptance.hold")
def hold(token: str) -> str:
    coord.set(f"started:{token}", os.getpid())
    wait_go(token)
    return token


@app.task(base=UniqueTask, lock="tracked_{token}", name="acceptance.tracked",
          track_started=True)
def tracked(token: str) -> str:
    """Holds its lock until told to go; the result backend knows where it runs."""
    coord.set(f"started:{token}", os.getpid())
    wait_go(token)
    return token


@app.task(base=UniqueTask, queueing_lock="job_{token}", queueing_lock_until="finished",
          name="acceptance.finished_job", bind=True)
def finished_job(self: Any, token: str, outcome: str = "ok") -> str:
    coord.set(f"started:{token}", os.getpid())
    end_as(self, outcome, token)
    if outcome == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if outcome == "sleep":
        wait_go(token, limit=60)
    return token


@app.task(base=UniqueTask, queueing_lock="slow_{token}", queueing_lock_until="finished",
          name="acceptance.slow", time_limit=1)
def slow(token: str) -> None:
    coord.set(f"started:{token}", os.getpid())
    wait_go(token, limit=60)


@app.task(base=UniqueTask, queueing_lock="retry_{token}", name="acceptance.retry_once",
          bind=True)
def retry_once(self: Any, token: str, countdown: float = 2.0) -> int:
    coord.rpush(f"runs:{token}", self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return int(self.request.retries)


@app.task(base=UniqueTask, queueing_lock="throttle_{token}", queueing_lock_until="expired",
          queueing_lock_timeout=4, name="acceptance.throttled", bind=True)
def throttled(self: Any, token: str, retry: bool = False) -> int:
    """A throttle: one job per token per 4 s, whatever becomes of it."""
    if retry and not self.request.retries:
        raise self.retry(countdown=2)
    return int(self.request.retries)


def _record_end(sender: Any = None, task_id: str = "", **_: Any) -> None:
    """Counts the ends of a job (a retry ends it too). Connected after celery-unique's own
    task_postrun handler, which runs first: at ``ended:<id>`` its release has been tried."""
    coord.incr(f"ended:{task_id}")
    coord.expire(f"ended:{task_id}", 600)


for _task in (finished_job, retry_once):
    signals.task_postrun.connect(_record_end, sender=_task, weak=False)


@app.task(base=UniqueTask, queueing_lock="retry_{token}", queueing_lock_until="finished",
          name="acceptance.retry_forever", bind=True, max_retries=1)
def retry_forever(self: Any, token: str) -> None:
    coord.rpush(f"runs:{token}", self.request.retries)
    raise self.retry(countdown=0.2)


@app.task(base=UniqueTask, queueing_lock="auto_{token}", queueing_lock_until="finished",
          name="acceptance.autoretry", autoretry_for=(RuntimeError,),
          retry_kwargs={"max_retries": 1, "countdown": 1.0}, bind=True)
def autoretry(self: Any, token: str) -> None:
    coord.rpush(f"runs:{token}", self.request.retries)
    raise RuntimeError("always")


@app.task(name="acceptance.noop")
def noop(token: str) -> str:
    return token


@app.task(base=UniqueTask, queueing_lock="step", name="acceptance.step")
def step(value: Any) -> Any:
    return value


# -- the execution lock ----------------------------------------------------------------


@app.task(base=UniqueTask, lock="{path}", lock_timeout=3, name="acceptance.write_alphabet",
          queue="locks")
def write_alphabet(path: str, letter: str) -> None:
    """The seed's example: letters written in creation order, whatever the workers."""
    time.sleep(random.random() * 0.05)
    with open(path, "a") as f:
        f.write(letter)


@app.task(base=UniqueTask, lock="{resource}", lock_timeout=3, name="acceptance.interval",
          queue="locks", bind=True)
def interval(self: Any, run: str, resource: str, n: int) -> None:
    """Records when it held its lock: [resource, start, end, n, fence]."""
    start = time.time()
    time.sleep(random.random() * 0.01)
    coord.rpush(f"intervals:{run}", json.dumps(
        [resource, start, time.time(), n, self.request.lock_fence]))


@app.task(name="acceptance.spawn")
def spawn(run: str, n: int, queue: str) -> None:
    """Enqueues a locked job from inside a job, as web code enqueues from its threads: each
    thread or greenlet of a worker publishes on the worker's own channels."""
    interval.apply_async((run, f"spawned-{run}-{n % 3}", n), queue=queue)


@app.task(base=UniqueTask, lock="long_{run}", lock_timeout=1, name="acceptance.long_job",
          queue="locks", bind=True)
def long_job(self: Any, run: str, seconds: float, n: int) -> None:
    start = time.time()
    coord.set(f"started:{run}:{n}", 1)
    time.sleep(seconds)
    coord.rpush(f"intervals:{run}", json.dumps(
        ["long", start, time.time(), n, self.request.lock_fence, self.request.lock_lost]))


@app.task(base=UniqueTask, lock="kill_{run}", lock_timeout=2, name="acceptance.kill_holder",
          queue="locks", bind=True)
def kill_holder(self: Any, run: str, n: int, kill: bool = False) -> None:
    coord.rpush(f"starts:{run}", json.dumps([n, time.time()]))
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)


@app.task(base=UniqueTask, lock="skip_{run}", on_locked="skip", name="acceptance.skip_job",
          queue="locks")
def skip_job(run: str, hold: bool = False) -> str:
    if hold:
        coord.set(f"started:{run}", 1)
        wait_go(run)
    return "ran"


# A lease far longer than any wait in the tests: only an explicit release frees the lock
# in time, so a path that forgets to release fails the test instead of hiding behind it.
LONG_LEASE = 60


@app.task(base=UniqueTask, lock="out_{run}", lock_timeout=LONG_LEASE, time_limit=2,
          name="acceptance.locked_outcome", queue="locks", bind=True)
def locked_outcome(self: Any, run: str, n: int, outcome: str = "ok") -> None:
    """Ends as told while holding its lock; records [n, retries, start, end]."""
    start = time.time()
    coord.rpush(f"starts:{run}", json.dumps([n, self.request.retries, start]))
    end_as(self, outcome, run)
    if outcome == "retry" and self.request.retries == 0:
        raise self.retry(countdown=0.3)
    if outcome == "stuck":
        # Stuck where the time limit's SIGTERM cannot interrupt it (in C code): only the
        # SIGKILL that follows ends it, so only the main process can release the lock.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(LONG_LEASE)
    time.sleep(0.02)
    coord.rpush(f"intervals:{run}", json.dumps([n, self.request.retries, start, time.time()]))


@app.task(base=UniqueTask, lock="lost_{run}", lock_timeout=LONG_LEASE, acks_late=True,
          reject_on_worker_lost=True, name="acceptance.redelivered", queue="locks",
          bind=True)
def redelivered(self: Any, run: str, n: int, kill: bool = False) -> None:
    """The first run of a ``kill`` job dies mid-job; its message is delivered again."""
    start = time.time()
    coord.rpush(f"starts:{run}", json.dumps([n, self.request.id, start]))
    if kill and coord.set(f"killed:{run}", 1, nx=True):
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    coord.rpush(f"intervals:{run}", json.dumps([n, self.request.id, start, time.time()]))


@app.task(base=UniqueTask, lock="gate_{run}", lock_timeout=LONG_LEASE,
          name="acceptance.gated", queue="locks")
def gated(run: str, n: int, hold: bool = False) -> None:
    coord.rpush(f"starts:{run}", n)
    if hold:
        wait_go(run)


@app.task(base=UniqueTask, lock="rm_{run}", on_locked="retry", max_retries=0,
          name="acceptance.retry_mode", queue="locks", bind=True)
def retry_mode(self: Any, run: str, n: int) -> None:
    """Records [n, retries, start, end]; waiting for the lock must not count as a retry."""
    start = time.time()
    time.sleep(random.random() * 0.02)
    coord.rpush(f"intervals:{run}", json.dumps([n, self.request.retries, start, time.time()]))


@app.task(base=UniqueTask, queueing_lock="lr_{run}", queueing_lock_until="finished",
          lock="lr_{run}", lock_timeout=LONG_LEASE, retry_on_worker_lost=True,
          default_retry_delay=0.5, max_retries=1, name="acceptance.lost_retry",
          queue="locks", bind=True)
def lost_retry(self: Any, run: str) -> int:
    """Celery >= 5.7 retries it when its first run's process dies; the retry waits."""
    coord.rpush(f"runs:{run}", self.request.retries)
    if self.request.retries == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    wait_go(run)
    return int(self.request.retries)


@app.task(base=UniqueTask, lock="frozen_{run}", lock_timeout=1, name="acceptance.frozen",
          queue="locks", bind=True)
def frozen(self: Any, run: str, n: int) -> None:
    """Job 0 holds until told to go (the test freezes its process meanwhile)."""
    coord.set(f"started:{run}:{n}", os.getpid())
    if n == 0:
        wait_go(run)
    coord.rpush(f"intervals:{run}", json.dumps(
        [n, self.request.lock_fence, self.request.lock_lost]))


@unique_signals.lock_lost.connect
def _record_lost(sender: Any = None, key: str = "", task_id: str = "", **_: Any) -> None:
    coord.set(f"lost:{task_id}", key)


@app.task(base=UniqueTask, lock="handover_{run}", lock_timeout=4, name="acceptance.handover",
          queue="locks", bind=True)
def handover(self: Any, run: str, n: int, kill: bool = False) -> None:
    """Job 0 releases its lock by the release script itself, then its process is killed
    before anything else runs: what a releasing worker that dies there leaves."""
    from celery_unique.wire import JobHeader

    coord.rpush(f"starts:{run}", json.dumps([n, time.time()]))
    if kill:
        wait_go(run)
        lock, header = self.request.celery_unique_run.lock, JobHeader.of_request(self.request)
        self._unique_store().release_lock(lock.base, token=self.request.id, limit=lock.limit,
                                          lease_ms=lock.lease_ms, queue=header.queue)
        coord.set(f"released:{run}", time.time())
        os.kill(os.getpid(), signal.SIGKILL)
    coord.rpush(f"ends:{run}", n)


@app.task(base=UniqueTask, lock="pf_{run}", lock_timeout=2, name="acceptance.prefetched",
          bind=True)
def prefetched(self: Any, run: str, n: int, hold: float = 0.0) -> None:
    """Job 0 holds its lock until told to go (or for ``hold`` seconds); the others
    record their run."""
    start = time.time()
    coord.rpush(f"starts:{run}", json.dumps([n, start, os.getpid()]))
    if hold:
        time.sleep(hold)
    elif n == 0:
        wait_go(run, limit=120)
    time.sleep(0.02)
    coord.rpush(f"intervals:{run}", json.dumps([n, start, time.time()]))


def _record_run(request: Any, run: str, policy: str) -> str:
    """[policy, task id, fence]: the fence is None for a job run without its lock."""
    coord.rpush(f"runs:{run}", json.dumps([policy, request.id,
                                           getattr(request, "lock_fence", None)]))
    return policy


@app.task(base=UniqueTask, lock="outage_{run}", name="acceptance.outage", bind=True)
def outage(self: Any, run: str, policy: str) -> str:
    return _record_run(self.request, run, policy)


@app.task(base=UniqueTask, lock="outage_{run}", on_store_error="allow",
          name="acceptance.outage_allow", bind=True)
def outage_allow(self: Any, run: str, policy: str) -> str:
    return _record_run(self.request, run, policy)


@unique_signals.store_unavailable.connect
def _record_outage(sender: Any = None, where: str = "", task_id: str = "", url: Any = None,
                   **_: Any) -> None:
    coord.rpush("store_unavailable", json.dumps([where, task_id, url]))


@app.task(base=UniqueTask, lock="ko_{run}", lock_timeout=2, name="acceptance.through_outage",
          bind=True)
def through_outage(self: Any, run: str, n: int) -> int:
    """Records [n, start, end, fence] while the lock store is killed and restarted."""
    start = time.time()
    time.sleep(0.05)
    coord.rpush(f"intervals:{run}", json.dumps([n, start, time.time(),
                                                getattr(self.request, "lock_fence", None)]))
    return n


@app.task(base=UniqueTask, lock="{resource}", lock_timeout=2, name="acceptance.failover_job",
          bind=True)
def failover_job(self: Any, run: str, resource: str, n: int, seconds: float) -> None:
    """Records [resource, start, end, n, fence, lock lost, task id] (a store failover
    mid-run)."""
    start = time.time()
    time.sleep(seconds)
    coord.rpush(f"intervals:{run}", json.dumps(
        [resource, start, time.time(), n, self.request.lock_fence, self.request.lock_lost,
         self.request.id]))


# -- the migration shims -------------------------------------------------------------

app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"default_timeout": 60}}


@app.task(base=Singleton, name="acceptance.single", bind=True)
def single(self: Any, token: str, outcome: str = "ok") -> str:
    """celery-singleton's task: held while queued and running; ends as ``outcome``."""
    coord.set(f"started:{token}", self.request.id)
    if outcome == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    wait_go(token)
    end_as(self, outcome, token)
    return token


@app.task(base=QueueOnce, once={"keys": ["token"]}, name="acceptance.once_retry", bind=True,
          max_retries=1)
def once_retry(self: Any, token: str, n: int = 0) -> int:
    """celery-once's task that retries once, after 1.5 s (celery-once dropped its lock)."""
    coord.rpush(f"runs:{token}", self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=1.5)
    wait_go(token)
    return int(self.request.retries)


@app.task(base=UniqueTask, queueing_lock="rt_{run}", lock="rt_{run}", lock_timeout=LONG_LEASE,
          name="acceptance.round_trips")
def round_trips(run: str) -> str:
    """Both locks, on the worker's own queue: counted by test_round_trips."""
    return run


@app.task(base=UniqueTask, queueing_lock="reindex_{run}", on_duplicate="replace",
          name="acceptance.reindex")
def reindex(run: str, version: int) -> int:
    """Latest wins: one run per burst, with the last call's arguments."""
    coord.rpush(f"runs:{run}", version)
    return version


@app.task(base=UniqueTask, queueing_lock="latest_{run}", on_duplicate="replace",
          lock="latest_{run}", lock_timeout=LONG_LEASE, name="acceptance.latest")
def latest(run: str, version: int, hold: bool = False) -> int:
    """keepLastIfActive: one running (its lock held), one waiting with the newest
    arguments (its queueing lock released when it starts: ``until="started"``)."""
    coord.rpush(f"runs:{run}", version)
    if hold:
        coord.set(f"started:{run}", 1)
        wait_go(run)
    return version


@app.task(base=UniqueTask, queueing_lock="debounce_{run}", debounce=0.5, debounce_max=1.5,
          name="acceptance.debounced")
def debounced(run: str, version: int) -> int:
    """Once per burst of calls, 0.5 s after the last, at most 1.5 s after the first."""
    coord.rpush(f"runs:{run}", json.dumps([version, time.time()]))
    return version


@app.task(base=UniqueTask, global_rate_limit="10/s", rate_limit_key="rl_{run}",
          name="acceptance.rate_limited")
def rate_limited(run: str, n: int) -> int:
    """At most 10 starts a second per ``run``, across all workers."""
    coord.rpush(f"starts:{run}", json.dumps([n, time.time()]))
    return n
