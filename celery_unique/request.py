"""The worker's request class for unique tasks: releases locks from the main process.

Some ends of a job never reach the pool process's tracer: a revoked or expired message is
discarded by the main process, a killed pool process (``WorkerLostError``) or a hard time
limit (older Celery skips ``after_return`` there) is handled by it. Each releases the
job's locks here, owner-checked, so a lock taken by a later job is never touched.
"""

from __future__ import annotations

from typing import Any

from billiard.exceptions import Terminated, WorkerLostError
from celery.worker.request import Request

from .lock import Lock, release_lock
from .scripts import get_store, release_quietly
from .task import HEADER

__all__ = ["UniqueRequest"]


class UniqueRequest(Request):  # type: ignore[misc]
    """``Task.Request`` of :class:`~celery_unique.UniqueTask`."""

    _unique_done = False

    def _unique_release(self, why: str, queueing: bool = True) -> None:
        info = self.request_dict.get(HEADER)
        if self._unique_done or not isinstance(info, dict):
            return
        self._unique_done = True
        if queueing and info.get("q"):
            release_quietly(get_store(self.task.app), info["q"], self.id, why)
        lock = Lock.from_header(info)
        if lock is not None:
            # Held, or a place in line: either way the job will not run now.
            release_lock(self.task, self.id, lock, why)

    def revoked(self) -> bool:
        revoked = bool(super().revoked())
        if revoked:
            self._unique_release("revoked or expired")
        return revoked

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            self._unique_release("hard time limit")

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, Terminated):
            self._unique_release("terminated")
        elif isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            task = self.task
            # With acks_late and reject_on_worker_lost the message is requeued and the
            # job runs again: it keeps its queueing lock, and takes its lock again.
            requeued = bool(task.acks_late and task.reject_on_worker_lost)
            self._unique_release("worker lost", queueing=not requeued)
