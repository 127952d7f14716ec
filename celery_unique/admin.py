"""The operator's API: list the locks, look at one, release them.

Everything here reads Redis with ``SCAN`` (never ``KEYS``), a page at a time, so that
listing a million locks holds one page in memory. Releasing goes through the same scripts
as a job's own release: a lock with jobs waiting is handed to the first in line::

    from celery_unique import admin
    for lock in admin.iter_locks(app, kind="lock"):
        print(lock.key, lock.holders, lock.waiting)
    admin.release(app, "celery_unique:q:{tasks.report:report_alice@example.com}")
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from collections.abc import Iterator
from typing import Any

from celery import Celery
from redis.cluster import RedisCluster

from .broker import publish_woken
from .keys import LOCK_KEY_SUFFIXES, glob_escape, registry_key
from .scripts import text
from .settings import setting
from .store import Store, get_store
from .wire import decode_parked

__all__ = ["LockDetail", "LockInfo", "Waiting", "clear", "get_lock", "iter_locks", "release"]

KINDS = ("queueing", "lock", "rate")
_SUFFIXES = tuple(f":{suffix}" for suffix in LOCK_KEY_SUFFIXES)
_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """One lock as Redis holds it now."""

    key: str  #: what :func:`get_lock` and :func:`release` take
    #: ``"queueing"``, ``"lock"`` or ``"rate"`` (a ``global_rate_limit``: its holders are
    #: the starts of its period, its line the jobs waiting for one)
    kind: str
    task: str | None  #: the task its key names (``None``: a lock on a shared resource)
    value: str  #: the rendered value (hashed values as stored: ``head~digest``)
    holders: tuple[str, ...]  #: the task ids holding it
    ttl: float | None  #: seconds left of its lease (the soonest holder's, for a lock)
    fence: int | None  #: the last fence given (a lock)
    waiting: int  #: jobs waiting in its line (a lock)
    #: A lock's holders' leases left, in seconds, in ``holders``' order: negative when it
    #: ran out that long ago (its worker died, or froze). Empty for a queueing lock, whose
    #: holder is a job in the queue or running, which Redis cannot tell apart.
    leases: tuple[float, ...] = ()
    #: A queueing lock taken and not yet published (its short lease: the separate path).
    publishing: bool = False

    def holder_status(self) -> tuple[str, ...]:
        """Each holder's status: ``"alive"`` (its lease is being renewed: a worker runs it),
        ``"lease expired"`` (nothing renewed it: its worker died or froze; the next
        sweep, or :func:`release` with ``dead=True``, gives the lock on), ``"publishing"``
        (a queueing lock whose message is being published: on its short lease until
        then), ``"unknown"`` (a queueing lock's holder, queued or running)."""
        if self.kind == "queueing":
            return ("publishing" if self.publishing else "unknown",) * len(self.holders)
        return tuple("alive" if left > 0 else "lease expired" for left in self.leases)

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON takes them (what ``celery unique locks --json`` prints)."""
        return {"key": self.key, "kind": self.kind, "task": self.task, "value": self.value,
                "holders": list(self.holders), "ttl": self.ttl, "fence": self.fence,
                "waiting": self.waiting, "status": list(self.holder_status()),
                "lease_left": None if self.kind == "queueing" else list(self.leases)}


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A job in a lock's line."""

    task_id: str
    place: int  #: 0 is first
    parked: bool  #: its message is kept in Redis (else it is on its way to a worker)
    task: str | None  #: its task name, read from its parked message


@dataclasses.dataclass(frozen=True)
class LockDetail(LockInfo):
    """One lock in full: :class:`LockInfo` and its line, in order."""

    line: tuple[Waiting, ...] = ()


def _prefix(app: Celery) -> str:
    return str(setting(app, "unique_key_prefix"))


def _splitter(app: Celery, scoped: bool) -> Any:
    """``task:value`` as the key built it, the longest registered task name first; a
    lock's tag names a task only for ``lock=True`` (``scoped``: a queueing lock's always)."""
    names = set(app.tasks.keys())
    # Task names with a colon inside: only those can make the first colon the wrong one.
    colons = sorted((n for n in names if ":" in n), key=len, reverse=True)

    def split(tag: str) -> tuple[str | None, str]:
        for name in colons:
            if tag.startswith(f"{name}:"):
                return name, tag[len(name) + 1:]
        head, sep, rest = tag.partition(":")
        if sep and (scoped or head in names):
            return head, rest
        return None, tag

    return split


def iter_locks(app: Celery, *, match: str | None = None, task: str | None = None,
               kind: str | None = None, page: int = _PAGE) -> Iterator[LockInfo]:
    """Every lock of ``app``'s store, a page at a time, in the order ``SCAN`` finds them.

    ``match``: a glob on the value or the key; ``task``: the task a key names;
    ``kind``: ``"queueing"``, ``"lock"`` or ``"rate"``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    store = get_store(app)
    # One pass over the keyspace for both kinds: a scan costs the size of the whole
    # keyspace however few keys match, so a pass per kind would double the listing.
    letter = {"queueing": "q", "lock": "l", "rate": "r", None: "[qlr]"}[kind]
    pattern = f"{glob_escape(_prefix(app))}:{letter}:{{{glob_escape(task) + ':' if task else ''}*"
    for keys in _pages(store.client, pattern, page):
        for info in _infos(app, store, list(_entries(app, keys))):
            if _wanted(info, match, task):
                yield info


def _wanted(info: LockInfo, match: str | None, task: str | None) -> bool:
    if task is not None and info.task != task:
        return False
    return match is None or fnmatch.fnmatchcase(info.value, match) or fnmatch.fnmatchcase(
        info.key, match)


def _pages(client: Any, pattern: str, page: int) -> Iterator[list[str]]:
    if isinstance(client, RedisCluster):  # a cursor per node: redis-py walks them
        keys = client.scan_iter(match=pattern, count=page)
        while batch := [text(k) for k in itertools.islice(keys, page)]:
            yield batch
        return
    cursor: Any = 0
    while True:
        cursor, keys = client.scan(cursor, match=pattern, count=page)
        if keys:
            yield [text(k) for k in keys]
        if int(cursor) == 0:
            return


def _entries(app: Celery, keys: list[str]) -> Iterator[tuple[str, str]]:
    """The locks among scanned keys, as ``(letter, key)`` (the letters of ``READ_LOCKS``):
    a queueing lock by its key, a lock by its holders key or, when it has none, its line;
    its other keys (parked, seq, arrival) and the sweepers' registry are passed over."""
    queueing, locks = f"{_prefix(app)}:q:{{", (f"{_prefix(app)}:l:{{", f"{_prefix(app)}:r:{{")
    for key in keys:
        if key.startswith(queueing):
            if key.endswith("}"):
                yield "q", key
        elif key.startswith(locks):
            if key.endswith("}:holders"):
                yield "h", key[: -len(":holders")]
            elif key.endswith("}:line"):
                yield "l", key[: -len(":line")]


def _infos(app: Celery, store: Store, entries: list[tuple[str, str]]) -> list[LockInfo]:
    """The locks ``entries`` name, read in one command (:meth:`Store.read_locks`); those
    gone since the scan, or listed by their holders, left out."""
    if not entries:
        return []
    now_ms, rows = store.read_locks(entries)
    prefix = _prefix(app)
    queueing = _splitter(app, scoped=True)
    shared = _splitter(app, scoped=False)
    out = []
    for (letter, key), row in zip(entries, rows):
        if row is None:
            continue
        if letter == "q":
            name, value = queueing(key[len(prefix) + 4:-1])
            pttl = int(row[1])
            out.append(LockInfo(key, "queueing", name, value, (row[0],),
                                pttl / 1000 if pttl >= 0 else None, None, 0,
                                publishing=row[2] == "1"))
            continue
        name, value = shared(key[len(prefix) + 4:-1])
        leases = tuple(round((float(d) - now_ms) / 1000, 3) for d in row[3::2])
        kind = "rate" if key.startswith(f"{prefix}:r:") else "lock"
        out.append(LockInfo(key, kind, name, value, tuple(row[2::2]),
                            max(0.0, min(leases)) if leases else None,
                            int(row[1]) if row[1] else None, int(row[0]), leases))
    return out


def get_lock(app: Celery, key_or_value: str) -> LockDetail | None:
    """One lock in full, by its key (as :func:`iter_locks` gives it) or its value."""
    store = get_store(app)
    prefix = _prefix(app)
    key = key_or_value
    lock = key.startswith((f"{prefix}:l:", f"{prefix}:r:"))
    for suffix in _SUFFIXES:
        if lock and key.endswith(suffix):
            key = key[: -len(suffix)]
    if key.startswith(f"{prefix}:q:"):
        found = _infos(app, store, [("q", key)])
    elif lock:
        found = _infos(app, store, [("h", key)])
    else:  # a value: the locks of any task with that value
        found = [i for i in iter_locks(app) if i.value == key_or_value]
    if not found:
        return None
    info = found[0]
    return LockDetail(**dataclasses.asdict(info), line=tuple(_line(store, info)))


def _line(store: Store, info: LockInfo) -> Iterator[Waiting]:
    if info.kind == "queueing":
        return
    for place, (token, message) in enumerate(store.line(info.key)):
        yield Waiting(token, place, message is not None,
                      _task_of(message) if message is not None else None)


def _task_of(message: str) -> str | None:
    """The task name in a parked message (kombu's own, or a Celery signature)."""
    try:
        return decode_parked(message).task_name()
    except Exception:
        return None


def release(app: Celery, key: str, *, dead: bool = False) -> int:
    """Release the lock ``key``: a queueing lock is deleted; a lock's holders are released
    as their own end would release them (its first waiting jobs are handed the lock and
    published). Returns how many holders were released (0: nothing was held).

    ``dead``: only the holders whose lease has run out (a lock's; a queueing lock's holder
    cannot be told dead, and is left alone), as the workers' sweep would.
    """
    store = get_store(app)
    prefix = _prefix(app)
    if key.startswith(f"{prefix}:q:"):
        return 0 if dead else int(store.client.delete(key))
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    if not key.startswith((f"{prefix}:l:", f"{prefix}:r:")):
        raise KeyError(f"not a key of celery-unique's (prefix {prefix!r}): {key!r}")
    # The lock's limit and lease, as the sweepers' registry has them (else defaults).
    entry = store.registered(registry_key(_prefix(app)), key)
    limit, lease_ms = (entry.limit, entry.lease_ms) if entry else (
        1, int(float(setting(app, "unique_lock_timeout")) * 1000))
    released = 0
    if dead:
        info = get_lock(app, key)
        expired = [h for h, left in zip(info.holders, info.leases) if left <= 0] if info else []
        swept = store.sweep_lock(key, limit=limit, lease_ms=lease_ms)  # drops them all
        publish_woken(app, store, swept.woken)
        return len(expired)
    for token in store.holders(key) or [""]:
        # With no holder, a release of nobody still hands free places to parked jobs.
        reply = store.release_lock(key, token=token, limit=limit, lease_ms=lease_ms)
        released += reply.held
        publish_woken(app, store, reply.woken)
    return released


def clear(app: Celery, *, match: str | None = None, task: str | None = None,
          kind: str | None = None, dead: bool = False) -> int:
    """Release every lock :func:`iter_locks` lists with these filters; returns how many.
    ``dead``: only the locks with a holder whose lease ran out, only those holders."""
    count = 0
    for info in iter_locks(app, match=match, task=task, kind=kind):
        if dead and "lease expired" not in info.holder_status():
            continue
        release(app, info.key, dead=dead)
        count += 1
    return count

