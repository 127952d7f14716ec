"""The execution lock at run time: take it, wait for it, release it.

A job takes its lock when the worker is about to run it (:func:`start`, from
``UniqueTask.__call__``). When the lock is held, ``on_locked`` decides: ``"order"`` parks
the job's message in Redis and frees the worker slot (the job that releases the lock
publishes it again, in line order), ``"retry"`` publishes it again with a countdown,
``"skip"`` drops it. Every end of the job releases what it holds (:func:`finish`, from
``task_postrun``). The threads that keep leases alive are :mod:`celery_unique.runtime`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, NoReturn

from celery import Celery, Signature, Task
from celery.exceptions import Ignore, Reject, Retry
from celery.states import FAILURE, IGNORED, REJECTED, RETRY, REVOKED

from . import signals as unique_signals
from .broker import capture, publish_woken
from .exceptions import LockHeld, LockStoreUnavailable, RateLimited, Replaced
from .keys import registry_key
from .runtime import worker_runtime
from .scripts import Grant, LockReply
from .settings import RATE_GUARD_MS, setting
from .state import app_state
from .store import Store, store_of
from .wire import HEADER, JobHeader, Lock, RegistryEntry, now_ms, rate_token, run_id

__all__ = ["JobRun", "finish", "release_lock", "release_unrun", "start", "started",
           "state_of"]

logger = logging.getLogger(__name__)

# Eager mode waits in the caller, asking again after these many seconds (doubling).
_EAGER_POLL = (0.005, 0.1)
# "retry": the countdown before asking again (doubling per attempt, capped).
_RETRY_COUNTDOWN = (0.1, 5.0)
# The lock store unreachable at a job's start: when to ask again (doubling, capped).
_STORE_BACKOFF = (1.0, 30.0)

#: The attribute of Celery's request holding the job's :class:`JobRun`.
_RUN = "celery_unique_run"


@dataclasses.dataclass
class JobRun:
    """What one run of a job holds, kept on its request from its start to its end."""

    header: JobHeader | None
    lock: Lock | None = None  #: the lock it holds, until released
    parked: bool = False  #: it will run again (parked, re-queued): its end releases nothing
    released: bool = False  #: its queueing lock was released
    #: When it took its place in line or first asked (``JobHeader.placed_ms``); 0: not yet.
    placed_ms: int = 0


def started(request: Any) -> bool:
    """Whether the job of ``request`` has started already (a recursive call)."""
    return getattr(request, _RUN, None) is not None


def start(task: Task, header: JobHeader | None, policy: str) -> None:
    """The job starts: take its lock, release its queueing lock (``until="started"``).

    Raises Ignore when it must not run now (parked, re-queued, skipped). ``policy``: the
    task's ``on_store_error`` (the header's, set per call, comes first).
    """
    request = task.request
    run = JobRun(header)
    setattr(request, _RUN, run)
    if header is None:
        return
    # A job that may be replaced asks whether it was once it holds its lock, in the
    # command that releases its queueing lock.
    replaceable = header.replaceable and bool(header.queueing_key)
    queueing_key = header.queueing_key if header.until == "started" and not (
        replaceable) else None
    policy = header.on_store_error or policy
    if header.rate is not None:
        _start_under_rate(task, run, header, policy)
    if header.lock is not None:
        held = _take(task, run, header.lock, queueing_key, policy)
        run.released = bool(queueing_key and held)  # the lock's script released it
        if run.released:
            app_state(task.app).metrics.dequeued(task, "job started")
    elif queueing_key:
        run.released = True
        free_queueing(task.app, task, queueing_key, request.id, "job started")
    if replaceable:
        _unless_replaced(task, run, header, policy)


def state_of(exc: Exception) -> str:
    """The state the tracer gives a job that raised ``exc``."""
    ends = ((Retry, RETRY), (Reject, REJECTED), (Ignore, IGNORED))
    return str(next((state for kind, state in ends if isinstance(exc, kind)), FAILURE))


def finish(task: Task, state: str, retval: Any) -> None:
    """Release what the job holds at its end: from ``UniqueTask.__call__`` before the
    result is stored, and again, for ends that never reach it, at ``task_postrun``
    (every state; what was released is not released twice)."""
    request = task.request
    # A job that never reached __call__ holds nothing but what its header names.
    run: JobRun = getattr(request, _RUN, None) or JobRun(JobHeader.of_request(request))
    if run.parked:
        return  # waiting for its lock: it keeps its place and its queueing lock
    header = run.header
    again = state == REJECTED and getattr(retval, "requeue", False)
    if run.lock is not None:
        lock, run.lock = run.lock, None
        # Every end releases the lock, a retry too: it goes to the back of the line.
        # A run that ended on a worker is remembered, unless its message goes back.
        ran = "" if request.is_eager or again else run_id(request)
        release_lock(task.app, task, request.id, lock, state,
                     header.queue if header else None, ran)
    if header is None or not header.queueing_key or run.released or (
            header.until == "expired"):
        return  # nothing to release, or held for its whole timeout (a throttle)
    if state == RETRY or again:
        # The retry holds the queueing lock now (its message, or in eager mode its run in
        # the caller, carries the same header and releases it); a message sent back to
        # the queue will run again.
        return
    run.released = True
    free_queueing(task.app, task, header.queueing_key, request.id, state,
                  replaceable=header.replaceable)


# -- taking the lock ---------------------------------------------------------------------

def _take(task: Task, run: JobRun, lock: Lock, queueing_key: str | None, policy: str) -> bool:
    """:func:`_ask`, the lock store's outages handled as ``policy`` says.

    Returns whether the job holds its lock (False: ``"allow"`` runs it without). With
    ``"raise"`` the job is neither run unlocked, nor failed, nor lost: it is published again
    with a backoff until the store answers, or, when that fails too (the store is the
    broker), it waits here and asks again.
    """
    delay = _STORE_BACKOFF[0]
    again = False
    request = task.request
    while True:
        try:
            _ask(task, run, lock, queueing_key, again)
            return True
        except LockStoreUnavailable as exc:
            metrics = app_state(task.app).metrics
            if request.is_eager:
                metrics.store_error(task, "acquire", "raised")
                raise  # the caller is here to be told
            if policy == "allow":
                metrics.store_error(task, "acquire", "allowed")
                unique_signals.report_store_unavailable(task, "run", request.id, exc)
                return False
            try:
                # It keeps its queueing lock, its place (for a lease) and its retries.
                countdown = _requeue(task, run, lock, counter="s", backoff=_STORE_BACKOFF)
            except Exception:
                metrics.store_error(task, "acquire", "waited")
                logger.warning("celery-unique: %s[%s]: the lock store is unreachable (%s);"
                               " asking again in %.1f s", task.name, request.id, exc, delay)
                time.sleep(delay)  # nowhere to publish it to: the job waits here
                delay = min(delay * 2, _STORE_BACKOFF[1])
                again = True  # the lock it finds held under its id may be its own
                continue
            metrics.store_error(task, "acquire", "requeued")
            logger.warning("celery-unique: %s[%s]: the lock store is unreachable (%s);"
                           " published again to run in %.1f s", task.name, request.id,
                           exc, countdown)
            run.parked = True  # its end releases nothing: it runs again
            raise Ignore() from None


def _ask(task: Task, run: JobRun, lock: Lock, queueing_key: str | None, again: bool) -> None:
    """Take ``lock`` for the running job, or raise Ignore when it must not run now.

    ``again``: this process asks again after losing the reply to its own ask. Before
    raising, the job is parked, re-queued or skipped, and marked so that the end of this
    run releases nothing it does not hold.
    """
    request, store = task.request, store_of(task.app)
    delay = _EAGER_POLL[0]
    header = run.header
    metrics = app_state(task.app).metrics
    # Its place in line was taken at enqueue, or is taken now if it has to wait.
    run.placed_ms = run.placed_ms or (header.placed_ms if header else 0)
    asked_ms = now_ms()
    while True:
        reply = store.acquire_lock(
            lock.base, token=request.id, limit=lock.limit, lease_ms=lock.lease_ms,
            mode=lock.mode, wait_ms=lock.wait_ms, asks_again=again,
            run="" if request.is_eager else run_id(request), queueing_key=queueing_key,
            queue=header.queue if header else None)
        if reply.grant is Grant.TAKEN:
            _held(task, run, store, lock, reply)
            return
        run.placed_ms = run.placed_ms or asked_ms
        metrics.handed(task, "line", len(reply.woken))
        publish_woken(task.app, store, reply.woken)
        if request.is_eager and lock.mode != "skip" and reply.grant is not Grant.RAN:
            # The caller is the worker: it waits for its turn (its place in line is kept
            # while it keeps asking).
            _waiting(task, lock, reply.holder, "waiting")
            time.sleep(delay)
            delay = min(delay * 2, _EAGER_POLL[1])
            continue
        _not_now(task, run, store, lock, reply)
        raise Ignore()


def _not_now(task: Task, run: JobRun, store: Store, lock: Lock, reply: LockReply) -> None:
    """The job does not run now: dropped, re-queued, skipped or parked, as ``reply`` and
    ``on_locked`` say."""
    request = task.request
    if reply.grant is Grant.RAN:
        # This very run of the job ended already: a late copy of it (published again
        # during an outage, or a parked copy woken meanwhile). Dropped, not run again.
        run.parked = True
        logger.info("celery-unique: %s[%s] ran already: this copy is dropped",
                    task.name, request.id)
    elif reply.grant is Grant.COPY_HOLDS and not request.is_eager:
        # Another copy of this job holds the lock: this one waits for it to end, never
        # runs beside it, and is then dropped as a copy of a run that ended (RAN above).
        run.parked = True
        _waiting(task, lock, reply.holder, "retry")
        _requeue(task, run, lock, counter="d")
    elif lock.mode == "skip":
        _skip(task, lock, reply.holder)
    elif lock.mode == "retry":
        run.parked = True
        _waiting(task, lock, reply.holder, "retry")
        _requeue(task, run, lock)
    else:
        run.parked = True
        _park(task, run, store, lock)
        _waiting(task, lock, reply.holder, "parked")


def _park(task: Task, run: JobRun, store: Store, lock: Lock) -> None:
    header = (run.header or JobHeader())._replace(lock=lock, placed_ms=run.placed_ms)
    _park_message(task, store, lock, task.request.id, _again(task, header), header.queue)


def _park_message(task: Task, store: Store, lock: Lock, token: str, sig: Signature,
                  queue: str | None) -> None:
    """Park the job ``sig`` in the line of ``lock`` under ``token``, registered for the
    sweepers, and publish the jobs its script woke."""
    message = capture(task.app, store, task, sig)
    registry = registry_key(setting(task.app, "unique_key_prefix"))
    reply = store.park(lock.base, token=token, limit=lock.limit, lease_ms=lock.lease_ms,
                       message=message, queue=queue, registry=registry)
    # Parked: from here on nothing may fail the job, which will run when woken.
    app_state(task.app).metrics.handed(task, "line", len(reply.woken))
    if store.cluster:
        # The registry is in another slot: registered with a command of its own. Its
        # holder may die without releasing; a failure is logged, not raised: the next
        # park or release of the lock registers it again.
        try:
            store.register(registry, RegistryEntry(lock.limit, lock.lease_ms, lock.base))
        except Exception:
            logger.exception("celery-unique: could not register %s for the sweepers",
                             lock.base)
    publish_woken(task.app, store, reply.woken)


def _held(task: Task, run: JobRun, store: Store, lock: Lock, reply: LockReply) -> None:
    request = task.request
    request.lock_fence = reply.fence
    request.lock_lost = False
    run.lock = lock
    worker_runtime(task.app).renewer.add(request.id, store, lock, task, request)
    app_state(task.app).metrics.acquired(task, request.id, run.placed_ms, reply.handed_ms)
    unique_signals.lock_acquired.send(sender=task, key=lock.base, task_id=request.id,
                                      fence=reply.fence)


# -- the rate limit ----------------------------------------------------------------------
#
# A ``global_rate_limit`` of N per period is kept as a lock of N places, each taken by a
# start and held for the period: never renewed, never released by the job's end (only
# a job that never started gives its place back). A job over the limit is parked in line
# like an "order" job; the workers' sweep hands it a place when the oldest start's
# period ends (``runtime``), at that moment.

def _start_under_rate(task: Task, run: JobRun, header: JobHeader, policy: str) -> None:
    """Take a start under the job's rate limit, or raise Ignore (parked, skipped)."""
    rate, request = header.rate, task.request
    assert rate is not None
    store, token = store_of(task.app), rate_token(request.id, request.retries)
    delay = _EAGER_POLL[0]
    while True:
        try:
            # A run published again after an outage may have been granted its start
            # before the reply was lost: it asks again, and is not taken for a copy.
            again = bool(header.attempt("s"))
            reply = store.acquire_lock(rate.base, token=token, limit=rate.limit,
                                       lease_ms=rate.lease_ms, mode=rate.mode,
                                       wait_ms=rate.wait_ms, queue=header.queue,
                                       asks_again=again, run="" if again else token,
                                       rate=True)
        except LockStoreUnavailable as exc:
            _rate_unavailable(task, run, header, policy, exc)
            return
        if reply.grant is Grant.TAKEN:
            return
        if reply.grant in (Grant.RAN, Grant.COPY_HOLDS):
            # A copy of a run that started already (a parked job handed its start again
            # when its first copy came late): dropped, never a second start.
            run.parked = True
            logger.info("celery-unique: %s[%s] started already: this copy is dropped",
                        task.name, request.id)
            raise Ignore()
        publish_woken(task.app, store, reply.woken)
        action = "skipped" if rate.mode == "skip" else (
            "waiting" if request.is_eager else "parked")
        unique_signals.rate_limited.send(sender=task, key=rate.base, task_id=request.id,
                                         action=action)
        if action != "waiting":
            break
        time.sleep(delay)  # eager mode: the caller waits for a start
        delay = min(delay * 2, _EAGER_POLL[1])
    _over_rate(task, run, header, store, token)


