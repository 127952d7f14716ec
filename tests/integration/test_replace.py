"""``on_duplicate="replace"`` against a real Redis server, on both enqueue paths: the
caller's side (the lock taken over, the replaced job's result) and the script a worker
runs when a job that may be replaced starts (``Store.started``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import ConfigurationError, Replaced, UniqueTask
from celery_unique import signals as unique_signals
from celery_unique.scripts import STARTED_FIELD, Started, replaced_key
from celery_unique.store import get_store


@pytest.fixture
def app(redis_app: Celery) -> Celery:
    # A result backend (this process' memory): a replaced job's result is stored there,
    # in JSON.
    redis_app.conf.result_backend = "cache+memory://"
    return redis_app


@pytest.fixture
def replaced() -> Iterator[list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def record(sender: Any = None, **kwargs: Any) -> None:
        sent.append(kwargs)

    unique_signals.job_replaced.connect(record, weak=False)
    yield sent
    unique_signals.job_replaced.disconnect(record)


def store_client(app: Celery) -> redis.Redis:
    return redis.Redis.from_url(app.conf.unique_redis_url)


def queued_ids(app: Celery) -> list[str]:
    import json

    broker = redis.Redis.from_url(app.conf.broker_url)
    return [json.loads(m)["headers"]["id"]
            for m in reversed(broker.lrange(app.conf.task_default_queue, 0, -1))]


def index_task(app: Celery, **options: Any) -> Any:
    @app.task(base=UniqueTask, shared=False,
              **{"queueing_lock": "doc_{doc}", "on_duplicate": "replace", **options})
    def index(doc: int, version: Any) -> None: ...

    return index


def test_each_call_replaces_the_job_queued_before_it(
    app: Celery, replaced: list[dict[str, Any]]
) -> None:
    """Three calls: all three messages are published, the lock names the last, and the
    first two are replaced: their results are final now (``REVOKED``, :class:`Replaced`
    naming the job that replaced each), and their workers, when they start them, are told
    not to run them. The last one runs and releases the lock."""
    index = index_task(app)
    a, b, c = (index.delay(1, version) for version in (1, 2, 3))
    key = f"celery_unique:q:{{{index.name}:doc_1}}"
    store, client = get_store(app), store_client(app)
    assert queued_ids(app) == [a.id, b.id, c.id]
    assert client.get(key) == c.id.encode()
    for old, new in ((a, b), (b, c)):
        assert old.state == "REVOKED"
        assert isinstance(old.result, Replaced)
        assert (old.result.task_id, old.result.replaced_by, old.result.key) == (
            old.id, new.id, key)
    assert c.state == "PENDING"
    assert [(s["task_id"], s["replaced_by"], s["args"]) for s in replaced] == [
        (a.id, b.id, (1, 2)), (b.id, c.id, (1, 3))]
    assert client.hgetall(replaced_key(key)) == {a.id.encode(): b.id.encode(),
                                                 b.id.encode(): c.id.encode()}
    # The worker, in queue order: the two replaced jobs are dropped, the last one runs.
    assert store.started(key, a.id, "started") == Started(b.id, False)
    assert store.started(key, b.id, "started") == Started(c.id, False)
    assert store.started(key, c.id, "started") == Started("", True)
    assert not client.exists(key, replaced_key(key))
    # Free again: the next call takes it without replacing anything.
    d = index.delay(1, 4)
    assert client.get(key) == d.id.encode() and len(replaced) == 2


def test_a_started_job_is_not_replaced(app: Celery) -> None:
    """``until="finished"``: a job that has started is marked so when it starts; a later
    call does not replace it (it cannot be stopped) but gets its result, as
    ``on_duplicate="existing"`` would, and queues nothing."""
    index = index_task(app, queueing_lock_until="finished")
    a = index.delay(1, 1)
    key = f"celery_unique:q:{{{index.name}:doc_1}}"
    store = get_store(app)
    assert store.started(key, a.id, "finished") == Started("", False)
    assert index.delay(1, 2).id == a.id
    assert queued_ids(app) == [a.id]
    assert store_client(app).hget(replaced_key(key), STARTED_FIELD) == a.id.encode()
    assert store.release(key, a.id)  # its end
    b = index.delay(1, 3)
    c = index.delay(1, 4)  # b has not started: replaced
    assert b.state == "REVOKED" and queued_ids(app) == [a.id, b.id, c.id]


def test_a_call_that_fails_to_publish_gives_the_lock_back(
    app: Celery, replaced: list[dict[str, Any]]
) -> None:
    """A replacing call whose message cannot be built (an argument JSON cannot encode)
    replaces nothing: the queued job keeps its lock and will run, on both paths (off the
    atomic path the lock was taken before the message was built, and is given back)."""
    index = index_task(app)
    a = index.delay(1, 1)
    key = f"celery_unique:q:{{{index.name}:doc_1}}"
    with pytest.raises(Exception, match="not JSON serializable"):
        index.delay(1, object())
    client = store_client(app)
    assert client.get(key) == a.id.encode()
    assert 3590_000 < client.pttl(key) <= 3600_000
    assert not client.exists(replaced_key(key))
    assert a.state == "PENDING" and replaced == [] and queued_ids(app) == [a.id]
    assert get_store(app).started(key, a.id, "started") == Started("", True)


def test_replace_is_the_tasks_option(app: Celery) -> None:
    """Every job of a task that replaces asks at its start whether it was replaced; a
    job queued without asking could not be stopped. So ``replace`` is set on the task (or
    app-wide), and a call can neither set nor unset it; nor can a throttle replace."""
    index = index_task(app)

    @app.task(base=UniqueTask, queueing_lock="doc_{doc}", shared=False)
    def plain(doc: int) -> None: ...

    with pytest.raises(ConfigurationError, match="not per call"):
        plain.apply_async((1,), on_duplicate="replace")
    with pytest.raises(ConfigurationError, match="not per call"):
        index.apply_async((1, 1), on_duplicate="raise")
    with pytest.raises(ConfigurationError, match="not per call"):
        plain.configure(on_duplicate="replace")
    with pytest.raises(ConfigurationError, match="a throttle"):
        index_task(app, name="throttled", queueing_lock_until="expired").delay(1, 1)
    with pytest.raises(ConfigurationError, match="a throttle"):
        index.apply_async((1, 1), queueing_lock_until="expired")
    assert queued_ids(app) == []
    assert not store_client(app).keys("celery_unique:*")


def test_off_the_atomic_path_a_job_is_replaced_only_once_its_replacer_is_published(
    redis_app: Celery,
) -> None:
    """The lock is taken before the message is published: the job it is taken from is
    marked as about to be replaced, and replaced once the new message is published. If it
    starts in between (or the publisher dies there), it runs: never is the old job
    dropped for a new one that was not published. Driven through the scripts, as the
    separate path calls them."""
    store, client = get_store(redis_app), store_client(redis_app)
    key = "celery_unique:q:{t:between}"
    assert store.acquire_queueing_lock(key, "old", 60_000).taken
    taken = store.acquire_queueing_lock(key, "new", 10_000, replace="?")
    assert (taken.taken, taken.replaced) == (True, "old")
    assert client.hget(replaced_key(key), "old") == b"?new"
    # The old job starts before its replacer is published: it runs.
    assert store.started(key, "old", "started") == Started("", False)
    extended = store.published("new", key, 60_000, replacing=(key, "old"))
    assert extended.queueing and not extended.replaced
    # Replaced once published, when it has not started.
    assert store.acquire_queueing_lock(key, "newer", 10_000, replace="?").replaced == "new"
    assert store.published("newer", key, 60_000, replacing=(key, "new")).replaced
    assert store.started(key, "new", "started") == Started("newer", False)
    assert store.started(key, "newer", "started") == Started("", True)


def _replace_forever(url: str, store_db: int, queue: str, doc: str) -> None:
    from tests.helpers import replace_forever
    from tests.integration.test_atomic import make_app

    replace_forever(make_app(url, store_db, queue), doc)


@pytest.mark.parametrize("store_db", [2, 1], ids=["atomic", "separate"])
def test_a_killed_replacing_publisher_never_loses_the_burst(
    unique_redis_server: Any, store_db: int
) -> None:
    """Publishers replacing one key's job, each SIGKILLed at a random moment, one after
    the other (20 kills). Then every queued message is started as a worker would, in
    queue order: the newest published job runs, and no burst is left with nothing to
    run. Off the atomic path a kill between the lock and the publish leaves the job it
    took the lock from marked as about to be replaced, which then runs too (a second run,
    never a lost one); counted, not asserted."""
    import json
    import multiprocessing
    import os
    import random
    import signal
    import time
    import uuid

    from celery_unique.scripts import Scripts
    from celery_unique.testing import wait_for

    queue, doc = f"replaced-{uuid.uuid4().hex}", uuid.uuid4().hex[:8]
    url = unique_redis_server.url
    broker = redis.Redis.from_url(f"{url}/2")
    context = multiprocessing.get_context("fork")
    for _ in range(20):
        process = context.Process(target=_replace_forever, args=(url, store_db, queue, doc))
        start = broker.llen(queue)
        process.start()
        wait_for(lambda start=start: broker.llen(queue) >= start + 5, timeout=30,
                 interval=0.001, what="the publisher to publish")
        time.sleep(random.uniform(0, 0.01))  # the timing of the kill, not a wait
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    ids = [json.loads(m)["headers"]["id"] for m in reversed(broker.lrange(queue, 0, -1))]
    scripts = Scripts(redis.Redis.from_url(f"{url}/{store_db}"), url)
    key = f"celery_unique:q:{{tests.replacing:{doc}}}"
    runs = [i for i in ids if not scripts.started(key, i, "started").replaced_by]
    assert ids[-1] in runs
    if store_db == 2:
        assert runs == [ids[-1]]
    print(f"replace, 20 kills ({'atomic' if store_db == 2 else 'separate'}):"
          f" {len(ids)} published, {len(runs)} run, {len(runs) - 1} second runs")


def queued_etas(app: Celery) -> list[float]:
    """The queued messages' ETAs, as seconds from now (0: none, due at once)."""
    import datetime
    import json

    broker = redis.Redis.from_url(app.conf.broker_url)
    now = datetime.datetime.now(datetime.timezone.utc)
    etas = [json.loads(m)["headers"]["eta"]
            for m in reversed(broker.lrange(app.conf.task_default_queue, 0, -1))]
    return [0.0 if eta is None else (datetime.datetime.fromisoformat(eta) - now
                                     ).total_seconds() for eta in etas]


