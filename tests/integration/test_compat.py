"""The migration shims against a real Redis: celery-once's and celery-singleton's
documented behaviour (options, defaults, exceptions, return values, settings), and the
fixes they keep (a retry keeps its lock, every end of a job releases it)."""

from __future__ import annotations

import pickle
import time
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from celery.states import REJECTED, SUCCESS

import celery_unique
from celery_unique import ConfigurationError
from celery_unique.compat import (
    AlreadyQueued,
    DuplicateTaskError,
    QueueOnce,
    Singleton,
    clear_locks,
)


def make_app(**conf: Any) -> Celery:
    app = Celery(f"compat-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_publish_retry=False, **conf)
    return app


@pytest.fixture
def store_url(unique_redis_url: str) -> str:
    """The locks' database: the plugin's, flushed before and after each test."""
    return unique_redis_url


@pytest.fixture
def db(store_url: str) -> redis.Redis:
    return redis.Redis.from_url(store_url)


def once_app(url: str, **settings: Any) -> Celery:
    return make_app(ONCE={"backend": "celery_once.backends.Redis",
                          "settings": {"url": url, "default_timeout": 60, **settings}})


# -- celery-once ---------------------------------------------------------------------

def test_once_configuration_and_defaults(store_url: str, db: redis.Redis) -> None:
    app = once_app(store_url)

    @app.task(base=QueueOnce, shared=False)
    def example(a: int, b: int = 2) -> int:
        return a + b

    assert example.config is app.conf
    assert example.once_config["settings"]["default_timeout"] == 60
    assert example.default_timeout == 60
    assert app.conf.unique_redis_url == store_url  # ONCE's url is the lock store
    assert example.queueing_lock_until == "finished"  # held until the job has run
    example.delay(1)
    key = example.get_key((1,))
    assert key == example.get_key(kwargs={"a": 1, "b": 2})  # bound like a call
    assert 59_000 < db.pttl(key) <= 60_000
    assert example.get_key((1, 3)) != key  # every argument counts by default


def test_once_duplicate_raises_its_alreadyqueued(store_url: str) -> None:
    app = once_app(store_url)

    @app.task(base=QueueOnce, shared=False)
    def example(a: int) -> int:
        return a

    first = example.delay(1)
    with pytest.raises(AlreadyQueued) as caught:
        example.delay(1)
    err = caught.value
    assert isinstance(err, celery_unique.AlreadyQueued)
    assert 59 < err.countdown <= 60 and err.message == f"Expires in {err.countdown} seconds"
    assert err.task_id == first.id and err.key == example.get_key((1,))
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.countdown, again.message, again.task_id) == (
        AlreadyQueued, err.countdown, err.message, err.task_id)
    assert AlreadyQueued(30).countdown == 30  # celery-once's own constructor
    assert AlreadyQueued(30).message == "Expires in 30 seconds"
    example.delay(2)  # other arguments: another lock


def test_once_keys_timeout_and_graceful(store_url: str, db: redis.Redis) -> None:
    app = once_app(store_url)

    @app.task(base=QueueOnce, shared=False, once={"keys": ["a"], "timeout": 120})
    def by_a(a: int, b: int) -> int:
        return a + b

    @app.task(base=QueueOnce, shared=False, once={"graceful": True, "keys": []})
    def graceful() -> None: ...

    by_a.delay(1, 2)
    assert 119_000 < db.pttl(by_a.get_key((1, 2))) <= 120_000
    with pytest.raises(AlreadyQueued):
        by_a.delay(1, 3)  # only ``a`` counts
    by_a.apply_async((2, 2), once={"timeout": 5})
    assert 4_000 < db.pttl(by_a.get_key((2, 2))) <= 5_000
    rejected = by_a.apply_async((1, 9), once={"graceful": True})
    assert (rejected.state, rejected.result) == (REJECTED, None)
    graceful.delay()
    assert graceful.delay().state == REJECTED  # from the decorator
    with pytest.raises(AlreadyQueued):  # per call beats the decorator
        graceful.apply_async(once={"graceful": False})
    assert sorted(db.keys("*")) == sorted(
        k.encode() for k in (by_a.get_key((1, 0)), by_a.get_key((2, 0)), graceful.get_key()))


def test_once_blocking_waits_for_the_lock(store_url: str) -> None:
    app = once_app(store_url, blocking=True, blocking_timeout=2)

    @app.task(base=QueueOnce, shared=False)
    def example(a: int) -> None: ...

    example.apply_async((1,), once={"timeout": 0.3})
    start = time.monotonic()
    example.delay(1)  # waits for the first lock to expire, then takes it
    waited = time.monotonic() - start
    assert 0.1 < waited < 2
    start = time.monotonic()
    with pytest.raises(AlreadyQueued):  # held for an hour: gives up after 2 s
        example.delay(1)
    assert 1.9 < time.monotonic() - start < 5
    no_wait = once_app(store_url)

    @no_wait.task(base=QueueOnce, shared=False, name=example.name)
    def same(a: int) -> None: ...

    start = time.monotonic()
    with pytest.raises(AlreadyQueued):
        same.delay(1)
    assert time.monotonic() - start < 0.5  # blocking is off by default


