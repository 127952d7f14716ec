from __future__ import annotations

import pickle

import pytest

import celery_unique
from celery_unique import (
    AlreadyEnqueued,
    AlreadyQueued,
    CeleryUniqueError,
    ConfigurationError,
    KeyBuildError,
    LockStoreUnavailable,
    Replaced,
)


@pytest.mark.parametrize("exc", [
    AlreadyQueued("dup", key="k", task_id="id", ttl=1.5, task_name="t"),
    ConfigurationError("bad", option="on_duplicate", value="x", where="t"),
    KeyBuildError("bad key", task="t", option="queueing_lock"),
    LockStoreUnavailable("down", url="redis://x"),
    Replaced.of("t", "k", "old", "new"),
    CeleryUniqueError(),
])
def test_exceptions_pickle_with_context(exc: CeleryUniqueError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.context == exc.context
    for name, value in exc.context.items():
        assert getattr(copy, name) == value


def test_a_replaced_jobs_error_keeps_its_context_through_a_json_result_backend() -> None:
    from celery import Celery

    backend = Celery(set_as_current=False, backend="cache+memory://").backend
    exc = Replaced.of("t", "k", "old", "new")
    copy = backend.exception_to_python(backend.prepare_exception(exc, "json"))
    assert type(copy) is Replaced and str(copy) == str(exc)
    assert (copy.key, copy.task_id, copy.replaced_by) == ("k", "old", "new")


def test_hierarchy_and_defaults() -> None:
    assert AlreadyEnqueued is AlreadyQueued
    for cls in (AlreadyQueued, ConfigurationError, KeyBuildError, LockStoreUnavailable):
        assert issubclass(cls, CeleryUniqueError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(LockStoreUnavailable, ConnectionError)
    assert str(AlreadyQueued()) == "A job holding the same queueing lock is already queued."


def test_public_names() -> None:
    assert set(celery_unique.__all__) >= {
        "UniqueTask", "AlreadyQueued", "AlreadyEnqueued", "CeleryUniqueError"}
