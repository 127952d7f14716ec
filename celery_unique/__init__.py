"""celery-unique: Celery tasks that are not queued twice."""

from __future__ import annotations

from .exceptions import (
    AlreadyEnqueued,
    AlreadyQueued,
    CeleryUniqueError,
    ConfigurationError,
    KeyBuildError,
    LockStoreUnavailable,
)
from .settings import UniqueOptions
from .task import UniqueTask

__all__ = [
    "AlreadyEnqueued",
    "AlreadyQueued",
    "CeleryUniqueError",
    "ConfigurationError",
    "KeyBuildError",
    "LockStoreUnavailable",
    "UniqueOptions",
    "UniqueTask",
]

__version__ = "0.1.0"
