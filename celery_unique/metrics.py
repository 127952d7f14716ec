"""Metrics of the locks' events through OpenTelemetry's metrics API.

Install ``celery-unique[metrics]`` and set ``unique_metrics``: ``True`` records through
the global meter provider (the one your OpenTelemetry SDK and exporter set up), or give a
``MeterProvider`` of the app's own. Off (the default), this module is not imported: no
instrument is made, no receiver listens to the signals and nothing is recorded
(celery-unique imports nothing of OpenTelemetry; redis-py 8 does when it is installed).

The instruments (meter ``celery_unique``) are fed by celery-unique's own signals, in the
process where each event happens (the caller for refused duplicates, the worker's pool
process for a lock's events). Every data point carries the task's name
(``celery.task.name``) and the lock's template as the task declares it
(``celery_unique.template``), never a rendered key, so that the number of series stays
bounded. See the reference's *Metrics* for the list.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from . import signals
from .exceptions import ConfigurationError
from .keys import CompiledSpec
from .state import app_state

__all__ = ["Instruments", "enable", "instruments_of"]

TASK = "celery.task.name"
TEMPLATE = "celery_unique.template"


#: The counters: attribute -> (name, unit, description). Names follow OpenTelemetry's
#: conventions (the reference's *Metrics* lists them with their attributes).
COUNTERS: dict[str, tuple[str, str, str]] = {
    "refused": ("celery_unique.queueing_lock.refused", "{job}",
                "Enqueues refused because the queueing lock was held (by action)"),
    "acquired": ("celery_unique.lock.acquired", "{job}",
                 "Jobs that took their execution lock"),
    "waited": ("celery_unique.lock.waited", "{job}",
               "Jobs that found their lock held (by action: parked, retry, skipped)"),
    "released": ("celery_unique.lock.released", "{job}",
                 "Jobs that released their lock (by end state)"),
    "lost": ("celery_unique.lock.lost", "{job}", "Running jobs whose lease was found lost"),
    "store_errors": ("celery_unique.store.errors", "{error}",
                     "Lock store outages a job went on through (on_store_error=allow)"),
}


class Instruments:
    """The meter ``celery_unique`` of one meter provider, and its instruments."""

    refused: Any
    acquired: Any
    waited: Any
    released: Any
    lost: Any
    store_errors: Any

    def __init__(self, provider: Any) -> None:
        from . import __version__

        meter = provider.get_meter("celery_unique", __version__)
        for attribute, (name, unit, description) in COUNTERS.items():
            setattr(self, attribute, meter.create_counter(name, unit=unit,
                                                          description=description))
        self.held = meter.create_histogram(
            "celery_unique.lock.held", unit="s",
            description="How long a job held its lock, from taking it to releasing it")
        #: When each job still holding its lock in this process took it (monotonic).
        self.since: dict[str, float] = {}


_providers: dict[int, Instruments] = {}  # one meter per provider, per process
_connected = threading.Lock()
_receivers: list[Callable[..., None]] = []


def enable(app: Celery, provider: Any) -> None:
    """Record ``app``'s lock events through ``provider`` (``True``: the global one)."""
    if provider is True:
        try:
            from opentelemetry import metrics as otel
        except ImportError:
            raise ConfigurationError(
                "Celery settings: unique_metrics is on, but opentelemetry-api is not"
                " installed: pip install 'celery-unique[metrics]'",
                option="unique_metrics", value=True, where="Celery settings") from None
        provider = otel.get_meter_provider()
    with _connected:
        instruments = _providers.get(id(provider))
        if instruments is None:
            instruments = _providers[id(provider)] = Instruments(provider)
        app_state(app).metrics = instruments
        if not _receivers:
            _connect()


def instruments_of(sender: Any) -> Instruments | None:
    """The instruments of the app of ``sender`` (a task), if its metrics are on."""
    app = getattr(sender, "app", None)
    if app is None:  # a message no task took: its task's name alone
        return next(iter(_providers.values()), None) if len(_providers) == 1 else None
    metrics: Instruments | None = app_state(app).metrics
    return metrics


def _template(spec: CompiledSpec | None) -> str:
    source = getattr(spec, "source", None)
    if isinstance(source, str):
        return source
    if callable(source):
        return str(getattr(source, "__qualname__", source))
    if isinstance(source, (list, tuple)):
        return ",".join(map(str, source))
    return "" if source is None else str(source)


def _attributes(sender: Any, spec: str, **more: str) -> dict[str, str]:
    name = sender if isinstance(sender, str) else str(getattr(sender, "name", ""))
    return {TASK: name, TEMPLATE: _template(getattr(sender, spec, None)), **more}


def _refused(sender: Any = None, action: str = "", **_: Any) -> None:
    m = instruments_of(sender)
    if m is not None:
        m.refused.add(1, _attributes(sender, "_unique_queueing",
                                     **{"celery_unique.action": action}))


def _acquired(sender: Any = None, task_id: str = "", **_: Any) -> None:
    m = instruments_of(sender)
    if m is not None:
        m.since[task_id] = time.monotonic()
        m.acquired.add(1, _attributes(sender, "_unique_lock"))


def _waited(sender: Any = None, action: str = "", **_: Any) -> None:
    m = instruments_of(sender)
    if m is not None:
        m.waited.add(1, _attributes(sender, "_unique_lock",
                                    **{"celery_unique.action": action}))


def _released(sender: Any = None, task_id: str = "", state: str = "", **_: Any) -> None:
    m = instruments_of(sender)
    if m is None:
        return
    attributes = _attributes(sender, "_unique_lock")
    m.released.add(1, {**attributes, "celery.task.state": str(state)})
    since = m.since.pop(task_id, None)
    if since is not None:
        m.held.record(time.monotonic() - since, attributes)


def _lost(sender: Any = None, task_id: str = "", **_: Any) -> None:
    m = instruments_of(sender)
    if m is not None:
        m.since.pop(task_id, None)
        m.lost.add(1, _attributes(sender, "_unique_lock"))


def _store_error(sender: Any = None, where: str = "", **_: Any) -> None:
    m = instruments_of(sender)
    if m is not None:
        m.store_errors.add(1, {**_attributes(sender, "_unique_lock"),
                               "celery_unique.where": where})


def _connect() -> None:
    for signal, receiver in ((signals.duplicate_rejected, _refused),
                             (signals.lock_acquired, _acquired),
                             (signals.lock_waiting, _waited),
                             (signals.lock_released, _released),
                             (signals.lock_lost, _lost),
                             (signals.store_unavailable, _store_error)):
        signal.connect(receiver, weak=False)
        _receivers.append(receiver)
