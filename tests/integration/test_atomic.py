"""The atomic enqueue against a real Redis: a publisher killed mid-enqueue, command
counts, kombu's internals pinned, and the fallback when they no longer match."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import AlreadyQueued, UniqueTask, admin, broker
from celery_unique.store import get_store
from celery_unique.testing import RedisServer, wait_for
from tests.helpers import held_locks, publish_forever

#: The short lease of the separate path in the kill runs (its floor): what an orphan lock
#: may live at most.
PUBLISH_LEASE = 1.0


def make_app(url: str, store_db: int, queue: str) -> Celery:
    app = Celery("tests", broker=f"{url}/2", set_as_current=False)
    app.conf.update(unique_redis_url=f"{url}/{store_db}", task_publish_retry=False,
                    task_default_queue=queue, unique_publish_lease=PUBLISH_LEASE)
    return app


def _publish_forever(url: str, store_db: int, queue: str, prefix: str,
                     lock: str | None = None) -> None:
    """The publisher: distinct keys, one after the other, until it is killed."""
    publish_forever(make_app(url, store_db, queue), prefix, lock)


def kill_publishers(server: RedisServer, store_db: int, kills: int,
                    lock: str | None = None) -> dict[str, Any]:
    """SIGKILL a publishing process at random moments; count locks and messages."""
    queue = f"killed-{uuid.uuid4().hex}"
    broker_db = redis.Redis.from_url(f"{server.url}/2")
    store = redis.Redis.from_url(f"{server.url}/{store_db}")
    context = multiprocessing.get_context("fork")
    for round_ in range(kills):
        process = context.Process(target=_publish_forever,
                                  args=(server.url, store_db, queue, f"{queue}-{round_}",
                                        lock))
        start = broker_db.llen(queue)
        process.start()
        wait_for(lambda start=start: broker_db.llen(queue) >= start + 5, timeout=30,
                 interval=0.001, what="the publisher to publish")
        # The fault, at a random moment of the loop (an enqueue takes about 0.5 ms): the
        # one sleep here is the timing of the kill, not a wait for a condition.
        time.sleep(random.uniform(0, 0.01))
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    return count_orphans(broker_db, store, queue) | {"kills": kills}


def count_orphans(broker_db: redis.Redis, store: redis.Redis, queue: str) -> dict[str, int]:
    """Locks without their message (orphans, and the longest lease one has left, ms) and
    messages without their lock."""
    messages = {json.loads(m)["headers"]["id"] for m in broker_db.lrange(queue, 0, -1)}
    locks = held_locks(store, f"celery_unique:q:*{queue}*")
    orphans = set(locks) - messages
    return {"messages": len(messages), "locks": len(locks), "orphan_locks": len(orphans),
            "orphan_pttl_max": max((locks[o] for o in orphans), default=0),
            "messages_without_lock": len(messages - set(locks)), "queue": queue}


def test_a_killed_publisher_leaves_no_orphan_lock(unique_redis_server: RedisServer) -> None:
    """50 kills mid-enqueue: every lock has its message and every message its lock."""
    counts = kill_publishers(unique_redis_server, store_db=2, kills=50)
    assert counts["messages"] > 50
    assert counts["orphan_locks"] == 0 and counts["messages_without_lock"] == 0, counts


def test_a_place_in_line_taken_before_the_push_lives_one_short_lease(
    unique_redis_server: RedisServer,
) -> None:
    """The same kills, each job also taking its place in one lock's line ("order"), the
    locks in another database: a place whose message never came has a deadline within
    PUBLISH_LEASE (it was a full queueing_lock_timeout), every published job's place its
    full wait."""
    base = f"celery_unique:l:{{line-{uuid.uuid4().hex[:8]}}}"
    counts = kill_publishers(unique_redis_server, store_db=1, kills=30,
                             lock=base.split("{")[1].rstrip("}"))
    store = redis.Redis.from_url(f"{unique_redis_server.url}/1")
    messages = {json.loads(m)["headers"]["id"] for m in redis.Redis.from_url(
        f"{unique_redis_server.url}/2").lrange(counts["queue"], 0, -1)}
    seconds, micros = store.time()
    now = seconds * 1000 + micros // 1000
    places = {text(t): d - now for t, d in store.zrange(f"{base}:arrival", 0, -1,
                                                        withscores=True)}
    orphans = {t: left for t, left in places.items() if t not in messages}
    published = {t: left for t, left in places.items() if t in messages}
    # A kill between the publish and the command after it leaves a published job on its
    # short lease (it then takes a place again when it reaches a worker): one per kill at
    # most, counted, not asserted.
    cut = {t: left for t, left in published.items() if left <= PUBLISH_LEASE * 1000}
    assert len(published) > 50 and len(cut) <= 30, published
    assert all(left > 3_000_000 for t, left in published.items() if t not in cut)
    assert max(orphans.values(), default=0) <= PUBLISH_LEASE * 1000, orphans
    longest = max(orphans.values(), default=0)
    print(f"places, 30 kills: {len(orphans)} orphans, the longest {longest:.0f} ms left;"
          f" {len(published) - len(cut)} published with their full wait, {len(cut)} cut"
          f" between their publish and its extension")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_with_locks_taken_before_the_push_an_orphan_lives_one_short_lease(
    unique_redis_server: RedisServer,
) -> None:
    """The same kills with the lock store in another database (the separate path): the
    lock is taken, the caller dies, no message follows. The orphan is there (what the
    atomic path removes, and what shows the test above can fail), but its lease is the
    short one of a lock not yet published: it is gone within PUBLISH_LEASE, not an
    hour. A caller killed after its publish and before the full lease leaves a message
    whose lock ends with that short lease (counted, not asserted: it takes a kill in a
    window of one round trip)."""
    counts = kill_publishers(unique_redis_server, store_db=1, kills=50)
    # The listing tells them: each lock still without its message is "publishing".
    app = make_app(unique_redis_server.url, 1, counts["queue"])
    status = {info.holders[0]: info.holder_status()[0]
              for info in admin.iter_locks(app, kind="queueing")
              if counts["queue"] in info.key}  # not another test's, on this server
    messages = {json.loads(m)["headers"]["id"] for m in redis.Redis.from_url(
        f"{unique_redis_server.url}/2").lrange(counts["queue"], 0, -1)}
    assert {status[h] for h in set(status) - messages} <= {"publishing"}, status
    assert list(status.values()).count("unknown") > 40  # published: their full lease
    assert counts["messages"] > 50
    assert counts["orphan_locks"] > 0, counts
    assert 0 < counts["orphan_pttl_max"] <= PUBLISH_LEASE * 1000, counts
    broker_db = redis.Redis.from_url(f"{unique_redis_server.url}/2")
    store = redis.Redis.from_url(f"{unique_redis_server.url}/1")
    after = wait_for(lambda: (c := count_orphans(broker_db, store, counts["queue"]))[
        "orphan_locks"] == 0 and c, timeout=PUBLISH_LEASE + 2, what="the orphans to end")
    assert after["messages"] == counts["messages"]
    print(f"separate path, 50 kills: {counts['orphan_locks']} orphans, the longest"
          f" {counts['orphan_pttl_max']} ms left; after the short lease 0 orphans and"
          f" {after['messages_without_lock']} messages without their lock")


# -- command counts --------------------------------------------------------------------


@pytest.fixture
def counting_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in r.info("commandstats").items()}


def counted(server: RedisServer, call: Any, n: int) -> dict[str, int]:
    r = redis.Redis.from_url(server.url)
    before = commandstats(r)
    for i in range(n):
        call(i)
    after = commandstats(r)
    diff = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    diff.pop("cmdstat_info", None)
    return diff


def test_an_atomic_enqueue_runs_plain_celerys_commands(counting_server: RedisServer) -> None:
    """Accepted: Celery's own commands with its LPUSH run by one EVALSHA (whose script
    also runs GET and SET); a duplicate: no LPUSH at all."""
    app = Celery("tests", broker=f"{counting_server.url}/0", set_as_current=False)
    app.conf.task_default_queue = "counted"

    @app.task(name="tests.plain", shared=False)
    def plain(n: str) -> None: ...

    @app.task(base=UniqueTask, queueing_lock="{n}", name="tests.unique", shared=False)
    def unique(n: str) -> None: ...

    plain.delay("warm")
    unique.delay("warm")  # connections, queue declaration, SCRIPT LOAD
    assert broker.atomic(app, get_store(app))
    ours = counted(counting_server, lambda i: unique.delay(f"u{i}"), 20)
    theirs = counted(counting_server, lambda i: plain.delay(f"p{i}"), 20)
    assert theirs == {"cmdstat_lpush": 20}
    assert ours == {"cmdstat_evalsha": 20, "cmdstat_lpush": 20, "cmdstat_get": 20,
                    "cmdstat_set": 20}

    def duplicate(i: int) -> None:
        with pytest.raises(AlreadyQueued):
            unique.delay(f"u{i}")

    refused = counted(counting_server, duplicate, 20)
    assert "cmdstat_lpush" not in refused
    assert refused["cmdstat_evalsha"] == 20  # the first by the push, the rest peeked
    assert redis.Redis.from_url(f"{counting_server.url}/0").llen("counted") == 42


# -- kombu's internals ---------------------------------------------------------------


def test_the_push_script_pushes_what_kombu_would(redis_app: Celery) -> None:
    """Pins the shape relied on: the same list key (priority included) and the same
    message as kombu's own ``_put`` would push, but for the header's queue field."""
    @redis_app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: int) -> None: ...

    @redis_app.task(shared=False)
    def plain(n: int) -> None: ...

    r = redis.Redis.from_url(redis_app.conf.broker_url)
    queue = redis_app.conf.task_default_queue
    atomic = broker.atomic(redis_app, get_store(redis_app))
    for priority in (None, 0, 5, 9):
        ours = t.apply_async((1,), priority=priority, headers={"x": 1}, expires=60,
                             queueing_lock=f"p{priority}")
        theirs = plain.apply_async((1,), priority=priority, headers={"x": 1}, expires=60)
        messages = {}
        for key in r.keys(f"{queue}*"):
            for raw in r.lrange(key, 0, -1):
                message = json.loads(raw)
                messages[message["headers"]["id"]] = (key, message)
        (our_key, mine), (their_key, other) = messages[ours.id], messages[theirs.id]
        assert our_key == their_key
        assert set(mine) == set(other) and set(mine["properties"]) == set(other["properties"])
        assert mine["properties"]["priority"] == other["properties"]["priority"]
        assert mine["properties"]["delivery_info"] == other["properties"]["delivery_info"]
        # kombu's own delivery tag: only a job that may be parked at enqueue carries the
        # tag of a parked message.
        assert not mine["properties"]["delivery_tag"].endswith(".cu")
        info = mine["headers"].pop("celery_unique")
        if atomic:
            assert info["k"] == our_key.decode()
        else:
            assert "k" not in info
        assert set(mine["headers"]) == set(other["headers"])


def test_an_unknown_kombu_shape_falls_back_safely(
    unique_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu's Redis channel without the method the hook needs (a future kombu): the
    locks are taken before the push, each job published once, duplicates refused."""
    from kombu.transport import redis as kombu_redis

    monkeypatch.delattr(kombu_redis.Channel, "_q_for_pri")
    queue = f"shape-{uuid.uuid4().hex}"
    app = make_app(unique_redis_server.url, 2, queue)

    @app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: int) -> None: ...

    assert not broker.atomic(app, get_store(app))
    monkeypatch.undo()  # the publish itself needs kombu whole
    first = t.delay(1)
    with pytest.raises(AlreadyQueued):
        t.delay(1)
    ids = [json.loads(m)["headers"]["id"] for m in
           redis.Redis.from_url(f"{unique_redis_server.url}/2").lrange(queue, 0, -1)]
    assert ids == [first.id]


