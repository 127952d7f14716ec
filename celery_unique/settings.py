"""Settings read from Celery's configuration, their defaults, and option checks.

Precedence for every option: per call, then per task (decorator, class attribute or
``task_annotations``), then the app-wide setting, then the default below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

from celery import Celery

from .exceptions import ConfigurationError
from .keys import CompiledSpec, LockSpec, build_key
from .wire import JobHeader, Lock

__all__ = ["DEFAULTS", "Resolved", "UniqueOptions", "redis_url", "setting"]

ON_DUPLICATE = ("raise", "existing", "replace")
ON_LOCKED = ("order", "retry", "skip")
ON_STORE_ERROR = ("raise", "allow")
UNTIL = ("started", "finished", "expired")
ON_RATE_LIMITED = ("wait", "skip")
#: ``global_rate_limit``'s periods, as Celery's ``rate_limit`` spells them (ms).
RATE_PERIODS = {"s": 1000, "m": 60_000, "h": 3_600_000}
#: Added to a rate limit's period: a start is counted from when the worker's script
#: granted it, and a job's own clock reads it a little later, by a varying delay; so
#: that no window of the period measured by the jobs themselves holds one start too
#: many (the rate is 0.5 % lower at 1/s).
RATE_GUARD_MS = 5

#: Celery settings of celery-unique (``CELERY_UNIQUE_...`` under Django's namespace).
DEFAULTS: dict[str, Any] = {
    "unique_redis_url": None,  # None: broker_url when it is Redis (else an error)
    "unique_redis_options": None,
    "unique_redis_cluster": False,  # True: a Redis Cluster client (redis.cluster)
    "unique_redis_client": None,  # a callable(app) returning the Redis client to use
    "unique_key_prefix": "celery_unique",
    "unique_queueing_lock_timeout": 3600.0,
    "unique_queueing_lock_until": "started",
    "unique_on_duplicate": "raise",
    "unique_lock_timeout": 60.0,
    "unique_on_locked": "order",
    "unique_on_store_error": "raise",  # the lock store unreachable: "raise" or "allow"
    # Where the lock cannot be written with the message (another broker, another store):
    # the queueing lock's lease until the broker has the message, then its full timeout.
    "unique_publish_lease": 10.0,
    # Debounce (seconds, None: off): each call replaces the queued job and puts its start
    # off to this long after the last call; and at most this long after a burst's first.
    "unique_debounce": None,
    "unique_debounce_max": None,
    # With on_locked="skip": a job whose lock is held now is not queued at all.
    "unique_lock_check_at_enqueue": False,
    # At most N starts per period across all workers ("10/s", "10/m", "10/h"; None: off);
    # the excess waits in line ("wait") or ends REVOKED ("skip").
    "unique_global_rate_limit": None,
    "unique_on_rate_limited": "wait",
    # Metrics through OpenTelemetry (celery-unique[metrics]): True (the global meter
    # provider), a MeterProvider, or a callable making one (called once in each process:
    # a prefork worker's pool processes each make their own); off by default, and then
    # nothing is imported.
    "unique_metrics": False,
}


class UniqueOptions(TypedDict, total=False):
    """The options of celery-unique, per task (decorator) or per call."""

    queueing_lock: LockSpec
    unique_on: Sequence[str] | None
    on_duplicate: str
    queueing_lock_timeout: float
    queueing_lock_until: str
    lock: LockSpec
    on_locked: str
    lock_limit: int
    lock_timeout: float
    on_store_error: str
    debounce: float | None
    debounce_max: float | None
    lock_check_at_enqueue: bool
    global_rate_limit: str | None
    rate_limit_key: LockSpec
    on_rate_limited: str


#: Options taken out of ``apply_async``'s keyword arguments.
CALL_OPTIONS = frozenset(UniqueOptions.__annotations__)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A task's value options, the app's settings filled in where the task sets none:
    resolved once when Celery binds the task (as Celery resolves its own task settings),
    and per call only for the options a call sets."""

    key_prefix: str = DEFAULTS["unique_key_prefix"]
    on_duplicate: str = DEFAULTS["unique_on_duplicate"]
    queueing_lock_timeout: float = DEFAULTS["unique_queueing_lock_timeout"]
    queueing_lock_until: str = DEFAULTS["unique_queueing_lock_until"]
    on_locked: str = DEFAULTS["unique_on_locked"]
    lock_limit: int = 1
    lock_timeout: float = DEFAULTS["unique_lock_timeout"]
    on_store_error: str = DEFAULTS["unique_on_store_error"]
    publish_lease: float = DEFAULTS["unique_publish_lease"]  #: a setting only
    debounce: float | None = None
    debounce_max: float | None = None
    lock_check_at_enqueue: bool = False
    global_rate_limit: str | None = None
    on_rate_limited: str = DEFAULTS["unique_on_rate_limited"]

    @classmethod
    def for_task(cls, app: Celery, per_task: Mapping[str, Any]) -> Resolved:
        """``per_task``'s values, else the app's settings (``unique_`` + the name)."""
        values: dict[str, Any] = {name: per_task.get(name) for name in _RESOLVED}
        for name, value in values.items():
            if value is None and name != "lock_limit":
                values[name] = setting(app, f"unique_{name}")
        values["lock_limit"] = values["lock_limit"] or 1
        return cls(**values)

    def with_call(self, per_call: Mapping[str, Any]) -> Resolved:
        """These options with a call's own (checked already) in their place."""
        if not per_call:
            return self
        values = {k: v for k, v in per_call.items() if v is not None and k in _RESOLVED}
        return dataclasses.replace(self, **values) if values else self

    def header(self, task_name: str, queueing: CompiledSpec | None, lock: CompiledSpec | None,
               args: Sequence[Any], kwargs: Mapping[str, Any], policy: str,
               rate: CompiledSpec | None = None) -> JobHeader:
        """A job's locks, its keys rendered from its arguments; ``policy``: the task's own
        ``on_store_error`` (the header names the job's only when it differs); ``rate``:
        the ``rate_limit_key`` (None: the task's name)."""
        held = None if lock is None else self.lock(task_name, lock, args, kwargs)
        key = None if queueing is None else build_key(
            self.key_prefix, "q", task_name, queueing.render(args, kwargs))
        return JobHeader(
            key, int(self.queueing_lock_timeout * 1000) if key else 0,
            self.queueing_lock_until if key else None, held,
            None if self.on_store_error == policy else self.on_store_error,
            replaceable=self.replaces and key is not None,
            rate=self.rate(task_name, rate, args, kwargs))

    @property
    def replaces(self) -> bool:
        """Whether a duplicate replaces the job it finds queued (debounce does too)."""
        return self.on_duplicate == "replace" or self.debounce is not None

    def check_replace(self, task_default: Resolved, where: str) -> None:
        """``on_duplicate="replace"`` is the task's, not a call's: every job of the task
        must ask at its start whether it was replaced; and a throttle is not replaced."""
        if self.replaces != task_default.replaces:
            raise ConfigurationError(
                f"{where}: on_duplicate='replace' is set on the task (or app-wide), not per"
                " call: only then do all its jobs ask, when they start, whether they were"
                " replaced", option="on_duplicate", value=self.on_duplicate, where=where)
        if self.replaces and self.queueing_lock_until == "expired":
            raise ConfigurationError(
                f"{where}: on_duplicate='replace' with queueing_lock_until='expired' (a"
                " throttle): a replacing job would start the throttle's period again",
                option="on_duplicate", value=self.on_duplicate, where=where)
        self._check_debounce(where)

    def _check_debounce(self, where: str) -> None:
        if self.debounce is None:
            if self.debounce_max is not None:
                raise ConfigurationError(f"{where}: debounce_max without debounce",
                                         option="debounce_max", where=where)
            return
        if self.queueing_lock_until != "started":
            raise ConfigurationError(
                f"{where}: debounce needs queueing_lock_until='started' (got"
                f" {self.queueing_lock_until!r}): a call while the job runs starts a new"
                " burst", option="queueing_lock_until", value=self.queueing_lock_until,
                where=where)
        if self.debounce_max is not None and self.debounce_max < self.debounce:
            raise ConfigurationError(
                f"{where}: debounce_max ({self.debounce_max} s) is shorter than debounce"
                f" ({self.debounce} s)", option="debounce_max", value=self.debounce_max,
                where=where)

    def rate(self, task_name: str, spec: CompiledSpec | None, args: Sequence[Any],
             kwargs: Mapping[str, Any]) -> Lock | None:
        """The job's ``global_rate_limit`` as a lock (None: none): ``limit`` starts, each
        held for the period; keyed by ``rate_limit_key`` (default: the task's name)."""
        if self.global_rate_limit is None:
            return None
        limit, period_ms = parse_rate(self.global_rate_limit)
        value = task_name if spec is None else spec.render(args, kwargs)
        scope = task_name if spec is not None and spec.kind == "all" else ""
        return Lock(build_key(self.key_prefix, "r", scope, value),
                    "order" if self.on_rate_limited == "wait" else "skip", limit,
                    period_ms + RATE_GUARD_MS, int(self.queueing_lock_timeout * 1000))

    def lock(self, task_name: str, spec: CompiledSpec, args: Sequence[Any],
             kwargs: Mapping[str, Any]) -> Lock:
        """The execution lock for these arguments."""
        # A string or callable names a shared resource: no task name in the key, so
        # different tasks exclude each other. True is scoped to this task.
        scope = task_name if spec.kind == "all" else ""
        return Lock(build_key(self.key_prefix, "l", scope, spec.render(args, kwargs)),
                    self.on_locked, int(self.lock_limit), int(self.lock_timeout * 1000),
                    int(self.queueing_lock_timeout * 1000))


