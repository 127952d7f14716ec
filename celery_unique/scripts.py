"""The Lua scripts that touch Redis, and the store that runs them.

Each check-then-write is one script run with EVALSHA (redis-py loads it on the first
NOSCRIPT), every key goes through ``KEYS`` (Redis Cluster), TTLs are in milliseconds and
every lock's value is its owner's token (the job's task id).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import redis
from celery import Celery

from .exceptions import LockStoreUnavailable
from .settings import redis_url, safe_url, setting

__all__ = ["ACQUIRE_QUEUEING_LOCK", "RELEASE_LOCK", "Store", "get_store"]

logger = logging.getLogger(__name__)

#: KEYS[1]: the queueing lock's key.
#: ARGV[1]: the owner's token (the job's task id); ARGV[2]: the lease in milliseconds.
#: Returns nil when taken, or already held by this owner (its lease is renewed: a retry
#: re-takes its own lock); else ``{holder's token, holder's PTTL in ms}``. (nil is the
#: cheapest reply to parse, and acceptance is the hot path.)
ACQUIRE_QUEUEING_LOCK = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return {holder, redis.call('PTTL', KEYS[1])}
"""

#: KEYS[1]: a lock's key. ARGV[1]: the owner's token.
#: Returns 1 when deleted, 0 when the key is gone or held by another owner (whose lock is
#: left alone: a job whose lease expired never deletes its successor's lock).
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    """The Redis client and scripts for one app; methods are one round trip each."""

    def __init__(self, client: Any, url: str, options: dict[str, Any] | None = None, *,
                 pinned: bool = False) -> None:
        self.client, self.url, self.options = client, url, options
        #: A pinned store (tests: fakeredis) is kept whatever the app's settings say.
        self.pinned = pinned
        self._acquire_queueing = client.register_script(ACQUIRE_QUEUEING_LOCK)
        self._release = client.register_script(RELEASE_LOCK)

    @classmethod
    def from_url(cls, url: str, options: dict[str, Any] | None = None) -> Store:
        return cls(redis.Redis.from_url(url, **(options or {})), url, options)

    @classmethod
    def from_client(cls, client: Any) -> Store:
        """A store over an existing client (fakeredis in unit tests), kept by its app."""
        return cls(client, "(given client)", pinned=True)

    def acquire_queueing_lock(self, key: str, token: str, ttl_ms: int) -> tuple[bool, str, int]:
        """Take ``key`` for ``token``; else return ``(False, holder, pttl_ms)``."""
        reply = self._run(self._acquire_queueing, [key], [token, ttl_ms])
        if reply is None:
            return True, token, ttl_ms
        return False, _text(reply[0]), int(reply[1])

    def release(self, key: str, token: str) -> bool:
        """Delete ``key`` if ``token`` holds it."""
        return bool(self._run(self._release, [key], [token]))

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args, client=self.client)
        except _CONNECTION_ERRORS as exc:
            raise LockStoreUnavailable(
                f"cannot reach the lock store at {safe_url(self.url)}: {exc}",
                url=safe_url(self.url),
            ) from exc


_stores: weakref.WeakKeyDictionary[Celery, Store] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def get_store(app: Celery) -> Store:
    """The app's store, made on first use (after a fork too: redis-py's pool resets)."""
    url = redis_url(app)
    options = setting(app, "unique_redis_options")
    store = _stores.get(app)
    # A changed setting (tests, a reconfigured app) builds a new client, not a stale one.
    if store is None or not (store.pinned or (store.url, store.options) == (url, options)):
        with _lock:
            store = _stores[app] = Store.from_url(url, options)
    return store


def use_store(app: Celery, store: Store) -> None:
    """Make ``app`` use ``store`` (tests)."""
    _stores[app] = store


def release_quietly(store: Store, key: str, token: str, why: str) -> None:
    """Release, logging instead of raising: used on paths that must not fail the job."""
    try:
        store.release(key, token)
    except Exception:
        logger.exception("celery-unique: could not release %s (%s) for %s", key, why, token)
