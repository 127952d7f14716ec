"""The store's connections kept between commands: a pool checkout costs a health check,
a tenth of an enqueue's whole cost."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import redis

__all__ = ["CONNECTION_ERRORS", "UNAVAILABLE_ERRORS", "ThreadConnections", "keep", "unkeep"]

logger = logging.getLogger(__name__)

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
#: A store that cannot answer (:class:`~celery_unique.LockStoreUnavailable`): a connection
#: lost or timed out, or a Redis Cluster that lost a master no replica took over
#: (``CLUSTERDOWN``: the whole cluster, unless ``cluster-require-full-coverage no``; the
#: slots' owner alone then), its retries exhausted.
UNAVAILABLE_ERRORS = (*CONNECTION_ERRORS, redis.exceptions.ClusterDownError,
                      redis.exceptions.ClusterError, redis.exceptions.SlotNotCoveredError,
                      # redis-py 7+: no node of the cluster answers.
                      *(getattr(redis.exceptions, name) for name in
                        ("RedisClusterUnreachableError",) if hasattr(redis.exceptions, name)))


class ThreadConnections:
    """Our pool's connections, each thread keeping the one it used for its next command.

    Checking one out of redis-py's pool costs a health check (about 10 µs), a tenth of
    an enqueue's whole cost. At most half the pool's bound is kept, so idle threads never
    use the pool up; a thread that ends gives its connection back (its locals go with it).
    """

    def __init__(self, pool: Any, pool_args: tuple[str, ...]) -> None:
        self.pool, self._pool_args = pool, pool_args
        self.cap = int(getattr(pool, "max_connections", 0) or 0) // 2
        #: A reply said NOSCRIPT: the server forgot its scripts (a restart, a flush), so a
        #: reply must not be left unread until they are loaded again.
        self.scripts_lost = False
        self._lock = threading.RLock()  # re-entrant: a slot's __del__ may run inside
        self._reset()

    def _reset(self) -> None:
        self.pid, self.kept, self._local = os.getpid(), 0, threading.local()

    def take(self) -> Any:
        """A connection for one command: the thread's own, else one of the pool's."""
        slot = getattr(self._local, "slot", None)
        mine = self.pid == os.getpid()  # after a fork, the parent's sockets stay untouched
        if slot is not None and slot.deferred is not None and mine:
            self._settle(slot)
        if slot is not None and slot.conn is not None and mine:
            conn, slot.conn = slot.conn, None
            return conn
        return self.pool.get_connection(*self._pool_args)

    def defer(self, pending: Any) -> bool:
        """Leave ``pending``'s reply unread until this thread's next command (which reads
        it first: by then it has long arrived) or its end; False when it cannot wait
        (no connection kept for this thread, or one waiting already): read it now."""
        slot = getattr(self._local, "slot", None)
        if slot is None or slot.deferred is not None or self.pid != os.getpid():
            return False
        slot.deferred = pending
        return True

    @staticmethod
    def _settle(slot: _Slot) -> None:
        pending, slot.deferred = slot.deferred, None
        pending.settle()  # gives its connection back: it becomes slot.conn

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
        if slot.deferred is not None:
            # The thread ended with a reply unread: it is never read, so its connection
            # is closed before it goes back (the next user would read it as its own).
            conn = slot.deferred.abandon()
            if conn is not None:
                conn.disconnect()
                self.pool.release(conn)
        if slot.conn is not None:
            self.pool.release(slot.conn)


class _Slot:
    """A thread's kept connection, and a reply left unread on another one (``deferred``);
    dropped with the thread's locals when it ends."""

    __slots__ = ("conn", "deferred", "owner", "pid")

    def __init__(self, owner: ThreadConnections) -> None:
        self.owner, self.conn, self.pid = owner, None, os.getpid()
        self.deferred: Any = None

    def __del__(self) -> None:
        if self.pid == os.getpid() and self.owner.pid == self.pid:
            with contextlib.suppress(Exception):  # interpreter shutdown
                self.owner._dropped(self)


#: The attribute holding the connection an owner keeps (``Store.push_with_locks``).
_KEPT_ON = "_celery_unique_conn"


def unkeep(owner: Any, pool: Any) -> Any:
    """The connection of ``pool`` that ``owner`` kept, taken from it; or None."""
    # An owner without a __dict__ (a kombu channel with __slots__ one day) keeps nothing.
    kept = getattr(owner, "__dict__", {}).pop(_KEPT_ON, None)
    if kept is None or kept[2] != os.getpid():
        return None  # nothing kept, or kept before a fork: the parent's socket
    if kept[0] is not pool:  # the owner's pool was replaced (kombu reconnected)
        kept[0].release(kept[1])
        return None
    return kept[1]


def keep(owner: Any, pool: Any, conn: Any) -> None:
    """Keep ``conn`` on ``owner`` for its next call, or give it back to ``pool``."""
    # setdefault, not a check then a set: two threads misusing one owner keep only one.
    attrs = getattr(owner, "__dict__", None)
    if attrs is None or attrs.setdefault(_KEPT_ON, (pool, conn, os.getpid()))[1] is not conn:
        pool.release(conn)
