"""Drop-in bases for celery-once 3.x and celery-singleton 0.3 users: change one import.

``from celery_unique.compat import QueueOnce, AlreadyQueued`` (celery-once) or
``from celery_unique.compat import Singleton, DuplicateTaskError, clear_locks``
(celery-singleton). Each is configured as its library was (``app.conf.ONCE`` and
``once={...}``; ``unique_on``, ``raise_on_duplicate``, ``lock_expiry`` and the
``singleton_*`` settings) and runs on this package's locks: owner-checked, released on
every end of a job, kept by retries, keyed by this package's scheme. Where the old
behaviour was a bug, the shim keeps the fix (see the migration guides).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from celery import Celery, states
from celery.result import AsyncResult, EagerResult

from . import admin
from .exceptions import AlreadyQueued as _AlreadyQueued
from .exceptions import ConfigurationError
from .keys import build_key, glob_escape
from .settings import setting
from .task import UniqueTask

__all__ = ["AlreadyQueued", "DuplicateTaskError", "QueueOnce", "Singleton", "clear_locks"]


# -- celery-once ---------------------------------------------------------------------

class AlreadyQueued(_AlreadyQueued):
    """A job with the same arguments is already queued (celery-once's exception).

    Also a :class:`celery_unique.AlreadyQueued`. celery-once's attributes: ``countdown``
    (seconds before the lock expires) and ``message`` (``"Expires in N seconds"``).
    """

    countdown: float

    def __init__(self, countdown: float | str | None = None, /, **context: Any) -> None:
        # celery-once raises AlreadyQueued(countdown); this package passes its message
        # and the context (key, task_id, ttl), and pickling passes the message back.
        ttl = countdown if isinstance(countdown, (int, float)) else context.get("ttl", 0.0)
        context["ttl"] = context["countdown"] = ttl
        super().__init__(f"Expires in {ttl} seconds", **context)


_ONCE_DEFAULTS: dict[str, Any] = {"graceful": False, "unlock_before_run": False}


class QueueOnce(UniqueTask):
    """celery-once's base class: not queued again while a job with the same arguments is.

    ``once={"graceful", "keys", "timeout", "unlock_before_run"}`` per task;
    ``apply_async(..., once={"graceful", "timeout"})`` per call; ``app.conf.ONCE =
    {"backend": "celery_once.backends.Redis", "settings": {"url", "default_timeout",
    "blocking", "blocking_timeout"}}``. The lock is held until the job finishes (until it
    starts with ``unlock_before_run``); a retry keeps it.
    """

    abstract = True
    once: ClassVar[dict[str, Any]] = dict(_ONCE_DEFAULTS)
    _unique_already_queued = AlreadyQueued

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        if cls.run is not UniqueTask.run:
            settings = _once_settings(app)
            once = {**_ONCE_DEFAULTS, **(cls.once or {})}
            cls.queueing_lock = True
            cls.unique_on = once.get("keys")
            cls.queueing_lock_until = "started" if once["unlock_before_run"] else "finished"
            cls.queueing_lock_timeout = float(
                once.get("timeout") or settings.get("default_timeout", 60 * 60))
            cls.on_duplicate = "raise"
        super().on_bound(app)

    @property
    def config(self) -> Any:
        """The app's configuration (celery-once's ``config``)."""
        return self._get_app().conf

    @property
    def once_config(self) -> Any:
        """``app.conf.ONCE``."""
        return self.config.ONCE

    @property
    def default_timeout(self) -> float:
        """``ONCE["settings"]["default_timeout"]`` (an hour when unset)."""
        return float(_once_settings(self._get_app()).get("default_timeout", 60 * 60))

    def get_key(self, args: Sequence[Any] | None = None,
                kwargs: Mapping[str, Any] | None = None) -> str:
        """The Redis key of the lock for these arguments (this package's scheme)."""
        spec = self._unique_check_call({})
        assert spec is not None
        return build_key(self._unique_defaults.key_prefix, "q", self.name,
                         spec.render(tuple(args or ()), dict(kwargs or {})))

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, **options: Any) -> AsyncResult:
        """Queue the job unless one with the same key is queued: then raise
        :class:`AlreadyQueued`, or with ``graceful`` return a ``REJECTED`` result."""
        once = {**_ONCE_DEFAULTS, **(self.once or {}), **(options.pop("once", None) or {})}
        if "timeout" in once and once["timeout"] is not None:
            options.setdefault("queueing_lock_timeout", float(once["timeout"]))
        settings = _once_settings(self._get_app())
        deadline = time.monotonic() + float(settings.get("blocking_timeout", 1))
        while True:
            try:
                return super().apply_async(args, kwargs, task_id, producer, link,
                                           link_error, shadow, **options)
            except AlreadyQueued:
                left = deadline - time.monotonic()
                if settings.get("blocking") and left > 0:
                    # celery-once's blocking: wait for the lock as redis-py's Lock does.
                    time.sleep(min(0.1, left))
                    continue
                if once["graceful"]:
                    return EagerResult(None, None, states.REJECTED)
                raise