def _over_rate(task: Task, run: JobRun, header: JobHeader, store: Store, token: str
               ) -> NoReturn:
    """The job is over its rate limit: skipped (``REVOKED``, :class:`RateLimited`) or
    parked in the limit's line; raises Ignore."""
    rate, request = header.rate, task.request
    assert rate is not None
    run.parked = True  # its end releases nothing: it runs later, or never
    if rate.mode == "skip":
        limited = RateLimited(f"{task.name}[{request.id}] skipped: over its rate limit"
                              f" {rate.limit} per {rate.lease_ms - RATE_GUARD_MS} ms"
                              f" ({rate.base})", key=rate.base, task_id=request.id)
        logger.info("celery-unique: %s", limited)
        _revoke(task, limited)
    else:
        _park_message(task, store, rate, token, _again(task, header), header.queue)
    raise Ignore()


def _rate_unavailable(task: Task, run: JobRun, header: JobHeader, policy: str,
                      exc: LockStoreUnavailable) -> None:
    """The lock store is unreachable at a rate-limited job's start: as ``policy`` says,
    run it without counting it, or publish it again with a backoff (raises Ignore)."""
    request = task.request
    if request.is_eager and policy != "allow":
        raise exc  # the caller is here to be told
    if policy == "allow":
        unique_signals.report_store_unavailable(task, "run", request.id, exc)
        return
    countdown = _requeue(task, run, header.lock, counter="s", backoff=_STORE_BACKOFF)
    logger.warning("celery-unique: %s[%s]: the lock store is unreachable (%s); published"
                   " again to run in %.1f s", task.name, request.id, exc, countdown)
    run.parked = True
    raise Ignore() from None


