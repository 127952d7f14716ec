"""The lock store: one app's Redis client, with the scripts (:class:`Scripts`) and the
plain commands the sweepers and the operator's listing read with; and the app's store
(:func:`get_store`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from celery import Celery
from redis.cluster import RedisCluster

from .exceptions import ConfigurationError
from .keys import glob_escape, lock_keys
from .scripts import Scripts, read_keys, text
from .settings import redis_url, safe_url, setting
from .state import app_state, every_app
from .wire import RegistryEntry

__all__ = ["Store", "get_store", "store_of", "use_store"]

logger = logging.getLogger(__name__)


class Store(Scripts):
    """The Redis client and scripts for one app."""

    def __init__(self, client: Any, url: str, options: dict[str, Any] | None = None, *,
                 pinned: bool = False) -> None:
        super().__init__(client, url)
        self.options = options
        #: A pinned store (tests: fakeredis) is kept whatever the app's settings say.
        self.pinned = pinned
        #: The ``unique_redis_client`` factory that made the client, if one did.
        self.factory: Any = None

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

    # -- the sweepers' registry (plain commands) ----------------------------------------

    def register(self, registry: str, entry: RegistryEntry) -> None:
        """Register a lock for the sweepers from here (a Cluster: :meth:`park` cannot)."""
        self.client.zadd(registry, {entry.member(): time.time() * 1000 + entry.lease_ms})

    def due_locks(self, registry: str, until_ms: float, count: int = 100
                  ) -> list[tuple[str, RegistryEntry, float]]:
        """The registered locks due for a sweep by ``until_ms``: ``(member, entry, due)``."""
        members = self.client.zrangebyscore(registry, "-inf", until_ms, start=0, num=count,
                                            withscores=True)
        return [(text(m), RegistryEntry.parse(text(m)), float(due)) for m, due in members]

    def reschedule(self, registry: str, member: str, at_ms: float | None) -> None:
        """Look at a registered lock again at ``at_ms``; None: unregister it."""
        if at_ms is None:
            self.client.zrem(registry, member)
        else:
            self.client.zadd(registry, {member: at_ms})

    def registered(self, registry: str, base: str) -> RegistryEntry | None:
        """The registry's entry for the lock ``base``, if it has one."""
        suffix = RegistryEntry.suffix(base)
        for member, _ in self.client.zscan_iter(registry, match=f"*{glob_escape(suffix)}"):
            if text(member).endswith(suffix):
                return RegistryEntry.parse(text(member))
        return None

    # -- the operator's listing ---------------------------------------------------------

    def read_locks(self, entries: list[tuple[str, str]]) -> tuple[int, list[list[str] | None]]:
        """:meth:`Scripts.read_locks`; on a Cluster, whose page of keys spans slots, one
        pipeline of plain commands."""
        if self.cluster:
            return self._read_pipelined(entries)
        return super().read_locks(entries)

    def _read_pipelined(self, entries: list[tuple[str, str]]
                        ) -> tuple[int, list[list[str] | None]]:
        pipe = self.client.pipeline(transaction=False)
        for letter, key in entries:
            keys = read_keys(letter, key)
            if letter == "q":
                pipe.get(key).pttl(key).exists(keys[1])
            else:
                pipe.zrange(keys[0], 0, -1, withscores=True).zcard(keys[1]).get(keys[2])
        seconds, micros = self.client.time()
        replies = iter(pipe.execute())
        rows: list[list[str] | None] = []
        for letter, _ in entries:
            if letter == "q":
                holder, pttl, publishing = next(replies), next(replies), next(replies)
                rows.append([text(holder), str(pttl), str(publishing)] if holder else None)
                continue
            held, waiting, seq = next(replies), next(replies), next(replies)
            if (letter == "l" and held) or not (held or waiting):
                rows.append(None)
                continue
            flat = [str(x) if isinstance(x, float) else text(x) for pair in held for x in pair]
            rows.append([str(waiting), text(seq) if seq else "", *flat])
        return int(seconds) * 1000 + int(micros) // 1000, rows

    def line(self, base: str) -> Iterator[tuple[str, str | None]]:
        """The line of the lock ``base`` in order: ``(token, parked message or None)``."""
        _, line, parked, *_ = lock_keys(base)
        for token in self.client.zrange(line, 0, -1):
            message = self.client.hget(parked, token)
            yield text(token), None if message is None else text(message)

    def holders(self, base: str) -> list[str]:
        """The tokens holding the lock ``base``."""
        return [text(t) for t in self.client.zrange(lock_keys(base)[0], 0, -1)]


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


# -- the app's store ---------------------------------------------------------------------

_lock = threading.Lock()


def store_of(app: Celery) -> Store:
    """The app's store as last made: the settings are read again only when a task was
    bound since (reading them costs more than the lock's own work)."""
    if every_app:
        return cast(Store, every_app[-1])
    state = app_state(app)
    store: Store | None = state.store
    if store is None or state.stale:
        return get_store(app)
    return store


def get_store(app: Celery) -> Store:
    """The app's store, made on first use, and made again when its settings changed
    (after a fork redis-py's pool resets by itself)."""
    if every_app:  # a test's store, for every app (celery_unique.testing)
        return cast(Store, every_app[-1])
    state = app_state(app)
    store: Store | None = state.store
    if store is not None and store.pinned:  # a test's store, whatever the settings say
        state.stale = False
        return store
    factory = setting(app, "unique_redis_client")
    # A client of the user's own needs no URL: it is only shown.
    url = redis_url(app) if factory is None else str(
        app.conf.get("unique_redis_url") or "(unique_redis_client)")
    options = setting(app, "unique_redis_options")
    cluster = bool(setting(app, "unique_redis_cluster"))
    if url.startswith("sentinel://") and not app.conf.get("unique_redis_url"):
        # The broker's Sentinel: its master_name (and sentinel_kwargs) are kombu's.
        transport = app.conf.broker_transport_options or {}
        options = {**{k: transport[k] for k in ("master_name", "sentinel_kwargs")
                      if k in transport}, **(options or {})}
    settings = (url, options, cluster, factory)
    # A changed setting (tests, a reconfigured app) builds a new client, not a stale one.
    if store is None or state.settings != settings:
        with _lock:
            if factory is not None:
                # Anything else (a proxy, a custom connection class): the user's client.
                store = Store(factory(app), url, options)
                store.factory = factory
            else:
                store = Store.from_url(url, options, cluster=cluster)
            state.store, state.settings = store, settings
    state.stale = False
    return store


def use_store(app: Celery, store: Store | None) -> Store | None:
    """Make ``app`` use ``store`` (tests); ``None``: the one its settings name again.
    Returns the store it used before (None: none made yet)."""
    state = app_state(app)
    before: Store | None = state.store
    state.store, state.settings, state.stale = store, None, store is None
    return before
