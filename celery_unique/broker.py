"""The Redis broker hook: a message and its locks pushed in one Lua script.

When the broker is kombu's Redis transport and the lock store is the same server and
database, the message is not pushed by kombu's ``Channel._put`` (one ``LPUSH``) but by
:data:`~celery_unique.scripts.PUSH_WITH_LOCKS`, which takes the queueing lock, takes the
job's place in line and pushes the message, or does nothing for a duplicate. A caller
that dies mid-enqueue then leaves both or neither, and the lock costs no round trip.

The hook acts only on the message whose id the current thread asked it to push
(:func:`pushing`); every other message goes through kombu's own ``_put`` untouched. It
is installed the first time an app is found able to use it, never at import.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.utils import json as kombu_json

from .settings import safe_url
from .store import Store, acquire_reply

__all__ = ["Captured", "Duplicate", "Push", "atomic", "pushing"]

logger = logging.getLogger(__name__)

# kombu's Redis transport serializes a message with this before its LPUSH.
_dumps: Callable[[Any], str] = kombu_json.dumps

#: The message header carrying a job's locks to the worker: ``{"q": key, "until": mode,
#: "t": lease in ms}``, the lock's fields (:meth:`~celery_unique.lock.Lock.header`) and
#: ``"k"``, the job's queue as the hook pushed it. The worker never rebuilds a key it
#: can read here.
HEADER = "celery_unique"


class Duplicate(Exception):
    """Internal: the queueing lock is held by another job; never leaves apply_async."""

    def __init__(self, holder: str, pttl: int) -> None:
        super().__init__(holder, pttl)
        self.holder, self.pttl = holder, pttl


class Captured(Exception):
    """Internal: a message built to be parked, stopped before kombu pushes it."""


class Push:
    """One message's locks, taken where kombu pushes the message (``Channel._put``).

    ``queueing_key``/``ttl_ms``: the queueing lock to take (or None); ``line``: the lock
    whose line the job enters, as ``(line, seq, arrival)`` keys and the ms it may take
    to reach a worker (or None). ``capture``: build the message, keep it, push nothing.
    """

    __slots__ = ("capture", "captured", "line", "pushed", "queueing_key", "refused",
                 "store", "task_id", "ttl_ms")

    def __init__(self, store: Store, task_id: str, queueing_key: str | None = None,
                 ttl_ms: int = 0, line: tuple[list[str], int] | None = None,
                 capture: bool = False) -> None:
        self.store, self.task_id = store, task_id
        self.queueing_key, self.ttl_ms, self.line = queueing_key, ttl_ms, line
        self.capture = capture
        self.captured: str | None = None
        self.pushed = self.refused = False

    def put(self, channel: Any, queue: str, message: dict[str, Any], kwargs: Any) -> Any:
        """Push ``message`` onto ``queue`` with its locks, or raise :class:`Duplicate`."""
        key = channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
        info = message["headers"].get(HEADER)
        if isinstance(info, dict):
            # The job's own queue, for the release that hands its lock on: a job parked
            # from this queue is pushed back onto it inside the release script.
            info["k"] = key
        plain = kwargs.get("_publish_batch") is not None or queue in (
            getattr(channel, "_expires", None) or ())
        if self.capture:
            if plain:
                # A queue with x-expires or a batch: not one LPUSH a script could redo.
                # Nothing is pushed; the job is parked as a signature instead.
                raise Captured()
            # A tag of the job's own: each push replaces it with a fresh one (a message
            # pushed twice must not share kombu's unacked entry).
            message["properties"]["delivery_tag"] = f"{self.task_id}.cu"
            self.captured = f"\x01{key}\n{_dumps(message)}"
            raise Captured()
        if plain or not _same_server(channel, self.store):
            # More to do than one LPUSH (a publish batch, queue expiry), or another
            # server: the locks first, then kombu's own put.
            self.take()
            return _kombu_put(channel, queue, message, **kwargs)
        keys, args = [key], [_dumps(message), self.task_id, "", ""]
        if self.queueing_key:
            keys.append(self.queueing_key)
            args[2] = str(self.ttl_ms)
        if self.line is not None:
            keys.extend(self.line[0])
            args[3] = str(self.line[1])
        with channel.conn_or_acquire() as client:
            # The channel is this thread's until the publish ends: it keeps the connection.
            reply = self.store.run_on(client, self.store.push_script, keys, args, channel)
        if reply is not None:
            self._refused(reply)
        self.pushed = True

    def take(self) -> None:
        """Take the locks with the store's own commands (kombu pushes the message)."""
        if self.queueing_key:
            reply = self.store.run(self.store.acquire_queueing, [self.queueing_key],
                                   [self.task_id, self.ttl_ms])
            if reply is not None:
                self._refused(reply)
        if self.line is not None:
            self.store.run(self.store.enter_line, self.line[0], [self.task_id, self.line[1]])
        self.pushed = True

    def _refused(self, reply: Any) -> None:
        _, holder, pttl = acquire_reply(self.task_id, self.ttl_ms)(reply)
        self.refused = True
        raise Duplicate(holder, pttl)


_local = threading.local()


class pushing:  # a function to its callers: ``with pushing(push):``
    """Within the block, the message ``push.task_id`` is pushed by :meth:`Push.put`.

    A class, not a generator: this is on every enqueue's path.
    """

    __slots__ = ("_previous", "_push")

    def __init__(self, push: Push) -> None:
        self._push = push

    def __enter__(self) -> Push:
        self._previous = getattr(_local, "push", None)
        _local.push = self._push
        return self._push

    def __exit__(self, *exc: object) -> None:
        _local.push = self._previous


