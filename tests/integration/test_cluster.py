"""Both locks on Redis Cluster (``unique_redis_cluster``): a real cluster of three masters
sharing the slots, so that locks live on every node.

A cluster node refuses any command, scripts included, whose keys lie in two hash slots,
even when it owns both: these tests fail if a script of ours ever does that.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from celery_unique import AlreadyQueued, LockStoreUnavailable, UniqueTask, admin
from celery_unique.keys import lock_keys
from celery_unique.scripts import Scripts
from celery_unique.store import get_store
from celery_unique.testing import wait_for
from tests.helpers import Cluster, failed, node


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    nodes = Cluster(masters=3)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


def make_app(url: str, eager: bool) -> Celery:
    app = Celery("cluster", broker="memory://", set_as_current=False)
    app.conf.update(unique_redis_url=url, unique_redis_cluster=True,
                    task_always_eager=eager, task_publish_retry=False)
    return app


def keys(cluster: Cluster) -> list[bytes]:
    return [k for k in cluster.find_keys() if not k.endswith((b":seq", b":ran"))]


def test_a_script_with_keys_in_two_slots_is_refused(cluster: Cluster) -> None:
    store = get_store(make_app(cluster.url, eager=True))
    assert store.cluster
    script = store.client.register_script(Scripts.ACQUIRE_LOCK)
    mixed = [*lock_keys("celery_unique:l:{a}"), "celery_unique:q:{b}"]
    args = ["t", 1, 1000, "order", 1000]
    with pytest.raises(RedisClusterException, match="same key slot"):  # the client
        script(keys=mixed, args=args, client=store.client)
    owner = node(cluster.master_of("celery_unique:l:{a}"))
    with pytest.raises(redis.ResponseError, match="same slot"):  # and the server (CROSSSLOT)
        script(keys=mixed, args=args, client=owner)
    assert script(keys=mixed[:5], args=args, client=owner)[0] == 1  # one slot: fine
    cluster.flushall()


def test_both_locks_in_the_caller(cluster: Cluster) -> None:
    app = make_app(cluster.url, eager=True)

    @app.task(base=UniqueTask, queueing_lock="sync_{account}", lock="sync_{account}",
              shared=False, bind=True)
    def sync(self: UniqueTask, account: str) -> int:
        return int(self.request.lock_fence)

    fences = [sync.delay("acme").get() for _ in range(2)]
    assert fences[1] > fences[0]
    assert keys(cluster) == []


def test_enqueue_then_the_worker_takes_the_lock(cluster: Cluster) -> None:
    app = make_app(cluster.url, eager=False)

    @app.task(base=UniqueTask, queueing_lock="sync_{account}", lock="sync_{account}",
              shared=False)
    def sync(account: str) -> None: ...

    job = sync.delay("acme")  # the queueing lock, and a place in the lock's line
    with pytest.raises(AlreadyQueued):
        sync.delay("acme")
    store = get_store(app)
    lock = sync._unique_defaults.lock(sync.name, sync._unique_lock, ("acme",), {})
    queueing_key = next(k for k in keys(cluster) if b":q:" in k).decode()
    # What the worker does when the job starts: take the lock, release the queueing lock.
    reply = store.acquire_lock(lock.base, token=job.id, limit=lock.limit,
                               lease_ms=lock.lease_ms, mode=lock.mode, wait_ms=lock.wait_ms,
                               queueing_key=queueing_key)
    assert reply.grant == 1
    assert not node(cluster.master_of(queueing_key)).exists(queueing_key)
    sync.delay("acme")  # queued again while the first one runs
    assert store.release_lock(lock.base, token=job.id, limit=lock.limit,
                              lease_ms=lock.lease_ms).held


def test_the_operators_api_lists_shows_and_releases(cluster: Cluster) -> None:
    """The listing reads with a pipeline there (a page's keys span slots): both kinds."""
    app = make_app(cluster.url, eager=False)
    store = get_store(app)
    cluster.flushall()
    try:
        for n in range(30):
            assert store.acquire_queueing_lock(f"celery_unique:q:{{t.report:r{n}}}",
                                               f"job-{n}", 60_000)[0]
        base = "celery_unique:l:{res}"
        assert store.acquire_lock(base, token="holder", limit=1, lease_ms=60_000,
                                  mode="order", wait_ms=60_000).grant == 1
        store.acquire_lock(base, token="next", limit=1, lease_ms=60_000, mode="order",
                           wait_ms=60_000)
        found = {i.key: i for i in admin.iter_locks(app, page=7)}
        assert len(found) == 31
        assert found["celery_unique:q:{t.report:r3}"].holders == ("job-3",)
        lock = found[base]
        assert (lock.kind, lock.holders, lock.waiting) == ("lock", ("holder",), 1)
        assert lock.ttl is not None and 0 < lock.ttl <= 60 and lock.fence is not None
        assert [i.key for i in admin.iter_locks(app, kind="lock")] == [base]
        detail = admin.get_lock(app, base)
        assert detail is not None and [w.task_id for w in detail.line] == ["next"]
        assert admin.release(app, base) == 1
        assert admin.clear(app, kind="queueing") == 30
    finally:
        cluster.flushall()


def test_locks_on_every_node_are_taken_handed_over_and_swept(cluster: Cluster) -> None:
    """Forty locks, spread over the three masters: each taken, one job parked behind its
    holder; the holders' leases run out (a dead worker) and the sweep, reading its
    registry on one node, hands every lock on to its parked job, wherever it lives."""
    from celery_unique.keys import registry_key
    from celery_unique.runtime import sweep
    from celery_unique.wire import RegistryEntry

    app = make_app(cluster.url, eager=False)
    store = get_store(app)
    cluster.flushall()
    bases = [f"celery_unique:l:{{res-{n}}}" for n in range(40)]
    assert {cluster.master_of(base).port for base in bases} == {
        m.port for m in cluster.masters}
    registry = registry_key("celery_unique")
    for n, base in enumerate(bases):
        assert store.acquire_lock(base, token=f"holder-{n}", limit=1, lease_ms=1000,
                                  mode="order", wait_ms=60_000).grant == 1
        assert store.acquire_lock(base, token=f"next-{n}", limit=1, lease_ms=1000,
                                  mode="order", wait_ms=60_000).grant == 0
        # A parked message woken is pushed by the script where it is kombu's (the atomic
        # path); here one the caller publishes: a signature (no task: never published).
        reply = store.park(base, token=f"next-{n}", limit=1, lease_ms=1000,
                           message="", registry=None)
        assert reply.grant == 0
        store.register(registry, RegistryEntry(1, 1000, base))
    time.sleep(1.1)  # every holder's lease runs out: its worker died
    assert sweep(app) == 40
    for n, base in enumerate(bases):
        detail = admin.get_lock(app, base)
        assert detail is not None and detail.holders == (f"next-{n}",), detail
    cluster.flushall()


def fast_failing_app(cluster: Cluster) -> Celery:
    """An app giving up on a frozen node after one attempt, not redis-py's three (10 s
    here to give up: 1 s)."""
    app = make_app(cluster.url, eager=False)
    once: dict[str, Any] = {"retry": Retry(NoBackoff(), 1)} if int(
        redis.__version__.split(".")[0]) >= 6 else {"cluster_error_retry_attempts": 1}
    app.conf.unique_redis_options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5,
                                     **once}
    return app


