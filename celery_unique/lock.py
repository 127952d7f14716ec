"""The execution lock at run time: take, wait, renew, release, and wake the next job.

A job takes its lock when the worker is about to run it (``UniqueTask.__call__``). When
the lock is held, ``on_locked`` decides: ``"order"`` parks the job's message in Redis and
frees the worker slot (the job that releases the lock publishes it again, in line order),
``"retry"`` publishes it again with a countdown, ``"skip"`` drops it. While a job runs,
a thread renews its lease every third of it; every worker whose tasks use a lock sweeps,
a few times a second, the locks whose holder may have died, so parked jobs never wait on
a dead worker; it also keeps the places of the jobs it received (``arrivals``).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import threading
import time
from typing import Any

from celery import Celery, Task, signals
from celery.canvas import Signature
from celery.exceptions import Ignore
from celery.states import REVOKED
from kombu.serialization import dumps, loads

from . import broker
from . import signals as unique_signals
from .exceptions import LockHeld, LockStoreUnavailable
from .settings import safe_url, setting
from .store import Store, get_store

__all__ = ["Lock", "acquire_lock", "acquire_or_wait", "arrivals", "release_lock",
           "store_unavailable", "sweep"]

logger = logging.getLogger(__name__)

#: How often each worker sweeps the locks that have parked jobs (seconds).
SWEEP_INTERVAL = 0.25
#: The registry of locks with parked jobs, swept by the workers that use locks (members:
#: ``"limit|lease ms|base"``, scores: when to look next, ms since the epoch).
WAITING = "waiting"
# Eager mode waits in the caller, asking again after these many seconds (doubling).
_EAGER_POLL = (0.005, 0.1)
# "retry": the countdown before asking again (doubling per attempt, capped).
_RETRY_COUNTDOWN = (0.1, 5.0)
# The lock store unreachable at a job's start: when to ask again (doubling, capped).
_STORE_BACKOFF = (1.0, 30.0)


@dataclasses.dataclass(frozen=True)
class Lock:
    """One job's execution lock, as carried in its message header."""

    base: str  #: the lock's Redis key prefix (``prefix:l:{name}``)
    mode: str  #: on_locked
    limit: int
    lease_ms: int
    wait_ms: int  #: how long a line entry may take to reach a worker

    def header(self) -> dict[str, Any]:
        return {"l": self.base, "o": self.mode, "n": self.limit, "lt": self.lease_ms,
                "lw": self.wait_ms}

    @classmethod
    def from_header(cls, info: dict[str, Any]) -> Lock | None:
        if not info.get("l"):
            return None
        return cls(info["l"], info["o"], int(info["n"]), int(info["lt"]), int(info["lw"]))


# -- taking the lock ---------------------------------------------------------------------

def acquire_lock(task: Task, lock: Lock, queueing_key: str | None, queue: str | None,
                 again: bool = False) -> None:
    """Take ``lock`` for the running job, or raise Ignore when it must not run now.

    ``queue``: the job's own queue (see :meth:`Store.lock`); ``again``: this process asks
    again after losing the reply to its own ask. Before raising, the job is parked,
    re-queued or skipped, and marked so that the end of this run releases nothing it does
    not hold.
    """
    request = task.request
    store = _store(task)
    token = request.id
    delay = _EAGER_POLL[0]
    while True:
        reply = store.lock("acquire", lock.base, [token, lock.limit, lock.lease_ms, lock.mode,
                                                  lock.wait_ms, "1" if again else "0",
                                                  "" if request.is_eager else run_id(request)],
                           queueing_key, queue)
        if reply[0] == 1:
            _held(task, store, lock, int(reply[1]))
            return
        holder = _text(reply[1])
        _publish_woken(task.app, reply[3:], store)
        if reply[0] == 3:
            # This very run of the job ended already: a late copy of it (published again
            # during an outage, or a parked copy woken meanwhile). Dropped, not run again.
            request._unique_parked = True
            logger.info("celery-unique: %s[%s] ran already: this copy is dropped",
                        task.name, token)
            raise Ignore()
        if reply[0] == 2 and not request.is_eager:
            # Another copy of this job holds the lock: this one waits for it to end, never
            # runs beside it, and is then dropped as a copy of a run that ended (3 above).
            request._unique_parked = True
            _waiting(task, lock, holder, "retry")
            _requeue(task, lock, counter="d")
            raise Ignore()
        if request.is_eager and lock.mode != "skip":
            # The caller is the worker: it waits for its turn (its place in line is kept
            # while it keeps asking).
            _waiting(task, lock, holder, "waiting")
            time.sleep(delay)
            delay = min(delay * 2, _EAGER_POLL[1])
            continue
        if lock.mode == "skip":
            _skip(task, lock, holder)
            raise Ignore()
        request._unique_parked = True
        if lock.mode == "retry":
            _waiting(task, lock, holder, "retry")
            _requeue(task, lock)
        else:
            message = _message(task, store)
            registry = waiting_key(task.app)
            reply = store.lock("park", lock.base, [token, lock.limit, lock.lease_ms, message,
                                                   lock.base], queue=queue, registry=registry)
            # Parked: from here on nothing may fail the job, which will run when woken.
            if store.cluster:
                _watch(store, lock, registry)
            _publish_woken(task.app, reply[3:], store)
            _waiting(task, lock, holder, "parked")
        raise Ignore()