def _once_settings(app: Celery) -> dict[str, Any]:
    """``ONCE["settings"]``, the backend checked; its ``url`` made the lock store's URL
    when ``unique_redis_url`` is unset (one store for the shims, the workers, the command)."""
    once = app.conf.get("ONCE")
    if not once:
        return {}
    if not isinstance(once, Mapping):
        raise ConfigurationError(f"ONCE must be a dict, got {once!r}", option="ONCE")
    backend = str(once.get("backend", "celery_once.backends.Redis"))
    if backend.rsplit(".", 1)[-1] == "File":
        raise ConfigurationError(
            f"ONCE backend {backend!r}: celery-unique keeps its locks in Redis only, whose"
            " scripts make them safe across hosts; use"
            " {'backend': 'celery_once.backends.Redis', 'settings': {'url': ...}}",
            option="ONCE", value=backend)
    if backend.rsplit(".", 1)[-1] != "Redis":
        raise ConfigurationError(
            f"ONCE backend {backend!r} is not supported: celery-unique keeps its locks in"
            " Redis ('celery_once.backends.Redis')", option="ONCE", value=backend)
    settings = dict(once.get("settings") or {})
    url = settings.get("url")
    if url and not app.conf.get("unique_redis_url"):
        # celery-once's spelling of a unix socket.
        app.conf.unique_redis_url = str(url).replace("redis+socket://", "unix://", 1)
    return settings


# -- celery-singleton ----------------------------------------------------------------

class DuplicateTaskError(_AlreadyQueued):
    """A duplicate of a queued or running job was refused (celery-singleton's exception,
    with ``raise_on_duplicate``). ``task_id``: the job already queued. Also a
    :class:`celery_unique.AlreadyQueued`."""

    def __init__(self, message: str | None = None, task_id: str | None = None,
                 **context: Any) -> None:
        if task_id is None:
            task_id = context.pop("task_id", None)
        else:
            context.pop("task_id", None)
        super().__init__(f"Attempted to queue a duplicate of task ID {task_id}",
                         task_id=task_id, **context)