def test_a_master_down_is_an_outage_of_its_locks_alone() -> None:
    """A master frozen, no replica to take over, the cluster set to serve the slots it
    still covers (``cluster-require-full-coverage no``): an enqueue whose lock lives on the
    lost master fails as ``on_store_error`` says; locks on the other two keep working."""
    nodes = Cluster(3, 0, 1000, "--cluster-require-full-coverage", "no").start()
    try:
        app = fast_failing_app(nodes)

        @app.task(base=UniqueTask, queueing_lock="{key}", shared=False)
        def report(key: str) -> None: ...

        down = nodes.masters[2]
        keys = {f"k{n}": nodes.master_of(f"celery_unique:q:{{{report.name}:k{n}}}")
                for n in range(100)}
        on_down = next(k for k, master in keys.items() if master is down)
        alive = [k for k, master in keys.items() if master is not down]
        report.delay(alive[0])  # the client has read the cluster's layout
        os.kill(down._process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: failed(nodes, down), timeout=20, what="the master marked failed")
            started = time.monotonic()
            with pytest.raises(LockStoreUnavailable):
                report.delay(on_down)
            assert time.monotonic() - started < 5
            report.apply_async((on_down,), on_store_error="allow")  # published, unlocked
            for key in alive[1:20]:
                report.delay(key)
                with pytest.raises(AlreadyQueued):
                    report.delay(key)
        finally:
            os.kill(down._process.pid, signal.SIGCONT)
    finally:
        nodes.stop()


def test_a_cluster_down_is_a_store_outage() -> None:
    """With Redis' default ``cluster-require-full-coverage yes``, a master lost without a
    replica takes the whole cluster down (``CLUSTERDOWN``): every lock is then a store
    outage (:class:`LockStoreUnavailable`, as ``on_store_error`` says), never a raw error."""
    nodes = Cluster(3).start()
    try:
        app = fast_failing_app(nodes)

        @app.task(base=UniqueTask, queueing_lock="{key}", shared=False)
        def report(key: str) -> None: ...

        report.delay("first")
        down = nodes.masters[2]
        os.kill(down._process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: failed(nodes, down), timeout=20, what="the master marked failed")
            alive = next(f"k{n}" for n in range(100) if nodes.master_of(
                f"celery_unique:q:{{{report.name}:k{n}}}") is not down)
            with pytest.raises(LockStoreUnavailable, match="(?i)cluster"):
                report.delay(alive)
        finally:
            os.kill(down._process.pid, signal.SIGCONT)
    finally:
        nodes.stop()