def _held(task: Task, store: Store, lock: Lock, fence: int) -> None:
    request = task.request
    request.lock_fence = fence
    request.lock_lost = False
    request._unique_lock = lock
    _renewer.add(request.id, store, lock, task, request)
    unique_signals.lock_acquired.send(sender=task, key=lock.base, task_id=request.id,
                                      fence=fence)


def _waiting(task: Task, lock: Lock, holder: str, action: str) -> None:
    unique_signals.lock_waiting.send(sender=task, key=lock.base, task_id=task.request.id,
                                     holder=holder, action=action)


def _skip(task: Task, lock: Lock, holder: str) -> None:
    request = task.request
    _waiting(task, lock, holder, "skipped")
    exc = LockHeld(f"{task.name}[{request.id}] skipped: its lock {lock.base} is held by"
                   f" {holder}", key=lock.base, holder=holder, task_id=request.id)
    logger.warning("celery-unique: %s", exc)
    # REVOKED is final (ready() is true) and neither success nor failure; get() raises
    # this error instead of waiting for a result that will never come.
    if request.is_eager:
        eager_skipped[request.id] = exc  # UniqueTask.apply makes its result REVOKED
    elif not task.ignore_result:
        task.backend.store_result(request.id, exc, REVOKED, request=request)
    request._unique_skipped = True


#: Jobs skipped while run eagerly, by id, until ``apply`` reads them (it always does).
eager_skipped: dict[str, LockHeld] = {}


def _requeue(task: Task, lock: Lock, counter: str = "w",
             backoff: tuple[float, float] = _RETRY_COUNTDOWN) -> float:
    """Publish the job again with a countdown (``backoff``: first, most; doubling per
    attempt, counted in the header under ``counter``); returns the countdown."""
    request = task.request
    headers = request.headers if isinstance(request.headers, dict) else {}
    info = headers.get("celery_unique") or getattr(request, "celery_unique", None) or {}
    attempt = int(info.get(counter, 0))
    countdown = float(min(backoff[0] * 2 ** attempt, backoff[1]))
    sig = task.signature_from_request(request, request.args, request.kwargs,
                                      countdown=countdown)
    headers = dict(sig.options.get("headers") or {})
    headers["celery_unique"] = {**(headers.get("celery_unique") or {}), **lock.header(),
                                counter: attempt + 1}
    sig.options["headers"] = headers
    # Not Task.retry: waiting for a lock does not use up max_retries, and the job keeps
    # its queueing lock while it waits.
    Task.apply_async(task, sig.args, sig.kwargs, **sig.options)
    return countdown


def acquire_or_wait(task: Task, lock: Lock, queueing_key: str | None, queue: str | None,
                    policy: str) -> bool:
    """:func:`acquire_lock`, the lock store's outages handled as ``policy`` says.

    Returns whether the job holds its lock (False: ``"allow"`` runs it without). With
    ``"raise"`` the job is neither run unlocked, nor failed, nor lost: it is published again
    with a backoff until the store answers, or, when that fails too (the store is the
    broker), it waits here and asks again.
    """
    delay = _STORE_BACKOFF[0]
    again = False
    while True:
        try:
            acquire_lock(task, lock, queueing_key, queue, again)
            return True
        except LockStoreUnavailable as exc:
            if task.request.is_eager:
                raise  # the caller is here to be told
            if policy == "allow":
                store_unavailable(task, "run", task.request.id, exc)
                return False
            try:
                # It keeps its queueing lock, its place (for a lease) and its retries.
                countdown = _requeue(task, lock, counter="s", backoff=_STORE_BACKOFF)
            except Exception:
                logger.warning("celery-unique: %s[%s]: the lock store is unreachable (%s);"
                               " asking again in %.1f s", task.name, task.request.id, exc,
                               delay)
                time.sleep(delay)  # nowhere to publish it to: the job waits here
                delay = min(delay * 2, _STORE_BACKOFF[1])
                again = True  # the lock it finds held under its id may be its own
                continue
            logger.warning("celery-unique: %s[%s]: the lock store is unreachable (%s);"
                           " published again to run in %.1f s", task.name, task.request.id,
                           exc, countdown)
            task.request._unique_parked = True  # its end releases nothing: it runs again
            raise Ignore() from None