def _message_id(message: dict[str, Any]) -> Any:
    headers = message.get("headers") or {}
    return headers.get("id") or (message.get("properties") or {}).get("correlation_id")


def _put(self: Any, queue: str, message: dict[str, Any], **kwargs: Any) -> Any:
    push = getattr(_local, "push", None)
    if push is None or push.task_id != _message_id(message):
        return _kombu_put(self, queue, message, **kwargs)
    return push.put(self, queue, message, kwargs)


def _put_fanout(self: Any, exchange: str, message: dict[str, Any], routing_key: str,
                **kwargs: Any) -> Any:
    push = getattr(_local, "push", None)
    if push is not None and push.task_id == _message_id(message) and not push.capture:
        push.take()  # a fanout message is not a list push: the locks are taken first
    return _kombu_put_fanout(self, exchange, message, routing_key, **kwargs)


# -- the decision, once per app --------------------------------------------------------

_kombu_put: Any = None
_kombu_put_fanout: Any = None
_install_lock = threading.Lock()
_choices: weakref.WeakKeyDictionary[Celery, tuple[Store, bool]] = (
    weakref.WeakKeyDictionary())


def atomic(app: Celery, store: Store) -> bool:
    """Whether ``app``'s messages are pushed with their locks: decided once per app and
    store (a changed setting makes a new store), and logged."""
    choice = _choices.get(app)
    if choice is None or choice[0] is not store:
        why_not = _why_not(app, store)
        choice = _choices[app] = (store, why_not is None and _install())
        logger.debug("celery-unique: %s: locks taken %s", app.main or app, "in the push"
                     " script (atomic enqueue)" if choice[1] else f"before the push ({why_not})")
    return choice[1]


def _why_not(app: Celery, store: Store) -> str | None:
    if store.pinned or store.cluster or store.factory is not None or store.url.startswith(
        "sentinel://"
    ):
        return ("a Redis Cluster lock store" if store.cluster else "a Sentinel lock store"
                if store.url.startswith("sentinel://") else "a lock store given")
    from kombu.transport import redis as kombu_redis

    shape = _shape_problem(kombu_redis.Channel)
    if shape:
        return shape
    connection = app.connection_for_write()
    try:
        transport = connection.transport
        channel_class = getattr(transport, "Channel", None)
        if not isinstance(transport, kombu_redis.Transport) or isinstance(
            transport, kombu_redis.SentinelTransport
        ) or not isinstance(channel_class, type) or not issubclass(
            channel_class, kombu_redis.Channel
        ) or channel_class._put is not kombu_redis.Channel._put:
            return "the broker is not kombu's Redis transport"
        if (connection.transport_options or {}).get("global_keyprefix"):
            return "the broker has a global_keyprefix"
        if _identity(connection) != store_identity(store):
            return (f"the lock store {safe_url(store.url)} is not the broker's server and"
                    " database")
    finally:
        connection.release()
    return None


def _shape_problem(channel: Any) -> str | None:
    """What of kombu's Redis channel the hook relies on is missing, if anything."""
    for name in ("_put", "_put_fanout", "_q_for_pri", "_get_message_priority",
                 "conn_or_acquire"):
        if not callable(getattr(channel, name, None)):
            return f"kombu's Redis channel has no {name}()"
    put = _kombu_put or channel._put
    params = list(inspect.signature(put).parameters.values())
    if [p.name for p in params[:3]] != ["self", "queue", "message"] or (
        len(params) != 4 or params[3].kind is not inspect.Parameter.VAR_KEYWORD
    ):
        return f"kombu's Redis Channel._put{inspect.signature(put)} has an unknown shape"
    return None


def _install() -> bool:
    global _kombu_put, _kombu_put_fanout
    from kombu.transport import redis as kombu_redis

    with _install_lock:
        if _kombu_put is None:
            _kombu_put = kombu_redis.Channel._put
            _kombu_put_fanout = kombu_redis.Channel._put_fanout
            setattr(kombu_redis.Channel, "_put", _put)  # noqa: B010 - mypy: a method
            setattr(kombu_redis.Channel, "_put_fanout", _put_fanout)  # noqa: B010
    return True


def _identity(connection: Any) -> tuple[str, int, int]:
    vhost = str(connection.virtual_host or "").strip("/")
    return (str(connection.hostname or "localhost"), int(connection.port or 6379),
            int(vhost) if vhost.isdigit() else 0)


def store_identity(store: Store) -> tuple[str, int, int]:
    """The store's (host, port, db), parsed as kombu parses a broker URL."""
    identity: tuple[str, int, int] | None = store.__dict__.get("_identity")
    if identity is None:
        from kombu import connection

        parsed: Any = connection.Connection
        identity = store.__dict__["_identity"] = _identity(parsed(store.url))
    return identity


def _same_server(channel: Any, store: Store) -> bool:
    """Whether ``channel`` (a producer's, maybe given by the caller) is the store's."""
    same = channel.__dict__.get("_celery_unique_same")
    if same is None:
        try:
            same = _identity(channel.connection.client) == store_identity(store)
        except Exception:  # pragma: no cover - an unknown channel: the safe path
            same = False
        channel.__dict__["_celery_unique_same"] = same
    return bool(same)

