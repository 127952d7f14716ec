"""The store: one app's Redis client, the scripts it runs there, and the connections it
keeps between commands."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from redis.cluster import RedisCluster

from .exceptions import ConfigurationError, LockStoreUnavailable
from .scripts import (
    ACQUIRE_QUEUEING_LOCK,
    ENTER_LINE,
    LOCK_PRELUDE,
    LOCK_SCRIPTS,
    PEEK_QUEUEING_LOCK,
    PUSH_WITH_LOCKS,
    READ_LOCKS,
    RELEASE_LOCK,
    line_keys,
    lock_keys,
)
from .settings import redis_url, safe_url, setting

__all__ = ["Pending", "Store", "get_store", "use_store"]

logger = logging.getLogger(__name__)

_HELD_KEYS_MAX = 1024

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ThreadConnections:
    """Our pool's connections, each thread keeping the one it used for its next command.

    Checking one out of redis-py's pool costs a health check (about 10 µs), a tenth of
    an enqueue's whole cost. At most half the pool's bound is kept, so idle threads never
    use the pool up; a thread that ends gives its connection back (its locals go with it).
    """

    def __init__(self, pool: Any, pool_args: tuple[str, ...]) -> None:
        self.pool, self._pool_args = pool, pool_args
        self.cap = int(getattr(pool, "max_connections", 0) or 0) // 2
        self._lock = threading.RLock()  # re-entrant: a slot's __del__ may run inside
        self._reset()

    def _reset(self) -> None:
        self.pid, self.kept, self._local = os.getpid(), 0, threading.local()

    def take(self) -> Any:
        """A connection for one command: the thread's own, else one of the pool's."""
        slot = getattr(self._local, "slot", None)
        if slot is not None and slot.conn is not None and self.pid == os.getpid():
            conn, slot.conn = slot.conn, None
            return conn
        return self.pool.get_connection(*self._pool_args)

    def give_back(self, conn: Any) -> None:
        """Keep ``conn`` as the thread's own, or return it to the pool."""
        if self.pid != os.getpid():
            # Forked: the parent's kept sockets are never used, nor returned, here.
            with self._lock:
                self._reset()
        slot = getattr(self._local, "slot", None)
        if slot is None:
            with self._lock:
                if self.kept < self.cap:
                    self.kept += 1
                    slot = self._local.slot = _Slot(self)
        if slot is None or slot.conn is not None:
            self.pool.release(conn)  # over the cap, or a second command sent ahead
        else:
            slot.conn = conn

    def _dropped(self, slot: _Slot) -> None:
        with self._lock:
            self.kept -= 1
        if slot.conn is not None:
            self.pool.release(slot.conn)


class _Slot:
    """A thread's kept connection; dropped with the thread's locals when it ends."""

    __slots__ = ("conn", "owner", "pid")

    def __init__(self, owner: ThreadConnections) -> None:
        self.owner, self.conn, self.pid = owner, None, os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid() and self.owner.pid == self.pid:
            with contextlib.suppress(Exception):  # interpreter shutdown
                self.owner._dropped(self)


#: The attribute holding the connection an owner keeps (see :meth:`Store.run_on`).
_KEPT_ON = "_celery_unique_conn"


def _unkeep(owner: Any, pool: Any) -> Any:
    """The connection of ``pool`` that ``owner`` kept, taken from it; or None."""
    # An owner without a __dict__ (a kombu channel with __slots__ one day) keeps nothing.
    kept = getattr(owner, "__dict__", {}).pop(_KEPT_ON, None)
    if kept is None or kept[2] != os.getpid():
        return None  # nothing kept, or kept before a fork: the parent's socket
    if kept[0] is not pool:  # the owner's pool was replaced (kombu reconnected)
        kept[0].release(kept[1])
        return None
    return kept[1]


def _keep(owner: Any, pool: Any, conn: Any) -> None:
    """Keep ``conn`` on ``owner`` for its next call, or give it back to ``pool``."""
    # setdefault, not a check then a set: two threads misusing one owner keep only one.
    attrs = getattr(owner, "__dict__", None)
    if attrs is None or attrs.setdefault(_KEPT_ON, (pool, conn, os.getpid()))[1] is not conn:
        pool.release(conn)


