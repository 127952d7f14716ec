"""The worker's main process: what frees a job's locks when its message ends there.

Some ends of a job never reach the pool process's tracer: a revoked or expired message is
discarded by the main process, a killed pool process (``WorkerLostError``) or a hard time
limit (older Celery skips ``after_return`` there) is handled by it (:class:`UniqueRequest`);
a message no task takes (an unregistered task, a content type the worker refuses, a body
that does not decode) is dropped before any request exists (:func:`on_discarded`). Each
releases the job's locks here, owner-checked, so a lock taken by a later job is never
touched.
"""

from __future__ import annotations

from typing import Any

from billiard.exceptions import Terminated, WorkerLostError
from celery.worker.request import Request

from .lock import release_unrun
from .runtime import worker_runtime
from .wire import HEADER, JobHeader, Lock

__all__ = ["UniqueRequest", "on_discarded", "watch_decode_errors"]


class UniqueRequest(Request):  # type: ignore[misc]
    """``Task.Request`` of :class:`~celery_unique.UniqueTask`."""

    _unique_done = False
    _unique_requeued = False  # its message went back to the queue
    _unique_retried = False  # Celery published its retry (retry_on_worker_lost)
    _unique_arrived: Lock | None = None  # its place in line, kept while it is held here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        info = self.request_dict.get(HEADER)
        lock = Lock.of_header(info)
        if lock is None or lock.mode != "order":
            lock = Lock.of_header(info, "r")  # a place in its rate limit's line, if any
        if lock is not None and lock.mode == "order":
            # Received: the worker's sweep keeps its place until a pool process starts it.
            self._unique_arrived = lock
            worker_runtime(self.task.app).arrivals.add(self.id, lock)

    def _unique_left(self) -> None:
        """The job is no longer only held here: started, or ended without running."""
        if self._unique_arrived is not None:
            worker_runtime(self.task.app).arrivals.discard(self.id, self._unique_arrived)

    def on_accepted(self, pid: Any, time_accepted: Any) -> None:
        self._unique_left()
        super().on_accepted(pid, time_accepted)


    def reject(self, requeue: bool = False) -> None:
        super().reject(requeue=requeue)
        self._unique_requeued = self._unique_requeued or requeue

    def _unique_release(self, why: str, queueing: bool = True, started: bool = True) -> None:
        self._unique_left()
        header = JobHeader.from_header(self.request_dict.get(HEADER))
        if self._unique_done or header is None:
            return
        self._unique_done = True
        release_unrun(self.task.app, self.task, self.id, header, why, queueing=queueing,
                      started=started, retries=self.request_dict.get("retries"))

    def revoked(self) -> bool:
        revoked = bool(super().revoked())
        if revoked:
            self._unique_release("revoked or expired", started=False)
        return revoked

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            self._unique_release("hard time limit")

    def _retry_worker_lost(self, exc: Any, exc_info: Any) -> bool:
        # Celery >= 5.7, retry_on_worker_lost: the main process publishes the retry, outside
        # the job's context. With the job's context pushed, UniqueTask.apply_async sees a
        # retry of this job, as from Task.retry: it keeps the queueing lock.
        task = self.task
        context = self._context
        context.called_directly = False
        task.request_stack.push(context)
        try:
            retried = bool(super()._retry_worker_lost(exc, exc_info))
        finally:
            task.request_stack.pop()
        self._unique_retried = retried
        return retried

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        self._unique_left()
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, Terminated):
            self._unique_release("terminated")
        elif isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            # Requeued (acks_late and reject_on_worker_lost) or retried (Celery 5.7's
            # retry_on_worker_lost), the job runs again: it keeps its queueing lock, and
            # takes its lock again.
            again = self._unique_requeued or self._unique_retried
            self._unique_release("worker lost", queueing=not again)


def _release_dropped(consumer: Any, message: Any, why: str) -> None:
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        return
    header = JobHeader.from_header(headers.get(HEADER))
    token = headers.get("id")
    if header is not None and isinstance(token, str):
        release_unrun(consumer.app, headers.get("task"), token, header, why,
                      retries=headers.get("retries"))


def on_discarded(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    """``task_unknown`` / ``task_rejected``: the worker dropped a message without running it
    (no such task here, a content type it does not accept, an invalid message)."""
    _release_dropped(sender, message, f"message dropped: {type(exc).__name__}")


def watch_decode_errors(consumer: Any) -> None:
    """A message whose body does not decode is acknowledged and dropped by the consumer,
    with no signal: its locks are freed here, before it is acknowledged."""
    original = consumer.on_decode_error

    def on_decode_error(message: Any, exc: Exception) -> None:
        _release_dropped(consumer, message, "message dropped: it does not decode")
        original(message, exc)

    consumer.on_decode_error = on_decode_error
