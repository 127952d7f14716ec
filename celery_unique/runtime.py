"""The worker's runtime: the threads and timers that keep locks alive while jobs run.

- The renewer: one thread per process renews the leases of the jobs running in it,
  every third of their lease.
- The arrivals: the main process keeps the places in line of the jobs it received and
  has not started yet (prefetched, or waiting for a free pool process).
- The sweep: every worker whose tasks use a lock looks, a few times a second, at the
  locks whose holder may have died, so parked jobs never wait on a dead worker.

All of it is per app (:func:`worker_runtime`), made on first use: a worker whose tasks
use no lock starts no thread, no timer and no connection.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, signals

from . import signals as unique_signals
from .broker import publish_woken
from .keys import registry_key
from .scripts import text
from .settings import safe_url, setting
from .state import app_state
from .store import Store, store_of
from .wire import HEADER, Lock, RegistryEntry

__all__ = ["SWEEP_INTERVAL", "WorkerRuntime", "on_worker_ready", "sweep", "volatile",
           "worker_runtime"]

logger = logging.getLogger(__name__)

#: How often each worker sweeps the locks that have parked jobs (seconds).
SWEEP_INTERVAL = 0.25
#: A lock with parked jobs whose next lease ends within this (ms) is swept once more at
#: that moment by each worker (a rate limit's period: its parked jobs start when a
#: start frees, not up to a sweep interval later, which cost 9 % of 10/s).
SOON_MS = 10_000


class Renewer:
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
            kept = store.extend(lock.base, token=token, lease_ms=lock.lease_ms)
        except Exception:
            logger.exception("celery-unique: could not renew %s for %s", lock.base, token)
            app_state(task.app).metrics.store_error(task, "renew", "logged")
            kept = True  # try again; the lease tells whether it was lost meanwhile
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
        app_state(task.app).metrics.lost(task, token)
        unique_signals.lock_lost.send(sender=task, key=lock.base, task_id=token)


class Arrivals:
    """The worker's received messages of jobs with a place in line, not yet started.

    The main process holds them (prefetched, or waiting for a free pool process); its
    sweep keeps their places a lease ahead (:meth:`Store.arrive`), so that the places of
    a worker that dies are given up within a lease instead of blocking the line.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, Lock]] = {}  # lock base -> token -> Lock
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
        marks = [(base, max(lock.lease_ms for _, lock in held), [t for t, _ in held])
                 for base, held in due]
        store.arrive_many(marks)  # one round trip for them all
        with self._lock:
            for base, lease_ms, _ in marks:
                if base in self._due:
                    self._due[base] = now + lease_ms / 3000


class WorkerRuntime:
    """One app's worker-side runtime: its renewer and its arrivals."""

    def __init__(self) -> None:
        self.renewer = Renewer()
        self.arrivals = Arrivals()


_made = threading.Lock()


def worker_runtime(app: Celery) -> WorkerRuntime:
    """``app``'s worker runtime, made on first use (nothing starts until it is used)."""
    state = app_state(app)
    runtime: WorkerRuntime | None = state.worker
    if runtime is None:
        with _made:
            if state.worker is None:
                state.worker = WorkerRuntime()
            runtime = state.worker
    return runtime


# -- sweeping ----------------------------------------------------------------------------

#: Sweeps ``(member, entry, seconds)`` once, that soon (the consumer's timer).
Soon = Callable[[str, RegistryEntry, float], None]


def sweep(app: Celery, soon: Soon | None = None) -> int:
    """Hand the places of expired leases to parked jobs; returns how many were woken.

    ``soon``: a lock whose next lease ends within :data:`SOON_MS` (a rate limit's
    starts, a short lock) is swept once more at that moment, so that its parked jobs
    are handed a place when it frees, not up to a sweep interval later."""
    store = store_of(app)
    registry = registry_key(setting(app, "unique_key_prefix"))
    now = time.time() * 1000
    woken = 0
    # With ``soon``, the locks due before the next sweep are swept when they are due.
    for member, entry, due in store.due_locks(
            registry, now + (SWEEP_INTERVAL * 1000 if soon is not None else 0)):
        if due > now and soon is not None:
            soon(member, entry, (due - now) / 1000)
        else:
            woken += sweep_lock(app, store, registry, member, entry, soon)
    return woken


