"""Celery signals sent by celery-unique.

Connect to them as to Celery's own: ``@duplicate_rejected.connect``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.dispatch import Signal

__all__ = ["duplicate_rejected", "job_replaced", "lock_acquired", "lock_lost", "lock_released",
           "lock_waiting", "rate_limited", "report_store_unavailable", "store_unavailable"]

logger = logging.getLogger("celery_unique")

#: Sent by the caller when an enqueue meets a held queueing lock, before it raises or
#: returns the job already queued. Sender: the task. Arguments: ``key``, ``task_id`` (the
#: job holding the lock), ``ttl`` (seconds left), ``args``, ``kwargs``, ``action``
#: (``"raised"``, ``"existing"`` or ``"skipped"``).
duplicate_rejected = Signal(name="celery_unique.duplicate_rejected")

#: Sent by the caller when its job replaced the job queued under the same queueing lock
#: (``on_duplicate="replace"``), once the new job is published. Sender: the task.
#: Arguments: ``key``, ``task_id`` (the job replaced, which will not run), ``replaced_by``
#: (the new job), ``args``, ``kwargs`` (the new job's).
job_replaced = Signal(name="celery_unique.job_replaced")

#: Sent by the worker when a job takes its lock, before it runs. Sender: the task.
#: Arguments: ``key`` (the lock's Redis key), ``task_id``, ``fence``.
lock_acquired = Signal(name="celery_unique.lock_acquired")

#: Sent when a job finds its lock held. Arguments: ``key``, ``task_id``, ``holder`` (a job
#: holding it), ``action`` (``"parked"``, ``"retry"``, ``"skipped"`` or ``"waiting"`` in
#: eager mode).
lock_waiting = Signal(name="celery_unique.lock_waiting")

#: Sent when a job over its ``global_rate_limit`` does not start now: by the worker, or by
#: the caller for a job parked at enqueue (the atomic path). Sender: the task.
#: Arguments: ``key`` (the limit's Redis key), ``task_id``, ``action`` (``"parked"``: it
#: waits in line, ``"skipped"``, or ``"waiting"`` in eager mode).
rate_limited = Signal(name="celery_unique.rate_limited")

#: Sent when a job that held its lock ends. Arguments: ``key``, ``task_id``, ``state``.
lock_released = Signal(name="celery_unique.lock_released")

#: Sent from the renewing thread when a running job's lease was found lost (another job
#: may hold the lock now). Arguments: ``key``, ``task_id``.
lock_lost = Signal(name="celery_unique.lock_lost")

#: Sent when the lock store cannot be reached and ``on_store_error="allow"`` lets the job go
#: on without its lock. Sender: the task. Arguments: ``where`` (``"enqueue"`` or
#: ``"run"``), ``task_id``, ``url`` (its password masked), ``error`` (the exception).
store_unavailable = Signal(name="celery_unique.store_unavailable")


def report_store_unavailable(sender: Any, where: str, task_id: str, exc: Exception) -> None:
    """``on_store_error="allow"``: the job goes on without its lock; say so (a warning and
    :data:`store_unavailable`)."""
    logger.warning("celery-unique: %s[%s] %s without its lock: %s", sender.name, task_id,
                   "published" if where == "enqueue" else "runs", exc)
    store_unavailable.send(sender=sender, where=where, task_id=task_id,
                           url=getattr(exc, "url", None), error=exc)