def store_unavailable(task: Task, where: str, task_id: str, exc: Exception) -> None:
    """``on_store_error="allow"``: the job goes on without its lock; say so."""
    logger.warning("celery-unique: %s[%s] %s without its lock: %s", task.name, task_id,
                   "published" if where == "enqueue" else "runs", exc)
    unique_signals.store_unavailable.send(sender=task, where=where, task_id=task_id,
                                          url=getattr(exc, "url", None), error=exc)


def _message(task: Task, store: Store) -> str:
    """The job as a message to publish again: kombu's own message, pushed as it is when
    it is handed the lock (the atomic path), else a signature in the task's serializer.
    """
    request = task.request
    sig = task.signature_from_request(request, request.args, request.kwargs)
    if broker.atomic(task.app, store):
        push = broker.Push(store, request.id, capture=True)
        try:
            with broker.pushing(push):
                # Not ours: the job already holds its queueing lock and its place.
                Task.apply_async(task, sig.args, sig.kwargs, **sig.options)
        except broker.Captured:
            pass
        if push.captured is not None:
            return push.captured
    content_type, encoding, data = dumps(  # type: ignore[no-untyped-call]
        dict(sig), serializer=task.serializer)
    if isinstance(data, bytes):
        data = data.decode(encoding if encoding != "binary" else "latin-1")
    return f"{content_type}\n{encoding}\n{data}"


def republish(app: Celery, message: str) -> None:
    """Publish a parked job again (it was handed the lock)."""
    content_type, encoding, data = message.split("\n", 2)
    raw: Any = data.encode("latin-1") if encoding == "binary" else data
    body = loads(raw, content_type, encoding,  # type: ignore[no-untyped-call]
                 accept=[content_type])
    sig = Signature(body, app=app)
    task = app.tasks[sig.task]
    # Task.apply_async, not ours: the job already holds its queueing lock and the lock.
    Task.apply_async(task, sig.args, sig.kwargs, **sig.options)


def _publish_woken(app: Celery, woken: list[Any], store: Store | None = None) -> None:
    for i in range(0, len(woken) - 1, 2):
        token, message = _text(woken[i]), _text(woken[i + 1])
        if not message:
            continue  # pushed onto its queue by the script that woke it
        try:
            if message.startswith("\x01"):
                # kombu's message for another queue than the caller's: pushed from here,
                # under a fresh delivery tag as the script would.
                queue, body = message[1:].split("\n", 1)
                body = body.replace(f'"{token}.cu"', f'"{token}.{time.time_ns()}"', 1)
                (store or get_store(app)).client.lpush(queue, body)
            else:
                republish(app, message)
        except Exception:
            # Its place is kept: the lease it was handed runs out, and it goes back to
            # the front of the line, published again by the next release or sweep.
            logger.exception("celery-unique: could not publish %s, handed its lock", token)


def _watch(store: Store, lock: Lock, key: str) -> None:
    """Register the lock for the sweepers (a Cluster: the registry is in another slot).

    Its holder may die without releasing. A failure is logged, not raised: the job is
    parked already, and the next park or release of the lock registers it again.
    """
    member = f"{lock.limit}|{lock.lease_ms}|{lock.base}"
    try:
        store.client.zadd(key, {member: time.time() * 1000 + lock.lease_ms})
    except Exception:
        logger.exception("celery-unique: could not register %s for the sweepers", lock.base)


def waiting_key(app: Celery) -> str:
    """The registry of locks with parked jobs (see :data:`WAITING`)."""
    return f"{setting(app, 'unique_key_prefix')}:l:{WAITING}"