class SingletonConfig:
    """celery-singleton's settings of an app, as its ``Config`` read them."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @property
    def key_prefix(self) -> str:
        return str(self.app.conf.get("singleton_key_prefix", "SINGLETONLOCK_"))

    @property
    def raise_on_duplicate(self) -> bool | None:
        return self.app.conf.get("singleton_raise_on_duplicate")  # type: ignore[no-any-return]

    @property
    def lock_expiry(self) -> float | None:
        return self.app.conf.get("singleton_lock_expiry")  # type: ignore[no-any-return]

    @property
    def backend_url(self) -> str | None:
        """``singleton_backend_url``, else the result backend when it is Redis, else the
        broker."""
        url = self.app.conf.get("singleton_backend_url")
        if url is not None:
            return str(url)
        url = self.app.conf.get("result_backend")
        if not url or not str(url).startswith(("redis://", "rediss://")):
            url = self.app.conf.get("broker_url")
        return None if url is None else str(url)


class SingletonBackend:
    """celery-singleton's backend calls, on this package's lock store."""

    def __init__(self, task: UniqueTask) -> None:
        #: The lock store's Redis client.
        self.redis = task._unique_store().client

    def get(self, lock: str) -> str | None:
        """The id of the job holding ``lock``."""
        value = self.redis.get(lock)
        return value.decode() if isinstance(value, bytes) else value

    def lock(self, lock: str, task_id: str, expiry: float | None = None) -> bool:
        """Take ``lock`` for ``task_id`` unless it is held."""
        ms = int(1000 * expiry) if expiry else None
        return bool(self.redis.set(lock, task_id, nx=True, px=ms))

    def unlock(self, lock: str) -> None:
        """Delete ``lock`` whoever holds it (an explicit release)."""
        self.redis.delete(lock)


class Singleton(UniqueTask):
    """celery-singleton's base class: one job per task and arguments, queued or running.

    A duplicate returns the existing job's ``AsyncResult``, or raises
    :class:`DuplicateTaskError` with ``raise_on_duplicate``. Task attributes
    ``unique_on`` (a name or a list; ``[]``: the task name only), ``raise_on_duplicate``,
    ``lock_expiry``; settings ``singleton_backend_url``, ``singleton_key_prefix``,
    ``singleton_raise_on_duplicate``, ``singleton_lock_expiry``. Its public methods
    (``generate_lock``, ``get_existing_task_id``, ``aquire_lock``, ``release_lock``,
    ``unlock``) work on this package's keys.
    """

    abstract = True
    raise_on_duplicate: ClassVar[bool | None] = None
    lock_expiry: ClassVar[float | None] = None
    _unique_already_queued = DuplicateTaskError

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        if cls.run is not UniqueTask.run:
            _singleton_store_url(app)
            config = SingletonConfig(app)
            cls.queueing_lock = True
            if isinstance(cls.unique_on, str):
                cls.unique_on = [cls.unique_on]
            cls.queueing_lock_until = "finished"
            raise_on = cls.raise_on_duplicate
            if raise_on is None:
                raise_on = bool(config.raise_on_duplicate)
            cls.on_duplicate = "raise" if raise_on else "existing"
            expiry = cls.lock_expiry if cls.lock_expiry is not None else config.lock_expiry
            # No expiry was celery-singleton's default, and how its locks got stuck: a
            # lock here always has a lease (the setting's, an hour by default).
            cls.queueing_lock_timeout = None if expiry is None else float(expiry)
        super().on_bound(app)
        prefix = app.conf.get("singleton_key_prefix")
        if prefix and cls.run is not UniqueTask.run:
            # This package's scheme under their prefix: ``lock_prefix:q:{task:...}``.
            cls._unique_defaults = dataclasses.replace(cls._unique_defaults,
                                                       key_prefix=str(prefix).rstrip(":"))

    @property
    def singleton_config(self) -> SingletonConfig:
        """The app's ``singleton_*`` settings."""
        return SingletonConfig(self._get_app())

    @property
    def singleton_backend(self) -> SingletonBackend:
        """The lock store, with celery-singleton's backend calls."""
        return SingletonBackend(self)

    @property
    def _raise_on_duplicate(self) -> bool:
        self._unique_check_call({})
        return self._unique_defaults.on_duplicate == "raise"

    def generate_lock(self, task_name: str, task_args: Sequence[Any] | None = None,
                      task_kwargs: Mapping[str, Any] | None = None) -> str:
        """The Redis key of the lock for these arguments (this package's scheme)."""
        spec = self._unique_check_call({})
        assert spec is not None
        return build_key(self._unique_defaults.key_prefix, "q", task_name,
                         spec.render(tuple(task_args or ()), dict(task_kwargs or {})))

    def get_existing_task_id(self, lock: str) -> str | None:
        """The id of the job holding ``lock`` (``None``: free)."""
        return self.singleton_backend.get(lock)

    def aquire_lock(self, lock: str, task_id: str) -> bool:
        """Take ``lock`` for ``task_id`` (celery-singleton's spelling)."""
        self._unique_check_call({})
        ttl = self._unique_defaults.queueing_lock_timeout
        return self.singleton_backend.lock(lock, task_id, expiry=ttl)

    def release_lock(self, task_args: Sequence[Any] | None = None,
                     task_kwargs: Mapping[str, Any] | None = None) -> None:
        """Release the lock of these arguments, whoever holds it."""
        self.unlock(self.generate_lock(self.name, task_args, task_kwargs))

    def unlock(self, lock: str) -> None:
        """Release ``lock``, whoever holds it."""
        self.singleton_backend.unlock(lock)


def _singleton_store_url(app: Celery) -> None:
    """celery-singleton's store (:attr:`SingletonConfig.backend_url`) made the lock store's
    URL, unless ``unique_redis_url`` is set; its other backends refused."""
    backend = app.conf.get("singleton_backend_class")
    if backend not in (None, "celery_singleton.backends.redis.RedisBackend"):
        raise ConfigurationError(
            f"singleton_backend_class {backend!r} is not supported: celery-unique keeps"
            " its locks in Redis (unset it; singleton_backend_url names the server)",
            option="singleton_backend_class", value=backend)
    encoder = app.conf.get("singleton_json_encoder_class")
    if encoder is not None:
        # Refused, not ignored: it changed celery-singleton's keys, and ours are built
        # from the arguments themselves (any type), so it could only mislead.
        raise ConfigurationError(
            f"singleton_json_encoder_class {encoder!r} is not used by celery-unique: its"
            " keys are built from the arguments themselves, whatever their type (unset it)",
            option="singleton_json_encoder_class", value=encoder)
    if not app.conf.get("unique_redis_url"):
        url = SingletonConfig(app).backend_url
        if url and url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            app.conf.unique_redis_url = url


def clear_locks(app: Celery) -> int:
    """Release the locks of every :class:`Singleton` task of ``app`` (celery-singleton's
    ``clear_locks``, for a worker's start). Returns how many were released."""
    tasks = [t for t in app.tasks.values() if isinstance(t, Singleton)]
    prefixes = {t._unique_defaults.key_prefix for t in tasks}
    count = 0
    app_prefix = setting(app, "unique_key_prefix")
    for prefix in prefixes - {app_prefix, None}:
        # A prefix of their own (singleton_key_prefix): every queueing lock under it.
        client = next(t for t in tasks if t._unique_defaults.key_prefix == prefix
                      )._unique_store().client
        for key in client.scan_iter(match=f"{glob_escape(str(prefix))}:q:*", count=1000):
            count += int(client.delete(key))
    if app_prefix in prefixes:
        for task in tasks:
            count += admin.clear(app, task=task.name, kind="queueing")
    return count
