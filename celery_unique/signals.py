"""Celery signals sent by celery-unique.

Connect to them as to Celery's own: ``@duplicate_rejected.connect``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["duplicate_rejected"]

#: Sent by the caller when an enqueue meets a held queueing lock, before it raises or
#: returns the job already queued. Sender: the task. Arguments: ``key``, ``task_id`` (the
#: job holding the lock), ``ttl`` (seconds left), ``args``, ``kwargs``, ``action``
#: (``"raised"``, ``"existing"`` or ``"skipped"``).
duplicate_rejected = Signal(name="celery_unique.duplicate_rejected")
