"""The lock store SIGKILLed during a burst of 500 enqueues, then restarted."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from celery_unique import LockStoreUnavailable, UniqueTask
from celery_unique.testing import RedisServer, wait_for

SOCKET_TIMEOUT = 1.0


@pytest.fixture
def lock_store() -> Iterator[RedisServer]:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["raise", "allow"])
def test_a_burst_of_500_enqueues_through_a_store_crash(
    unique_redis_server: RedisServer, lock_store: RedisServer, policy: str
) -> None:
    """``"raise"``: each call is published with its lock, or raises at once, never both;
    ``"allow"``: every call is published. No call blocks past the socket timeout, and
    enqueues succeed again once the store is back."""
    queue = f"burst-{uuid.uuid4().hex}"
    app = Celery("tests", broker=f"{unique_redis_server.url}/8", set_as_current=False)
    app.conf.update(unique_redis_url=f"{lock_store.url}/0", task_default_queue=queue,
                    task_publish_retry=False, unique_on_store_error=policy,
                    unique_redis_options={"socket_timeout": SOCKET_TIMEOUT,
                                          "socket_connect_timeout": SOCKET_TIMEOUT})

    @app.task(base=UniqueTask, queueing_lock="{n}", shared=False)
    def t(n: int) -> None: ...

    published: dict[int, str] = {}
    refused: list[int] = []
    slowest = 0.0
    killed = threading.Event()

    def burst() -> None:
        nonlocal slowest
        for n in range(500):
            if n == 150:
                killed.set()  # the test kills the store now, mid-burst
            start = time.monotonic()
            try:
                published[n] = t.delay(n).id
            except LockStoreUnavailable:
                refused.append(n)
            slowest = max(slowest, time.monotonic() - start)

    thread = threading.Thread(target=burst)
    thread.start()
    assert killed.wait(60)
    lock_store.kill()
    thread.join(120)
    assert not thread.is_alive()
    messages = {json.loads(m)["headers"]["id"] for m in
                redis.Redis.from_url(f"{unique_redis_server.url}/8").lrange(queue, 0, -1)}
    assert messages == set(published.values())  # what returned was published, once
    assert len(published) + len(refused) == 500
    assert slowest < SOCKET_TIMEOUT * 3, slowest  # connect and read, bounded
    if policy == "raise":
        assert refused and len(published) >= 150
    else:
        assert not refused and len(published) == 500
    lock_store.start()
    wait_for(lambda: _enqueued(t), timeout=30, what="an enqueue with the store back")
    print(f"{policy}: {len(published)} published, {len(refused)} refused,"
          f" slowest call {slowest:.2f} s")


def _enqueued(task: UniqueTask) -> bool:
    try:
        task.delay(f"after-{uuid.uuid4().hex}")
    except LockStoreUnavailable:
        return False
    return True
