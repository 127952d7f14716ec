"""The migration shims on a real worker (prefork): celery-singleton's and celery-once's
behaviour, with the fixes kept: a revoked, failed or killed job frees its lock, and a
retry keeps it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from celery_unique.compat import AlreadyQueued
from celery_unique.testing import wait_for

pytestmark = pytest.mark.acceptance


def token() -> str:
    return uuid.uuid4().hex[:12]


def single_keys(store: redis.Redis, t: str) -> list[bytes]:
    return store.keys(f"celery_unique:q:{{acceptance.single:*{t}*")


def test_singleton_returns_the_running_job_then_a_new_one(
    tasks: Any, store: Any, coord: Any
) -> None:
    t = token()
    first = tasks.single.delay(t)
    assert tasks.single.delay(t).id == first.id  # queued
    wait_for(lambda: coord.get(f"started:{t}"), timeout=20, what="the job to start")
    assert tasks.single.delay(t).id == first.id  # running
    coord.set(f"go:{t}", 1)
    assert first.get(timeout=20) == t
    wait_for(lambda: not single_keys(store, t), timeout=10, what="the lock to be released")
    second = tasks.single.delay(t)
    assert second.id != first.id and second.get(timeout=20) == t


@pytest.mark.parametrize("outcome", ["fail", "kill", "revoke"])
def test_singleton_frees_its_lock_on_every_end(
    tasks: Any, store: Any, coord: Any, outcome: str
) -> None:
    """celery-singleton never released on a revoke or a killed process: its lock stayed
    until the expiry (by default: never)."""
    t = token()
    if outcome == "revoke":
        result = tasks.single.apply_async((t,), countdown=1)
        result.revoke()
    else:
        result = tasks.single.delay(t, outcome)
    assert single_keys(store, t)
    coord.set(f"go:{t}", 1)  # after: a job let go at once may end before the check
    wait_for(lambda: not single_keys(store, t), timeout=30,
             what=f"the lock to be released ({outcome})")
    assert tasks.single.delay(t).id != result.id


def test_queueonce_retry_keeps_its_lock(tasks: Any, store: Any, coord: Any) -> None:
    """celery-once took no lock for a retry: a duplicate got in during the countdown."""
    t = token()
    result = tasks.once_retry.delay(t)
    wait_for(lambda: coord.llen(f"runs:{t}") == 1, timeout=20, what="the first run")
    with pytest.raises(AlreadyQueued) as info:  # during the retry's countdown
        tasks.once_retry.delay(t, n=1)
    # The lease: default_timeout (60 s) plus the retry's countdown (1.5 s).
    assert info.value.task_id == result.id and 0 < info.value.countdown <= 61.5
    coord.set(f"go:{t}", 1)
    assert result.get(timeout=20) == 1
    wait_for(lambda: not store.exists(info.value.key), timeout=10, what="the release")
    tasks.once_retry.delay(t)  # free again