_RESOLVED = frozenset(f.name for f in dataclasses.fields(Resolved))


def setting(app: Celery, name: str) -> Any:
    value = app.conf.get(name)
    return DEFAULTS[name] if value is None else value


def redis_url(app: Celery) -> str:
    """The lock store's URL: ``unique_redis_url``, else the broker's when it is Redis.

    Raises :class:`ConfigurationError` for any other broker: guessing a server there
    (``localhost``) would put the locks where no one looks, or in a developer's Redis.
    """
    url = app.conf.get("unique_redis_url")
    if url:
        return str(url)
    broker = app.conf.broker_url
    if isinstance(broker, str) and broker.split("://", 1)[0] in ("redis", "rediss", "unix",
                                                                 "sentinel"):
        return broker
    raise ConfigurationError(
        f"celery-unique keeps its locks in Redis, and the broker"
        f" ({safe_url(broker) if isinstance(broker, str) else 'amqp, the default'}) is not"
        " Redis: set unique_redis_url (for example redis://localhost:6379/0)",
        option="unique_redis_url")


def safe_url(url: str) -> str:
    """The URL with its password masked, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


#: The shortest leases accepted, in seconds. A queueing lock's lease is whole milliseconds
#: (Redis' PX). A lock's lease is renewed every third of it by a thread that a garbage
#: collection, a loaded machine or a slow round trip can delay by tenths of a second:
#: below half a second, renewals would come too late to keep the lock (jobs would
#: overlap) while costing several calls a second per job.
FLOORS = {"queueing_lock_timeout": 0.001, "lock_timeout": 0.5, "debounce": 0.001,
          "debounce_max": 0.001,
          # Below a second, a publish slowed by a loaded machine or one reconnect could
          # outlast it, and a duplicate be queued beside a job still being published.
          "publish_lease": 1.0}


def check_timeout(value: Any, *, option: str, where: str) -> float:
    """A lease in seconds: a finite number, at least the option's floor (:data:`FLOORS`)."""
    floor = FLOORS[option.removeprefix("unique_")]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ConfigurationError(
            f"{where}: {option} must be a positive number of seconds, got {value!r}",
            option=option, value=value, where=where, floor=floor,
        )
    if value < floor:
        raise ConfigurationError(
            f"{where}: {option}={value!r} is below its floor of {floor} s"
            f" ({'whole milliseconds' if floor < 0.01 else 'renewals could not keep up'})",
            option=option, value=value, where=where, floor=floor,
        )
    return float(value)


