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
import json
from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu.serialization import loads

from .lock import _publish_woken, waiting_key
from .scripts import Store, get_store, lock_keys
from .settings import setting

__all__ = ["LockDetail", "LockInfo", "Waiting", "clear", "get_lock", "iter_locks", "release"]

KINDS = ("queueing", "lock")
_SUFFIXES = (":holders", ":line", ":parked", ":seq", ":arrival")
_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """One lock as Redis holds it now."""

    key: str  #: what :func:`get_lock` and :func:`release` take
    kind: str  #: ``"queueing"`` or ``"lock"``
    task: str | None  #: the task its key names (``None``: a lock on a shared resource)
    value: str  #: the rendered value (hashed values as stored: ``head~digest``)
    holders: tuple[str, ...]  #: the task ids holding it
    ttl: float | None  #: seconds left of its lease (the soonest holder's, for a lock)
    fence: int | None  #: the last fence given (a lock)
    waiting: int  #: jobs waiting in its line (a lock)

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON takes them (what ``celery unique locks --json`` prints)."""
        return {"key": self.key, "kind": self.kind, "task": self.task, "value": self.value,
                "holders": list(self.holders), "ttl": self.ttl, "fence": self.fence,
                "waiting": self.waiting}


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


def _glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def iter_locks(app: Celery, *, match: str | None = None, task: str | None = None,
               kind: str | None = None, page: int = _PAGE) -> Iterator[LockInfo]:
    """Every lock of ``app``'s store, a page at a time.

    ``match``: a glob on the value or the key; ``task``: the task a key names;
    ``kind``: ``"queueing"`` or ``"lock"``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    store = get_store(app)
    if kind in (None, "queueing"):
        yield from _queueing(app, store, match, task, page)
    if kind in (None, "lock"):
        yield from _locks(app, store, match, task, page)


def _wanted(info: LockInfo, match: str | None, task: str | None) -> bool:
    if task is not None and info.task != task:
        return False
    return match is None or fnmatch.fnmatchcase(info.value, match) or fnmatch.fnmatchcase(
        info.key, match)


def _pages(client: Any, pattern: str, page: int) -> Iterator[list[str]]:
    cursor: Any = 0
    while True:
        cursor, keys = client.scan(cursor, match=pattern, count=page)
        if keys:
            yield [_text(k) for k in keys]
        if int(cursor) == 0:
            return


def _queueing(app: Celery, store: Store, match: str | None, task: str | None, page: int
              ) -> Iterator[LockInfo]:
    base = f"{_prefix(app)}:q:{{"
    pattern = f"{_glob(base)}{_glob(task)}:*" if task else f"{_glob(base)}*"
    for keys in _pages(store.client, pattern, page):
        for info in _queueing_infos(app, store, keys):
            if _wanted(info, match, task):
                yield info


def _queueing_infos(app: Celery, store: Store, keys: list[str]) -> list[LockInfo]:
    if store.cluster:  # keys of many slots: a pipeline
        pipe = store.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key).pttl(key)
        flat = pipe.execute()
        rows = [(_text(flat[i] or b""), int(flat[i + 1])) for i in range(0, len(flat), 2)]
    else:
        text = _text(store.run(store.read_queueing, keys, []))
        rows = [(holder, int(pttl)) for holder, pttl in
                (line.split("\0") for line in text.split("\n"))] if keys else []
    skip = len(f"{_prefix(app)}:q:{{")
    split = _splitter(app, scoped=True)
    out = []
    for key, (holder, pttl) in zip(keys, rows):
        if not holder:
            continue  # released since the page was read
        name, value = split(key[skip:-1])
        out.append(LockInfo(key, "queueing", name, value, (holder,),
                            pttl / 1000 if pttl >= 0 else None, None, 0))
    return out


def _locks(app: Celery, store: Store, match: str | None, task: str | None, page: int
           ) -> Iterator[LockInfo]:
    base = f"{_prefix(app)}:l:{{"
    head = f"{_glob(base)}{_glob(task)}:*" if task else f"{_glob(base)}*"
    # A lock is held (holders) or waited for (line); one waited for and held is listed
    # with its holders, so the second pass skips the bases that have holders.
    for suffix, other in ((":holders", None), (":line", ":holders")):
        for keys in _pages(store.client, f"{head}}}{suffix}", page):
            bases = [k[: -len(suffix)] for k in keys]
            for info in _lock_infos(app, store, bases, skip_if=other):
                if _wanted(info, match, task):
                    yield info


