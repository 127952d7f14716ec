"""celery-unique: Celery tasks that are not queued twice, and run one at a time."""

from __future__ import annotations

from .exceptions import (
    AlreadyEnqueued,
    AlreadyQueued,
    CeleryUniqueError,
    ConfigurationError,
    KeyBuildError,
    LockHeld,
    LockStoreUnavailable,
    RateLimited,
    Replaced,
)
from .settings import UniqueOptions
from .task import UniqueTask

__all__ = [
    "AlreadyEnqueued",
    "AlreadyQueued",
    "CeleryUniqueError",
    "ConfigurationError",
    "KeyBuildError",
    "LockHeld",
    "LockStoreUnavailable",
    "RateLimited",
    "Replaced",
    "UniqueOptions",
    "UniqueTask",
]

__version__ = "0.1.0"