def sweep_lock(app: Celery, store: Store, registry: str, member: str, entry: RegistryEntry,
               soon: Soon | None = None) -> int:
    """Sweep one registered lock (:func:`sweep`); returns how many jobs it woke."""
    now = time.time() * 1000
    metrics = app_state(app).metrics
    # Rescheduled in the sweep's own script, but on a Cluster (the registry's slot is
    # another): then one command more.
    swept = store.sweep_lock(entry.base, limit=entry.limit, lease_ms=entry.lease_ms,
                             registry=registry)
    metrics.swept(swept.expired, swept.dropped)
    metrics.handed(None, "sweep", len(swept.woken))
    publish_woken(app, store, swept.woken)
    if store.cluster:
        store.reschedule(registry, member,
                         None if swept.next_ms < 0 else now + max(swept.next_ms, 50))
    if soon is not None and 0 <= swept.next_ms < SOON_MS:
        soon(member, entry, swept.next_ms / 1000)
    return len(swept.woken)


def on_worker_ready(consumer: Any, *, locked: bool, ordered: bool, unique: bool) -> None:
    """A worker sweeps only where locks are used: at once when one of its tasks has a
    ``lock`` or a ``global_rate_limit`` (``locked``; ``ordered``: one of them waits in
    line), at the first such job it receives when its tasks are unique ones that may be
    given one per call (``unique``), never otherwise (no timer, no connection)."""
    if locked:
        _start_sweeping(consumer)
        if ordered:
            _warn_if_volatile(store_of(consumer.app))
    elif unique:
        def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
            info = (getattr(request, "request_dict", None) or {}).get(HEADER)
            if sender is consumer and isinstance(info, dict) and (
                    info.get("l") or info.get("rl")):
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
    return text(config.get("appendonly", "")) == "no" and not text(config.get("save", "x"))


def _warn_if_volatile(store: Store) -> None:
    if volatile(store):
        logger.warning(
            "celery-unique: the lock store %s keeps no data across a restart (appendonly no,"
            " no save points), and jobs waiting in \"order\" mode are parked there: a restart"
            " loses them. Set appendonly yes (CONFIG SET appendonly yes, and in its"
            " redis.conf); see the guarantees page, 'Parked jobs live in Redis'.",
            safe_url(store.url))


def _start_sweeping(consumer: Any) -> None:
    app = consumer.app
    arrivals = worker_runtime(app).arrivals
    failing = False

    def run() -> None:
        nonlocal failing
        try:
            sweep(app, sweep_soon)
            arrivals.renew(store_of(app))
        except Exception:
            # Said once per outage, not four times a second: the sweep goes on by itself.
            app_state(app).metrics.store_error(None, "sweep", "logged")
            if not failing:
                logger.exception("celery-unique: sweeping the locks failed; trying again"
                                 " every %s s", SWEEP_INTERVAL)
            failing = True
        else:
            if failing:
                logger.warning("celery-unique: sweeping the locks works again")
            failing = False

    soon: set[str] = set()  # the locks with a sweep of their own pending

    def sweep_soon(member: str, entry: RegistryEntry, seconds: float) -> None:
        if member in soon:
            return
        soon.add(member)

        def once() -> None:
            soon.discard(member)
            try:
                sweep_lock(app, store_of(app), registry_key(
                    setting(app, "unique_key_prefix")), member, entry, sweep_soon)
            except Exception:  # the regular sweep goes on, and says so
                logger.debug("celery-unique: sweeping %s failed", entry.base, exc_info=True)

        consumer.timer.call_after(seconds, once)

    consumer.timer.call_repeatedly(SWEEP_INTERVAL, run)
    logger.info("celery-unique: sweeping the locks of dead holders every %s s",
                SWEEP_INTERVAL)