def test_debounce_puts_the_run_off_within_the_bursts_limit(app: Celery) -> None:
    """``debounce``: each call replaces the queued job and is due ``debounce`` from now,
    but never later than ``debounce_max`` after the burst's first call (the store's
    clock); once the burst's job has started, the next call begins a new burst."""
    index = index_task(app, name="debounced", debounce=30, debounce_max=60)
    key = f"celery_unique:q:{{{index.name}:doc_1}}"
    a = index.delay(1, 1)
    b = index.delay(1, 2)
    assert a.state == "REVOKED" and queued_ids(app) == [a.id, b.id]
    assert all(29 < eta <= 30 for eta in queued_etas(app))
    # The burst began 50 s ago: 10 s are left of its 60.
    client = store_client(app)
    began = int(client.hget(replaced_key(key), ":burst"))
    client.hset(replaced_key(key), ":burst", began - 50_000)
    c = index.delay(1, 3)
    assert 9 < queued_etas(app)[-1] <= 10
    client.hset(replaced_key(key), ":burst", began - 70_000)  # over: due at once
    d = index.delay(1, 4)
    assert queued_etas(app)[-1] == 0
    assert 3599_000 < client.pttl(key) <= 3600_000  # no countdown added to its lease
    store = get_store(app)
    for job in (a, b, c):
        assert store.started(key, job.id, "started").replaced_by
    assert store.started(key, d.id, "started") == Started("", True)
    assert not client.exists(key, replaced_key(key))  # the burst's mark went with it
    index.delay(1, 5)  # a new burst
    assert 29 < queued_etas(app)[-1] <= 30


def test_debounce_options_are_checked(app: Celery) -> None:
    @app.task(base=UniqueTask, queueing_lock="doc_{doc}", shared=False)
    def plain(doc: int) -> None: ...

    debounced = index_task(app, name="debounced_checks", debounce=1)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"debounce": 1, "queueing_lock": None}, "needs a queueing_lock"),
        ({"debounce": 1, "queueing_lock_until": "finished"}, "queueing_lock_until='started'"),
        ({"debounce": 2, "debounce_max": 1}, "shorter than debounce"),
        ({"debounce_max": 1}, "debounce_max without debounce"),
        ({"debounce": -1}, "positive number of seconds"),
    ]
    for n, (options, message) in enumerate(bad):
        with pytest.raises(ConfigurationError, match=message):
            index_task(app, name=f"bad{n}", **{"on_duplicate": "raise", **options}
                       ).delay(1, 1)
    with pytest.raises(ConfigurationError, match="not per call"):
        plain.apply_async((1,), debounce=1)
    with pytest.raises(ConfigurationError, match="takes no countdown"):
        debounced.apply_async((1, 1), countdown=5)
    assert queued_ids(app) == []
    assert not store_client(app).keys("celery_unique:*")
