"""The package's exceptions: one base, context as attributes, all picklable."""

from __future__ import annotations

from typing import Any

__all__ = ["AlreadyEnqueued", "AlreadyQueued", "CeleryUniqueError", "ConfigurationError",
           "KeyBuildError", "LockHeld", "LockStoreUnavailable", "RateLimited", "Replaced"]


class CeleryUniqueError(Exception):
    """A celery-unique error occurred."""

    def __init__(self, message: str | None = None, **context: Any) -> None:
        # The docstring's first line is the default message (procrastinate's habit), so
        # every subclass documents and words itself in one place.
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        self.context = context
        for name, value in context.items():
            setattr(self, name, value)
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their ``args`` only; keyword context would be lost on the
        # way through a result backend or a multiprocessing pool without this.
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CeleryUniqueError], message: str, context: dict[str, Any]) -> Any:
    return cls(message, **context)


class ConfigurationError(CeleryUniqueError, ValueError):
    """An option of celery-unique has an invalid value."""


class KeyBuildError(CeleryUniqueError, ValueError):
    """The lock key could not be built from the task's arguments."""


class LockStoreUnavailable(CeleryUniqueError, ConnectionError):
    """The Redis server holding the locks could not be reached."""


class AlreadyQueued(CeleryUniqueError):
    """A job holding the same queueing lock is already queued.

    Attributes: ``key`` (the Redis key), ``task_id`` (the job already queued) and
    ``ttl`` (seconds before the lock expires by itself).
    """

    key: str
    task_id: str
    ttl: float


class LockHeld(CeleryUniqueError):
    """The job's lock was held by another job, and the job was skipped.

    ``on_locked="skip"``: the result of a skipped job (state ``REVOKED``). Context:
    ``lock`` (the lock's name), ``key`` (its Redis key), ``holder`` (a job holding it).
    """


class RateLimited(CeleryUniqueError):
    """The job was over its global rate limit, and was skipped.

    ``on_rate_limited="skip"``: the result of a skipped job (state ``REVOKED``). Context:
    ``key`` (the limit's Redis key), ``limit`` (as set: ``"10/s"``).
    """


class Replaced(CeleryUniqueError):
    """The job was replaced by a newer one before it started.

    ``on_duplicate="replace"``: the result of a replaced job (state ``REVOKED``). Context:
    ``key`` (its queueing lock's Redis key), ``task_id`` (the replaced job),
    ``replaced_by`` (the job queued in its place).
    """

    key: str
    task_id: str
    replaced_by: str

    def __init__(self, message: str | None = None, key: str = "", task_id: str = "",
                 replaced_by: str = "", **context: Any) -> None:
        super().__init__(message, key=key, task_id=task_id, replaced_by=replaced_by,
                         **context)
        # Celery's JSON result backends keep an exception's args only, and rebuild it
        # with them: its context rides there.
        self.args = (self.message, key, task_id, replaced_by)

    @classmethod
    def of(cls, task_name: str, key: str, task_id: str, replaced_by: str) -> Replaced:
        """The error a replaced job ends with, worded once for the caller and the worker."""
        return cls(f"{task_name}[{task_id}] was replaced by {replaced_by} before it started"
                   f" (queueing lock {key})", key=key, task_id=task_id,
                   replaced_by=replaced_by)


#: procrastinate's spelling of :class:`AlreadyQueued`.
AlreadyEnqueued = AlreadyQueued