class Pending:
    """A script whose command is sent now and whose reply is read later.

    The round trip then overlaps whatever the caller does in between (Celery building
    its message). :meth:`result` reads the reply once; a connection error, or a script
    the server does not know yet, falls back to the synchronous call. Every script sent
    this way is safe to repeat.
    """

    __slots__ = ("_args", "_conn", "_conns", "_keys", "_parse", "_reply", "_script", "_store")

    def __init__(self, store: Store, script: Any, keys: list[str], args: list[Any],
                 parse: Callable[[Any], Any]) -> None:
        self._store, self._script, self._keys, self._args = store, script, keys, args
        self._parse = parse
        #: The connection the command was sent on, and where it goes back (:meth:`send`).
        self._conn: Any = None
        self._conns: Any = None
        self._reply: Any = _UNREAD

    def result(self) -> Any:
        """The parsed reply."""
        if self._reply is not _UNREAD:
            return self._reply
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                reply = conn.read_response()
            except redis.ResponseError:  # NOSCRIPT: the server restarted or was flushed
                self._conns.give_back(conn)
            except BaseException as exc:
                # A broken connection must not be used again with a reply unread.
                conn.disconnect()
                self._conns.give_back(conn)
                if not isinstance(exc, Exception):
                    raise
            else:
                self._conns.give_back(conn)
                self._reply = self._parse(reply)
                return self._reply
        self._reply = self._parse(self._store.run(self._script, self._keys, self._args))
        return self._reply

    def settle(self) -> Any:
        """Read the reply if still unread; None when it cannot be read. Never raises."""
        if self._reply is _UNREAD and self._conn is None:
            return None  # reading it failed, and the caller has been told
        try:
            return self.result()
        except Exception:
            logger.exception("celery-unique: could not read the reply for %s", self._keys)
            return None


_UNREAD = object()


def acquire_reply(token: str, ttl_ms: int) -> Callable[[Any], tuple[bool, str, int]]:
    def parse(reply: Any) -> tuple[bool, str, int]:
        if reply is None:
            return True, token, ttl_ms
        return False, _text(reply[0]), int(reply[1])
    return parse


def _same(reply: Any) -> Any:
    return reply


