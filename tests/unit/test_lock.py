"""The execution lock in the caller (eager mode and ``apply``), against fakeredis."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery import Celery
from celery.states import REVOKED, SUCCESS

from celery_unique import ConfigurationError, LockHeld, UniqueTask
from celery_unique import signals as unique_signals


def lock_keys(client: Any) -> list[str]:
    return sorted(k.decode() for k in client.keys("*:l:*") if not k.endswith((b":seq", b":ran")))


def test_fence_increases_and_nothing_is_left(app: Celery, fake_redis: Any) -> None:
    @app.task(base=UniqueTask, lock="res_{x}", shared=False, bind=True)
    def t(self: Any, x: int) -> int:
        assert fake_redis.zcard("celery_unique:l:{res_1}:holders") == 1
        return int(self.request.lock_fence)

    fences = [t.apply((1,)).get() for _ in range(3)]
    assert fences == sorted(fences) and len(set(fences)) == 3
    assert lock_keys(fake_redis) == []


def test_string_lock_is_shared_between_tasks_true_is_per_task(app: Celery) -> None:
    @app.task(base=UniqueTask, lock="db-{x}", shared=False)
    def a(x: int) -> None: ...

    @app.task(base=UniqueTask, lock="db-{y}", shared=False)
    def b(y: int) -> None: ...

    @app.task(base=UniqueTask, lock=True, unique_on=["user_id"], shared=False)
    def charge(user_id: int, amount: int) -> None: ...

    def base(task: Any, *args: Any) -> str:
        return task._unique_defaults.lock(task.name, task._unique_lock, args, {}).base

    assert base(a, 1) == base(b, 1) == "celery_unique:l:{db-1}"
    scoped = f"celery_unique:l:{{{charge.name}:user_id=7}}"
    assert base(charge, 7, 10) == base(charge, 7, 99) == scoped


@pytest.mark.parametrize("options, match", [
    ({"lock": "x_{nope}"}, "nope"),
    ({"lock": "x", "on_locked": "wait"}, "on_locked"),
    ({"lock": "x", "lock_limit": 0}, "lock_limit"),
    ({"lock": "x", "lock_timeout": -1}, "lock_timeout"),
])
def test_bad_options_fail_when_the_task_is_created(
    app: Celery, options: dict[str, Any], match: str
) -> None:
    app.finalize()
    with pytest.raises(ConfigurationError, match=match):
        @app.task(base=UniqueTask, shared=False, **options)
        def t(x: int) -> None: ...


def test_bad_per_call_options_leave_nothing(app: Celery, fake_redis: Any) -> None:
    @app.task(base=UniqueTask, lock="x", shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match="lock_limit"):
        t.apply_async(lock_limit=0)
    assert fake_redis.keys("*") == []


def held_by_other(app: Celery, task: Any, base: str) -> Any:
    store = task._unique_store()
    assert store.acquire_lock(base, token="other", limit=1, lease_ms=60000, mode="order",
                              wait_ms=60000).grant == 1
    return store


def test_skip_in_the_caller(app: Celery, fake_redis: Any) -> None:
    @app.task(base=UniqueTask, lock="x", on_locked="skip", shared=False)
    def t() -> str:
        return "ran"

    events: list[str] = []

    def waiting(action: str = "", **_: Any) -> None:
        events.append(action)

    unique_signals.lock_waiting.connect(waiting, weak=False)
    try:
        held_by_other(app, t, "celery_unique:l:{x}")
        result = t.apply()
        # As on a worker: final, neither success nor failure, and get() says why.
        assert result.state == REVOKED
        with pytest.raises(LockHeld, match="held by other"):
            result.get()
        assert events == ["skipped"]
    finally:
        unique_signals.lock_waiting.disconnect(waiting)
    assert fake_redis.zrange("celery_unique:l:{x}:holders", 0, -1) == [b"other"]


def test_order_waits_in_the_caller_until_released(app: Celery, fake_redis: Any) -> None:
    @app.task(base=UniqueTask, lock="x", shared=False)
    def t() -> str:
        return "ran"

    store = held_by_other(app, t, "celery_unique:l:{x}")
    released = threading.Event()

    def release_soon() -> None:
        released.wait(0.2)
        store.release_lock("celery_unique:l:{x}", token="other", limit=1, lease_ms=60000)
        released.set()

    threading.Thread(target=release_soon).start()
    result = t.apply()
    assert released.is_set() and result.state == SUCCESS and result.get() == "ran"
    assert lock_keys(fake_redis) == []


@pytest.mark.parametrize("outcome", ["raise", "retry"])
def test_eager_failures_and_retries_leave_no_lock(
    app: Celery, fake_redis: Any, outcome: str
) -> None:
    app.conf.task_always_eager = True

    @app.task(base=UniqueTask, lock="x", queueing_lock="q", shared=False, bind=True,
              max_retries=2)
    def t(self: Any) -> None:
        if outcome == "retry":
            raise self.retry(countdown=0)
        raise RuntimeError("boom")

    with pytest.raises(Exception):  # noqa: B017 - RuntimeError or MaxRetriesExceeded
        t.apply_async().get()
    assert lock_keys(fake_redis) == [] and fake_redis.keys("*:q:*") == []


def test_order_enters_the_line_at_enqueue(app: Celery, fake_redis: Any) -> None:
    @app.task(base=UniqueTask, lock="x", queueing_lock="q_{n}", shared=False)
    def t(n: int) -> None: ...

    ids = [t.delay(n).id for n in range(3)]
    with pytest.raises(Exception, match="already queued"):
        t.delay(0)  # a duplicate never takes a place in line
    assert [i.decode() for i in fake_redis.zrange("celery_unique:l:{x}:line", 0, -1)] == ids
    t.apply_async((9,), countdown=5)  # takes its place when it reaches a worker
    assert fake_redis.zcard("celery_unique:l:{x}:line") == 3


def test_failed_publish_leaves_the_line(app: Celery, fake_redis: Any) -> None:
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    app.conf.broker_connection_timeout = 0.2
    app.conf.broker_transport_options = {"max_retries": 0}

    @app.task(base=UniqueTask, lock="x", shared=False)
    def t() -> None: ...

    with pytest.raises(Exception):  # noqa: B017 - the broker's error
        t.delay()
    assert lock_keys(fake_redis) == []


@pytest.mark.parametrize("option, value", [
    ("lock_timeout", 0.001),  # the 0 ms lease: 3 overlaps in 4 jobs
    ("lock_timeout", 0.49),
    ("queueing_lock_timeout", 0.0001),  # Redis' raw "invalid expire time" otherwise
])
def test_a_lease_below_its_floor_is_refused_naming_it(
    app: Celery, fake_redis: Any, option: str, value: float
) -> None:
    from celery_unique.settings import FLOORS

    app.finalize()
    with pytest.raises(ConfigurationError, match=rf"{option}={value} is below its floor of"
                       rf" {FLOORS[option]} s") as created:
        @app.task(base=UniqueTask, lock="x", queueing_lock="q", shared=False, **{option: value})
        def t() -> None: ...
    assert (created.value.option, created.value.value) == (option, value)

    @app.task(base=UniqueTask, lock="x", queueing_lock="q", shared=False)
    def u() -> None: ...

    with pytest.raises(ConfigurationError, match=rf"\(per call\): {option}={value} is below"):
        u.apply_async(**{option: value})
    assert fake_redis.keys("*") == []  # nothing taken, nothing published
    app.conf[f"unique_{option}"] = value  # the app-wide setting: checked at creation
    with pytest.raises(ConfigurationError, match=f"unique_{option}={value} is below"):
        @app.task(base=UniqueTask, lock="x", shared=False)
        def v() -> None: ...


def test_leases_at_their_floors_are_accepted(app: Celery) -> None:
    @app.task(base=UniqueTask, lock="x", queueing_lock="q", lock_timeout=0.5,
              queueing_lock_timeout=0.001, shared=False)
    def t() -> None: ...

    assert t.apply_async().id