def _unless_replaced(task: Task, run: JobRun, header: JobHeader, policy: str) -> None:
    """Raise Ignore when a newer job replaced this one (``on_duplicate="replace"``): it
    ends ``REVOKED`` with :class:`Replaced` and gives up its lock. Else its queueing lock
    is released (``until="started"``) or marked as started (no longer replaced)."""
    request, key = task.request, header.queueing_key or ""
    metrics = app_state(task.app).metrics
    try:
        started = store_of(task.app).started(key, request.id, header.until or "started")
    except LockStoreUnavailable as exc:
        if policy == "allow" or request.is_eager:
            metrics.store_error(task, "acquire", "allowed")
            unique_signals.report_store_unavailable(task, "run", request.id, exc)
            return
        _give_up_lock(task, run, "requeued")
        metrics.store_error(task, "acquire", "requeued")
        countdown = _requeue(task, run, header.lock, counter="s", backoff=_STORE_BACKOFF)
        logger.warning("celery-unique: %s[%s]: the lock store is unreachable (%s);"
                       " published again to run in %.1f s", task.name, request.id, exc,
                       countdown)
        run.parked = True
        raise Ignore() from None
    if started.replaced_by:
        _give_up_lock(task, run, "replaced")
        run.parked = True  # its end releases nothing more: its queueing lock is not its own
        replaced = Replaced.of(task.name, key, request.id, started.replaced_by)
        logger.info("celery-unique: %s", replaced)
        _revoke(task, replaced)
        raise Ignore()
    if started.released:
        run.released = True
        metrics.dequeued(task, "job started")


