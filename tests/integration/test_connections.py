"""The lock store over Sentinel (with a failover), TLS, a Unix socket and a client factory:
real private servers each."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import AlreadyQueued, LockStoreUnavailable, UniqueTask
from celery_unique.testing import RedisServer, find_redis_server, free_port, wait_for


def make_app(url: str, **conf: Any) -> Celery:
    app = Celery("tests", broker="memory://", set_as_current=False)
    app.conf.update(unique_redis_url=url, task_publish_retry=False, **conf)
    return app


def both_locks(app: Celery) -> Any:
    """A task with both locks; one enqueue, one duplicate refused, one locked run."""
    name = f"tests.conn_{uuid.uuid4().hex[:8]}"

    @app.task(base=UniqueTask, queueing_lock="q_{n}", name=name, shared=False)
    def queued(n: int) -> None: ...

    @app.task(base=UniqueTask, lock="l_{n}", name=f"{name}_locked", shared=False, bind=True)
    def locked(self: Any, n: int) -> int:
        return int(self.request.lock_fence)

    queued.delay(1)
    with pytest.raises(AlreadyQueued):
        queued.delay(1)
    assert locked.apply((1,)).get() > 0
    return queued


class Process:
    """A redis-server (or sentinel) started from a config file of its own."""

    def __init__(self, config: str, *args: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="celery-unique-conn-")
        path = Path(self.dir, "redis.conf")
        path.write_text(config)
        self.process = subprocess.Popen([find_redis_server(), str(path), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        cwd=self.dir)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def sentinel() -> Iterator[tuple[int, int, int]]:
    """A primary, its replica and one sentinel watching them: (primary, replica, sentinel)."""
    primary = RedisServer().start()
    replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port)).start()
    port = free_port()
    watcher = Process(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1"
                      f" {primary.port} 1\nsentinel down-after-milliseconds mymaster 1000\n"
                      "sentinel failover-timeout mymaster 3000\n", "--sentinel")
    try:
        wait_for(lambda: _replicated(replica.port), timeout=15, what="the replica to sync")
        wait_for(lambda: _master(port) == primary.port, timeout=15,
                 what="the sentinel to watch the primary")
        yield primary.port, replica.port, port
    finally:
        watcher.stop()
        replica.stop()
        primary.stop()


def _replicated(port: int) -> bool:
    return bool(redis.Redis(port=port).info("replication").get("master_link_status") == "up")


def _master(port: int) -> int | None:
    # The raw command: redis-py 6.4's reply parser rejects its own
    # sentinel_get_master_addr_by_name on a plain client.
    try:
        address = redis.Redis(port=port).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
    except redis.RedisError:
        return None
    return int(address[1]) if address else None


def _role(port: int) -> str | None:
    """The server's role; None while it closes its clients (a primary turning replica)."""
    try:
        return str(redis.Redis(port=port).info("replication")["role"])
    except redis.ConnectionError:
        return None


def _failover(port: int) -> bool:
    """Ask the sentinel for a failover; False while it refuses for want of a replica it
    has read (it learns of the replica from the primary, then reads it, within seconds)."""
    try:
        redis.Redis(port=port).execute_command("SENTINEL", "FAILOVER", "mymaster")
    except redis.ResponseError as exc:
        if "NOGOODSLAVE" in str(exc):
            return False
        raise
    return True


def test_sentinel_with_a_failover_followed(sentinel: tuple[int, int, int]) -> None:
    primary, replica, port = sentinel
    app = make_app(f"sentinel://127.0.0.1:{port};sentinel://127.0.0.1:{port}/0",
                   unique_redis_options={"master_name": "mymaster", "socket_timeout": 2})
    queued = both_locks(app)
    assert redis.Redis(port=primary).exists(f"celery_unique:q:{{{queued.name}:q_1}}")
    wait_for(lambda: _failover(port), timeout=30, what="the sentinel to start a failover")
    wait_for(lambda: _master(port) == replica, timeout=30, what="the failover")
    # Until the old primary is told to follow the new one, it still takes writes, which
    # its resync then drops: asynchronous replication (see the guarantees page).
    wait_for(lambda: _role(primary) == "slave", timeout=30,
             what="the old primary to follow the new one")

    def enqueued() -> bool:
        try:
            queued.delay(2)
        except LockStoreUnavailable:
            return False  # the old primary refused the write: the client asks again
        return True

    wait_for(enqueued, timeout=30, what="an enqueue on the new primary")
    assert redis.Redis(port=replica).exists(f"celery_unique:q:{{{queued.name}:q_2}}")
    with pytest.raises(AlreadyQueued):  # the lock taken before the failover was replicated
        queued.delay(1)


