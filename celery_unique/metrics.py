"""Metrics of the locks' events through OpenTelemetry's metrics API.

Install ``celery-unique[metrics]`` and set ``unique_metrics``: ``True`` records through
the global meter provider (the one your OpenTelemetry SDK and exporter set up), a
``MeterProvider`` of the app's own, or a callable making one, called once in each process
that records (a prefork worker's pool processes each make their own, after the fork). Off
(the default), this module is not imported: no instrument is made and nothing is recorded
(celery-unique imports nothing of OpenTelemetry; redis-py 8 does when it is installed).

:class:`Metrics` is the app's :class:`~celery_unique.state.Recorder`: the enqueue path and
the worker call it where each event happens (the caller for its queueing locks, the pool
process for a job's lock, the worker's main process for jobs that ended there and for its
sweep). Every data point carries the task's name (``celery.task.name``) and the lock's
template as the task declares it (``celery_unique.template``), never a rendered key, so
that the number of series stays bounded. See the reference's *Metrics* for the list.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Celery

from .exceptions import ConfigurationError
from .keys import CompiledSpec
from .state import Recorder, app_state

__all__ = ["Instruments", "Metrics", "enable", "reason"]

TASK = "celery.task.name"
TEMPLATE = "celery_unique.template"

#: The counters: attribute -> (name, unit, description). Names follow OpenTelemetry's
#: conventions (the reference's *Metrics* lists them with their attributes).
COUNTERS: dict[str, tuple[str, str, str]] = {
    "refused": ("celery_unique.queueing_lock.refused", "{job}",
                "Enqueues refused because the queueing lock was held (by action)"),
    "queued": ("celery_unique.queueing_lock.taken", "{job}",
               "Enqueues that took their queueing lock"),
    "dequeued": ("celery_unique.queueing_lock.released", "{job}",
                 "Jobs that released their queueing lock (by reason)"),
    "acquired": ("celery_unique.lock.acquired", "{job}",
                 "Jobs that took their execution lock"),
    "waited": ("celery_unique.lock.waited", "{job}",
               "Jobs that found their lock held (by action: parked, retry, skipped)"),
    "handed": ("celery_unique.lock.handed_over", "{job}",
               "Parked jobs handed the lock and published again (by what handed it)"),
    "released": ("celery_unique.lock.released", "{job}",
                 "Jobs that released their lock (by reason)"),
    "lost": ("celery_unique.lock.lost", "{job}", "Running jobs whose lease was found lost"),
    "store_errors": ("celery_unique.store.errors", "{error}",
                     "Lock store outages met (by where, and what was done)"),
    "expired": ("celery_unique.sweep.expired", "{entry}",
                "Leases run out and places given up, found by the workers' sweep (by kind)"),
}

#: The histograms: attribute -> (name, description), all in seconds.
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "held": ("celery_unique.lock.held",
             "How long a job held its lock, from taking it to releasing it"),
    "wait": ("celery_unique.lock.wait",
             "How long a job waited for its lock, from taking its place in line (or first"
             " asking) to being granted it"),
    "handover": ("celery_unique.lock.handover",
                 "From a release (or the sweep) handing a parked job the lock to that job's"
                 " start"),
}

#: Bucket boundaries (s) for the histograms: from a hand-over's milliseconds to an
#: hour's wait (OpenTelemetry's defaults are made for milliseconds).
BOUNDARIES = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

#: How a job's end or a release is reported (``celery_unique.reason``): Celery's states
#: and the worker's own ends, in a closed set of words.
_REASONS = {
    "SUCCESS": "success", "FAILURE": "failure", "RETRY": "retry", "REVOKED": "revoked",
    "IGNORED": "ignored", "REJECTED": "rejected", "revoked or expired": "revoked",
    "terminated": "revoked", "worker lost": "killed", "hard time limit": "time_limit",
    "job started": "started", "lock taken": "started", "publish failed": "not_published",
}


def reason(why: str) -> str:
    """The reason a release is counted under, from a state or the releaser's sentence."""
    if why.startswith("job ended: "):
        why = why[len("job ended: "):]
    if why.startswith("message dropped"):
        return "dropped"
    return _REASONS.get(why, why.lower().replace(" ", "_"))


class Instruments:
    """The meter ``celery_unique`` of one meter provider, and its instruments."""

    refused: Any
    queued: Any
    dequeued: Any
    acquired: Any
    waited: Any
    handed: Any
    released: Any
    lost: Any
    store_errors: Any
    expired: Any
    held: Any
    wait: Any
    handover: Any

    def __init__(self, provider: Any) -> None:
        from . import __version__

        self.provider = provider
        meter = provider.get_meter("celery_unique", __version__)
        for attribute, (name, unit, description) in COUNTERS.items():
            setattr(self, attribute, meter.create_counter(name, unit=unit,
                                                          description=description))
        for attribute, (name, description) in HISTOGRAMS.items():
            try:  # opentelemetry-api >= 1.23 takes the boundaries as advice
                histogram = meter.create_histogram(
                    name, unit="s", description=description,
                    explicit_bucket_boundaries_advisory=list(BOUNDARIES))
            except TypeError:
                histogram = meter.create_histogram(name, unit="s", description=description)
            setattr(self, attribute, histogram)