def _give_up_lock(task: Task, run: JobRun, why: str) -> None:
    if run.lock is not None:
        lock, run.lock = run.lock, None
        release_lock(task.app, task, task.request.id, lock, why,
                     run.header.queue if run.header else None)


def _revoke(task: Task, exc: Exception) -> None:
    """The job ends ``REVOKED`` with ``exc``: final (ready() is true), neither success nor
    failure; get() raises ``exc`` instead of waiting for a result that will never come."""
    request = task.request
    if request.is_eager:
        app_state(task.app).eager_skipped[request.id] = exc  # UniqueTask.apply reads it
    elif not task.ignore_result:
        task.backend.store_result(request.id, exc, REVOKED, request=request)


def _waiting(task: Task, lock: Lock, holder: str, action: str) -> None:
    app_state(task.app).metrics.waited(task, action)
    unique_signals.lock_waiting.send(sender=task, key=lock.base, task_id=task.request.id,
                                     holder=holder, action=action)


def _skip(task: Task, lock: Lock, holder: str) -> None:
    request = task.request
    _waiting(task, lock, holder, "skipped")
    exc = LockHeld(f"{task.name}[{request.id}] skipped: its lock {lock.base} is held by"
                   f" {holder}", key=lock.base, holder=holder, task_id=request.id)
    logger.warning("celery-unique: %s", exc)
    _revoke(task, exc)