# -- releasing ---------------------------------------------------------------------------

def release_lock(task: Task, token: str, lock: Lock, state: str, queue: str | None = None,
                 ran: str = "") -> None:
    """Release the job's lock (or its place in line) and publish the jobs it wakes.

    ``queue``: the job's own queue; a woken job parked from it is pushed by the release
    script itself, so a releasing process that dies cannot lose it. ``ran``: the run that
    ended (:func:`run_id`), remembered for a while so that a late copy is dropped.
    """
    app = task.app
    _renewer.remove(token)
    store = _store(task)
    args: list[Any] = [token, lock.limit, lock.lease_ms]
    if ran:
        args += [ran, ran_window_ms(lock)]
    try:
        reply = store.lock("release", lock.base, args, queue=queue)
    except Exception:
        logger.exception("celery-unique: could not release %s for %s", lock.base, token)
        return
    _publish_woken(app, reply[1:], store)
    if reply[0]:
        unique_signals.lock_released.send(sender=task, key=lock.base, task_id=token,
                                          state=state)


def run_id(request: Any) -> str:
    """One run of a job: its task id and retries (a retry is another run)."""
    return f"{request.id}:{int(request.retries or 0)}"


def ran_window_ms(lock: Lock) -> int:
    """How long a run that ended is remembered: late copies come from a publish again
    during an outage (a backoff of up to 30 s once the store answers) or from a wait
    behind the running copy; a minute, or two leases when longer."""
    return max(60_000, 2 * lock.lease_ms)


# -- sweeping ----------------------------------------------------------------------------

def sweep(app: Celery) -> int:
    """Hand the places of expired leases to parked jobs; returns how many were woken."""
    store = get_store(app)
    key = waiting_key(app)
    now = time.time() * 1000
    woken = 0
    for member in store.client.zrangebyscore(key, "-inf", now, start=0, num=100):
        limit, lease_ms, base = _text(member).split("|", 2)
        reply = store.lock("sweep", base, [limit, lease_ms])
        woken += (len(reply) - 1) // 2
        _publish_woken(app, reply[1:], store)
        if int(reply[0]) < 0:
            store.client.zrem(key, member)
        else:
            store.client.zadd(key, {member: now + max(int(reply[0]), 50)})
    return woken


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """A worker sweeps only where locks are used: at once when one of its tasks has a
    ``lock``, at the first locked job it receives when its tasks are unique ones that
    may be given a lock per call, never otherwise (no timer, no connection)."""
    consumer = sender
    tasks = [t for t in consumer.app.tasks.values() if hasattr(type(t), "_unique_lock")]
    if any(t._unique_lock is not None for t in tasks):
        _start_sweeping(consumer)
        if any(t._unique_lock is not None and t._unique_defaults["on_locked"] == "order"
               for t in tasks):
            _warn_if_volatile(get_store(consumer.app))
    elif tasks:
        def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
            info = (getattr(request, "request_dict", None) or {}).get("celery_unique")
            if sender is consumer and isinstance(info, dict) and info.get("l"):
                signals.task_received.disconnect(on_received)
                _start_sweeping(consumer)

        signals.task_received.connect(on_received, weak=False)


def volatile(store: Store) -> bool:
    """Whether the lock store keeps nothing across a restart (no AOF, no RDB snapshots).

    False where it cannot tell (``CONFIG`` renamed or refused, as managed Redis does).
    """
    try:
        config = store.client.config_get("appendonly")
        config.update(store.client.config_get("save"))
    except Exception:
        return False
    return _text(config.get("appendonly", "")) == "no" and not _text(config.get("save", "x"))


def _warn_if_volatile(store: Store) -> None:
    if volatile(store):
        logger.warning(
            "celery-unique: the lock store %s keeps no data across a restart (appendonly no,"
            " no save points), and jobs waiting in \"order\" mode are parked there: a restart"
            " loses them. Set appendonly yes (CONFIG SET appendonly yes, and in its"
            " redis.conf); see the guarantees page, 'Parked jobs live in Redis'.",
            safe_url(store.url))