def test_once_unlock_before_run_and_every_end_releases(store_url: str, db: redis.Redis
                                                      ) -> None:
    app = once_app(store_url)
    app.conf.task_always_eager = True
    seen: dict[str, Any] = {}

    @app.task(base=QueueOnce, shared=False, once={"unlock_before_run": True}, bind=True)
    def early(self: Any) -> None:
        seen["early"] = db.exists(self.get_key())

    @app.task(base=QueueOnce, shared=False, bind=True)
    def late(self: Any, fail: bool = False) -> None:
        seen["late"] = db.exists(self.get_key((fail,)))
        if fail:
            raise RuntimeError("boom")

    assert early.queueing_lock_until == "started"
    early.delay()
    late.delay()
    assert seen == {"early": 0, "late": 1}
    assert late.delay(True).state == "FAILURE"
    assert db.keys("*") == []  # released after success and after failure


def test_once_a_retry_keeps_its_lock(store_url: str, db: redis.Redis) -> None:
    """celery-once skips the lock for every retry, so a duplicate got in meanwhile: the
    shim keeps the fixed behaviour, the lock held across the retry."""
    app = once_app(store_url)
    app.conf.task_always_eager = True
    during: list[Any] = []

    @app.task(base=QueueOnce, shared=False, bind=True, max_retries=1, default_retry_delay=0)
    def flaky(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry()
        try:
            flaky.apply_async()  # a duplicate sent during the retry
        except AlreadyQueued as exc:
            during.append(exc)
        return "done"

    assert flaky.delay().get() == "done"
    assert len(during) == 1 and db.keys("*") == []


def test_once_backends_that_are_not_redis_are_refused(store_url: str) -> None:
    file_app = make_app(ONCE={"backend": "celery_once.backends.File",
                              "settings": {"location": "/tmp/once"}})

    @file_app.task(base=QueueOnce, shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match="Redis only"):  # when Celery creates it
        file_app.finalize()
    other = make_app(ONCE={"backend": "mine.Memcached", "settings": {}})

    @other.task(base=QueueOnce, shared=False)
    def u() -> None: ...

    with pytest.raises(ConfigurationError, match="not supported"):
        other.finalize()
    unix = once_app("redis+socket:///var/run/redis.sock?db=2")

    @unix.task(base=QueueOnce, shared=False)
    def v() -> None: ...

    v._unique_check_call({})
    assert unix.conf.unique_redis_url == "unix:///var/run/redis.sock?db=2"


# -- celery-singleton ----------------------------------------------------------------

def test_singleton_returns_the_existing_job(store_url: str) -> None:
    app = make_app(result_backend=store_url)  # the result backend is Redis: the store

    @app.task(base=Singleton, shared=False)
    def simple(*args: Any) -> Any:
        return args

    results = [simple.apply_async(args=[1, 2, 3]) for _ in range(10)]
    assert {r.id for r in results} == {results[0].id}
    assert len({simple.delay(i).id for i in range(5)}) == 5
    assert app.conf.unique_redis_url == store_url
    assert simple._raise_on_duplicate is False


def test_singleton_raise_on_duplicate(store_url: str) -> None:
    app = make_app(singleton_backend_url=store_url)

    @app.task(base=Singleton, shared=False, raise_on_duplicate=True)
    def strict(x: int) -> None: ...

    first = strict.delay(1)
    with pytest.raises(DuplicateTaskError) as caught:
        strict.delay(1)
    err = caught.value
    assert err.task_id == first.id and isinstance(err, celery_unique.AlreadyQueued)
    assert str(err) == f"Attempted to queue a duplicate of task ID {first.id}"
    assert pickle.loads(pickle.dumps(err)).task_id == first.id
    assert DuplicateTaskError("x", task_id="abc").task_id == "abc"  # its own constructor
    app_wide = make_app(singleton_backend_url=store_url, singleton_raise_on_duplicate=True)

    @app_wide.task(base=Singleton, shared=False)
    def by_setting(x: int) -> None: ...

    @app_wide.task(base=Singleton, shared=False, raise_on_duplicate=False)
    def by_task(x: int) -> None: ...

    assert by_setting._raise_on_duplicate is True
    assert by_task._raise_on_duplicate is False  # the task's option beats the setting
    by_task.delay(1)
    assert by_task.delay(1).id  # an AsyncResult, not an error


def test_singleton_unique_on(store_url: str) -> None:
    app = make_app(singleton_backend_url=store_url)

    @app.task(base=Singleton, shared=False, unique_on=["a", "c"])
    def on_a_c(a: int, b: int, c: int, d: int = 4) -> None: ...

    @app.task(base=Singleton, shared=False, unique_on="c")
    def on_c(a: int, b: int = 2, c: int = 3) -> None: ...

    @app.task(base=Singleton, shared=False, unique_on=[])
    def on_name(a: int) -> None: ...

    assert on_a_c.delay(2, 3, 4, 5).id == on_a_c.delay(2, 9, 4, d=9).id
    assert on_a_c.delay(2, 3, 5).id != on_a_c.delay(2, 3, 4).id
    assert on_c.delay(1, c=7).id == on_c.delay(2, b=5, c=7).id
    assert on_name.delay(1).id == on_name.delay(2).id


def test_singleton_lock_expiry_key_prefix_and_clear_locks(store_url: str, db: redis.Redis
                                                         ) -> None:
    app = make_app(singleton_backend_url=store_url, singleton_lock_expiry=30)

    @app.task(base=Singleton, shared=False, lock_expiry=10)
    def by_task(x: int) -> None: ...

    @app.task(base=Singleton, shared=False)
    def by_setting(x: int) -> None: ...

    by_task.delay(1)
    by_setting.delay(1)
    ttls = sorted(db.pttl(k) for k in db.keys("*"))
    assert 9_000 < ttls[0] <= 10_000 and 29_000 < ttls[1] <= 30_000
    assert clear_locks(app) == 2 and db.keys("*") == []
    prefixed = make_app(singleton_backend_url=store_url, singleton_key_prefix="lock_prefix")

    @prefixed.task(base=Singleton, shared=False)
    def mine(x: int) -> None: ...

    for i in range(5):
        mine.delay(i)
    keys = db.keys("*")
    assert len(keys) == 5 and all(k.startswith(b"lock_prefix:q:{") for k in keys)
    assert all(0 < db.pttl(k) <= 3_600_000 for k in keys)  # never without a lease
    assert clear_locks(prefixed) == 5 and db.keys("*") == []


def test_singleton_store_url_fallbacks(store_url: str) -> None:
    explicit = make_app(singleton_backend_url=store_url, result_backend="redis://elsewhere/0")

    @explicit.task(base=Singleton, shared=False)
    def a() -> None: ...

    a._unique_check_call({})
    assert explicit.conf.unique_redis_url == store_url
    not_redis = make_app(result_backend="cache+memory://")

    @not_redis.task(base=Singleton, shared=False)
    def b() -> None: ...

    b._unique_check_call({})
    assert not not_redis.conf.get("unique_redis_url")  # the broker, as this package does
    ours = make_app(unique_redis_url=store_url, singleton_backend_url="redis://other/1")

    @ours.task(base=Singleton, shared=False)
    def c() -> None: ...

    c._unique_check_call({})
    assert ours.conf.unique_redis_url == store_url  # this package's own setting wins


@pytest.mark.parametrize("shim", ["once", "singleton"])
def test_one_job_per_call_however_it_is_spelled(store_url: str, shim: str) -> None:
    """The migration guides' difference: keyed on the bound arguments, defaults filled
    in, where the originals keyed on the call's spelling and queued two."""
    app = once_app(store_url) if shim == "once" else make_app(singleton_backend_url=store_url)

    @app.task(base=QueueOnce if shim == "once" else Singleton, shared=False)
    def add(a: int, b: int = 2) -> int:
        return a + b

    for first, second in (((5, 6), {"a": 5, "b": 6}), ((7,), {"a": 7, "b": 2})):
        queued = add.apply_async(first)
        if shim == "once":
            with pytest.raises(AlreadyQueued):
                add.apply_async(kwargs=second)
        else:
            assert add.apply_async(kwargs=second).id == queued.id  # the job queued


def test_singleton_json_encoder_class_is_refused_not_ignored(store_url: str) -> None:
    app = make_app(singleton_backend_url=store_url,
                   singleton_json_encoder_class="myapp.encoders.Encoder")

    @app.task(base=Singleton, shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match="singleton_json_encoder_class") as info:
        app.finalize()
    assert info.value.option == "singleton_json_encoder_class"


def test_singleton_released_after_success_and_failure(store_url: str, db: redis.Redis
                                                     ) -> None:
    app = make_app(singleton_backend_url=store_url, task_always_eager=True)

    @app.task(base=Singleton, shared=False)
    def job(fail: bool) -> str:
        assert len(db.keys("*")) == 1  # held while it runs
        if fail:
            raise RuntimeError("boom")
        return "ok"

    first, second = job.delay(False), job.delay(False)
    assert first.id != second.id and first.state == second.state == SUCCESS
    assert job.delay(True).state == "FAILURE"
    assert db.keys("*") == []
