"""The broker hook: a message and its locks pushed in one Lua script, a message built to
be parked, and a parked job published again.

When the broker is kombu's Redis transport and the lock store is the same server and
database, the message is not pushed by kombu's ``Channel._put`` (one ``LPUSH``) but by
:meth:`~celery_unique.store.Store.push_with_locks`, which takes the queueing lock, takes
the job's place in line and pushes the message, or does nothing for a duplicate. A
caller that dies mid-enqueue then leaves both or neither, and the lock costs no round
trip.

The hook acts only on the message whose id the current thread asked it to push
(:class:`pushing`); every other message goes through kombu's own ``_put`` untouched. It
is installed the first time an app is found able to use it, never at import.

Both sides stand on this module: the caller's (the push), the worker's (the capture of a
message to park, the wake of parked jobs) and the operator's (a release hands the lock on).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.canvas import Signature
from celery.result import AsyncResult
from kombu.serialization import dumps
from kombu.utils import json as kombu_json

from .exceptions import LockStoreUnavailable
from .scripts import Duplicate, GatedProducer, GatedRouter, Woken
from .settings import safe_url
from .signals import report_store_unavailable
from .state import app_state
from .store import Store
from .wire import HEADER, Lock, ParkedMessage, ParkedSignature, decode_parked, set_queue

__all__ = ["INTERNALS", "Captured", "Duplicate", "Push", "atomic", "capture", "publish_woken",
           "pushing"]

logger = logging.getLogger(__name__)

#: Every internal of kombu or Celery this package relies on, and what for. Each is pinned
#: by ``tests/unit/test_internals.py``, which fails naming the one a new version changed.
INTERNALS: dict[str, str] = {
    "kombu.transport.redis.Channel._put": "replaced by the hook: the atomic enqueue",
    "kombu.transport.redis.Channel._put_fanout": "replaced: locks taken before the put",
    "kombu.transport.redis.Channel._q_for_pri": "the queue key the hook pushes onto",
    "kombu.transport.redis.Channel._get_message_priority": "the same",
    "kombu.transport.redis.Channel._expires": "queues with x-expires: kombu's own put",
    "kombu.transport.redis.Channel._put(_publish_batch=)": "a batch: kombu's own put",
    "celery.backends.redis.ResultConsumer.cancel_for":
        "a refused push forgets Celery's subscription to its result",
    "celery.app.amqp: the router is called before the producer is used":
        "the reply of a lock sent ahead is read there",
    "celery.worker.request.Request.request_dict": "the job's header, in the main process",
    "celery.worker.request.Request._context": "a retry on worker loss keeps its lock",
    "celery.worker.request.Request._retry_worker_lost": "the same (Celery >= 5.7)",
    "celery._state.default_app": "the command's app when none is given",
    "celery._state._get_active_apps": "the test plugin's eager() reaches every app",
    "celery.worker.consumer.Consumer.on_decode_error": (
        "looked up on the consumer for each message: an undecodable job frees its locks"),
}

Publish = Callable[..., AsyncResult]

# kombu's Redis transport serializes a message with this before its LPUSH.
_dumps: Callable[[Any], str] = kombu_json.dumps


class Captured(Exception):
    """Internal: a message built to be parked, stopped before kombu pushes it."""


class Push:
    """One message's locks, taken with its publish: in the script that pushes it where
    kombu would (:meth:`atomic`, ``Channel._put``), else by commands sent ahead and read
    while Celery builds the message (:meth:`separate`).

    ``queueing_key``/``ttl_ms``: the queueing lock to take (or None); ``line``: the lock
    whose line the job enters (or None). ``capture``: build the message, keep it, push
    nothing. ``publish_ms``: off the atomic path, the queueing lock's lease until the
    message is published (then ``ttl_ms``), so that a caller dying in between leaves a
    lock that frees itself soon; 0: ``ttl_ms`` from the start. ``replace``: the queueing
    lock is taken from a holder that has not started, which is then replaced
    (:attr:`replaced` names it once published). ``lock_check``: nothing is published
    while this execution lock is held (``lock_check_at_enqueue``). ``park_in``: the
    sweepers' registry, when ``line`` is a rate limit's: on the atomic path a job that
    would wait for its turn is parked there at once, never pushed (:attr:`parked`).
    """

    __slots__ = (
        "capture",
        "captured",
        "line",
        "lock_check",
        "park_in",
        "parked",
        "publish_ms",
        "pushed",
        "queueing_key",
        "refused",
        "replace",
        "replaced",
        "store",
        "task_id",
        "ttl_ms",
    )

    def __init__(self, store: Store, task_id: str, queueing_key: str | None = None,
                 ttl_ms: int = 0, line: Lock | None = None, capture: bool = False,
                 publish_ms: int = 0, replace: bool = False, lock_check: Lock | None = None,
                 park_in: str | None = None) -> None:
        self.store, self.task_id = store, task_id
        self.queueing_key, self.ttl_ms, self.line = queueing_key, ttl_ms, line
        self.capture, self.publish_ms, self.replace = capture, publish_ms, replace
        self.captured: str | None = None
        self.pushed = self.refused = self.parked = False
        self.replaced = ""
        self.lock_check, self.park_in = lock_check, park_in

    def publish(self, app: Celery, publish: Publish, producer: Any, options: dict[str, Any],
                *, eager: bool, held: bool, task: Task, on_store_error: str) -> AsyncResult:
        """Publish through the path chosen for the app and store (``held``: the key was
        found held moments ago); a store outage as ``on_store_error`` says."""
        metrics = app_state(app).metrics
        try:
            # A ``connection`` of the caller's own may be another server's: the safe path.
            if not (eager or options.get("connection")) and atomic(app, self.store):
                result = self.atomic(app, publish, options, peek=held, task=task)
            else:
                result = self.separate(app, publish, producer, options, eager=eager,
                                       at_router=held or bool(options.get("connection")))
        except LockStoreUnavailable as exc:
            allow = on_store_error == "allow"
            metrics.store_error(task, "enqueue", "allowed" if allow else "raised")
            if not allow:
                raise
            # Chosen: published without its locks, and said.
            report_store_unavailable(task, "enqueue", self.task_id, exc)
            options["headers"] = {k: v for k, v in options["headers"].items() if k != HEADER}
            options.pop("router", None)
            return publish(self.task_id, producer)
        if self.queueing_key:
            metrics.queued(task)
        return result

    def atomic(self, app: Celery, publish: Publish, options: dict[str, Any], *,
               peek: bool, task: Task) -> AsyncResult:
        """Publish, the locks taken by the push script; ``peek``: the key was found held
        moments ago (duplicates come in bursts): a peek is sent now and read when Celery
        routes the message, before it builds it. A hint of a duplicate, never a decision
        to accept: the push decides."""
        sent = None
        if peek and self.queueing_key:
            sent = peeked = self.store.send_peek_queueing_lock(self.queueing_key, self.task_id)
            options["router"] = GatedRouter(options.get("router") or app.amqp.router,
                                            lambda: peeked.result().check())
        try:
            with pushing(self):
                result = publish(self.task_id)
        except Duplicate:
            consumer: Any = getattr(task.backend, "result_consumer", None)
            if self.refused and hasattr(consumer, "cancel_for"):
                # Celery subscribed to the job's result before the push was refused (the
                # Redis result backend): nobody will ever publish that result.
                with contextlib.suppress(Exception):
                    consumer.cancel_for(self.task_id)
            raise
        finally:
            if sent is not None:
                sent.settle()
        if not self.pushed:
            # Nothing came through kombu's Redis put, which every exchange type of kombu's
            # Redis transport calls: a kombu that publishes some other way. The locks are
            # taken now, late rather than never, and it is said once.
            _warn_unpushed(app, task.name)
            self.replaced = self.store.take_locks(
                self.task_id, self.queueing_key, self.ttl_ms, self.line,
                "1" if self.replace else "", self.lock_check).check()
        return result

    def separate(self, app: Celery, publish: Publish, producer: Any,
                 options: dict[str, Any], *, eager: bool, at_router: bool) -> AsyncResult:
        """Publish, the locks taken first (:class:`~celery_unique.scripts.Reservation`):
        sent now, read when Celery first uses the producer, once the message is built,
        so that the round trip overlaps Celery's work; or at routing, before it builds it
        (``at_router``: a key found held moments ago, or a message Celery sends on a
        ``connection`` of the caller's). Eager mode runs the job in the caller, without
        routing or producer: the reply is read first."""
        locks = self.store.reserve(self.task_id, self.queueing_key, self.ttl_ms, self.line,
                                   publish_ms=self.publish_ms, now=eager, replace=self.replace,
                                   lock_check=self.lock_check)
        woken: list[Woken] = []
        try:
            if eager:
                locks.check()
                result = publish(self.task_id)
            elif at_router:
                options["router"] = GatedRouter(options.get("router") or app.amqp.router,
                                                locks.check)
                result = publish(self.task_id)
            else:
                # The full lease as soon as kombu has published (not after Celery's
                # after_task_publish): the window a killed caller may hit, the smallest.
                with app.producer_or_acquire(producer) as real_producer:
                    result = publish(self.task_id, GatedProducer(real_producer, locks))
            locks.published()  # unless the producer's publish did
            self.replaced = locks.replaced
        except Duplicate:
            raise
        except BaseException:
            # The message was not published (or, in eager mode, the job raised): its locks
            # would otherwise block others until their leases run out.
            woken = locks.undo()
            raise
        finally:
            locks.settle()
            if woken:
                publish_woken(app, self.store, woken)
        return result

    def put(self, channel: Any, queue: str, message: dict[str, Any], kwargs: Any) -> Any:
        """Push ``message`` onto ``queue`` with its locks, or raise :class:`Duplicate`."""
        key = channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
        plain = kwargs.get("_publish_batch") is not None or queue in (
            getattr(channel, "_expires", None) or ())
        same = not plain and _same_server(channel, self.store)
        info = message["headers"].get(HEADER)
        if same and isinstance(info, dict):
            # The job's own queue, for the release that hands its lock on: a job parked
            # from this queue is pushed back onto it inside the release script, which
            # runs on the lock store: only where that is this queue's server and user.
            set_queue(info, key)
        if self.capture:
            if plain:
                # A queue with x-expires or a batch: not one LPUSH a script could redo.
                # Nothing is pushed; the job is parked as a signature instead.
                raise Captured()
            message["properties"]["delivery_tag"] = ParkedMessage.captured_tag(self.task_id)
            self.captured = ParkedMessage(key, _dumps(message)).encode()
            raise Captured()
        if not same:
            # More to do than one LPUSH (a publish batch, queue expiry), or another
            # server: the locks first, then kombu's own put.
            self.take()
            return _kombu.put(channel, queue, message, **kwargs)
        if self.park_in is not None:
            # It may be parked as it is (the script decides): under the tag a parked
            # message carries, replaced at each push.
            message["properties"]["delivery_tag"] = ParkedMessage.captured_tag(self.task_id)
        with channel.conn_or_acquire() as client:
            # The channel is this thread's until the publish ends: it keeps the connection.
            taken = self.store.push_with_locks(
                client, channel, queue=key, message=_dumps(message), token=self.task_id,
                queueing_key=self.queueing_key, ttl_ms=self.ttl_ms, line=self.line,
                replace=self.replace, lock_check=self.lock_check, park_in=self.park_in)
        self.refused = not taken.taken
        self.replaced = taken.check()
        self.pushed, self.parked = True, taken.parked

    def take(self, check: bool = True) -> None:
        """Take the locks with the store's own commands (kombu pushes the message);
        ``check``: raise :class:`Duplicate` when the queueing lock is held."""
        taken = self.store.take_locks(self.task_id, self.queueing_key, self.ttl_ms, self.line,
                                      "1" if self.replace and check else "",
                                      self.lock_check if check else None)
        if check:
            self.refused = not taken.taken
            self.replaced = taken.check()
        self.pushed = True


def _warn_unpushed(app: Celery, name: str) -> None:
    warned = app_state(app).warned
    if name not in warned:
        warned.add(name)
        logger.warning("celery-unique: %s was published without kombu's Redis put: its"
                       " locks were taken after the publish (please report this kombu"
                       " version)", name)


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
        return _kombu.put(self, queue, message, **kwargs)
    return push.put(self, queue, message, kwargs)


def _put_fanout(self: Any, exchange: str, message: dict[str, Any], routing_key: str,
                **kwargs: Any) -> Any:
    push = getattr(_local, "push", None)
    if push is not None and push.task_id == _message_id(message) and not push.capture:
        push.take()  # a fanout message is not a list push: the locks are taken first
    return _kombu.put_fanout(self, exchange, message, routing_key, **kwargs)


# -- parking and waking ------------------------------------------------------------------

def capture(app: Celery, store: Store, task: Task, sig: Signature) -> str:
    """The job ``sig`` of ``task`` as a parked message (:mod:`celery_unique.wire`): kombu's
    own message, pushed as it is when it is handed the lock (the atomic path), else a
    signature in the task's serializer."""
    if atomic(app, store):
        push = Push(store, sig.id, capture=True)
        try:
            with pushing(push):
                # Not UniqueTask's: the job already holds its queueing lock and its place.
                Task.apply_async(task, sig.args, sig.kwargs, **sig.options)
        except Captured:
            pass
        if push.captured is not None:
            return push.captured
    content_type, encoding, data = dumps(  # type: ignore[no-untyped-call]
        dict(sig), serializer=task.serializer)
    return ParkedSignature.of(content_type, encoding, data).encode()


def publish_woken(app: Celery, store: Store, woken: list[Woken]) -> None:
    """Publish the parked jobs a script handed the lock (those it did not push itself)."""
    parked: list[tuple[str, ParkedMessage | ParkedSignature]] = []
    for token, text in woken:
        if text:  # else pushed onto its queue by the script that woke it
            try:
                parked.append((token, decode_parked(text)))
            except Exception:
                _not_published([token])
    messages = [(token, p) for token, p in parked if isinstance(p, ParkedMessage)]
    if messages:
        # kombu's messages for another queue than the caller's: pushed from here, under a
        # fresh delivery tag, at the head of their queue, the front of the line last, as
        # the script would; all in one round trip (a sweep hands on a rate limit's starts
        # many at once: one by one, the last waited for the others' round trips).
        try:
            with store.client.pipeline(transaction=False) as pipe:
                for token, message in reversed(messages):
                    pipe.rpush(message.queue, message.fresh_body(token))
                pipe.execute()
        except Exception:
            _not_published([token for token, _ in messages])
    for token, signature in parked:
        if isinstance(signature, ParkedSignature):
            try:
                sig = Signature(signature.signature(), app=app)
                # Task.apply_async, not UniqueTask's: the job holds its queueing lock and
                # its lock already.
                Task.apply_async(app.tasks[sig.task], sig.args, sig.kwargs, **sig.options)
            except Exception:
                _not_published([token])


def _not_published(tokens: list[str]) -> None:
    # Their places are kept: the lease they were handed runs out, and they go back to the
    # front of the line, published again by the next release or sweep.
    logger.exception("celery-unique: could not publish %s, handed the lock",
                     ", ".join(tokens))


# -- the decision, once per app and store ------------------------------------------------

class _Kombu:
    """kombu's own puts, kept when the hook replaces them: once per process, as the class
    it patches is."""

    put: Any = None
    put_fanout: Any = None
    lock = threading.Lock()


_kombu = _Kombu()


def atomic(app: Celery, store: Store) -> bool:
    """Whether ``app``'s messages are pushed with their locks: decided once per app and
    store (a changed setting makes a new store), and logged."""
    state = app_state(app)
    choice = state.atomic
    if choice is None or choice[0] is not store:
        why_not = _why_not(app, store)
        choice = state.atomic = (store, why_not is None and _install())
        # Two users on one database are a choice worth saying once; the rest is routine.
        log = logger.info if why_not and "another user" in why_not else logger.debug
        log("celery-unique: %s: locks taken %s", app.main or app, "in the push"
                     " script (atomic enqueue)" if choice[1] else f"before the push ({why_not})")
    return choice[1]


def _why_not(app: Celery, store: Store) -> str | None:
    if store.pinned or store.cluster or store.factory is not None or store.url.startswith(
        "sentinel://"
    ):
        return ("a Redis Cluster lock store" if store.cluster else "a Sentinel lock store"
                if store.url.startswith("sentinel://") else "a lock store given")
    from kombu.transport import redis as kombu_redis

    shape = shape_problem(kombu_redis.Channel)
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
        broker, ours = _identity(connection), store_identity(store)
        if broker[:3] != ours[:3]:
            return (f"the lock store {safe_url(store.url)} is not the broker's server and"
                    " database")
        if broker[3:] != ours[3:]:
            return (f"the lock store {safe_url(store.url)} is the broker's database, reached"
                    " as another user: each keeps to its own keys")
    finally:
        connection.release()
    return None


def shape_problem(channel: Any) -> str | None:
    """What of kombu's Redis channel the hook relies on is missing, if anything."""
    for name in ("_put", "_put_fanout", "_q_for_pri", "_get_message_priority",
                 "conn_or_acquire"):
        if not callable(getattr(channel, name, None)):
            return f"kombu's Redis channel has no {name}()"
    put = _kombu.put or channel._put
    params = list(inspect.signature(put).parameters.values())
    if [p.name for p in params[:3]] != ["self", "queue", "message"] or (
        len(params) != 4 or params[3].kind is not inspect.Parameter.VAR_KEYWORD
    ):
        return f"kombu's Redis Channel._put{inspect.signature(put)} has an unknown shape"
    return None


def _install() -> bool:
    from kombu.transport import redis as kombu_redis

    with _kombu.lock:
        if _kombu.put is None:
            _kombu.put = kombu_redis.Channel._put
            _kombu.put_fanout = kombu_redis.Channel._put_fanout
            setattr(kombu_redis.Channel, "_put", _put)  # noqa: B010 - mypy: a method
            setattr(kombu_redis.Channel, "_put_fanout", _put_fanout)  # noqa: B010
    return True


#: A Redis server, database and user: ``(host, port, db, username, password)``.
Identity = tuple[str, int, int, Any, Any]


def _identity(connection: Any) -> Identity:
    vhost = str(connection.virtual_host or "").strip("/")
    return (str(connection.hostname or "localhost"), int(connection.port or 6379),
            int(vhost) if vhost.isdigit() else 0, connection.userid or None,
            connection.password or None)


def store_identity(store: Store) -> Identity:
    """The store's server and database, parsed as kombu parses a broker URL, and the user
    its client logs in as (the URL's, or ``unique_redis_options``'): a script touching
    both the locks and the queues runs only where one user reaches both."""
    identity: Identity | None = store.__dict__.get("_identity")
    if identity is None:
        from kombu import connection

        parsed: Any = connection.Connection
        host, port, db, user, password = _identity(parsed(store.url))
        given = getattr(getattr(store.client, "connection_pool", None), "connection_kwargs",
                        None) or {}
        identity = store.__dict__["_identity"] = (
            host, port, db, given.get("username") or user, given.get("password") or password)
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
