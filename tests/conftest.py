from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
from celery import Celery

from celery_unique.store import Store, use_store

# The plugin is opt-in (installing the package loads nothing): the suite enables it.
pytest_plugins = ["celery_unique.testing", "pytester"]
# A user's project, run by tests/integration/test_plugin.py with pytest's own pytester.
collect_ignore = ["integration/plugin_project"]


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


#: The two enqueue paths: the lock store is the broker's database (the default; locks
#: taken by the push script) or another database (locks taken before the push).
PATHS = ("atomic", "separate")


@pytest.fixture(params=PATHS)
def redis_app(request: pytest.FixtureRequest, unique_redis_server) -> Iterator[Celery]:  # type: ignore[no-untyped-def]
    """An app whose broker (db 2) and lock store (db 2, or db 1) are the private server."""
    import uuid

    import redis

    from celery_unique import broker
    from celery_unique.store import get_store

    url = unique_redis_server.url
    store_db = 2 if request.param == "atomic" else 1
    store = redis.Redis.from_url(f"{url}/{store_db}")
    for key in store.scan_iter("celery_unique:*"):
        store.delete(key)
    store.close()
    app = Celery("tests", broker=f"{url}/2", set_as_current=False)
    app.conf.unique_redis_url = f"{url}/{store_db}"
    app.conf.task_publish_retry = False
    # A queue of its own per test, never a flushed broker database: kombu remembers the
    # queues it declared per connection, and would publish to a binding flushed away.
    app.conf.task_default_queue = f"test-{uuid.uuid4().hex}"
    assert broker.atomic(app, get_store(app)) is (request.param == "atomic")
    yield app
    app.close()