class Metrics(Recorder):
    """The app's recorder with metrics on: its instruments, made in each process that
    records (from ``source``: a provider, or a callable making one per process)."""

    __slots__ = ("_attributes", "_instruments", "_pid", "_since", "source")

    def __init__(self, source: Any) -> None:
        self.source = source
        self._instruments: Instruments | None = None
        self._pid = 0
        #: (task name, spec attribute) -> the data points' attributes.
        self._attributes: dict[tuple[str, str], dict[str, str]] = {}
        #: When each job still holding its lock in this process took it (monotonic).
        self._since: dict[str, float] = {}

    def instruments(self) -> Instruments:
        """This process's instruments (a factory's provider is made again after a fork)."""
        made = self._instruments
        if made is not None and (self._pid == os.getpid() or hasattr(self.source,
                                                                       "get_meter")):
            return made
        with _made:
            source = self.source
            provider = source if hasattr(source, "get_meter") else source()
            self._instruments, self._pid = Instruments(provider), os.getpid()
            self._since.clear()
            return self._instruments

    def _of(self, sender: Any, spec: str, **more: str) -> dict[str, str]:
        if sender is None:  # the worker's sweep: no task
            return more
        name = sender if isinstance(sender, str) else str(getattr(sender, "name", ""))
        attributes = self._attributes.get((name, spec))
        if attributes is None:
            attributes = self._attributes[(name, spec)] = {
                TASK: name, TEMPLATE: template(getattr(sender, spec, None))}
        return {**attributes, **more} if more else attributes

    # -- the caller's queueing locks -----------------------------------------------------

    def refused(self, sender: Any, action: str) -> None:
        self.instruments().refused.add(1, self._of(sender, _QUEUEING,
                                                   **{"celery_unique.action": action}))

    def queued(self, sender: Any) -> None:
        self.instruments().queued.add(1, self._of(sender, _QUEUEING))

    def dequeued(self, sender: Any, why: str) -> None:
        self.instruments().dequeued.add(1, self._of(sender, _QUEUEING, **{
            "celery_unique.reason": reason(why)}))

    # -- a job's lock ----------------------------------------------------------------------

    def acquired(self, sender: Any, token: str, placed_ms: int, handed_ms: int) -> None:
        m, attributes = self.instruments(), self._of(sender, _LOCK)
        self._since[token] = time.monotonic()
        m.acquired.add(1, attributes)
        handed = max(handed_ms, 0) / 1000
        if handed_ms >= 0:
            m.handover.record(handed, attributes)
        # Wall clocks (the caller's, when it took the place at enqueue): a hand-over is
        # the store's clock, taken out of the wait.
        waited = time.time() - placed_ms / 1000 - handed if placed_ms else 0.0
        m.wait.record(max(waited, 0.0), attributes)

    def waited(self, sender: Any, action: str) -> None:
        self.instruments().waited.add(1, self._of(sender, _LOCK,
                                                  **{"celery_unique.action": action}))

    def handed(self, sender: Any, by: str, count: int) -> None:
        if count:
            self.instruments().handed.add(count, self._of(sender, _LOCK,
                                                          **{"celery_unique.by": by}))

    def released(self, sender: Any, token: str, why: str) -> None:
        m, attributes = self.instruments(), self._of(sender, _LOCK)
        m.released.add(1, {**attributes, "celery_unique.reason": reason(why)})
        since = self._since.pop(token, None)
        if since is not None:
            m.held.record(time.monotonic() - since, attributes)

    def lost(self, sender: Any, token: str) -> None:
        self._since.pop(token, None)
        self.instruments().lost.add(1, self._of(sender, _LOCK))

    # -- the store and the sweep -----------------------------------------------------------

    def store_error(self, sender: Any, where: str, action: str) -> None:
        spec = _QUEUEING if where == "enqueue" else _LOCK
        self.instruments().store_errors.add(1, self._of(sender, spec, **{
            "celery_unique.where": where, "celery_unique.action": action}))

    def swept(self, expired: int, dropped: int) -> None:
        m = self.instruments()
        for kind, count in (("lease", expired), ("place", dropped)):
            if count:
                m.expired.add(count, {"celery_unique.kind": kind})


_QUEUEING, _LOCK = "_unique_queueing", "_unique_lock"
_made = threading.Lock()
_providers: dict[int, Metrics] = {}  # one recorder per provider (or factory), per process


def template(spec: CompiledSpec | None) -> str:
    """A lock's template as the task declares it: never a rendered key."""
    source = getattr(spec, "source", None)
    if isinstance(source, str):
        return source
    if callable(source):
        return str(getattr(source, "__qualname__", source))
    if isinstance(source, (list, tuple)):
        return ",".join(map(str, source))
    return "" if source is None else str(source)


def enable(app: Celery, source: Any) -> None:
    """Record ``app``'s lock events through ``source`` (``True``: the global provider)."""
    if source is True:
        try:
            from opentelemetry import metrics as otel
        except ImportError:
            raise ConfigurationError(
                "Celery settings: unique_metrics is on, but opentelemetry-api is not"
                " installed: pip install 'celery-unique[metrics]'",
                option="unique_metrics", value=True, where="Celery settings") from None
        source = otel.get_meter_provider()
    with _made:
        metrics = _providers.get(id(source))
        if metrics is None:
            metrics = _providers[id(source)] = Metrics(source)
    app_state(app).metrics = metrics