class Store:
    """The Redis client and scripts for one app; methods are one round trip each."""

    def __init__(self, client: Any, url: str, options: dict[str, Any] | None = None, *,
                 pinned: bool = False) -> None:
        self.client, self.url, self.options = client, url, options
        #: A Redis Cluster client: no script touches keys of two hash slots.
        self.cluster = isinstance(client, RedisCluster)
        #: A pinned store (tests: fakeredis) is kept whatever the app's settings say.
        self.pinned = pinned
        #: The ``unique_redis_client`` factory that made the client, if one did.
        self.factory: Any = None
        self.acquire_queueing = client.register_script(ACQUIRE_QUEUEING_LOCK)
        self._release = client.register_script(RELEASE_LOCK)
        self.lock_scripts = {name: client.register_script(LOCK_PRELUDE + body)
                             for name, body in LOCK_SCRIPTS.items()}
        self.enter_line = client.register_script(ENTER_LINE)
        #: Run on kombu's connection by the broker hook (``client=``), not on ours.
        self.push_script = client.register_script(PUSH_WITH_LOCKS)
        self._peek = client.register_script(PEEK_QUEUEING_LOCK)
        self.read_locks = client.register_script(READ_LOCKS)
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
        #: Sending ahead takes its connections here.
        self.conns = (None if self.pool is None
                      else ThreadConnections(self.pool, self._pool_args))

    @classmethod
    def from_url(cls, url: str, options: dict[str, Any] | None = None, *,
                 cluster: bool = False) -> Store:
        """A store for ``url``: ``redis://``, ``rediss://`` (TLS: ``ssl_*`` in ``options``),
        ``unix://``, or Sentinel in kombu's spelling (``sentinel://h:26379;sentinel://h2``,
        ``master_name`` in ``options``)."""
        if url.startswith("sentinel://"):
            return cls(_sentinel_master(url, dict(options or {})), url, options)
        client_class = RedisCluster if cluster else redis.Redis
        return cls(client_class.from_url(url, **(options or {})), url, options)

    @classmethod
    def from_client(cls, client: Any) -> Store:
        """A store over an existing client (fakeredis in unit tests), kept by its app."""
        return cls(client, "(given client)", pinned=True)

    # -- the queueing lock ------------------------------------------------------------

    def acquire_queueing_lock(self, key: str, token: str, ttl_ms: int) -> tuple[bool, str, int]:
        """Take ``key`` for ``token``; else return ``(False, holder, pttl_ms)``."""
        reply = self.run(self.acquire_queueing, [key], [token, ttl_ms])
        return acquire_reply(token, ttl_ms)(reply)

    def send_acquire_now(self, key: str, token: str, ttl_ms: int) -> Pending:
        """:meth:`acquire_queueing_lock`, its reply already read."""
        pending = Pending(self, self.acquire_queueing, [key], [token, ttl_ms],
                          acquire_reply(token, ttl_ms))
        pending.result()
        return pending

    def send_acquire(self, key: str, token: str, ttl_ms: int) -> Pending:
        """Send :meth:`acquire_queueing_lock` now and read its reply later."""
        return self.send(self.acquire_queueing, [key], [token, ttl_ms],
                         acquire_reply(token, ttl_ms))

    def send_peek(self, key: str, token: str) -> Pending:
        """Send :data:`PEEK_QUEUEING_LOCK` now; its reply parses as an acquire's."""
        return self.send(self._peek, [key], [token], acquire_reply(token, 0))

    def remember_held(self, key: str) -> None:
        """Note that ``key`` was found held (bounded: the oldest is dropped)."""
        held = self.held_keys
        held[key] = None
        if len(held) > _HELD_KEYS_MAX:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del held[next(iter(held))]

    def release(self, key: str, token: str) -> bool:
        """Delete ``key`` if ``token`` holds it."""
        return bool(self.run(self._release, [key], [token]))

    # -- the execution lock -----------------------------------------------------------

    def send_enter_line(self, base: str, token: str, wait_ms: int) -> Pending:
        """Send :data:`ENTER_LINE` for the lock ``base`` now; read its reply later."""
        return self.send(self.enter_line, line_keys(base), [token, wait_ms], _same)

    def lock(self, name: str, base: str, args: list[Any], queueing_key: str | None = None,
             queue: str | None = None, registry: str | None = None) -> Any:
        """Run the lock script ``name`` (see :data:`LOCK_SCRIPTS`) on the lock ``base``.

        ``queueing_key``: the job's queueing lock, released when ``acquire`` takes the lock;
        ``queue``: the calling job's queue, where parked kombu messages are pushed;
        ``registry``: the sweepers' registry, where ``park`` registers the lock. None of
        them on a Cluster: they live in other slots.
        """
        keys = lock_keys(base)
        if not self.cluster:
            keys.append(queue or "")
            if queueing_key or registry:
                keys.append(queueing_key or registry or "")
        reply = self.run(self.lock_scripts[name], keys, args)
        if queueing_key and self.cluster and reply[0] == 1:
            # On a cluster the two keys live in different slots, which one script may not
            # touch: one more round trip, still owner-checked. The lock is taken by now,
            # so a failure here is logged, and the queueing lock's lease runs out.
            release_quietly(self, queueing_key, args[0], "lock taken")
        return reply

    # -- plumbing ---------------------------------------------------------------------

    def send(self, script: Any, keys: list[str], args: list[Any],
             parse: Callable[[Any], Any]) -> Pending:
        """Send ``script`` now on a connection of its own; :meth:`Pending.result` reads."""
        conns = self.conns
        pending = Pending(self, script, keys, args, parse)
        if conns is None:
            pending.result()
            return pending
        try:
            conn = conns.take()
        except _CONNECTION_ERRORS:
            pending.result()
            return pending
        try:
            conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except Exception:
            # A stale connection (the server restarted): the client's own retry decides.
            conn.disconnect()
            conns.give_back(conn)
            pending.result()
            return pending
        pending._conn, pending._conns = conn, conns
        return pending

    def run_on(self, client: Any, script: Any, keys: list[str], args: list[Any],
               owner: Any = None) -> Any:
        """Run ``script`` on another client's server (kombu's, for the broker hook).

        The command goes straight onto one of the client's pooled connections: a client
        call costs more than the lock's own work. ``owner``, an object used by one thread
        at a time (kombu's channel, lent by Celery's producer pool), keeps the connection
        between calls: checking one out costs a health check. Never a thread: kombu's
        channel lends 10 connections, to every thread that publishes on it. Anything but
        a clean reply goes through the client's own call, with its retries (a script
        repeated is safe).
        """
        pool = client.connection_pool
        conn = _unkeep(owner, pool)
        try:
            if conn is None:
                conn = pool.get_connection(*self._pool_args)
        except _CONNECTION_ERRORS:
            return script(keys=keys, args=args, client=client)
        try:
            conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
            reply = conn.read_response()
        except redis.ResponseError:  # NOSCRIPT: the server restarted or was flushed
            _keep(owner, pool, conn)
            return script(keys=keys, args=args, client=client)
        except BaseException as exc:
            conn.disconnect()  # a reply may be left unread: never used again as it is
            pool.release(conn)
            if isinstance(exc, _CONNECTION_ERRORS):  # a stale connection: the client retries
                return script(keys=keys, args=args, client=client)
            raise
        _keep(owner, pool, conn)
        return reply

    def run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args, client=self.client)
        except _CONNECTION_ERRORS as exc:
            raise LockStoreUnavailable(
                f"cannot reach the lock store at {safe_url(self.url)}: {exc}",
                url=safe_url(self.url),
            ) from exc