# -- Celery's publishing options, on both paths ------------------------------------------


def messages_in(r: redis.Redis, pattern: str) -> dict[str, bytes]:
    """Message id -> the list holding it, over the lists matching ``pattern``."""
    found = {}
    for key in r.scan_iter(pattern):
        if r.type(key) == b"list":
            for raw in r.lrange(key, 0, -1):
                found[json.loads(raw)["headers"]["id"]] = key
    return found


def test_publishing_options_behave_as_plain_celery(redis_app: Celery) -> None:
    """Routing, countdown, a producer from the pool, a connection of the caller's own and
    a group: each job lands in the list where the same call on a plain task lands its
    job, once, with its lock; each duplicate is refused."""
    from celery import group
    from kombu import Exchange, Queue

    r = redis.Redis.from_url(redis_app.conf.broker_url)
    store = redis.Redis.from_url(redis_app.conf.unique_redis_url)
    tag = uuid.uuid4().hex[:8]
    default = redis_app.conf.task_default_queue
    redis_app.conf.task_queues = [
        Queue(f"routed-{tag}", Exchange(f"ex-{tag}", type="direct"), routing_key=f"rk-{tag}"),
        Queue(default),
    ]

    @redis_app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: str) -> None: ...

    @redis_app.task(shared=False)
    def plain(n: str) -> None: ...

    pairs: list[tuple[str, str]] = []

    def both(name: str, **options: Any) -> None:
        ours = t.apply_async((f"{tag}-{name}",), **options)
        theirs = plain.apply_async((f"{tag}-{name}",), **options)
        pairs.append((ours.id, theirs.id))

    both("queue", queue=f"other-{tag}")
    both("routed", queue=f"routed-{tag}")
    both("rk", exchange=f"ex-{tag}", routing_key=f"rk-{tag}")
    both("eta", countdown=30)
    both("priority", priority=7)
    with redis_app.producer_or_acquire() as producer:
        both("producer", producer=producer)
    with redis_app.connection_for_write() as connection:
        both("conn", connection=connection)
    ours_g = group(t.s(f"{tag}-g1"), t.s(f"{tag}-g2")).apply_async().results
    theirs_g = group(plain.s(f"{tag}-g1"), plain.s(f"{tag}-g2")).apply_async().results
    pairs += [(a.id, b.id) for a, b in zip(ours_g, theirs_g)]
    for name in ("queue", "routed", "rk", "eta", "priority", "producer", "conn", "g1", "g2"):
        with pytest.raises(AlreadyQueued):
            t.delay(f"{tag}-{name}")
    found = messages_in(r, "*")
    assert [found.get(ours) for ours, _ in pairs] == [found.get(theirs) for _, theirs in pairs]
    assert None not in [found.get(ours) for ours, _ in pairs]
    assert [found[ours] for ours, _ in pairs][:2] == [f"other-{tag}".encode(),
                                                       f"routed-{tag}".encode()]
    held = {store.get(k).decode() for k in store.scan_iter(f"celery_unique:q:*{tag}*")}
    assert held == {ours for ours, _ in pairs}


