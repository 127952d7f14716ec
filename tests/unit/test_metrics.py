"""Metrics through OpenTelemetry: recorded where ``unique_metrics`` is on, nothing of it
imported where it is off."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from celery_unique import AlreadyQueued, ConfigurationError, UniqueTask


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Each metric's data points: (attributes, value: a sum, or a histogram's count)."""
    found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = [
                    (dict(p.attributes or {}), getattr(p, "value", getattr(p, "count", None)))
                    for p in metric.data.data_points]
    return found


def test_every_lock_event_is_counted_with_the_task_and_its_template(app: Celery) -> None:
    reader = InMemoryMetricReader()
    app.conf.unique_metrics = MeterProvider(metric_readers=[reader])

    @app.task(base=UniqueTask, queueing_lock="report_{email}", lock="mail_{email}",
              shared=False)
    def report(email: str) -> None: ...

    report.delay("a@example.com")
    with pytest.raises(AlreadyQueued):
        report.delay("a@example.com")
    report.apply(("b@example.com",))  # takes and releases its lock in this process
    found = points(reader)
    task = {"celery.task.name": report.name}
    queueing = {**task, "celery_unique.template": "report_{email}"}
    assert found["celery_unique.queueing_lock.taken"] == [(queueing, 1)]
    assert found["celery_unique.queueing_lock.refused"] == [
        ({**queueing, "celery_unique.action": "raised"}, 1)]
    lock = {**task, "celery_unique.template": "mail_{email}"}
    assert found["celery_unique.lock.acquired"] == [(lock, 1)]
    assert found["celery_unique.lock.released"] == [
        ({**lock, "celery_unique.reason": "success"}, 1)]
    assert found["celery_unique.lock.held"] == [(lock, 1)]  # one recorded hold time
    assert found["celery_unique.lock.wait"] == [(lock, 1)]  # it waited 0 s
    assert "celery_unique.lock.handover" not in found  # it took its lock itself


def test_a_factory_makes_a_provider_in_each_process_that_records(app: Celery) -> None:
    """A callable is called once per process, at its first event: a prefork worker's pool
    processes each make their own provider after the fork."""
    made: list[InMemoryMetricReader] = []

    def provider() -> MeterProvider:
        made.append(InMemoryMetricReader())
        return MeterProvider(metric_readers=[made[-1]])

    app.conf.unique_metrics = provider

    @app.task(base=UniqueTask, lock="f", shared=False)
    def job() -> None: ...

    assert made == []  # nothing made until something is recorded
    job.apply()
    job.apply()
    assert len(made) == 1
    assert points(made[0])["celery_unique.lock.acquired"][0][1] == 2


@pytest.mark.parametrize(("why", "reason"), [
    ("SUCCESS", "success"), ("job ended: FAILURE", "failure"), ("RETRY", "retry"),
    ("revoked or expired", "revoked"), ("worker lost", "killed"),
    ("hard time limit", "time_limit"), ("message dropped: KeyError", "dropped"),
    ("job started", "started"),
])
def test_releases_are_counted_under_a_closed_set_of_reasons(why: str, reason: str) -> None:
    from celery_unique.metrics import reason as reason_of

    assert reason_of(why) == reason


def test_a_skipped_job_is_counted_as_it_waited(app: Celery) -> None:
    reader = InMemoryMetricReader()
    app.conf.unique_metrics = MeterProvider(metric_readers=[reader])

    @app.task(base=UniqueTask, lock="res", on_locked="skip", shared=False, bind=True)
    def nested(self: UniqueTask) -> None:
        inner.apply()  # the same lock, held by this job: the inner one is skipped

    @app.task(base=UniqueTask, lock="res", on_locked="skip", shared=False)
    def inner() -> None: ...

    nested.apply()
    waited = points(reader)["celery_unique.lock.waited"]
    assert waited == [({"celery.task.name": inner.name, "celery_unique.template": "res",
                        "celery_unique.action": "skipped"}, 1)]


def test_a_bad_value_is_refused_when_tasks_are_created(app: Celery) -> None:
    app.conf.unique_metrics = "yes"

    @app.task(base=UniqueTask, lock="x", shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match="unique_metrics"):
        t.apply()  # the task is bound: its settings checked


def test_on_without_opentelemetry_says_which_extra_to_install(
    app: Celery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # not installed
    app.conf.unique_metrics = True

    @app.task(base=UniqueTask, lock="x", shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match=r"celery-unique\[metrics\]"):
        t.apply()