def test_a_sentinel_url_without_master_name_is_a_clear_error() -> None:
    app = make_app("sentinel://127.0.0.1:1")

    @app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    with pytest.raises(Exception, match="needs master_name"):
        t.delay()


@pytest.fixture
def tls_server() -> Iterator[tuple[int, str]]:
    folder = tempfile.mkdtemp(prefix="celery-unique-tls-")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    server = Process(f"port 0\nbind 127.0.0.1\ntls-port {port}\ntls-cert-file {cert}\n"
                     f"tls-key-file {key}\ntls-ca-cert-file {cert}\ntls-auth-clients no\n"
                     "save \"\"\nappendonly no\n")

    def up() -> bool:
        if server.process.poll() is not None:
            output = server.process.stdout.read().decode() if server.process.stdout else ""
            if ("TLS" in output and "not" in output.lower()) or "'tls-port" in output:
                pytest.skip(f"this redis-server has no TLS: {output.strip()[-200:]}")
            raise RuntimeError(f"redis-server with TLS exited: {output[-500:]}")
        try:
            return bool(redis.Redis(host="127.0.0.1", port=port, ssl=True,
                                    ssl_ca_certs=cert).ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, timeout=15, what="redis-server with TLS")
        yield port, cert
    finally:
        server.stop()


def test_tls(tls_server: tuple[int, str]) -> None:
    port, cert = tls_server
    app = make_app(f"rediss://127.0.0.1:{port}/0", unique_redis_options={"ssl_ca_certs": cert})
    queued = both_locks(app)
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=cert)
    assert client.exists(f"celery_unique:q:{{{queued.name}:q_1}}")


def test_unix_socket() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="celery-unique-sock-"), "redis.sock")
    with RedisServer("--unixsocket", path, "--unixsocketperm", "700"):
        app = make_app(f"unix://{path}?db=3")
        queued = both_locks(app)
        assert redis.Redis(unix_socket_path=path, db=3).exists(
            f"celery_unique:q:{{{queued.name}:q_1}}")


def test_a_client_factory(unique_redis_server: RedisServer) -> None:
    made: list[Celery] = []

    def factory(app: Celery) -> redis.Redis:
        made.append(app)
        return redis.Redis.from_url(f"{unique_redis_server.url}/7")

    app = make_app("redis://127.0.0.1:1/0", unique_redis_client=factory)
    queued = both_locks(app)
    assert made == [app]
    assert redis.Redis.from_url(f"{unique_redis_server.url}/7").exists(
        f"celery_unique:q:{{{queued.name}:q_1}}")


def test_threads_keep_at_most_half_a_bounded_pool(unique_redis_server: RedisServer) -> None:
    """Each thread keeps the connection it used, but never more than half the pool's
    bound in all, and gives it back when it ends: idle threads never use the pool up."""
    from celery_unique.store import Store

    store = Store.from_url(f"{unique_redis_server.url}/1", {"max_connections": 4})
    conns = store.conns
    assert conns is not None
    pool = conns.pool
    used, done, one_at_a_time = threading.Barrier(11), threading.Event(), threading.Lock()

    def enqueue_then_idle() -> None:
        with one_at_a_time:  # ten at once would need ten connections of the four
            store.send_acquire_queueing_lock(f"celery_unique:q:{uuid.uuid4()}", "t",
                                             1000).result()
        used.wait(10)
        done.wait(10)

    threads = [threading.Thread(target=enqueue_then_idle) for _ in range(10)]
    for thread in threads:
        thread.start()
    used.wait(10)
    assert conns.kept == 2
    lent = [pool.get_connection(*store._pool_args) for _ in range(2)]  # the other half
    for conn in lent:
        pool.release(conn)
    done.set()
    for thread in threads:
        thread.join(10)
    assert conns.kept == 0  # ended threads gave theirs back: the whole pool lends again
    lent = [pool.get_connection(*store._pool_args) for _ in range(4)]
    for conn in lent:
        pool.release(conn)
    store.client.close()


