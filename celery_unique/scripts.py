"""The Lua scripts that touch Redis, and the store that runs them.

Each check-then-write is one script run with EVALSHA (redis-py loads it on the first
NOSCRIPT), every key goes through ``KEYS`` (Redis Cluster), TTLs are in milliseconds and
every lock's value is its owner's token (the job's task id).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import weakref
from typing import Any

import redis
from celery import Celery

from .exceptions import LockStoreUnavailable
from .settings import redis_url, safe_url, setting

__all__ = ["ACQUIRE_QUEUEING_LOCK", "RELEASE_LOCK", "PendingAcquire", "Store", "get_store"]

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

_HELD_KEYS_MAX = 1024

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PendingAcquire:
    """A queueing-lock acquire whose command is sent and whose reply is read later.

    The round trip then overlaps whatever the caller does in between (Celery building
    its message). :meth:`result` reads the reply once; a connection error, or a script
    the server does not know yet, falls back to the synchronous call, which is safe to
    repeat: the script renews a lock its own token holds.
    """

    __slots__ = ("_conn", "_key", "_pool", "_reply", "_store", "_token", "_ttl_ms")

    def __init__(self, store: Store, pool: Any, conn: Any, key: str, token: str,
                 ttl_ms: int) -> None:
        self._store, self._pool, self._conn = store, pool, conn
        self._key, self._token, self._ttl_ms = key, token, ttl_ms
        self._reply: tuple[bool, str, int] | None = None

    @classmethod
    def done(cls, store: Store, reply: tuple[bool, str, int]) -> PendingAcquire:
        pending = cls(store, None, None, "", "", 0)
        pending._reply = reply
        return pending

    def result(self) -> tuple[bool, str, int]:
        """``(True, token, ttl_ms)`` when taken, else ``(False, holder, pttl_ms)``."""
        if self._reply is not None:
            return self._reply
        conn, self._conn = self._conn, None
        try:
            reply = conn.read_response()
        except redis.ResponseError:  # NOSCRIPT: the server restarted or was flushed
            self._pool.release(conn)
        except BaseException as exc:
            # A broken connection must not go back to the pool with a reply unread.
            conn.disconnect()
            self._pool.release(conn)
            if not isinstance(exc, Exception):
                raise
        else:
            self._pool.release(conn)
            self._reply = _acquire_reply(reply, self._token, self._ttl_ms)
            return self._reply
        self._reply = self._store.acquire_queueing_lock(self._key, self._token, self._ttl_ms)
        return self._reply

    def settle(self) -> bool:
        """Read the reply if still unread; whether the lock is ours. Never raises."""
        if self._reply is None and self._conn is None:
            return False  # reading it failed, and the caller has been told
        try:
            return self.result()[0]
        except Exception:
            logger.exception("celery-unique: could not read the reply for %s", self._key)
            return False


def _acquire_reply(reply: Any, token: str, ttl_ms: int) -> tuple[bool, str, int]:
    if reply is None:
        return True, token, ttl_ms
    return False, _text(reply[0]), int(reply[1])


class Store:
    """The Redis client and scripts for one app; methods are one round trip each."""

    def __init__(self, client: Any, url: str, options: dict[str, Any] | None = None, *,
                 pinned: bool = False) -> None:
        self.client, self.url, self.options = client, url, options
        #: A pinned store (tests: fakeredis) is kept whatever the app's settings say.
        self.pinned = pinned
        self._acquire_queueing = client.register_script(ACQUIRE_QUEUEING_LOCK)
        self._release = client.register_script(RELEASE_LOCK)
        #: Keys recently found held (an ordered set): a hint of where to wait for the
        #: next reply on them, never a decision; a key is dropped when next taken.
        self.held_keys: dict[str, None] = {}
        # Sending ahead needs a connection of our own from the pool, which a
        # single-connection client does not lend.
        self.pool = None if getattr(client, "connection", None) else getattr(
            client, "connection_pool", None)
        # redis-py < 5.1 requires a command name that later versions deprecate.
        self._pool_args: tuple[str, ...] = ()
        if self.pool is not None:
            param = inspect.signature(self.pool.get_connection).parameters.get("command_name")
            if param is not None and param.default is inspect.Parameter.empty:
                self._pool_args = ("EVALSHA",)

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
        return _acquire_reply(reply, token, ttl_ms)

    def send_acquire_now(self, key: str, token: str, ttl_ms: int) -> PendingAcquire:
        """:meth:`acquire_queueing_lock`, its reply already read."""
        return PendingAcquire.done(self, self.acquire_queueing_lock(key, token, ttl_ms))

    def send_acquire(self, key: str, token: str, ttl_ms: int) -> PendingAcquire:
        """Send :meth:`acquire_queueing_lock` now and read its reply later."""
        pool = self.pool
        if pool is None:
            return PendingAcquire.done(self, self.acquire_queueing_lock(key, token, ttl_ms))
        try:
            conn = pool.get_connection(*self._pool_args)
        except _CONNECTION_ERRORS:
            return PendingAcquire.done(self, self.acquire_queueing_lock(key, token, ttl_ms))
        try:
            conn.send_command("EVALSHA", self._acquire_queueing.sha, 1, key, token, ttl_ms)
        except Exception:
            # A stale connection (the server restarted): the client's own retry decides.
            conn.disconnect()
            pool.release(conn)
            return PendingAcquire.done(self, self.acquire_queueing_lock(key, token, ttl_ms))
        return PendingAcquire(self, pool, conn, key, token, ttl_ms)

    def remember_held(self, key: str) -> None:
        """Note that ``key`` was found held (bounded: the oldest is dropped)."""
        held = self.held_keys
        held[key] = None
        if len(held) > _HELD_KEYS_MAX:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del held[next(iter(held))]

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
