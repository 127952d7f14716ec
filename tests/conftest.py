from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
from celery import Celery

from celery_unique.scripts import Store, use_store


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def app(fake_redis: fakeredis.FakeRedis) -> Iterator[Celery]:
    """An app with an in-memory broker and its locks in fakeredis (unit tests)."""
    app = Celery("tests", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_publish_retry = False
    use_store(app, Store.from_client(fake_redis))
    yield app
    app.close()


@pytest.fixture
def redis_app(unique_redis_server) -> Iterator[Celery]:  # type: ignore[no-untyped-def]
    """An app whose broker (db 2) and lock store (db 1) are the private Redis server."""
    import uuid

    import redis

    url = unique_redis_server.url
    redis.Redis.from_url(f"{url}/1").flushdb()
    app = Celery("tests", broker=f"{url}/2", set_as_current=False)
    app.conf.unique_redis_url = f"{url}/1"
    app.conf.task_publish_retry = False
    # A queue of its own per test, never a flushed broker database: kombu remembers the
    # queues it declared per connection, and would publish to a binding flushed away.
    app.conf.task_default_queue = f"test-{uuid.uuid4().hex}"
    yield app
    app.close()