def _requeue(task: Task, run: JobRun, lock: Lock | None, counter: str = "w",
             backoff: tuple[float, float] = _RETRY_COUNTDOWN) -> float:
    """Publish the job again with a countdown (``backoff``: first, most; doubling per
    attempt, counted in the header under ``counter``); returns the countdown."""
    header = run.header or JobHeader()
    attempt = header.attempt(counter)
    countdown = float(min(backoff[0] * 2 ** attempt, backoff[1]))
    sig = _again(task, header._replace(
        lock=lock, attempts={**header.attempts, counter: attempt + 1},
        placed_ms=run.placed_ms), countdown=countdown)
    # Not Task.retry: waiting for a lock does not use up max_retries, and the job keeps
    # its queueing lock while it waits.
    Task.apply_async(task, sig.args, sig.kwargs, **sig.options)
    return countdown


def _again(task: Task, header: JobHeader, **options: Any) -> Signature:
    """The running job as a signature to publish again, its header now ``header``."""
    request = task.request
    sig = task.signature_from_request(request, request.args, request.kwargs, **options)
    headers = dict(sig.options.get("headers") or {})
    headers[HEADER] = {**(headers.get(HEADER) or {}), **header.to_header()}
    sig.options["headers"] = headers
    return sig


# -- releasing ---------------------------------------------------------------------------

