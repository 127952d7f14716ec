"""Both locks on Redis Cluster (``unique_redis_cluster``): a real, one-node cluster.

A cluster node refuses any command, scripts included, whose keys lie in two hash slots,
even when it owns both: these tests fail if a script of ours ever does that.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from redis.exceptions import RedisClusterException

from celery_unique import AlreadyQueued, UniqueTask
from celery_unique.keys import lock_keys
from celery_unique.scripts import Scripts
from celery_unique.store import get_store
from celery_unique.testing import RedisServer, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    server = RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    server.start()
    try:
        node = redis.Redis.from_url(server.url)
        node.execute_command("CLUSTER ADDSLOTS", *range(16384))
        wait_for(lambda: node.cluster("info")["cluster_state"] == "ok", timeout=15,
                 what="the cluster to be ready")
        node.close()
        yield f"{server.url}/0"
    finally:
        server.stop()


def make_app(url: str, eager: bool) -> Celery:
    app = Celery("cluster", broker="memory://", set_as_current=False)
    app.conf.update(unique_redis_url=url, unique_redis_cluster=True,
                    task_always_eager=eager, task_publish_retry=False)
    return app


def keys(url: str) -> list[bytes]:
    return [k for k in redis.Redis.from_url(url).keys("*")
            if not k.endswith((b":seq", b":ran"))]


def test_a_script_with_keys_in_two_slots_is_refused(cluster: str) -> None:
    store = get_store(make_app(cluster, eager=True))
    assert store.cluster
    script = store.client.register_script(Scripts.ACQUIRE_LOCK)
    mixed = [*lock_keys("celery_unique:l:{a}"), "celery_unique:q:{b}"]
    args = ["t", 1, 1000, "order", 1000]
    with pytest.raises(RedisClusterException, match="same key slot"):  # the client
        script(keys=mixed, args=args, client=store.client)
    node = redis.Redis.from_url(cluster)
    with pytest.raises(redis.ResponseError, match="same slot"):  # and the server (CROSSSLOT)
        script(keys=mixed, args=args, client=node)
    assert script(keys=mixed[:5], args=args, client=node)[0] == 1  # one slot: fine
    node.flushall()


def test_both_locks_in_the_caller(cluster: str) -> None:
    app = make_app(cluster, eager=True)

    @app.task(base=UniqueTask, queueing_lock="sync_{account}", lock="sync_{account}",
              shared=False, bind=True)
    def sync(self: UniqueTask, account: str) -> int:
        return int(self.request.lock_fence)

    fences = [sync.delay("acme").get() for _ in range(2)]
    assert fences[1] > fences[0]
    assert keys(cluster) == []


def test_enqueue_then_the_worker_takes_the_lock(cluster: str) -> None:
    app = make_app(cluster, eager=False)

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
    assert not redis.Redis.from_url(cluster).exists(queueing_key)
    sync.delay("acme")  # queued again while the first one runs
    assert store.release_lock(lock.base, token=job.id, limit=lock.limit,
                              lease_ms=lock.lease_ms).held


def test_the_operators_api_lists_shows_and_releases(cluster: str) -> None:
    """The listing reads with a pipeline there (a page's keys span slots): both kinds."""
    from celery_unique import admin

    app = make_app(cluster, eager=False)
    store = get_store(app)
    redis.Redis.from_url(cluster).flushall()
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
        redis.Redis.from_url(cluster).flushall()