def _lock_infos(app: Celery, store: Store, bases: list[str], skip_if: str | None = None
                ) -> list[LockInfo]:
    client = store.client
    if skip_if:  # the second pass: locks already listed with their holders
        pipe = client.pipeline(transaction=False)
        for b in bases:
            pipe.exists(f"{b}{skip_if}")
        bases = [b for b, listed in zip(bases, pipe.execute()) if not listed]
    keys = [k for b in bases for k in _read_keys(b)]
    if store.cluster:
        pipe = client.pipeline(transaction=False)
        seconds, micros = client.time()
        replies: list[Any] = [int(seconds) * 1000 + int(micros) // 1000]
        for i in range(0, len(keys), 3):
            pipe.zrange(keys[i], 0, -1, withscores=True).zcard(keys[i + 1]).get(keys[i + 2])
        for i, r in enumerate(pipe.execute()):
            replies.append([x for pair in r for x in pair] if i % 3 == 0 else r)
    else:
        replies = list(store.run(store.read_locks, keys, []))
    now_ms = int(replies[0])
    prefix = f"{_prefix(app)}:l:{{"
    split = _splitter(app, scoped=False)
    out = []
    for i, b in enumerate(bases):
        flat, waiting, seq = replies[1 + 3 * i: 4 + 3 * i]
        if not flat and not waiting:
            continue  # released since the page was read
        name, value = split(b[len(prefix):-1])
        holders = [_text(t) for t in flat[0::2]]
        soonest = min((float(d) for d in flat[1::2]), default=None)
        out.append(LockInfo(b, "lock", name, value, tuple(holders),
                            max(0.0, (soonest - now_ms) / 1000) if soonest else None,
                            int(seq) if seq not in (None, False) else None, int(waiting)))
    return out


def _read_keys(base: str) -> list[str]:
    holders, line, _, seq, _ = lock_keys(base)
    return [holders, line, seq]


def get_lock(app: Celery, key_or_value: str) -> LockDetail | None:
    """One lock in full, by its key (as :func:`iter_locks` gives it) or its value."""
    store = get_store(app)
    prefix = _prefix(app)
    key = key_or_value
    for suffix in _SUFFIXES:
        if key.startswith(f"{prefix}:l:") and key.endswith(suffix):
            key = key[: -len(suffix)]
    if key.startswith(f"{prefix}:q:"):
        found = _queueing_infos(app, store, [key])
    elif key.startswith(f"{prefix}:l:"):
        found = list(_lock_infos(app, store, [key]))
    else:  # a value: the locks of any task with that value
        found = [i for i in iter_locks(app) if i.value == key_or_value]
    if not found:
        return None
    info = found[0]
    return LockDetail(**dataclasses.asdict(info), line=tuple(_line(store, info)))


def _line(store: Store, info: LockInfo) -> Iterator[Waiting]:
    if info.kind != "lock":
        return
    _, line, parked, _, _ = lock_keys(info.key)
    for place, token in enumerate(store.client.zrange(line, 0, -1)):
        message = store.client.hget(parked, token)
        yield Waiting(_text(token), place, message is not None,
                      _task_of(_text(message)) if message is not None else None)


def _task_of(message: str) -> str | None:
    """The task name in a parked message (kombu's own, or a Celery signature)."""
    try:
        if message.startswith("\x01"):
            return str(json.loads(message.split("\n", 1)[1])["headers"]["task"])
        content_type, encoding, data = message.split("\n", 2)
        raw: Any = data.encode("latin-1") if encoding == "binary" else data
        body = loads(raw, content_type, encoding,  # type: ignore[no-untyped-call]
                     accept=[content_type])
        return str(body["task"])
    except Exception:
        return None


def release(app: Celery, key: str) -> int:
    """Release the lock ``key``: a queueing lock is deleted; a lock's holders are released
    as their own end would release them (its first waiting jobs are handed the lock and
    published). Returns how many holders were released (0: nothing was held)."""
    store = get_store(app)
    prefix = _prefix(app)
    if key.startswith(f"{prefix}:q:"):
        return int(store.client.delete(key))
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    if not key.startswith(f"{prefix}:l:"):
        raise KeyError(f"not a key of celery-unique's (prefix {prefix!r}): {key!r}")
    limit, lease_ms = _limits(app, store, key)
    holders = [_text(t) for t in store.client.zrange(lock_keys(key)[0], 0, -1)]
    released = 0
    for token in holders or [""]:
        # With no holder, a release of nobody still hands free places to parked jobs.
        reply = store.lock("release", key, [token, limit, lease_ms])
        released += int(reply[0])
        _publish_woken(app, reply[1:], store)
    return released


def _limits(app: Celery, store: Store, base: str) -> tuple[int, int]:
    """The lock's limit and lease, as the sweepers' registry has them (else defaults)."""
    suffix = f"|{base}"
    for member in store.client.zscan_iter(waiting_key(app), match=f"*{_glob(suffix)}"):
        name = _text(member[0])
        if name.endswith(suffix):
            limit, lease, _ = name.split("|", 2)
            return int(limit), int(lease)
    return 1, int(float(setting(app, "unique_lock_timeout")) * 1000)


def clear(app: Celery, *, match: str | None = None, task: str | None = None,
          kind: str | None = None) -> int:
    """Release every lock :func:`iter_locks` lists with these filters; returns how many."""
    count = 0
    for info in iter_locks(app, match=match, task=task, kind=kind):
        release(app, info.key)
        count += 1
    return count

