"""What celery-unique keeps per Celery app, in one object: :func:`app_state`.

Kept on the app itself (not in module-level dictionaries), so that it lives and dies with
the app. It holds values only: the store is made by :func:`celery_unique.store.get_store`,
the broker choice by ``celery_unique.broker.atomic``, the worker's threads by
``celery_unique.runtime``. No I/O here.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Celery

__all__ = ["AppState", "Recorder", "app_state", "every_app"]

#: Keys recently found held are remembered up to this many (the oldest dropped).
HELD_KEYS_MAX = 1024

_ATTRIBUTE = "_celery_unique_state"


class Recorder:
    """Where the locks' events are recorded: nowhere (this class), or, with
    ``unique_metrics`` on, ``celery_unique.metrics.Metrics``. Each method is called where its
    event happens, with what is at hand there; doing nothing costs one call.

    ``sender``: the task, or for a message no task took, its name.
    """

    __slots__ = ()

    def refused(self, sender: Any, action: str) -> None:
        """An enqueue met a held queueing lock (``action``: raised, existing, skipped)."""

    def queued(self, sender: Any) -> None:
        """An enqueue took its queueing lock (its retry: took it again)."""

    def dequeued(self, sender: Any, why: str) -> None:
        """A job released its queueing lock (``why``: its state, or a sentence)."""

    def acquired(self, sender: Any, token: str, placed_ms: int, handed_ms: int) -> None:
        """A job took its lock: ``placed_ms``: when it took its place in line (or first
        asked; wall clock, ms), ``handed_ms``: how long ago a release or a sweep handed it
        the lock (-1: it took it itself)."""

    def waited(self, sender: Any, action: str) -> None:
        """A job found its lock held (``action``: parked, retry, skipped, waiting)."""

    def handed(self, sender: Any, by: str, count: int) -> None:
        """Parked jobs were handed the lock (``by``: release, sweep, line)."""

    def released(self, sender: Any, token: str, why: str) -> None:
        """A job that held its lock released it (``why``: its state, or a sentence)."""

    def lost(self, sender: Any, token: str) -> None:
        """A running job's lease was found lost."""

    def store_error(self, sender: Any, where: str, action: str) -> None:
        """The lock store could not be reached: ``where`` (enqueue, acquire, renew,
        release, sweep), and what was done (allowed, raised, requeued, waited, logged)."""

    def swept(self, expired: int, dropped: int) -> None:
        """A sweep found ``expired`` leases run out and ``dropped`` places given up."""


#: Records nothing (metrics off).
NOWHERE = Recorder()


class AppState:
    """celery-unique's state for one app."""

    __slots__ = ("atomic", "eager_skipped", "held_keys", "metrics", "settings", "stale",
                 "store", "warned", "worker")

    def __init__(self) -> None:
        #: The lock store (``celery_unique.store.Store``), once one was made.
        self.store: Any = None
        #: The settings the store was made from (a change makes a new store).
        self.settings: tuple[Any, ...] | None = None
        #: Whether the settings may have changed since (a task was bound): read them again.
        self.stale = True
        #: ``(store, True/False)``: whether messages are pushed with their locks, decided
        #: for that store (``celery_unique.broker.atomic``).
        self.atomic: tuple[Any, bool] | None = None
        #: Queueing-lock keys recently found held (an ordered set): a hint of where to
        #: wait for the next reply on them, never a decision; a key is dropped when taken.
        self.held_keys: dict[str, None] = {}
        #: The worker's threads and what they keep (``celery_unique.runtime``).
        self.worker: Any = None
        #: Jobs skipped while run eagerly, by id, until ``UniqueTask.apply`` reads them.
        self.eager_skipped: dict[str, Exception] = {}
        #: Task names already warned about (a warning said once per task).
        self.warned: set[str] = set()
        #: Where the locks' events are recorded (``celery_unique.metrics``, when on).
        self.metrics: Recorder = NOWHERE

    def remember_held(self, key: str) -> None:
        """Note that ``key`` was found held (bounded: the oldest is dropped)."""
        held = self.held_keys
        held[key] = None
        if len(held) > HELD_KEYS_MAX:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del held[next(iter(held))]


def app_state(app: Celery) -> AppState:
    """celery-unique's state for ``app``, made on first use."""
    state: AppState | None = app.__dict__.get(_ATTRIBUTE)
    if state is None:
        state = app.__dict__.setdefault(_ATTRIBUTE, AppState())
    return state


#: Stores that every app uses while one is here, the innermost last: the test plugin's
#: (``celery_unique.testing.UniqueLocks``), so that no test reaches a Redis it did not
#: start, whichever app its tasks belong to. Process-wide, like the tests it serves.
every_app: list[Any] = []
