"""The queueing lock against a real Redis server (the session's private one)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.beat import ScheduleEntry, Scheduler

from celery_unique import AlreadyQueued, ConfigurationError, LockStoreUnavailable, UniqueTask
from celery_unique.store import get_store
from celery_unique.testing import RedisServer


def client(app: Celery) -> redis.Redis:
    return redis.Redis.from_url(app.conf.unique_redis_url)


def broker(app: Celery) -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


def QUEUE(app: Celery) -> str:
    return str(app.conf.task_default_queue)


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in r.info("commandstats").items()}


@pytest.fixture
def counting_server() -> Iterator[RedisServer]:
    """A server of the test's own: commandstats count every client, workers' sweeps too."""
    server = RedisServer().start()
    yield server
    server.stop()


def test_enqueue_costs_two_redis_commands_accepted_one_refused(
    counting_server: RedisServer,
) -> None:
    """Off the atomic path (here a memory broker), counted by the server itself: an
    accepted job takes its lock with a short lease and, once published, gives it its
    full one (two EVALSHA); a duplicate costs one."""
    app = Celery("tests", broker="memory://", set_as_current=False)
    app.conf.unique_redis_url = f"{counting_server.url}/1"

    @app.task(base=UniqueTask, queueing_lock=True, shared=False)
    def t(a: int) -> None: ...

    t.delay(-1)  # warm up: connection set-up and the first SCRIPT LOAD
    r = redis.Redis.from_url(counting_server.url)
    before = commandstats(r)
    for i in range(20):
        t.delay(i)
    for i in range(20):
        with pytest.raises(AlreadyQueued):
            t.delay(i)
    after = commandstats(r)
    diff = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    diff.pop("cmdstat_info", None)
    # commandstats also counts what a script calls; the only command sent by a client is
    # EVALSHA; GET/SET/DEL/PEXPIRE/PTTL are the scripts' own, inside those calls (the
    # lock and its publishing mark set, then the mark deleted and the lock's lease set).
    assert diff == {"cmdstat_evalsha": 60, "cmdstat_get": 60, "cmdstat_set": 40,
                    "cmdstat_del": 20, "cmdstat_pexpire": 20, "cmdstat_pttl": 20}
    # Each accepted job's lock has its full lease once published.
    assert 3590_000 < redis.Redis.from_url(f"{counting_server.url}/1").pttl(
        f"celery_unique:q:{{{t.name}:a=19}}") <= 3600_000


def test_fifty_threads_one_message(redis_app: Celery) -> None:
    @redis_app.task(base=UniqueTask, queueing_lock="same", shared=False)
    def t() -> None: ...

    t.delay  # noqa: B018 - bind the task before the threads race
    barrier = threading.Barrier(50)
    outcomes: list[str] = []

    def enqueue() -> None:
        barrier.wait()
        try:
            t.delay()
            outcomes.append("queued")
        except AlreadyQueued:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=enqueue) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["duplicate"] * 49 + ["queued"]
    assert broker(redis_app).llen(QUEUE(redis_app)) == 1


def test_release_is_owner_checked(redis_app: Celery) -> None:
    store = get_store(redis_app)
    assert store.acquire_queueing_lock("k", "old", 50)[0]
    client(redis_app).delete("k")  # the old owner's lease ran out...
    assert store.acquire_queueing_lock("k", "new", 60000)[0]  # ...and another took it
    assert store.release("k", "old") is False
    assert client(redis_app).get("k") == b"new"
    assert store.acquire_queueing_lock("k", "other", 1000)[:3] == (
        False, "new", pytest.approx(60000, abs=1000))
    assert store.release("k", "new") is True


def test_bad_input_leaves_no_lock_and_no_message(redis_app: Celery) -> None:
    @redis_app.task(base=UniqueTask, queueing_lock=lambda a: a["x"], shared=False)
    def t(a: Any) -> None: ...

    with pytest.raises(Exception, match="raised KeyError"):
        t.delay({})
    with pytest.raises(Exception, match="on_duplicate"):
        t.apply_async(({"x": "1"},), on_duplicate="nope")
    assert client(redis_app).keys("celery_unique:*") == []
    assert broker(redis_app).llen(QUEUE(redis_app)) == 0


def test_unreachable_lock_store_names_the_url(redis_app: Celery) -> None:
    redis_app.conf.unique_redis_url = "redis://:secret@127.0.0.1:1/0"

    @redis_app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    with pytest.raises(LockStoreUnavailable, match=r"redis://:\*\*\*@127.0.0.1:1/0") as info:
        t.delay()
    assert "secret" not in str(info.value)
    assert broker(redis_app).llen(QUEUE(redis_app)) == 0


@pytest.mark.parametrize("lock_only", [True, False])
def test_a_store_lost_between_enqueues_raises_and_publishes_nothing(
    redis_app: Celery, lock_only: bool
) -> None:
    """The store dies under a kept connection (the separate path: its own server). The
    next enqueue raises, and publishes nothing; a job whose only lock is its place in line
    too (it was published without its place, its error only logged)."""
    store = RedisServer().start()
    try:
        redis_app.conf.unique_redis_url = f"{store.url}/0"
        options: dict[str, Any] = {"lock": "line"} if lock_only else {"queueing_lock": "k_{n}"}

        @redis_app.task(base=UniqueTask, shared=False, **options)
        def t(n: int) -> None: ...

        t.delay(1)  # connected
        assert broker(redis_app).llen(QUEUE(redis_app)) == 1
        store.kill()
        with pytest.raises(LockStoreUnavailable):
            t.delay(2)
        assert broker(redis_app).llen(QUEUE(redis_app)) == 1
    finally:
        store.stop()


def test_default_url_follows_a_redis_broker(unique_redis_server: Any) -> None:
    app = Celery("tests", broker=f"{unique_redis_server.url}/3", set_as_current=False)
    assert get_store(app).url == f"{unique_redis_server.url}/3"



@pytest.mark.parametrize("broker", ["amqp://guest:secret@rabbit//", None])
def test_a_broker_not_redis_needs_the_url_set(broker: str | None) -> None:
    """No guess (localhost): the first use names the setting, and the password is masked."""
    app = Celery("tests", broker=broker, set_as_current=False)

    @app.task(base=UniqueTask, queueing_lock="k", name="tests.k", shared=False)
    def k() -> None: ...

    with pytest.raises(ConfigurationError, match="set unique_redis_url") as info:
        k.delay()
    assert info.value.option == "unique_redis_url"
    assert "secret" not in str(info.value)


def test_beat_duplicate_is_skipped_not_a_scheduling_error(
    redis_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    @redis_app.task(base=UniqueTask, queueing_lock="cleanup", name="tests.cleanup", shared=False)
    def cleanup() -> None: ...

    scheduler = Scheduler(redis_app, lazy=True)
    entry = ScheduleEntry(name="cleanup", task="tests.cleanup", schedule=60, app=redis_app)
    first = scheduler.apply_async(entry, advance=False)
    second = scheduler.apply_async(entry, advance=False)  # would raise SchedulingError
    assert second.id == first.id
    assert broker(redis_app).llen(QUEUE(redis_app)) == 1
    assert "already queued" in caplog.text and "from beat" in caplog.text


def test_send_task_cannot_be_intercepted(redis_app: Celery) -> None:
    """Documented: send_task by name bypasses the caller-side lock."""
    @redis_app.task(base=UniqueTask, queueing_lock="k", name="tests.byname", shared=False)
    def byname() -> None: ...

    byname.delay()
    redis_app.send_task("tests.byname")
    assert broker(redis_app).llen(QUEUE(redis_app)) == 2


def test_failed_publish_releases_the_lock(redis_app: Celery) -> None:
    redis_app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    redis_app.conf.broker_connection_timeout = 0.2
    redis_app.conf.broker_transport_options = {"max_retries": 0}

    @redis_app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    for _ in range(2):  # the lock's reply is read while Celery fails to connect
        with pytest.raises(Exception) as info:
            t.delay()
        assert not isinstance(info.value, (AlreadyQueued, LockStoreUnavailable))
        assert client(redis_app).keys("celery_unique:*") == []


def test_connections_killed_or_scripts_flushed_between_calls(redis_app: Celery) -> None:
    """The reply read later falls back to a plain call when the pooled connection died."""
    @redis_app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: int) -> None: ...

    admin = client(redis_app)
    for n in range(3):
        admin.client_kill_filter(_type="normal", skipme=True)
        admin.script_flush()
        first = t.delay(n)
        admin.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(AlreadyQueued) as info:
            t.delay(n)
        assert info.value.task_id == first.id
    assert broker(redis_app).llen(QUEUE(redis_app)) == 3


@pytest.mark.parametrize("path", ["atomic", "separate"])
def test_a_flushed_script_cache_costs_one_reload_per_script(
    counting_server: RedisServer, path: str,
) -> None:
    """A server that forgot its scripts (SCRIPT FLUSH, a restart, a failover; Redis 7.4+
    may evict scripts) costs each script one refused EVALSHA and a SCRIPT LOAD, nothing
    else: the job is enqueued, run and released as before."""
    app = Celery("tests", broker=f"{counting_server.url}/2", set_as_current=False)
    app.conf.unique_redis_url = f"{counting_server.url}/{2 if path == 'atomic' else 1}"
    app.conf.task_default_queue = f"test-{uuid.uuid4().hex}"
    ran: list[int] = []

    @app.task(base=UniqueTask, queueing_lock="q_{n}", lock="l_{n}", shared=False)
    def t(n: int) -> None:
        ran.append(n)

    r = client(app)
    for n in range(3):
        t.delay(n)  # loaded: the enqueue's scripts
        r.script_flush()
        before = commandstats(r)
        t.delay(n + 10)  # enqueued after a flush
        t.apply((n + 20,))  # its lock taken and released after a flush, in this process
        r.script_flush()
        with pytest.raises(AlreadyQueued):
            t.delay(n + 10)
        after = commandstats(r)
        # Redis < 7 counts SCRIPT's subcommands together: the flush above is one of them.
        load = "cmdstat_script|load" if "cmdstat_script|load" in after else "cmdstat_script"
        flushes = 1 if load == "cmdstat_script" else 0
        diff = {k: after[k] - before.get(k, 0) for k in ("cmdstat_evalsha", load)}
        # The enqueue (on the atomic path the push script; on the separate one the
        # queueing lock, the place in line and the full lease), the lock's take and
        # release, the duplicate's refusal.
        scripts = (1 if path == "atomic" else 3) + 2 + 1
        assert diff == {"cmdstat_evalsha": 2 * scripts, load: scripts + flushes}, diff
    assert ran == [20, 21, 22]
    assert broker(app).llen(QUEUE(app)) == 6
    assert r.keys("celery_unique:l:*:holders") == []


def test_uncontended_locked_job_costs_two_round_trips(counting_server: RedisServer) -> None:
    """Take (which also releases the queueing lock) and release: two EVALSHA."""
    redis_app = Celery("tests", broker="memory://", set_as_current=False)
    redis_app.conf.unique_redis_url = f"{counting_server.url}/1"
    redis_app.conf.task_always_eager = True

    @redis_app.task(base=UniqueTask, queueing_lock="q_{n}", lock="l_{n}", shared=False)
    def t(n: int) -> int:
        return n

    t.delay(-1)  # warm up: connections and SCRIPT LOADs
    r = client(redis_app)
    before = commandstats(r)
    for n in range(10):
        t.apply((n,))  # the job alone
    middle = commandstats(r)
    for n in range(10):
        t.delay(n)  # enqueue (queueing lock) and run in line
    after = commandstats(r)
    assert middle["cmdstat_evalsha"] - before["cmdstat_evalsha"] == 20
    assert after["cmdstat_evalsha"] - middle["cmdstat_evalsha"] == 30
    clients = {k for k in after if after[k] != before.get(k)} - {
        "cmdstat_info", "cmdstat_evalsha", "cmdstat_time", "cmdstat_get", "cmdstat_set",
        "cmdstat_del", "cmdstat_pttl", "cmdstat_zadd", "cmdstat_zrem", "cmdstat_zscore",
        "cmdstat_zcard", "cmdstat_zrangebyscore", "cmdstat_zrange", "cmdstat_hdel",
        "cmdstat_hexists", "cmdstat_hget", "cmdstat_exists", "cmdstat_incrby"}
    assert clients == set()  # everything else ran inside the scripts
    assert [k for k in r.keys("*") if not k.endswith((b":seq", b":ran"))] == []


@pytest.mark.parametrize("per", ["task", "call"])
def test_an_unreachable_store_with_allow_publishes_without_the_lock(
    redis_app: Celery, caplog: pytest.LogCaptureFixture, per: str
) -> None:
    """``on_store_error="allow"``: published without its lock, a warning, the signal."""
    from celery_unique import signals as unique_signals

    redis_app.conf.unique_redis_url = "redis://:secret@127.0.0.1:1/0"
    seen: list[dict[str, Any]] = []

    def record(sender: Any = None, **kw: Any) -> None:
        seen.append(kw)

    options = {"on_store_error": "allow"} if per == "task" else {}

    @redis_app.task(base=UniqueTask, queueing_lock="k", lock="l", shared=False, **options)
    def t() -> None: ...

    unique_signals.store_unavailable.connect(record, weak=False)
    try:
        result = t.delay() if per == "task" else t.apply_async(on_store_error="allow")
    finally:
        unique_signals.store_unavailable.disconnect(record)
    [message] = broker(redis_app).lrange(QUEUE(redis_app), 0, -1)
    import json

    assert json.loads(message)["headers"]["id"] == result.id
    assert "celery_unique" not in json.loads(message)["headers"]  # no lock to release
    [sent] = seen
    assert (sent["where"], sent["task_id"], sent["url"]) == (
        "enqueue", result.id, "redis://:***@127.0.0.1:1/0")
    assert "published without its lock" in caplog.text and "secret" not in caplog.text
    with pytest.raises(LockStoreUnavailable):  # the default still refuses
        t.apply_async(on_store_error="raise")


def test_threads_that_come_and_go_do_not_exhaust_a_pool(redis_app: Celery) -> None:
    """Each thread's enqueue returns its connections: kombu's channel lends only 10.

    A web server's threads come and go (one per request), and live ones outnumber the
    channel's 10: a connection a thread kept for itself would soon be the channel's last.
    """
    redis_app.conf.broker_pool_limit = 1  # every thread publishes on one channel

    @redis_app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: int) -> None: ...

    store = client(redis_app)
    connected = int(store.info("clients")["connected_clients"])
    errors: list[BaseException] = []

    def enqueue(n: int) -> None:
        try:
            t.delay(n)
            with pytest.raises(AlreadyQueued):
                t.delay(n)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    for n in range(30):  # one after another, as request threads are
        thread = threading.Thread(target=enqueue, args=(n,))
        thread.start()
        thread.join(30)
    # Each ended thread's connections went back to their pools: none was left open.
    assert int(store.info("clients")["connected_clients"]) - connected <= 3
    live = [threading.Thread(target=enqueue, args=(n,)) for n in range(30, 50)]
    for thread in live:  # twenty at once, more than the channel lends
        thread.start()
    for thread in live:
        thread.join(30)
    assert errors == []
    assert broker(redis_app).llen(QUEUE(redis_app)) == 50


def test_bad_input_after_a_peek_gives_its_connection_back(redis_app: Celery) -> None:
    """A duplicate's key is peeked at before the rest is checked: an error found after
    (here the lock's template) still reads the peek, and gives its connection back."""
    redis_app.conf.unique_redis_options = {"max_connections": 4}

    @redis_app.task(base=UniqueTask, queueing_lock="k", lock=lambda n: str(10 // n),
                    shared=False)
    def t(n: int) -> None: ...

    first = t.delay(1)
    with pytest.raises(AlreadyQueued):
        t.delay(1)  # the key is now known held: the next calls peek at it first
    for _ in range(10):
        with pytest.raises(Exception, match="ZeroDivisionError"):
            t.delay(0)  # the lock's key cannot be built
    with pytest.raises(AlreadyQueued) as info:  # the pool still lends
        t.delay(1)
    assert info.value.task_id == first.id
    assert broker(redis_app).llen(QUEUE(redis_app)) == 1
