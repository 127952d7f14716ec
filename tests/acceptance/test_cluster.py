"""The locks on a Redis Cluster of three masters, with a real prefork worker (the broker
on the tests' plain Redis: kombu has no Cluster transport)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique.store import get_store
from celery_unique.testing import RedisServer, max_overlap, wait_for
from tests.acceptance.conftest import Worker
from tests.helpers import Cluster, node


def node_role(server: RedisServer) -> str:
    try:
        return str(node(server).info("replication")["role"])
    except redis.ConnectionError:
        return "down"


def replica_of(nodes: Cluster, replica: RedisServer) -> RedisServer:
    """The master ``replica`` was started to follow (:class:`Cluster` pairs them in order)."""
    return nodes.masters[nodes.replicas.index(replica) % len(nodes.masters)]


@contextlib.contextmanager
def using(nodes: Cluster, server: RedisServer) -> Iterator[Any]:
    """The tests' app (this process's copy) with its locks on ``nodes``, for the block."""
    os.environ["CELERY_UNIQUE_TEST_REDIS"] = server.url
    from tests.acceptance import tasks

    conf = tasks.app.conf
    before = conf.unique_redis_url, conf.unique_redis_cluster
    conf.unique_redis_url, conf.unique_redis_cluster = nodes.url, True
    get_store(tasks.app)  # changed at run time: read again (tasks read them when bound)
    try:
        yield tasks
    finally:
        conf.unique_redis_url, conf.unique_redis_cluster = before
        get_store(tasks.app)


def cluster_worker(server: RedisServer, nodes: Cluster, name: str, queue: str) -> Worker:
    """A prefork worker of four processes on ``queue``, its locks on ``nodes``."""
    return Worker(server, concurrency=4, name=name, queues=queue,
                  env={"CELERY_UNIQUE_TEST_STORE_URL": nodes.url,
                       "CELERY_UNIQUE_TEST_STORE_CLUSTER": "1"})


@pytest.fixture
def on_cluster(unique_redis_server: RedisServer, results: str
               ) -> Iterator[tuple[Cluster, Any]]:
    """A three-master cluster, and the tests' app using it (``results``: the session's
    results folder is set before the tests' app is first imported, as every test needs)."""
    nodes = Cluster(masters=3).start()
    try:
        with using(nodes, unique_redis_server) as tasks:
            yield nodes, tasks
    finally:
        nodes.stop()


def test_jobs_of_locks_on_every_node_run_in_creation_order_never_together(
    on_cluster: tuple[Cluster, Any], unique_redis_server: RedisServer,
) -> None:
    """240 jobs on 12 locks, ``"order"`` mode, a worker of four processes: each lock's jobs
    run one at a time, in creation order, under strictly increasing fences; nothing is
    left held."""
    nodes, tasks = on_cluster
    run = uuid.uuid4().hex[:12]
    queue = f"cluster-{run}"
    resources = [f"res-{run}-{n}" for n in range(12)]
    assert {nodes.master_of(f"celery_unique:l:{{{r}}}").port for r in resources} == {
        m.port for m in nodes.masters}, "the locks should live on every master"
    worker = cluster_worker(unique_redis_server, nodes, "cluster", queue)
    coord = redis.Redis.from_url(f"{unique_redis_server.url}/4")
    try:
        worker.wait_ready()
        for n in range(240):
            tasks.interval.apply_async((run, resources[n % 12], n), queue=queue)
        wait_for(lambda: coord.llen(f"intervals:{run}") == 240, timeout=120,
                 what=f"240 jobs (worker log: {worker.log})")
    finally:
        worker.stop()
    rows = [json.loads(x) for x in coord.lrange(f"intervals:{run}", 0, -1)]
    assert sorted(r[3] for r in rows) == list(range(240))  # each ran once
    for resource in resources:
        mine = sorted((r for r in rows if r[0] == resource), key=lambda r: r[1])
        assert max_overlap([(r[1], r[2]) for r in mine]) == 1
        assert [r[3] for r in mine] == sorted(r[3] for r in mine)  # creation order
        fences = [r[4] for r in mine]
        assert fences == sorted(fences) and len(set(fences)) == len(fences)
    assert nodes.find_keys("*:holders") == [] and nodes.find_keys("*:parked") == []


def test_a_failover_keeps_the_fence_order(unique_redis_server: RedisServer, results: str
                                          ) -> None:
    """A master SIGKILLed mid-run, a round of its writes not on its replica, which Redis
    Cluster promotes: what it cost is counted and printed (jobs lost, run twice,
    overlapping runs of one lock, locks left held); what must hold is that whenever two
    runs of one lock overlapped, the later one carries the higher fence, so that a
    resource checking fences refuses the earlier one. The figures of repeated runs are on
    the guarantees page (``python -m tests.acceptance.test_cluster``)."""
    print(f"\nfailover: {failover(unique_redis_server, jobs=12, seconds=4)}")