def test_a_connection_kept_with_its_owner_is_the_only_one(
    unique_redis_server: RedisServer,
) -> None:
    """The broker hook's connection is kept with kombu's channel (its owner), one per
    owner; an owner that cannot hold it (no ``__dict__``) gives it back each time."""
    from celery_unique.store import Store

    url = f"{unique_redis_server.url}/1"
    store = Store.from_url(url)

    class Channel: ...

    class Slotted:
        __slots__ = ()

    for owner, free in ((Channel(), 1), (Slotted(), 2)):
        kombu_like = redis.Redis.from_url(url, max_connections=2)  # a channel's pool
        pool = kombu_like.connection_pool
        for _ in range(5):
            assert store.push_with_locks(
                kombu_like, owner, queue="celery_unique:owner-queue", message="m", token="t",
                queueing_key="celery_unique:q:owner", ttl_ms=1000, line=None).taken
        lent = [pool.get_connection(*store._pool_args) for _ in range(free)]
        with pytest.raises(redis.ConnectionError, match="Too many connections"):
            pool.get_connection(*store._pool_args)
        for conn in lent:
            pool.release(conn)
        kombu_like.close()
    store.client.close()


def test_a_deferred_reply_is_read_first_and_never_left_for_another(
    unique_redis_server: RedisServer,
) -> None:
    """The full lease of a published job is sent and its reply read at the thread's next
    command: that command still gets its own reply. A thread that ends with a reply
    unread closes its connection before the pool lends it again."""
    from celery_unique.store import Store

    store = Store.from_url(f"{unique_redis_server.url}/1", {"max_connections": 4})
    conns = store.conns
    assert conns is not None
    key = f"celery_unique:q:{uuid.uuid4()}"
    store.acquire_queueing_lock(key, "t", 1000)  # the thread keeps a connection
    store.published("t", key, 2000)  # the first: read at once (loads the script)
    store.send_published("t", key, 60_000, defer=True)
    assert conns._local.slot.deferred is not None  # sent, not read
    assert 59_000 < store.client.pttl(key) <= 60_000  # the server ran it all the same
    # The next command sent ahead (an enqueue's) reads it first, then gets its own reply.
    assert store.send_acquire_queueing_lock(key, "t", 90_000).result().taken
    assert conns._local.slot.deferred is None and 89_000 < store.client.pttl(key) <= 90_000

    closed: list[Any] = []

    def enqueue_and_end() -> None:
        store.send_acquire_queueing_lock(key, "t", 1000).result()
        store.published("t", key, 2000)
        store.send_published("t", key, 5000, defer=True)
        conn = conns._local.slot.deferred._conn
        conn_disconnect = conn.disconnect

        def disconnect(*args: Any, **kwargs: Any) -> None:
            closed.append(conn)
            conn_disconnect(*args, **kwargs)

        conn.disconnect = disconnect

    thread = threading.Thread(target=enqueue_and_end)
    thread.start()
    thread.join(10)
    wait_for(lambda: closed, timeout=5, what="the unread connection to be closed")
    for _ in range(4):  # every connection the pool lends answers its own command
        assert store.send_acquire_queueing_lock(f"celery_unique:q:{uuid.uuid4()}", "u",
                                                1000).result().taken
    store.client.close()


def test_after_the_server_forgot_its_scripts_the_full_lease_is_not_left_unread(
    unique_redis_server: RedisServer,
) -> None:
    """A lock store restarted or flushed forgets its scripts: the lock taken in the same
    enqueue says NOSCRIPT, and the full lease is then read at once (which loads it),
    not left for a next enqueue that may never come."""
    from celery_unique.store import Store

    store = Store.from_url(f"{unique_redis_server.url}/1")
    conns = store.conns
    assert conns is not None
    key = f"celery_unique:q:{uuid.uuid4()}"
    store.send_acquire_queueing_lock(key, "t", 1000).result()
    store.published("t", key, 2000)  # loaded
    store.client.script_flush()
    store.send_acquire_queueing_lock(key, "t", 1000).result()  # NOSCRIPT, then run again
    store.send_published("t", key, 60_000, defer=True)
    assert conns._local.slot.deferred is None  # read at once
    assert 59_000 < store.client.pttl(key) <= 60_000
    store.send_published("t", key, 70_000, defer=True)
    assert conns._local.slot.deferred is not None  # loaded again: deferred again
    store.client.close()