def release_lock(app: Celery, sender: Any, token: str, lock: Lock, state: str,
                 queue: str | None = None, ran: str = "") -> None:
    """Release the job's lock (or its place in line) and publish the jobs it wakes.

    ``sender``: the task (or, for a message no task took, its name), the sender of
    :data:`~celery_unique.signals.lock_released`. ``queue``: the job's own queue; a woken
    job parked from it is pushed by the release script itself, so a releasing process that
    dies cannot lose it. ``ran``: the run that ended (``wire.run_id``), remembered for a
    while so that a late copy is dropped.
    """
    worker_runtime(app).renewer.remove(token)
    store = store_of(app)
    metrics = app_state(app).metrics
    try:
        released = store.release_lock(lock.base, token=token, limit=lock.limit,
                                      lease_ms=lock.lease_ms, queue=queue, ran=ran,
                                      remember_ms=ran_window_ms(lock) if ran else 0)
    except Exception:
        logger.exception("celery-unique: could not release %s for %s", lock.base, token)
        metrics.store_error(sender, "release", "logged")
        return
    metrics.handed(sender, "release", len(released.woken))
    publish_woken(app, store, released.woken)
    if released.expired:  # its lease ran out first (a frozen job, a late end)
        metrics.released(sender, token, "expired")
    if released.held:
        metrics.released(sender, token, state)
        unique_signals.lock_released.send(sender=sender, key=lock.base, task_id=token,
                                          state=state)


def release_unrun(app: Celery, sender: Any, token: str, header: JobHeader, why: str, *,
                  queueing: bool = True, started: bool = False, retries: Any = 0) -> None:
    """A job that will not run now (revoked, discarded, its process lost) frees what its
    header names: its lock or place in line, and its queueing lock unless ``queueing`` is
    false (it runs again); its place under its rate limit unless it ``started`` (a start
    counts for the period, whatever becomes of the job)."""
    if queueing and header.queueing_key and header.until != "expired":
        free_queueing(app, sender, header.queueing_key, token, why)
    if header.lock is not None:
        release_lock(app, sender, token, header.lock, why, header.queue)
    if header.rate is not None and not started:
        release_lock(app, sender, rate_token(token, retries), header.rate, why, header.queue)


def free_queueing(app: Celery, sender: Any, key: str, token: str, why: str, *,
                  replaceable: bool = False) -> None:
    """Release the queueing lock ``key`` if ``token`` holds it; a failure is logged."""
    released = store_of(app).release_quietly(key, token, why, replaceable=replaceable)
    if released:
        app_state(app).metrics.dequeued(sender, why)
    elif released is None:
        app_state(app).metrics.store_error(sender, "release", "logged")


def ran_window_ms(lock: Lock) -> int:
    """How long a run that ended is remembered: late copies come from a publish again
    during an outage (a backoff of up to 30 s once the store answers) or from a wait
    behind the running copy; a minute, or two leases when longer."""
    return max(60_000, 2 * lock.lease_ms)
