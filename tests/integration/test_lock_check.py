"""``lock_check_at_enqueue`` (que-locks' preemptive check) against a real Redis, on both
enqueue paths: a job that would be skipped for its lock is not queued at all."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import AlreadyQueued, UniqueTask
from celery_unique.store import get_store


def queued_ids(app: Celery) -> list[str]:
    broker = redis.Redis.from_url(app.conf.broker_url)
    return [json.loads(m)["headers"]["id"]
            for m in reversed(broker.lrange(app.conf.task_default_queue, 0, -1))]


@pytest.mark.parametrize("queueing", [False, True], ids=["lock", "lock+queueing"])
def test_a_job_whose_lock_is_held_now_is_not_queued(redis_app: Celery, queueing: bool
                                                     ) -> None:
    """The lock held by a running job: the enqueue raises :class:`AlreadyQueued` naming
    the running holder, and nothing is queued or taken (its queueing lock neither); with
    ``on_duplicate="existing"`` the running job's result is returned. A call may turn the
    check off; a lease run out, or a released lock, lets the job in."""
    options: dict[str, Any] = {"queueing_lock": "feed_{url}"} if queueing else {}

    @redis_app.task(base=UniqueTask, lock="feed_{url}", on_locked="skip",
                    lock_check_at_enqueue=True, shared=False, **options)
    def import_feed(url: str) -> None: ...

    store, base = get_store(redis_app), "celery_unique:l:{feed_u}"
    client = redis.Redis.from_url(redis_app.conf.unique_redis_url)
    assert store.acquire_lock(base, token="running", limit=1, lease_ms=60_000, mode="skip",
                              wait_ms=0).fence  # a worker runs a job under it
    with pytest.raises(AlreadyQueued) as info:
        import_feed.delay("u")
    assert (info.value.task_id, info.value.key) == ("running", base)
    assert 59 < info.value.ttl <= 60
    assert "already running under the lock" in str(info.value)
    assert import_feed.apply_async(("u",), on_duplicate="existing").id == "running"
    assert queued_ids(redis_app) == []
    assert client.keys("celery_unique:q:*") == []
    off = import_feed.apply_async(("u",), lock_check_at_enqueue=False)
    assert queued_ids(redis_app) == [off.id]
    if queueing:
        assert store.release(f"celery_unique:q:{{{import_feed.name}:feed_u}}", off.id)
    store.release_lock(base, token="running", limit=1, lease_ms=60_000)
    let_in = import_feed.delay("u")
    assert queued_ids(redis_app)[-1] == let_in.id
    # Other tasks, and jobs whose lock is in another mode, are not checked.

    @redis_app.task(base=UniqueTask, lock="feed_{url}", lock_check_at_enqueue=True,
                    shared=False)
    def in_order(url: str) -> None: ...

    assert store.acquire_lock(base, token="running2", limit=1, lease_ms=60_000, mode="skip",
                              wait_ms=0).fence
    ordered = in_order.delay("u")
    assert queued_ids(redis_app)[-1] == ordered.id