def _sentinel_master(url: str, options: dict[str, Any]) -> Any:
    """The master's client through Sentinel: it follows a failover (redis-py asks the
    sentinels again on a connection error or a READONLY reply)."""
    from redis import sentinel as redis_sentinel

    master_name = options.pop("master_name", None)
    if not master_name:
        raise ConfigurationError(
            f"{safe_url(url)}: a Sentinel URL needs master_name (in unique_redis_options,"
            " or broker_transport_options when the lock store is the broker)",
            option="master_name")
    sentinel_kwargs = options.pop("sentinel_kwargs", None)
    hosts, db, password = [], 0, None
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        hosts.append((parsed.hostname or "localhost", parsed.port or 26379))
        if parsed.path.strip("/").isdigit():
            db = int(parsed.path.strip("/"))
        password = password or parsed.password
    options.setdefault("db", db)
    if password:
        options.setdefault("password", password)
    sentinel_class: Any = redis_sentinel.Sentinel
    sentinels = sentinel_class(hosts, sentinel_kwargs=sentinel_kwargs, **options)
    return sentinels.master_for(master_name, **options)


_stores: weakref.WeakKeyDictionary[Celery, Store] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
#: Bumped whenever an app is given another store: tasks keep theirs until it changes
#: (reading the settings on every enqueue would cost more than the lock's own work).
generation = 0


def get_store(app: Celery) -> Store:
    """The app's store, made on first use (after a fork too: redis-py's pool resets)."""
    url = redis_url(app)
    options = setting(app, "unique_redis_options")
    cluster = bool(setting(app, "unique_redis_cluster"))
    factory = setting(app, "unique_redis_client")
    if url.startswith("sentinel://") and not app.conf.get("unique_redis_url"):
        # The broker's Sentinel: its master_name (and sentinel_kwargs) are kombu's.
        transport = app.conf.broker_transport_options or {}
        options = {**{k: transport[k] for k in ("master_name", "sentinel_kwargs")
                      if k in transport}, **(options or {})}
    store = _stores.get(app)
    # A changed setting (tests, a reconfigured app) builds a new client, not a stale one.
    if store is None or not (store.pinned or (store.url, store.options, store.cluster,
                                              store.factory) == (url, options, cluster,
                                                                 factory)):
        with _lock:
            if factory is not None:
                # Anything else (a proxy, a custom connection class): the user's client.
                store = Store(factory(app), url, options)
                store.factory = factory
            else:
                store = Store.from_url(url, options, cluster=cluster)
            _set_store(app, store)
    return store


def use_store(app: Celery, store: Store | None) -> None:
    """Make ``app`` use ``store`` (tests); ``None``: the one its settings name again."""
    _set_store(app, store)


def _set_store(app: Celery, store: Store | None) -> None:
    global generation
    if store is None:
        _stores.pop(app, None)
    else:
        _stores[app] = store
    generation += 1


def release_quietly(store: Store, key: str, token: str, why: str) -> None:
    """Release, logging instead of raising: used on paths that must not fail the job."""
    try:
        store.release(key, token)
    except Exception:
        logger.exception("celery-unique: could not release %s (%s) for %s", key, why, token)
