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


def publish_forever(app: Celery, prefix: str) -> None:
    """A publisher for the kill runs: distinct keys, one after the other, until killed."""
    @app.task(base=UniqueTask, queueing_lock="{n}", name="tests.killed", shared=False)
    def killed(n: str) -> None: ...

    i = 0
    while True:
        killed.delay(f"{prefix}-{i}")
        i += 1