class _Arrivals:
    """The worker's received messages of jobs with a place in line, not yet started.

    The main process holds them (prefetched, or waiting for a free pool process); its
    sweep keeps their places a lease ahead (``"arrive"``), so that the places of a worker
    that dies are given up within a lease instead of blocking the line.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, Any]] = {}  # lock base -> token -> Lock
        self._due: dict[str, float] = {}  # lock base -> when to renew next (monotonic)

    def add(self, token: str, lock: Lock) -> None:
        with self._lock:
            self._held.setdefault(lock.base, {})[token] = lock
            self._due.setdefault(lock.base, 0.0)

    def discard(self, token: str, lock: Lock | None) -> None:
        if lock is None:
            return
        with self._lock:
            held = self._held.get(lock.base)
            if held is not None:
                held.pop(token, None)
                if not held:
                    self._held.pop(lock.base, None)
                    self._due.pop(lock.base, None)

    def renew(self, store: Store) -> None:
        """Mark the places of the jobs held here, each lock a third of its lease ahead."""
        now = time.monotonic()
        with self._lock:
            due = [(base, list(held.items())) for base, held in self._held.items()
                   if self._due.get(base, 0.0) <= now]
        for base, held in due:
            lease_ms = max(lock.lease_ms for _, lock in held)
            store.lock("arrive", base, [lease_ms, *(token for token, _ in held)])
            with self._lock:
                if base in self._due:
                    self._due[base] = now + lease_ms / 3000


arrivals = _Arrivals()


def _start_sweeping(consumer: Any) -> None:
    app = consumer.app
    failing = False

    def run() -> None:
        nonlocal failing
        try:
            sweep(app)
            arrivals.renew(get_store(app))
        except Exception:
            # Said once per outage, not four times a second: the sweep goes on by itself.
            if not failing:
                logger.exception("celery-unique: sweeping the locks failed; trying again"
                                 " every %s s", SWEEP_INTERVAL)
            failing = True
        else:
            if failing:
                logger.warning("celery-unique: sweeping the locks works again")
            failing = False

    consumer.timer.call_repeatedly(SWEEP_INTERVAL, run)
    logger.info("celery-unique: sweeping the locks of dead holders every %s s",
                SWEEP_INTERVAL)


signals.worker_ready.connect(_on_worker_ready, weak=False)


# -- renewing ----------------------------------------------------------------------------

class _Renewer:
    """One thread per process renews the leases of the jobs running in it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: dict[str, tuple[Store, Lock, Task, Any]] = {}
        self._due: list[tuple[float, str]] = []
        self._pid = 0

    def add(self, token: str, store: Store, lock: Lock, task: Task, request: Any) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use in this (forked) process
                self._pid = os.getpid()
                self._jobs.clear()
                self._due.clear()
                threading.Thread(target=self._run, name="celery-unique-renew",
                                 daemon=True).start()
            self._jobs[token] = (store, lock, task, request)
            due = time.monotonic() + lock.lease_ms / 3000
            # The thread sleeps until the earliest due time: wake it only when this one
            # comes first (leases are mostly alike, so a short job rarely wakes it).
            if not self._due or due < self._due[0][0]:
                self._cond.notify()
            heapq.heappush(self._due, (due, token))

    def remove(self, token: str) -> None:
        with self._cond:
            self._jobs.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._due and self._due[0][1] not in self._jobs:
                        heapq.heappop(self._due)
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    if wait is not None and wait <= 0:
                        token = heapq.heappop(self._due)[1]
                        store, lock, task, request = self._jobs[token]
                        break
                    self._cond.wait(wait)
            self._renew(token, store, lock, task, request)

    def _renew(self, token: str, store: Store, lock: Lock, task: Task, request: Any) -> None:
        try:
            kept = store.lock("extend", lock.base, [token, lock.lease_ms])
        except Exception:
            logger.exception("celery-unique: could not renew %s for %s", lock.base, token)
            kept = 1  # try again; the lease tells whether it was lost meanwhile
        with self._cond:
            if token not in self._jobs:
                return
            if kept:
                heapq.heappush(self._due, (time.monotonic() + lock.lease_ms / 3000, token))
                return
            self._jobs.pop(token, None)
        request.lock_lost = True
        logger.error("celery-unique: %s[%s] lost its lock %s: its lease ran out, another"
                     " job may hold it now", task.name, token, lock.base)
        unique_signals.lock_lost.send(sender=task, key=lock.base, task_id=token)


_renewer = _Renewer()


def _store(task: Task) -> Store:
    # UniqueTask keeps its store on the class: looking it up per job costs more than the
    # scripts' own Python side.
    cached = getattr(task, "_unique_store", None)
    return cached() if cached is not None else get_store(task.app)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
