"""Both locks with RabbitMQ as the broker (run when one is reachable on localhost)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import string
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Queue

from celery_unique import AlreadyQueued
from celery_unique.testing import RedisServer, wait_for
from tests.helpers import held_locks, publish_forever

from .conftest import Worker

pytestmark = pytest.mark.acceptance

BROKER = os.environ.get("CELERY_UNIQUE_TEST_AMQP", "amqp://guest:guest@localhost:5672//")


def reachable(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


def delete_queue(url: str, name: str) -> None:
    """Leave the RabbitMQ the machine runs as it was: the test's queue goes."""
    with Connection(url, connect_timeout=2) as conn:
        conn.default_channel.queue_delete(name)


@pytest.fixture(scope="module")
def amqp(unique_redis_server: RedisServer) -> Iterator[Any]:
    if not reachable(BROKER):
        pytest.skip(f"no RabbitMQ at {BROKER}: the non-Redis broker is not tested here")
    env = {"CELERY_UNIQUE_TEST_REDIS": unique_redis_server.url,
           "CELERY_UNIQUE_TEST_AMQP": BROKER,
           "CELERY_UNIQUE_TEST_AMQP_QUEUE": f"celery-unique-test-{uuid.uuid4().hex[:8]}"}
    os.environ.update(env)
    from tests.acceptance import amqp_app  # reads the environment set above
    worker = Worker(unique_redis_server, concurrency=4, name="amqp",
                    queues=env["CELERY_UNIQUE_TEST_AMQP_QUEUE"],
                    app="tests.acceptance.amqp_app", env=env)
    try:
        worker.wait_ready()
        yield amqp_app
    finally:
        worker.stop()
        delete_queue(BROKER, env["CELERY_UNIQUE_TEST_AMQP_QUEUE"])


def test_alphabet_and_duplicates_over_rabbitmq(amqp: Any) -> None:
    path = Path(tempfile.mkdtemp()) / "alphabet.txt"
    for letter in string.ascii_lowercase:
        amqp.write_letter.delay(str(path), letter)
    # "z" is still waiting for its turn, so it is still queued.
    with pytest.raises(AlreadyQueued):
        amqp.write_letter.delay(str(path), "z")
    wait_for(lambda: path.exists() and len(path.read_text()) == 26, timeout=60,
             what="26 letters")
    assert path.read_text() == string.ascii_lowercase



def test_a_worker_with_no_lock_store_named_says_so_once(amqp: Any,
                                                       unique_redis_server: RedisServer
                                                       ) -> None:
    """RabbitMQ and no unique_redis_url: no guess at a local Redis. The worker says what
    to set, once, at start, and starts nothing (the caller's side: test_queueing_lock)."""
    queue = f"celery-unique-test-{uuid.uuid4().hex[:8]}"
    env = {"CELERY_UNIQUE_TEST_REDIS": unique_redis_server.url,
           "CELERY_UNIQUE_TEST_AMQP": BROKER, "CELERY_UNIQUE_TEST_AMQP_QUEUE": queue,
           "CELERY_UNIQUE_TEST_NO_STORE": "1"}
    worker = Worker(unique_redis_server, concurrency=1, name="amqp-nostore", queues=queue,
                    app="tests.acceptance.amqp_app", env=env)
    try:
        worker.wait_ready()
        assert worker.logs().count("set unique_redis_url") == 1
        assert "sweeping the locks" not in worker.logs()  # nothing started
    finally:
        worker.stop()
        delete_queue(BROKER, queue)


def _publish_forever(broker: str, store: str, queue: str, prefix: str, confirm: bool
                     ) -> None:
    """A publisher on RabbitMQ: distinct keys, one after the other, until it is killed."""
    app = Celery("amqp-killed", broker=broker, set_as_current=False)
    app.conf.update(unique_redis_url=store, task_default_queue=queue,
                    task_queues=[Queue(queue)], unique_publish_lease=PUBLISH_LEASE,
                    broker_connection_retry_on_startup=True,
                    broker_transport_options={"confirm_publish": confirm})
    publish_forever(app, prefix)


def _drain(url: str, queue: str) -> set[str]:
    """The ids of every message in ``queue``, taken off it."""
    ids = set()
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            ids.add(message.headers["id"])
    return ids


def _depth(url: str, queue: str) -> int:
    with Connection(url, connect_timeout=5) as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except conn.channel_errors:  # not declared yet: no message yet
            return 0


PUBLISH_LEASE = 1.0


@pytest.mark.parametrize("confirm", [False, True], ids=["no-confirms", "confirms"])
def test_a_publisher_killed_on_rabbitmq_orphans_a_lock_one_short_lease_at_most(
    amqp: Any, unique_redis_server: RedisServer, confirm: bool,
) -> None:
    """Issue's fault run on the non-atomic path: a publisher on RabbitMQ SIGKILLed at
    random moments 50 times, the locks in a private Redis. A lock left without its
    message has the short lease of a job not yet published: none is left after it. With
    publisher confirms, the full lease follows the broker's confirm."""
    queue = f"celery-unique-killed-{uuid.uuid4().hex[:8]}"
    store_url = f"{unique_redis_server.url}/5"
    store = redis.Redis.from_url(store_url)
    context = multiprocessing.get_context("fork")
    try:
        for round_ in range(50):
            start = _depth(BROKER, queue) if round_ else 0
            process = context.Process(target=_publish_forever,
                                      args=(BROKER, store_url, queue, f"{queue}-{round_}",
                                            confirm))
            process.start()
            wait_for(lambda start=start: _depth(BROKER, queue) >= start + 3, timeout=30,
                     interval=0.005, what="the publisher to publish")
            time.sleep(random.uniform(0, 0.01))  # the kill's timing, not a wait
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
        locks = held_locks(store, f"celery_unique:q:*{queue}*")
        messages = _drain(BROKER, queue)
        orphans = set(locks) - messages
        # Without confirms, kombu's publish returns once the message is written to the
        # socket: a publisher killed then may lose it in flight (the kernel drops what it
        # had not sent), its lock already given its full lease. Only confirms tell.
        lost = {o for o in orphans if locks[o] > PUBLISH_LEASE * 1000}
        if confirm:
            assert not lost, (len(orphans), max(locks[o] for o in lost))
        short = orphans - lost
        longest = max((locks[o] for o in short), default=0)
        wait_for(lambda: not short & set(held_locks(store, f"celery_unique:q:*{queue}*")),
                 timeout=PUBLISH_LEASE + 2, what="the orphans' short leases to end")
        mode = "confirms" if confirm else "no confirms"
        print(f"RabbitMQ ({mode}), 50 kills: {len(messages)} messages, {len(short)} orphan"
              f" locks, the longest {longest} ms left, none after the short lease;"
              f" {len(messages - set(locks))} messages without their lock; {len(lost)}"
              " messages lost in flight, their lock on its full lease")
    finally:
        delete_queue(BROKER, queue)