def test_a_fanout_exchange_takes_the_lock_before_kombu_publishes(redis_app: Celery) -> None:
    from kombu import Exchange

    store = redis.Redis.from_url(redis_app.conf.unique_redis_url)
    tag = uuid.uuid4().hex[:8]

    @redis_app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: str) -> None: ...

    fanout = Exchange(f"fan-{tag}", type="fanout")
    with redis_app.producer_or_acquire() as producer:
        fanout.declare(channel=producer.channel)
    first = t.apply_async((tag,), exchange=fanout, routing_key="")
    with pytest.raises(AlreadyQueued):
        t.apply_async((tag,), exchange=fanout, routing_key="")
    assert store.get(f"celery_unique:q:{{{t.name}:{tag}}}") == first.id.encode()


# -- a rate limit's excess parked at enqueue ----------------------------------------------


def test_a_job_over_its_rate_limit_is_parked_at_enqueue(redis_app: Celery) -> None:
    """On the atomic path a rate-limited job that would wait for its turn (a start is
    live, and the starts and the places ahead fill the limit) is parked in the push script:
    its message never reaches a worker until the sweep hands it its start, then it is
    pushed at the head of its queue. With no live start it is pushed, even when it will
    wait (the worker that receives it sweeps). Off the atomic path every job is pushed,
    and waits at a worker."""
    from celery_unique import signals
    from celery_unique.runtime import sweep
    from celery_unique.wire import decode_parked

    tag = uuid.uuid4().hex[:8]

    @redis_app.task(base=UniqueTask, global_rate_limit="2/s", rate_limit_key=tag,
                    shared=False)
    def t(n: int) -> None: ...

    store, r = get_store(redis_app), redis.Redis.from_url(redis_app.conf.broker_url)
    queue, base = redis_app.conf.task_default_queue, f"celery_unique:r:{{{tag}}}"
    atomic = broker.atomic(redis_app, store)
    parked: list[str] = []

    def on_rate_limited(sender: Any = None, task_id: str = "", action: str = "",
                        **_: Any) -> None:
        parked.append(f"{action}:{task_id}")

    signals.rate_limited.connect(on_rate_limited, weak=False)
    try:
        # No start live: pushed, even the one that will wait (a worker receives it, and
        # so sweeps).
        first, second, waits = t.delay(0), t.delay(1), t.delay(2)
        assert r.llen(queue) == 3 and not parked
        for job in (first, second):  # their workers start them: the limit is full
            assert store.acquire_lock(base, token=job.id, limit=2, lease_ms=1005,
                                      mode="order", wait_ms=0, run=job.id, rate=True).fence
        third = t.delay(3)
        if not atomic:
            assert r.llen(queue) == 4 and not parked
            return
        assert r.llen(queue) == 3 and parked == [f"parked:{third.id}"]
        # The one on its way is revoked: it gives its place back (no start freed yet).
        assert not store.release_lock(base, token=waits.id, limit=2, lease_ms=1005).woken
        message = decode_parked(store.client.hget(f"{base}:parked", third.id).decode())
        assert message.queue == queue  # type: ignore[union-attr]
        body = json.loads(message.body)  # type: ignore[union-attr]
        assert body["headers"]["id"] == third.id
        assert body["properties"]["delivery_tag"] == f"{third.id}.cu"
        assert store.client.zscore(f"{base}:arrival", third.id) is None
        assert store.client.zscore("celery_unique:l:waiting", f"2|1005|{base}") is not None
        # The first start's period ends: the sweep hands the third its start.
        wait_for(lambda: sweep(redis_app) == 1, timeout=5,
                 what="the first start's period to end and the third to be woken")
        woken = json.loads(r.lindex(queue, -1))  # at the head: kombu pops from the right
        assert woken["headers"]["id"] == third.id
        assert woken["properties"]["delivery_tag"].startswith(f"{third.id}.")
        assert woken["properties"]["delivery_tag"] != f"{third.id}.cu"
        assert store.client.zscore(f"{base}:holders", third.id) is not None
    finally:
        signals.rate_limited.disconnect(on_rate_limited)
