"""Both locks with RabbitMQ as the broker (run when one is reachable on localhost)."""

from __future__ import annotations

import os
import string
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from celery_unique import AlreadyQueued
from celery_unique.testing import RedisServer, wait_for

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