def failover(server: RedisServer, jobs: int, seconds: float, quiet: float = 15
             ) -> dict[str, int]:
    """``jobs`` jobs of ``seconds`` on three locks that live on one master (a job outlasts
    the failover), a worker of four processes. After three have run, the master's replica
    stops; after three more, the master is SIGKILLed: what it wrote meanwhile (a round of
    releases and of grants) is lost, as in any failover that comes before the replica
    caught up. The replica takes over. Counts what that cost once every job has run, or
    none has for ``quiet`` s (a job published again during the outage waits up to 30 s:
    "not run" counts those too, unless ``quiet`` is longer)."""
    nodes = Cluster(masters=3, replicas=1, node_timeout=1000).start()
    try:
        with using(nodes, server) as tasks:
            return _failover(nodes, tasks, server, jobs, seconds, quiet)
    finally:
        nodes.stop()


def _failover(nodes: Cluster, tasks: Any, server: RedisServer, jobs: int, seconds: float,
              quiet: float) -> dict[str, int]:
    run = uuid.uuid4().hex[:12]
    queue = f"failover-{run}"
    victim = nodes.masters[0]
    resources = [r for r in (f"res-{run}-{n}" for n in range(100))
                 if nodes.master_of(f"celery_unique:l:{{{r}}}") is victim][:3]
    promoted = [r for r in nodes.replicas if replica_of(nodes, r) is victim]
    worker = cluster_worker(server, nodes, "failover", queue)
    coord = redis.Redis.from_url(f"{server.url}/4")
    try:
        worker.wait_ready()
        for n in range(jobs):
            tasks.failover_job.apply_async((run, resources[n % 3], n, seconds), queue=queue)
        wait_for(lambda: coord.llen(f"intervals:{run}") >= 3, timeout=60, what="3 jobs")
        for replica in promoted:
            os.kill(replica._process.pid, signal.SIGSTOP)
        # Its link cut too: else the kernel would keep the stream for it while it is stopped.
        node(victim).execute_command("CLIENT", "KILL", "TYPE", "replica")
        # The first round's releases and the next round's grants reach the master alone.
        wait_for(lambda: coord.llen(f"intervals:{run}") >= 6, timeout=60, what="6 jobs")
        victim.kill()
        for replica in promoted:
            os.kill(replica._process.pid, signal.SIGCONT)
        wait_for(lambda: all(node_role(r) == "master" for r in promoted), timeout=30,
                 what="the replica promoted")
        wait_for(settled(coord, f"intervals:{run}", jobs, quiet), timeout=300, interval=0.2,
                 what="the jobs to settle")
        rows = [json.loads(x) for x in coord.lrange(f"intervals:{run}", 0, -1)]

        def held() -> int:
            """Holders whose lease still runs (an expired one is cleared only by the lock's
            next script)."""
            return sum(int(master.zcount(key, time.time() * 1000, "+inf"))
                       for master in nodes.live_masters() for key in master.keys("*:holders"))

        # The last jobs release their locks as they end: anything held three leases
        # after the last one started is a lock left held.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: held() == 0, timeout=3 * 2 + seconds, what="the locks freed")
        left = held()
    finally:
        worker.stop()
    ran = [r[3] for r in rows]
    overlaps = 0
    for resource in resources:
        mine = sorted((r for r in rows if r[0] == resource), key=lambda r: r[1])
        for i, a in enumerate(mine):
            for b in mine[i + 1:]:
                if b[1] < a[2]:  # b started while a ran
                    overlaps += 1
                    assert b[4] > a[4], f"overlapping runs without a higher fence: {a} {b}"
    return {"jobs": jobs, "not run": jobs - len(set(ran)),
            "run twice": len(ran) - len(set(ran)),
            "overlapping pairs": overlaps, "told lost": sum(1 for r in rows if r[5]),
            "left held": left}


def settled(coord: redis.Redis, key: str, jobs: int, quiet: float) -> Any:
    """Every job has run (a run twice counts once), or none has for ``quiet`` s."""
    seen = [0, time.monotonic()]

    def done() -> bool:
        count = int(coord.llen(key))
        if count != seen[0]:
            seen[:] = [count, time.monotonic()]
        ran = {json.loads(row)[3] for row in coord.lrange(key, 0, -1)}
        return len(ran) >= jobs or time.monotonic() - seen[1] > quiet

    return done


if __name__ == "__main__":  # the figures of the guarantees page: ten failovers
    with RedisServer() as broker:
        for _ in range(10):
            print(failover(broker, jobs=12, seconds=4, quiet=45), flush=True)
