"""The enqueue path: one ``apply_async``'s locks taken with its publish.

The task resolves its options into a :class:`Job` (keys rendered, leases in ms); an
:class:`Enqueue` publishes it through the path chosen once per app and store:

- ``"atomic"``: the broker is the lock store's Redis. The locks are taken by the script
  that pushes the message (:mod:`celery_unique.broker`): no round trip of its own, and
  a caller that dies leaves both or neither.
- ``"separate"``: another broker, or another server or database for the locks. The lock
  command is sent first and its reply read while Celery builds the message.
- ``"now"``: eager mode. The lock is taken before the job runs in the caller.

Nothing here imports the worker's side.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from celery import Celery
from celery.result import AsyncResult
from celery.states import REVOKED
from celery.utils import uuid

from . import signals as unique_signals
from .broker import Push
from .exceptions import AlreadyQueued, ConfigurationError, Replaced
from .keys import CompiledSpec, registry_key
from .scripts import Duplicate
from .settings import Resolved, setting
from .state import app_state
from .store import store_of
from .wire import HEADER, JobHeader, Lock, now_ms, set_placed, wait_seconds

__all__ = ["Enqueue", "Job"]

logger = logging.getLogger(__name__)

Publish = Callable[..., AsyncResult]


class Job(NamedTuple):
    """What one ``apply_async`` asks of the locks, as the task resolved it (a named
    tuple: one is made for every enqueue)."""

    sender: Any  #: the task: the sender of signals, its name, app and result backend
    task_id: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    queueing: CompiledSpec | None  #: the queueing lock's spec
    lock: CompiledSpec | None  #: the execution lock's spec
    values: Resolved  #: the call's options over the task's over the app's settings
    policy: str  #: the task's own ``on_store_error`` (a call's own travels with it)
    #: The id of the job running this call, when it is published under that id: maybe
    #: its retry (``Task.retry``).
    running: str | None = None
    #: What a refused duplicate raises (the migration shims raise their libraries' own).
    refuse: type[AlreadyQueued] = AlreadyQueued
    #: The ``rate_limit_key``'s spec (None: the task's name), with a ``global_rate_limit``.
    rate: CompiledSpec | None = None


class Enqueue:
    """One ``apply_async`` of a task with a queueing lock or a lock."""

    __slots__ = ("app", "job", "state", "store", "task_id")

    def __init__(self, job: Job, app: Celery) -> None:
        self.job, self.app, self.task_id = job, app, job.task_id or uuid()
        self.state, self.store = app_state(app), store_of(app)

    def run(self, publish: Publish, producer: Any, options: dict[str, Any]) -> AsyncResult:
        """Publish with the locks: the message, the job already queued, or an error."""
        job, values = self.job, self.job.values
        header = values.header(job.sender.name, job.queueing, job.lock, job.args, job.kwargs,
                               job.policy, job.rate)
        key, lock = header.queueing_key, header.lock
        if values.debounce is not None and key is not None and not job.running:
            self._debounce(key, values, options)
        headers = options.get("headers") or {}
        wait = wait_seconds(options.get("countdown"), options.get("eta"))
        retried = JobHeader.from_header(headers.get(HEADER)) if (
            job.running and options.get("retries")) else None
        if retried is not None:
            # A retry re-publishes the running job under its own id: it re-enters the
            # queue, so it takes its queueing lock again. It is published whatever the
            # answer: a retry is never dropped because another job took the lock meanwhile.
            # A throttle's lock ("expired") keeps the lease it was given at enqueue.
            if retried.queueing_key and retried.until != "expired":
                Push(self.store, self.task_id, retried.queueing_key,
                     retried.lease_ms + int(1000 * wait)).take(check=False)
                self.state.metrics.queued(job.sender)
            return publish(self.task_id)
        if key is None and lock is None and header.rate is None:
            return publish(self.task_id)
        eager = bool(self.app.conf.task_always_eager)
        line = header.line_at_enqueue(bool(wait or eager))
        value = header.to_header()
        if line is not None:
            set_placed(value, now_ms())  # when it took its place: the wait is measured
        options["headers"] = {**headers, HEADER: value}
        push = Push(self.store, self.task_id, key, header.lease_ms + int(1000 * wait), line,
                    publish_ms=int(values.publish_lease * 1000), replace=values.replaces,
                    lock_check=header.lock_to_check(values.lock_check_at_enqueue),
                    park_in=self._registry() if line and line is header.rate else None)
        held = key is not None and key in self.state.held_keys
        try:
            result = push.publish(self.app, publish, producer, options, eager=eager, held=held,
                                  task=job.sender, on_store_error=values.on_store_error)
        except Duplicate as duplicate:
            return self._duplicate(key, lock, duplicate, options)
        if held:
            self.state.held_keys.pop(key or "", None)
        self._published(push, key, line)
        return result

    def _published(self, push: Push, key: str | None, line: Lock | None) -> None:
        """What the push did beside publishing: replaced a queued job, parked this one."""
        if push.replaced:
            self._replaced(key or "", push.replaced)
        if push.parked and line is not None:
            unique_signals.rate_limited.send(sender=self.job.sender, key=line.base,
                                             task_id=self.task_id, action="parked")

    def _registry(self) -> str:
        """The sweepers' registry, where a rate-limited job waiting for its turn is
        parked at enqueue (on the atomic path)."""
        return registry_key(setting(self.app, "unique_key_prefix"))

    def _debounce(self, key: str, values: Resolved, options: dict[str, Any]) -> None:
        """A debounced call's countdown: ``debounce``, cut so that the burst's first call
        waits at most ``debounce_max``."""
        if options.get("countdown") is not None or options.get("eta") is not None:
            raise ConfigurationError(
                f"{self.job.sender.name}: a debounced job's start is set by debounce; it"
                " takes no countdown or eta", option="debounce", value=values.debounce)
        delay = float(values.debounce or 0)
        if values.debounce_max is not None:
            lease = int((values.queueing_lock_timeout + delay) * 1000)
            lasted = self.store.burst(key, lease) / 1000
            delay = max(0.0, min(delay, values.debounce_max - lasted))
        options["countdown"] = delay

    def _replaced(self, key: str, old: str) -> None:
        """This job took the queueing lock from the job ``old``, replaced: ``old`` will not
        run (its worker drops it), and its result says so from now on."""
        job, task = self.job, self.job.sender
        logger.info("celery-unique: %s[%s] replaced by %s under %s", task.name, old,
                    self.task_id, key)
        self.state.metrics.dequeued(task, "replaced")
        unique_signals.job_replaced.send(sender=task, key=key, task_id=old,
                                         replaced_by=self.task_id, args=job.args,
                                         kwargs=job.kwargs)
        if not task.ignore_result:
            try:
                task.backend.store_result(old, Replaced.of(task.name, key, old, self.task_id),
                                          REVOKED)
            except Exception:  # published: the worker that drops it stores it again
                logger.exception("celery-unique: could not store the result of %s", old)

    def _duplicate(self, queueing_key: str | None, lock: Lock | None, duplicate: Duplicate,
                   options: Mapping[str, Any]) -> AsyncResult:
        """The queueing lock is held (or, ``duplicate.running``, the lock): raise, or give
        the job already queued (or running)."""
        job, task = self.job, self.job.sender
        if duplicate.running:
            key = lock.base if lock is not None else ""
        else:
            key = queueing_key or ""
            self.state.remember_held(key)
        holder, ttl = duplicate.holder, max(duplicate.pttl, 0) / 1000
        # A chain or callback step sent by a worker (Celery passes parent_id), or a beat
        # entry: nobody can catch the error there, so the step is skipped and logged,
        # and the parent job keeps its own outcome.
        from_canvas = bool(options.get("parent_id")) and task.app.current_worker_task is not None
        from_beat = bool((options.get("headers") or {}).get("celery_beat_task")
                         ) or _called_from_beat()
        # "replace" never replaces a job that has started (``until="finished"``): it gets
        # that job's result, as "existing" does.
        action = "existing" if job.values.on_duplicate != "raise" else "raised"
        if action == "raised" and (from_canvas or from_beat):
            action = "skipped"
        unique_signals.duplicate_rejected.send(
            sender=task, key=key, task_id=holder, ttl=ttl, args=job.args, kwargs=job.kwargs,
            action=action)
        self.state.metrics.refused(task, action)
        if action == "raised":
            raise job.refuse(
                f"{task.name}: a job is already running under the lock {key} (task id"
                f" {holder}, lease left {ttl:.1f}s)" if duplicate.running else
                f"{task.name}: a job is already queued under {key} (task id {holder},"
                f" lock expires in {ttl:.1f}s)",
                key=key, task_id=holder, ttl=ttl, task_name=task.name)
        log = logger.info if action == "existing" else logger.warning
        log("celery-unique: %s not queued: %s is already queued under %s (%s)", task.name,
            holder, key, "from beat" if from_beat else "from a worker" if from_canvas else
            f"on_duplicate={job.values.on_duplicate}")
        return task.AsyncResult(holder)


def _called_from_beat() -> bool:
    """Whether beat's scheduler is sending this job (Celery < 5.5 sets no header for it).

    Only looked at for a duplicate, so the enqueue path does not pay for it.
    """
    from celery.beat import Scheduler

    code = Scheduler.apply_async.__code__
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