def check_limit(value: Any, *, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{where}: lock_limit must be a positive integer, got {value!r}",
            option="lock_limit", value=value, where=where,
        )
    return value


@functools.lru_cache(maxsize=256)
def parse_rate(value: Any) -> tuple[int, int]:
    """``"10/s"`` (``N/s``, ``N/m``, ``N/h``, or a number: per second) as ``(10, 1000)``:
    the limit and its period in ms. Raises :class:`ConfigurationError`."""
    text = str(value).strip()
    count, _, unit = text.partition("/")
    try:
        limit = int(count)
    except ValueError:
        limit = 0
    if isinstance(value, bool) or limit < 1 or str(limit) != count.strip() or (
            unit and unit.strip() not in RATE_PERIODS):
        raise ConfigurationError(
            f"global_rate_limit must be a whole number of starts per period, as Celery's"
            f" rate_limit spells it ('10/s', '100/m', '1000/h'), got {value!r}",
            option="global_rate_limit", value=value)
    return limit, RATE_PERIODS[unit.strip() or "s"]


def check_bool(value: Any, *, option: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}: {option} must be True or False, got {value!r}",
                                 option=option, value=value, where=where)
    return value


def check_choice(value: Any, choices: Sequence[str], *, option: str, where: str) -> str:
    if value not in choices:
        raise ConfigurationError(
            f"{where}: {option} must be one of {', '.join(map(repr, choices))}, got {value!r}",
            option=option, value=value, where=where,
        )
    return str(value)


