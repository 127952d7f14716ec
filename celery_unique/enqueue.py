"""The enqueue path: what one ``apply_async`` asks of Redis, and the path that does it.

:class:`Enqueue` plans a call (which locks, which keys, which path); :meth:`Enqueue.run`
publishes through the path chosen once per app:

- ``"atomic"``: the broker is the lock store's Redis. The locks are taken by the script
  that pushes the message (:mod:`celery_unique.broker`): no round trip of its own, and
  a caller that dies leaves both or neither.
- ``"separate"``: another broker, or another server or database for the locks. The lock
  command is sent first and its reply read while Celery builds the message.
- ``"now"``: eager mode. The lock is taken before the job runs in the caller.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import Task
from celery.result import AsyncResult
from celery.utils import uuid

from . import broker
from .broker import Duplicate, Push
from .exceptions import LockStoreUnavailable
from .keys import build_key
from .lock import Lock, release_lock, store_unavailable
from .scripts import line_keys
from .settings import wait_seconds
from .store import Pending, release_quietly

__all__ = ["Enqueue"]

logger = logging.getLogger(__name__)

Publish = Callable[..., AsyncResult]


class Enqueue:
    """One ``apply_async`` of a task with a queueing lock or a lock."""

    __slots__ = ("header", "key", "line", "lock", "on_duplicate", "on_store_error", "path",
                 "peek", "store", "task", "task_id", "ttl_ms")

    def __init__(self, task: Any, queueing: Any, lock_spec: Any, args: Sequence[Any],
                 kwargs: Mapping[str, Any], task_id: str | None, per_call: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        self.task, self.task_id = task, task_id or uuid()
        self.store = store = task._unique_store()
        app = task._get_app()
        values = task._unique_defaults if not per_call else {
            **task._unique_defaults, **{k: v for k, v in per_call.items() if v is not None}}
        # A ``connection`` of the caller's own may be another server's: the safe path.
        self.path = "atomic" if (not options.get("connection")
                                 and broker.atomic(app, store)) else "separate"
        self.key: str | None = None
        self.peek: Pending | None = None
        if queueing is not None:
            self.key = build_key(values["key_prefix"], "q", task.name,
                                 queueing.render(args, kwargs))
            if self.path == "atomic" and self.key in store.held_keys:
                # Sent first, so that the rest of the planning and Celery's own work
                # overlap its round trip (see _atomic).
                self.peek = store.send_peek(self.key, self.task_id)
        try:
            eager = bool(app.conf.task_always_eager)
            if eager:
                self.path = "now"
                if self.peek is not None:
                    self.peek.settle()
                    self.peek = None
            wait = wait_seconds(options.get("countdown"), options.get("eta"))
            self.on_duplicate: str = values["on_duplicate"]
            self.on_store_error: str = values["on_store_error"]
            self.header: dict[str, Any] = {}
            self.lock: Lock | None = None
            self.line = False
            if lock_spec is not None:
                self.lock = task._unique_make_lock(lock_spec, args, kwargs, per_call)
                self.header = self.lock.header()
                # "order": the job's place in line is its creation order, taken now. A job
                # with a countdown or eta takes its place when it reaches a worker.
                self.line = self.lock.mode == "order" and not wait and not eager
            self.ttl_ms = 0
            if queueing is not None:
                lease_ms = int(values["queueing_lock_timeout"] * 1000)
                self.ttl_ms = lease_ms + int(1000 * wait) if wait else lease_ms
                self.header.update(q=self.key, t=lease_ms, until=values["queueing_lock_until"])
            if self.on_store_error != task._unique_defaults["on_store_error"]:
                self.header["e"] = self.on_store_error  # the worker's policy, set per call
        except BaseException:
            if self.peek is not None:  # bad input found after the peek was sent
                self.peek.settle()
            raise

    def run(self, publish: Publish, producer: Any, options: dict[str, Any]) -> AsyncResult:
        """Publish with the locks; raises :class:`~celery_unique.broker.Duplicate`."""
        try:
            if self.path == "atomic":
                return self._atomic(publish, options)
            return self._separate(publish, producer, options)
        except Duplicate:
            self.store.remember_held(self.key or "")
            raise
        except LockStoreUnavailable as exc:
            if self.on_store_error != "allow":
                raise
            # Chosen: published without its locks, and said.
            store_unavailable(self.task, "enqueue", self.task_id, exc)
            options["headers"] = {k: v for k, v in options["headers"].items()
                                  if k != broker.HEADER}
            options.pop("router", None)
            return publish(self.task_id, producer)

    def _atomic(self, publish: Publish, options: dict[str, Any]) -> AsyncResult:
        key, store, peek = self.key, self.store, self.peek
        if peek is not None:
            # A key found held moments ago (duplicates come in bursts): the peek sent
            # while planning is read when Celery routes the message, before it builds it.
            # A hint of a duplicate, never a decision to accept: the push decides.
            options["router"] = _GatedRouter(options.get("router") or
                                             self.task._get_app().amqp.router, peek)
        line = None
        if self.line and self.lock is not None:
            line = (line_keys(self.lock.base), self.lock.wait_ms)
        push = Push(store, self.task_id, key, self.ttl_ms, line)
        try:
            with broker.pushing(push):
                result = publish(self.task_id)
        except Duplicate:
            if push.refused:
                _forget_result(self.task, self.task_id)
            raise
        finally:
            if peek is not None:
                peek.settle()
        if not push.pushed:
            # Nothing came through kombu's Redis put, which every exchange type of kombu's
            # Redis transport calls: a kombu that publishes some other way. The locks are
            # taken now, late rather than never, and it is said once.
            _warn_unpushed(self.task)
            push.take()
        if key is not None:
            store.held_keys.pop(key, None)
        return result

    def _separate(self, publish: Publish, producer: Any, options: dict[str, Any]
                  ) -> AsyncResult:
        key, store, task_id, app = self.key, self.store, self.task_id, self.task._get_app()
        entered: list[Pending] = []

        def enter_line() -> None:
            if self.line and self.lock is not None:
                entered.append(store.send_enter_line(self.lock.base, task_id,
                                                     self.lock.wait_ms))

        pending: Pending | None = None
        try:
            if key is None:
                enter_line()
                return publish(task_id)
            if self.path == "now":
                # Eager mode runs the job in line, without routing or producer: wait first.
                pending = store.send_acquire_now(key, task_id, self.ttl_ms)
                _check(pending, enter_line)
                return publish(task_id)
            # The command is sent now and its reply read while Celery works: the round
            # trip overlaps Celery's message building instead of preceding it.
            pending = store.send_acquire(key, task_id, self.ttl_ms)
            if key in store.held_keys or options.get("connection"):
                # Checked when Celery routes the message, before it builds it; so is a
                # message Celery sends on a ``connection`` of its own.
                options["router"] = _GatedRouter(options.get("router") or app.amqp.router,
                                                 pending, enter_line)
                result = publish(task_id)
                store.held_keys.pop(key, None)
                return result
            # Else the reply is read when Celery first uses the producer, once the message
            # is built: most of the round trip is hidden.
            with app.producer_or_acquire(producer) as real_producer:
                return publish(task_id, _GatedProducer(real_producer, pending, enter_line))
        except Duplicate:
            raise
        except BaseException:
            # The message was not published (or, in eager mode, the job raised): its locks
            # would otherwise block others until their leases run out.
            if pending is not None and (pending.settle() or (False,))[0]:
                release_quietly(store, key or "", task_id, "publish failed")
            for each in entered:
                each.settle()
            if entered and self.lock is not None:
                release_lock(self.task, task_id, self.lock, "publish failed")
            raise
        finally:
            for each in entered if pending is None else (pending, *entered):
                each.settle()


_warned: set[str] = set()


def _warn_unpushed(task: Task) -> None:
    if task.name not in _warned:
        _warned.add(task.name)
        logger.warning("celery-unique: %s was published without kombu's Redis put: its locks"
                       " were taken after the publish (please report this kombu version)",
                       task.name)


def _forget_result(task: Task, task_id: str) -> None:
    # On the atomic path Celery subscribed to the job's result before the push was
    # refused (the Redis result backend): nobody will ever publish that result.
    consumer = getattr(task.backend, "result_consumer", None)
    cancel = getattr(consumer, "cancel_for", None)
    if cancel is not None:
        with contextlib.suppress(Exception):
            cancel(task_id)


def _check(pending: Pending, then: Callable[[], None] | None = None) -> None:
    taken, holder, pttl = pending.result()
    if not taken:
        raise Duplicate(holder, pttl)
    if then is not None:
        then()


class _GatedRouter:
    """The router Celery gets for one message: routing, the first thing Celery does with
    a message, waits for the lock's reply and stops the message on a duplicate."""

    __slots__ = ("_pending", "_router", "_then")

    def __init__(self, router: Any, pending: Pending,
                 then: Callable[[], None] | None = None) -> None:
        self._router, self._pending, self._then = router, pending, then

    def route(self, *args: Any, **kwargs: Any) -> Any:
        _check(self._pending, self._then)
        return self._router.route(*args, **kwargs)


class _GatedProducer:
    """The producer Celery gets: its first use (``P.connection``, right after Celery has
    built the message) waits for the lock's reply and stops the publish on a duplicate.
    """

    __slots__ = ("_pending", "_producer", "_then")

    def __init__(self, producer: Any, pending: Pending, then: Callable[[], None]) -> None:
        self._producer, self._then = producer, then
        self._pending: Pending | None = pending

    def __getattr__(self, name: str) -> Any:
        pending = self._pending
        if pending is not None:
            self._pending = None
            _check(pending, self._then)
        return getattr(self._producer, name)
