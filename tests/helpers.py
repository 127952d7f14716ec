"""Helpers the tests share: the lock scripts' typed replies as flat lists, and the
queueing locks held in a store."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from celery_unique import UniqueTask
from celery_unique.scripts import Grant, LockReply, Released, Swept, Woken


def woken(pairs: list[Woken]) -> list[str]:
    return [x for pair in pairs for x in pair]


def flat(reply: Any) -> list[Any]:
    """``[1, fence]`` or ``[grant, holder, place, token, message, ...]`` (acquire, park);
    ``[held, token, message, ...]`` (release); ``[next ms, token, message, ...]`` (sweep)."""
    if isinstance(reply, LockReply):
        if reply.grant is Grant.TAKEN:
            return [1, reply.fence]
        return [int(reply.grant), reply.holder, reply.place, *woken(reply.woken)]
    if isinstance(reply, Released):
        return [int(reply.held), *woken(reply.woken)]
    if isinstance(reply, Swept):
        return [reply.next_ms, *woken(reply.woken)]
    raise TypeError(reply)


def held_locks(store: redis.Redis, pattern: str) -> dict[str, int]:
    """Each queueing lock's holder and its lease left (ms); one that ended meanwhile (a
    short lease) is not counted."""
    held = {}
    for key in store.scan_iter(pattern):
        holder, pttl = store.get(key), store.pttl(key)
        if holder is not None and pttl > 0:
            held[holder.decode()] = pttl
    return held


def publish_forever(app: Celery, prefix: str, lock: str | None = None) -> None:
    """A publisher for the kill runs: distinct keys, one after the other, until killed;
    ``lock``: each job also takes its place in that lock's line ("order")."""
    @app.task(base=UniqueTask, queueing_lock="{n}", lock=lock, name="tests.killed",
              shared=False)
    def killed(n: str) -> None: ...

    i = 0
    while True:
        killed.delay(f"{prefix}-{i}")
        i += 1


def replace_forever(app: Celery, doc: str) -> None:
    """A publisher for the kill runs: one key, each call replacing the job queued before
    it (``on_duplicate="replace"``), until killed."""
    @app.task(base=UniqueTask, queueing_lock="{doc}", on_duplicate="replace",
              name="tests.replacing", shared=False)
    def replacing(doc: str, n: int) -> None: ...

    i = 0
    while True:
        replacing.delay(doc, i)
        i += 1


class Cluster:
    """A real Redis Cluster of private servers: ``masters`` masters sharing the 16,384 slots
    in equal ranges, each with ``replicas`` replicas; the failure detection at
    ``node_timeout`` ms (a replica takes over from a dead master about that long after);
    ``extra``: more options for every node."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout: int = 1000,
                 *extra: str) -> None:
        from celery_unique.testing import RedisServer

        # A replica that never synced refuses to take over: sync at once, not 5 s later.
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout), "--repl-diskless-sync-delay",
                "0", *extra)
        self.masters = [RedisServer(*args) for _ in range(masters)]
        self.replicas = [RedisServer(*args) for _ in range(masters * replicas)]
        self.url = ""
        self.ids: dict[int, str] = {}

    @property
    def servers(self) -> list[Any]:
        return self.masters + self.replicas

    def start(self) -> Cluster:
        from celery_unique.testing import wait_for

        for server in self.servers:
            server.start()
        step = -(-16384 // len(self.masters))
        for i, server in enumerate(self.masters):
            node(server).execute_command("CLUSTER ADDSLOTS",
                                         *range(i * step, min((i + 1) * step, 16384)))
        first = self.masters[0]
        for server in self.servers[1:]:
            node(server).execute_command("CLUSTER MEET", "127.0.0.1", first.port)
        count = len(self.servers)
        wait_for(lambda: all(int(node(s).cluster("info")["cluster_known_nodes"]) == count
                             for s in self.servers), timeout=30, what="the nodes to meet")
        for i, server in enumerate(self.replicas):
            master = self.masters[i % len(self.masters)]
            node(server).execute_command("CLUSTER REPLICATE", node_id(master))
        wait_for(lambda: all(node(s).cluster("info")["cluster_state"] == "ok"
                             for s in self.servers), timeout=30, what="the cluster to be ok")
        wait_for(lambda: all(node(s).info("replication").get("master_link_status") == "up"
                             for s in self.replicas), timeout=30, what="the replicas to sync")
        self.url = f"{first.url}/0"
        #: Each node's id, by port (read while they all answer).
        self.ids = {s.port: node_id(s) for s in self.servers}
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def live_masters(self) -> list[redis.Redis]:
        """A client of each node that is up and a master now (a replica promoted too)."""
        found = []
        for server in self.servers:
            try:
                if node(server).info("replication")["role"] == "master":
                    found.append(node(server))
            except redis.ConnectionError:
                continue
        return found

    def find_keys(self, pattern: str = "*") -> list[bytes]:
        """Every key of every live master."""
        return [key for master in self.live_masters() for key in master.keys(pattern)]

    def flushall(self) -> None:
        for server in self.masters:
            node(server).flushall()

    def master_of(self, key: str) -> Any:
        """The master server holding ``key``'s slot now."""
        slot = int(node(self.masters[0]).execute_command("CLUSTER KEYSLOT", key))
        step = -(-16384 // len(self.masters))
        return self.masters[slot // step]


def failed(cluster: Cluster, server: Any) -> bool:
    """Whether every other master has marked ``server`` failed (``CLUSTER NODES``)."""
    me = cluster.ids[server.port]
    return all(any(entry["node_id"] == me and "fail" in entry["flags"].split(",")
                   for entry in node(other).cluster("nodes").values())
               for other in cluster.masters if other is not server)


def node(server: Any) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def node_id(server: Any) -> str:
    reply = node(server).execute_command("CLUSTER MYID")
    return reply.decode() if isinstance(reply, bytes) else str(reply)