def check_settings(app: Celery) -> None:
    """Check the app-wide settings, so that a typo fails when tasks are created."""
    where = "Celery settings"
    if setting(app, "unique_global_rate_limit") is not None:
        parse_rate(setting(app, "unique_global_rate_limit"))
    for name, choices in (("unique_on_duplicate", ON_DUPLICATE),
                          ("unique_on_rate_limited", ON_RATE_LIMITED),
                          ("unique_queueing_lock_until", UNTIL),
                          ("unique_on_locked", ON_LOCKED),
                          ("unique_on_store_error", ON_STORE_ERROR)):
        check_choice(setting(app, name), choices, option=name, where=where)
    for name in ("unique_queueing_lock_timeout", "unique_lock_timeout",
                 "unique_publish_lease", "unique_debounce", "unique_debounce_max"):
        if setting(app, name) is not None:  # debounce: None is off
            check_timeout(setting(app, name), option=name, where=where)
    check_bool(setting(app, "unique_lock_check_at_enqueue"),
               option="unique_lock_check_at_enqueue", where=where)
    cluster = setting(app, "unique_redis_cluster")
    if not isinstance(cluster, bool):
        raise ConfigurationError(
            f"{where}: unique_redis_cluster must be True or False, got {cluster!r}",
            option="unique_redis_cluster", value=cluster, where=where,
        )
    metrics = setting(app, "unique_metrics")
    if not isinstance(metrics, bool) and not callable(metrics) and not callable(
            getattr(metrics, "get_meter", None)):
        raise ConfigurationError(
            f"{where}: unique_metrics must be True, False, an OpenTelemetry MeterProvider"
            f" or a callable returning one, got {metrics!r}",
            option="unique_metrics", value=metrics, where=where,
        )
    factory = setting(app, "unique_redis_client")
    if factory is not None and not callable(factory):
        raise ConfigurationError(
            f"{where}: unique_redis_client must be a callable taking the app, got {factory!r}",
            option="unique_redis_client", value=factory, where=where,
        )
    options = setting(app, "unique_redis_options")
    if options is not None and not isinstance(options, dict):
        raise ConfigurationError(
            f"{where}: unique_redis_options must be a dict, got {options!r}",
            option="unique_redis_options", value=options, where=where,
        )
