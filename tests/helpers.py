"""The lock scripts' typed replies as flat lists, as the tests read them."""

from __future__ import annotations

from typing import Any

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
