"""The Redis commands a job with a lock sends from its receipt to its release, read off a
real prefork worker with ``MONITOR`` on the private server (the performance budget:
round trips)."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import Counter
from typing import Any

import redis

from celery_unique.scripts import Scripts
from celery_unique.testing import RedisServer, wait_for

SCRIPTS = {hashlib.sha1(source.encode()).hexdigest(): name
           for name, source in vars(Scripts).items()
           if name.isupper() and isinstance(source, str)}


def watch(server: RedisServer, needle: str, stop: str, out: list[str]) -> threading.Thread:
    """Record, until ``ECHO stop``, the commands clients send on keys naming ``needle``
    (the commands scripts run inside Redis are left out): an EVALSHA by its script's
    name. kombu's own commands carry the message, not our keys: they are left out."""
    started = threading.Event()

    def run() -> None:
        with redis.Redis.from_url(server.url).monitor() as monitor:
            started.set()
            for command in monitor.listen():
                text = command["command"]
                if stop in text:
                    return
                if needle not in text or command.get("client_type") == "lua":
                    continue
                words = text.split()
                if words[0] == "EVALSHA":
                    out.append(SCRIPTS.get(words[1], words[1]))
                elif len(words) > 1 and words[1].startswith("celery_unique:"):
                    out.append(words[0])  # a plain command on a key of ours

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    return thread


def test_a_free_lock_costs_one_round_trip_to_take_and_one_to_release(
    tasks: Any, unique_redis_server: RedisServer, store: redis.Redis, path: str,
) -> None:
    # A first job loads the scripts (each first EVALSHA meets NOSCRIPT, then loads it).
    warm = uuid.uuid4().hex[:8]
    assert tasks.round_trips.delay(warm).get(timeout=30) == warm
    run, stop = uuid.uuid4().hex[:8], f"stop-{uuid.uuid4().hex}"
    seen: list[str] = []
    thread = watch(unique_redis_server, f"rt_{run}", stop, seen)
    assert tasks.round_trips.delay(run).get(timeout=30) == run
    wait_for(lambda: not store.keys(f"*rt_{run}*:holders"), timeout=10, what="the release")
    redis.Redis.from_url(unique_redis_server.url).echo(stop)
    thread.join(10)
    counts = Counter(seen)
    enqueue = {"atomic": {"PUSH_WITH_LOCKS": 1},
               # The lock on its short lease, its place, then its full lease once
               # published (sent, not waited for).
               "separate": {"ACQUIRE_QUEUEING_LOCK": 1, "ENTER_LINE": 1,
                            "PUBLISHED": 1}}[path]
    assert {k: counts.pop(k, 0) for k in enqueue} == enqueue, seen
    # The main process may mark the place of a job it holds (ARRIVE) at a sweep tick.
    counts.pop("ARRIVE", None)
    # The job itself: one script to take the lock (which releases its queueing lock too),
    # one to release it; nothing else.
    assert counts == {"ACQUIRE_LOCK": 1, "RELEASE_LOCK": 1}, seen
